"""Runs inside the sandbox child: isolate, limit, drop privileges, run the program, then its tests.

Started as ``python -I _sandbox_runner.py CONFIG_JSON`` with the sandbox folder as working
directory. Only the standard library is used, and every step happens before a line of the
program runs, so the program inherits all of them.

A pass is written by this harness, never by the program: after the program *and every line of its
tests* ran without an exception, the harness writes ``pass <nonce>`` to a pipe the parent reads.
The nonce comes through a second pipe that is read and closed before the program starts, so it is
in no file, argument or environment variable the program could read. ``sys.exit(0)``,
``os._exit(0)`` or an ``atexit`` hook before the asserts therefore end the process without the
marker, and the parent scores a failure whatever the exit status.
"""

import builtins
import ctypes
import io
import json
import os
import resource
import sys
import types

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
MNT_DETACH = 2
#: pivot_root has no libc wrapper; its number differs by architecture (a missing one falls back to chroot).
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
#: Device files a Python program may need (os.devnull, randomness); nothing else of /dev is shown.
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
OLD_ROOT = "/.exme-old-root"
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
PROGRAM_MODULE = "exme_program"


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> bool:
    try:
        return _libc().unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _enter_namespaces(want_net: bool) -> tuple[bool, bool]:
    """(mount namespace, network namespace) entered. As root directly; otherwise in a new user
    namespace that maps the current uid and gid to themselves (the program keeps its uid)."""
    net = CLONE_NEWNET if want_net else 0
    if os.getuid() == 0:
        if _unshare(CLONE_NEWNS | net):
            return True, bool(net)
        return False, bool(net) and _unshare(net)
    uid, gid = os.getuid(), os.getgid()
    if not _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET):
        return False, False
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    except OSError:
        return False, True
    return True, True


def _minimal_root(libc, workdir: str, view: list) -> None:
    """Make a fresh tmpfs the root, holding only bind mounts of ``view`` (the interpreter, its standard
    library, the shared libraries they load) and a few device files; the rest of the host's tree is
    detached. Built on the work folder (a new, empty folder), so no host path is hidden while binding.
    """
    new = workdir.rstrip("/")
    _check(libc.mount(b"tmpfs", new.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755"), "mount the new root")
    # The host's top-level links (/lib -> usr/lib on merged-/usr systems), so library paths resolve the same way.
    for entry in os.listdir("/"):
        if os.path.islink("/" + entry):
            os.symlink(os.readlink("/" + entry), new + "/" + entry)
    for path in [*view, *DEVICES]:
        if not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        dest = new + real
        if os.path.isdir(real):
            os.makedirs(dest, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if not os.path.exists(dest):
                open(dest, "w").close()
        if libc.mount(real.encode(), dest.encode(), None, MS_BIND | MS_REC, None) != 0 and path not in DEVICES:
            err = ctypes.get_errno()
            raise OSError(err, f"bind {real}: {os.strerror(err)}")
        if real != path and not os.path.lexists(new + path):  # the interpreter's own (venv) name for it
            os.makedirs(os.path.dirname(new + path), exist_ok=True)
            os.symlink(real, new + path)
    for folder in (*TEMP_DIRS, workdir):
        os.makedirs(new + folder, exist_ok=True)
    os.makedirs(new + OLD_ROOT)
    import platform

    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is not None and libc.syscall(number, new.encode(), (new + OLD_ROOT).encode()) == 0:
        os.chdir("/")
        _check(libc.umount2(OLD_ROOT.encode(), MNT_DETACH), "detach the old root")
        os.rmdir(OLD_ROOT)
    else:  # no pivot_root (an initramfs root): chroot, which the dropped capabilities make final
        os.chdir(new)
        os.chroot(new)
        os.chdir("/")


def _private_filesystem(workdir: str, owner: int, tmpfs_mb: int, view: list | None = None) -> None:
    """Everything read-only; fresh, size-limited tmpfs over the temp folders and the work folder.

    With ``view`` the root holds only those paths (see :func:`_minimal_root`): the program can read
    the interpreter, its standard library and its own folder, and nothing else of the host.
    The mounts live in this process's own mount namespace: the host never sees them, and they
    vanish with the last process of the sandbox.
    """
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    if view:
        _minimal_root(libc, workdir, view)
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
           "make every mount read-only (mount_setattr)")
    size = f"size={tmpfs_mb}m".encode()
    for folder in TEMP_DIRS:
        if os.path.isdir(folder) and not os.path.islink(folder):
            _check(libc.mount(b"tmpfs", folder.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, size + b",mode=1777"),
                   f"mount tmpfs on {folder}")
    os.makedirs(workdir, exist_ok=True)
    data = size + f",mode=0700,uid={owner},gid={owner}".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, data), "mount tmpfs on the work folder")
    os.chdir(workdir)  # the old working directory is the read-only one underneath


def _limit(cfg: dict) -> None:
    limits = {
        resource.RLIMIT_AS: cfg["memory_bytes"],
        resource.RLIMIT_CPU: cfg["cpu_seconds"],
        resource.RLIMIT_FSIZE: cfg["file_bytes"],
        resource.RLIMIT_NPROC: cfg["max_procs"],
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NOFILE: 64,
    }
    for which, value in limits.items():
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            soft, hard = resource.getrlimit(which)
            capped = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (capped, hard))


def _drop_privileges(uid: int) -> None:
    """As root: become an unused uid, so file permissions and RLIMIT_NPROC apply (root ignores both)."""
    if os.getuid() == 0 and uid:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _drop_capabilities() -> None:
    """Hold no capability: no undoing the mounts or namespaces, no overriding file permissions.

    Needed for uid 0 that could not switch uid, and after entering a user namespace (which grants
    every capability inside it). RLIMIT_NPROC still does not bind uid 0 of the initial user
    namespace, so for that case process creation is also blocked at the Python level."""
    libc = _libc()
    PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed: cannot drop capabilities")


def _block_processes() -> None:
    """Best effort where RLIMIT_NPROC cannot hold (uid 0): no fork, exec or spawn from Python."""

    def _no_processes(*args, **kwargs):
        raise PermissionError("creating processes is disabled in the exme sandbox")

    names = ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp",
             "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe")
    for name in names:
        if hasattr(os, name):
            setattr(os, name, _no_processes)
    import _posixsubprocess
    import subprocess

    _posixsubprocess.fork_exec = _no_processes
    subprocess.Popen.__init__ = _no_processes


def _guard_python(root: str) -> None:
    """Best-effort guards at the Python level: no sockets, no writes outside the sandbox folder.

    Not a security boundary (ctypes, ``_io.FileIO`` or a subprocess bypass them); the namespaces,
    the uid and the limits are. They turn the common cases into a clear error message, and are the
    only file and network protection where namespaces are unavailable.
    """
    import socket

    def _no_network(*args, **kwargs):
        raise PermissionError("network access is disabled in the exme sandbox")

    class _NoSocket:
        def __init__(self, *args, **kwargs):
            _no_network()

    socket.socket = _NoSocket  # type: ignore[misc,assignment]
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, _no_network)

    root = os.path.realpath(root)

    def _inside(path) -> bool:
        if isinstance(path, int):
            return True
        full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
        return full == root or full.startswith(root + os.sep) or full == os.devnull

    real_open = builtins.open
    real_os_open = os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not _inside(file):
            raise PermissionError(f"writing outside the sandbox folder is not allowed: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not _inside(path):
            raise PermissionError(f"writing outside the sandbox folder is not allowed: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = guarded_open
    io.open = guarded_open
    os.open = guarded_os_open


def main() -> None:
    cfg = json.loads(sys.argv[1])
    write, exit_now, result_fd = os.write, os._exit, cfg["result_fd"]  # kept before the program can replace them
    nonce = os.read(cfg["nonce_fd"], 256).decode()
    os.close(cfg["nonce_fd"])
    sources = []
    for key in ("program", "tests"):
        with open(cfg[key], encoding="utf-8") as fh:
            sources.append((cfg[key], fh.read()))
    workdir = os.getcwd()
    started_as_root = os.getuid() == 0
    mount_ns, net_ns = _enter_namespaces(cfg["unshare_net"]) if cfg["isolate_fs"] else (False, False)
    if not cfg["isolate_fs"] and cfg["unshare_net"] and os.getuid() == 0:
        net_ns = _unshare(CLONE_NEWNET)
    isolated_fs = minimal_view = False
    if mount_ns:
        view = cfg.get("view") or []
        try:
            _private_filesystem(workdir, cfg["uid"] or os.getuid(), cfg["tmpfs_mb"], view)
            isolated_fs, minimal_view = True, bool(view)
        except OSError as err:
            if view:  # the whole host tree, read-only, rather than none
                sys.stderr.write(f"exme sandbox: no minimal filesystem view ({err}); the host's files stay readable\n")
                try:
                    _private_filesystem(workdir, cfg["uid"] or os.getuid(), cfg["tmpfs_mb"])
                    isolated_fs = True
                except OSError as again:
                    sys.stderr.write(f"exme sandbox: no private filesystem ({again})\n")
            else:
                sys.stderr.write(f"exme sandbox: no private filesystem ({err})\n")
        if isolated_fs:  # the work folder is a fresh tmpfs now: put the sources back for tracebacks
            for path, text in sources:
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(text)
    write(result_fd, f"isolation fs={int(isolated_fs)} net={int(net_ns)} reads={int(minimal_view)}\n".encode())
    _limit(cfg)
    _drop_privileges(cfg["uid"])
    in_user_namespace = not started_as_root and (mount_ns or net_ns)  # which grants every capability inside it
    if cfg.get("drop_capabilities") or in_user_namespace:
        _drop_capabilities()
    if cfg.get("drop_capabilities"):
        _block_processes()
    _guard_python(os.getcwd())
    sys.argv = [cfg["program"]]
    sys.stderr.write("")  # keep the stream open before the program can close descriptors
    # Not "__main__": an `if __name__ == "__main__":` block of a completion (a demo, an input() loop)
    # does not run, as in HumanEval's own harness, which executes programs without a __name__.
    module = types.ModuleType(PROGRAM_MODULE)
    module.__dict__["__builtins__"] = builtins
    sys.modules[PROGRAM_MODULE] = module
    try:
        for path, text in sources:
            exec(compile(text, path, "exec"), module.__dict__)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        sys.stderr.write(f"\nexme sandbox: the program exited (status {code}) before its tests finished\n")
        sys.stderr.flush()
        exit_now(code)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        exit_now(1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    write(result_fd, f"pass {nonce}\n".encode())
    exit_now(0)


if __name__ == "__main__":
    main()
