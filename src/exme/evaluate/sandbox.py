"""Run untrusted generated code: separate process, private filesystem, time/memory/process limits, no network.

What a pass means: the harness, not the program, writes ``pass <nonce>`` after the program and
every line of its tests ran; a program that exits early (``sys.exit(0)``, ``os._exit(0)``, an
``atexit`` hook) never passes, whatever its exit status. See ``_sandbox_runner.py``.

Layers, each on its own enough to stop the common accident and together hard to get past:

- a private mount namespace: every mount read-only, fresh size-limited tmpfs over ``/tmp``,
  ``/var/tmp``, ``/dev/shm`` and the program's own folder, so nothing it writes outlives it and
  nothing outside can be changed, whatever API it uses (``_io.FileIO``, a shell, ctypes). As root
  the namespace is entered directly; otherwise inside a new user namespace that maps the current
  uid to itself (Linux with unprivileged user namespaces, the default on most distributions);
- a fresh network namespace (no interface is up), entered the same way;
- as root (containers): an unused uid per worker slot, so file permissions and ``RLIMIT_NPROC``
  apply (root ignores it); after the run every process of that uid is killed, so even a child that
  left the process group dies;
- a new session (process group) per program, SIGKILLed as a whole on timeout;
- ``resource`` limits: address space, CPU seconds, file size, processes, open files, no core dumps;
- a clean environment (no inherited variables, so no tokens or keys), ``python -I``;
- Python-level guards (sockets disabled, writes outside the folder refused): best effort only.

Where namespaces are unavailable (a seccomp profile or a distribution that forbids them), the
sandbox degrades to the limits, the uid switch (root only) and the Python guards, and says so once
with a warning; :func:`sandbox_isolation` reports what this machine provides.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
_UID_BASE = 200_000
log = logging.getLogger(__name__)
_warned_unisolated = False


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: ``passed`` only when the harness ran it and all its tests to the end."""

    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    seconds: float
    output: str  # the last 2,000 characters of stdout+stderr
    fs_isolated: bool | None = None  # ran in a private, read-only filesystem (None: not reported)
    net_isolated: bool | None = None  # ran in its own network namespace
    reads_isolated: bool | None = None  # saw only the interpreter, its standard library and its own folder


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits."""

    timeout: float = 5.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
    max_procs: int = 16  # processes/threads of the sandbox uid
    file_mb: int = 16  # largest file it may write
    isolate_network: bool = True
    isolate_filesystem: bool = True  # private mount namespace (read-only /, tmpfs temp folders)
    minimal_view: bool = True  # ... whose root shows only the interpreter, its standard library and the program's folder
    tmpfs_mb: int = 64  # size of each fresh tmpfs (/tmp, /var/tmp, /dev/shm, the work folder)


def _uid_for_slot(slot: int) -> int:
    """An unused uid for worker ``slot`` of this process (distinct per process and slot)."""
    return _UID_BASE + (os.getpid() % 100_000) * 64 + slot


def _processes_of(uid: int) -> tuple[list[int], int]:
    """(live pids of ``uid``, number of its zombies): zombies still count against RLIMIT_NPROC."""
    live, zombies = [], 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                status = dict(line.split(":", 1) for line in fh if ":" in line)
            if int(status["Uid"].split()[0]) != uid:
                continue
            if status["State"].strip().startswith(("Z", "X")):
                zombies += 1
            else:
                live.append(int(entry))
        except (OSError, ValueError, IndexError, KeyError):
            continue
    return live, zombies


def _kill_uid(uid: int, deadline_s: float = 5.0) -> None:
    """SIGKILL every process of ``uid`` until none is left, zombies reaped too (a fork bomb may still be forking).

    Waiting for the zombies matters: the next program of this worker slot runs under the same uid,
    and leftover zombies would eat its process allowance.
    """
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        live, zombies = _processes_of(uid)
        if not live and not zombies:
            return
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _readable_by_others(path: Path) -> bool:
    """Whether a user other than the owner can traverse every parent of ``path`` and read it."""
    path = Path(path).resolve()
    try:
        if not path.stat().st_mode & 0o004:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in path.parents)
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def sandbox_python() -> tuple[str, bool]:
    """(interpreter, whether the program can run under a dropped uid).

    Under a dropped uid the interpreter and its standard library must be readable by others; an
    interpreter installed under a private home (``/root/.pyenv``) is not, so a system ``python3``
    is used instead when there is one. Without either, the program keeps uid 0 but loses every
    capability, and process creation is blocked at the Python level (uid 0 of the initial user
    namespace is exempt from ``RLIMIT_NPROC`` whatever its capabilities).
    """
    if os.getuid() != 0:
        return sys.executable, False
    candidates = [sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
    for exe in candidates:
        if not exe:
            continue
        try:
            stdlib = subprocess.run(
                [exe, "-I", "-c", "import os; print(os.__file__)"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if _readable_by_others(Path(exe)) and _readable_by_others(Path(stdlib)) and _readable_by_others(RUNNER):
            return exe, True
    return sys.executable, False


#: The program in its own process: after these imports, /proc/self/maps lists every shared library the
#: interpreter and its standard library's extension modules load.
_VIEW_PROBE = r"""
import json, os, sys, sysconfig, importlib
paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"], os.path.dirname(os.__file__)}
dynload = [p for p in sys.path if p.endswith("lib-dynload")]
for folder in dynload:
    paths.add(folder)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".so"):
            try:
                importlib.import_module(name.split(".")[0])
            except BaseException:
                pass
libs = set()
with open("/proc/self/maps") as fh:
    for line in fh:
        part = line.split(None, 5)
        if len(part) == 6 and part[5].strip().startswith("/") and ".so" in part[5]:
            libs.add(part[5].strip())
print(json.dumps({"exe": [sys.executable, os.path.realpath(sys.executable)], "paths": sorted(paths), "libs": sorted(libs)}))
"""


@functools.lru_cache(maxsize=4)
def sandbox_view(python: str) -> tuple[str, ...]:
    """What a sandboxed program may read: the interpreter, its standard library (with lib-dynload), the
    shared libraries they load, and the loader's cache to find them. Found once per interpreter by
    importing every extension module of the standard library in a throwaway process; empty when that
    fails (the program then sees the whole host tree read-only, as ``reads_isolated=False`` reports)."""
    try:
        done = subprocess.run([python, "-I", "-c", _VIEW_PROBE], capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL)
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return ()
    libs = set(found["libs"])
    # The loader opens a library by its soname (libz.so.1), a link beside the file the maps name.
    links = []
    for folder in sorted({os.path.dirname(lib) for lib in libs}):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) and os.path.realpath(path) in libs:
                links.append(path)
    view = [*found["exe"], *found["paths"], *sorted(libs), *sorted(links), "/etc/ld.so.cache"]
    # One bind mount per path costs time per program: a path inside a folder already shown needs none.
    folders = [f.rstrip("/") + "/" for f in found["paths"] if os.path.isdir(f)]
    view = [p for p in view if p in found["paths"] or not any(p.startswith(f) for f in folders)]
    return tuple(dict.fromkeys(p for p in view if os.path.exists(p)))


def run_program(source: str, limits: SandboxLimits = SandboxLimits(), *, slot: int = 0, tests: str = "") -> ExecResult:
    """Run ``source`` then ``tests`` (one module namespace) under the sandbox; never raises for their failures.

    It passes only when the harness reports, with this call's nonce, that both ran to the end.
    """
    global _warned_unisolated
    is_root = os.getuid() == 0
    python, can_drop_uid = sandbox_python()
    uid = _uid_for_slot(slot) if can_drop_uid else 0
    workdir = tempfile.mkdtemp(prefix="exme-sandbox-")
    files = {"program": os.path.join(workdir, "program.py"), "tests": os.path.join(workdir, "tests.py")}
    for key, text in (("program", source), ("tests", tests)):
        with open(files[key], "w", encoding="utf-8") as fh:
            fh.write(text)
        if uid:
            os.chown(files[key], uid, uid)
    if uid:
        os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)
    nonce = secrets.token_hex(16)
    nonce_r, nonce_w = os.pipe()
    result_r, result_w = os.pipe()
    os.write(nonce_w, nonce.encode())
    os.close(nonce_w)
    cfg = {
        **files,
        "uid": uid,
        "drop_capabilities": is_root and not uid,
        "unshare_net": limits.isolate_network,
        "isolate_fs": limits.isolate_filesystem,
        "view": list(sandbox_view(python)) if limits.isolate_filesystem and limits.minimal_view else [],
        "tmpfs_mb": int(limits.tmpfs_mb),
        "memory_bytes": int(limits.memory_mb) * 1024 * 1024,
        "cpu_seconds": int(limits.timeout) + 1,
        "file_bytes": int(limits.file_mb) * 1024 * 1024,
        "max_procs": int(limits.max_procs),
        "nonce_fd": nonce_r,
        "result_fd": result_w,
    }
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    started = time.monotonic()
    timed_out = False
    try:
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(
                [python, "-I", str(RUNNER), json.dumps(cfg)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=(nonce_r, result_w),
            )
            os.close(nonce_r)
            os.close(result_w)
            nonce_r = result_w = -1
            try:
                proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                for kill in (os.killpg, os.kill):  # the group, then the leader even if it left its group
                    try:
                        kill(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                proc.wait()
                if uid:
                    _kill_uid(uid)
            seconds = time.monotonic() - started
            report = _read_available(result_r)
            out.seek(0, os.SEEK_END)
            size = out.tell()
            out.seek(max(0, size - 2000))
            output = out.read().decode("utf-8", "replace")
    finally:
        for fd in (nonce_r, result_w, result_r):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    lines = report.splitlines()
    fs_isolated = net_isolated = reads_isolated = None
    if lines and lines[0].startswith("isolation "):
        flags = dict(part.split("=") for part in lines[0].split()[1:])
        fs_isolated, net_isolated = flags.get("fs") == "1", flags.get("net") == "1"
        reads_isolated = flags.get("reads") == "1"
        if limits.isolate_filesystem and not fs_isolated and not _warned_unisolated:
            _warned_unisolated = True
            log.warning(
                "the code sandbox has no private filesystem on this machine (mount/user namespaces are "
                "unavailable): generated programs run with resource limits and Python-level guards only"
            )
    completed = f"pass {nonce}" in lines
    if timed_out:
        return ExecResult(False, "timeout", None, seconds, output, fs_isolated, net_isolated, reads_isolated)
    passed = completed and proc.returncode == 0
    return ExecResult(passed, "passed" if passed else "failed", proc.returncode, seconds, output, fs_isolated, net_isolated,
                      reads_isolated)


def _read_available(fd: int) -> str:
    """Whatever is in the pipe now, without blocking (an escaped child may still hold its write end)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        if sum(map(len, chunks)) > 1 << 20:
            break
    return b"".join(chunks).decode("utf-8", "replace")


@functools.lru_cache(maxsize=1)
def sandbox_isolation() -> dict[str, bool]:
    """What this machine gives a sandboxed program: ``{"filesystem": bool, "network": bool, "reads": bool}``
    (``reads``: only the interpreter, its standard library and the program's own folder are visible)."""
    result = run_program("pass\n", SandboxLimits(timeout=30))
    return {"filesystem": bool(result.fs_isolated), "network": bool(result.net_isolated),
            "reads": bool(result.reads_isolated)}


def run_programs(
    sources: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    *,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    tests: Sequence[str] | None = None,
) -> list[ExecResult]:
    """Run many programs (each with its ``tests``), ``workers`` at a time (each slot its own uid); results in input order."""
    workers = max(1, min(workers, 32, len(sources) or 1))
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(job: tuple[str, str]) -> ExecResult:
        slot = slots.get()
        try:
            return run_program(job[0], limits, slot=slot, tests=job[1])
        finally:
            slots.put(slot)
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, zip(sources, tests if tests is not None else [""] * len(sources))))
