"""Runs inside the sandbox child before the untrusted program: isolate, limit, drop privileges, exec.

Started as ``python -I _sandbox_runner.py CONFIG_JSON`` with the sandbox folder as working
directory. Only the standard library is used, and every step happens before a line of the
program runs, so the program inherits all of them.
"""

import builtins
import ctypes
import io
import json
import os
import resource
import sys

CLONE_NEWNET = 0x40000000


def _isolate_network() -> bool:
    """A fresh network namespace (only a loopback that is down): no route anywhere. Needs CAP_SYS_ADMIN."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


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
    """Stay uid 0 but hold no capability: no undoing the namespace, no overriding file permissions.

    (RLIMIT_NPROC still does not bind uid 0 of the initial user namespace, so process creation is
    blocked at the Python level instead, see ``_block_processes``.)"""
    libc = ctypes.CDLL(None, use_errno=True)
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

    These are not a security boundary (ctypes can bypass them); the namespace, the uid and the
    resource limits are. They turn the common cases into a clear error message.
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
    with open(cfg["program"], encoding="utf-8") as fh:
        source = fh.read()
    isolated = _isolate_network() if cfg["unshare_net"] else False
    _limit(cfg)
    _drop_privileges(cfg["uid"])
    if cfg.get("drop_capabilities"):
        _drop_capabilities()
        _block_processes()
    _guard_python(os.getcwd())
    sys.argv = [cfg["program"]]
    sys.stderr.write("")  # keep the stream open before the program can close descriptors
    os.environ["EXME_SANDBOX_NET_ISOLATED"] = "1" if isolated else "0"
    code = compile(source, cfg["program"], "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins})


if __name__ == "__main__":
    main()
