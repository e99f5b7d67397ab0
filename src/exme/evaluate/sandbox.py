"""Run untrusted generated code: separate process, own folder, time/memory/process limits, no network.

Layers, each on its own enough to stop the common accident and together hard to get past:

- a new session (process group) per program, SIGKILLed as a whole on timeout;
- as root (containers): a fresh network namespace (``unshare(CLONE_NEWNET)``: no interface is up),
  and an unused uid per worker slot, so the program can write only where that uid may (its own
  folder, world-writable places aside) and ``RLIMIT_NPROC`` holds (root ignores it); after the run
  every process of that uid is killed, so even a child that left the process group dies;
- ``resource`` limits: address space, CPU seconds, file size, processes, open files, no core dumps;
- a clean environment (no inherited variables, so no tokens or keys), ``python -I``;
- Python-level guards (sockets disabled, writes outside the folder refused): best effort only, the
  one layer left for network and files when not root and namespaces are unavailable.

Not root: the limits (``RLIMIT_NPROC`` counts all of the user's processes, so a fork bomb stops
early), the process-group kill and the Python guards apply; there is no namespace.
"""

from __future__ import annotations

import functools
import json
import os
import queue
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


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: ``passed`` when it exited 0 within its time limit."""

    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    seconds: float
    output: str  # the last 2,000 characters of stdout+stderr


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits."""

    timeout: float = 5.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
    max_procs: int = 16  # processes/threads of the sandbox uid
    file_mb: int = 16  # largest file it may write
    isolate_network: bool = True


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


def run_program(source: str, limits: SandboxLimits = SandboxLimits(), *, slot: int = 0) -> ExecResult:
    """Run ``source`` as ``program.py`` in a fresh temporary folder under the sandbox; never raises for its failures."""
    is_root = os.getuid() == 0
    python, can_drop_uid = sandbox_python()
    uid = _uid_for_slot(slot) if can_drop_uid else 0
    workdir = tempfile.mkdtemp(prefix="exme-sandbox-")
    program = os.path.join(workdir, "program.py")
    with open(program, "w", encoding="utf-8") as fh:
        fh.write(source)
    if uid:
        os.chown(workdir, uid, uid)
        os.chown(program, uid, uid)
    os.chmod(workdir, 0o700)
    cfg = {
        "program": program,
        "uid": uid,
        "drop_capabilities": is_root and not uid,
        "unshare_net": limits.isolate_network and is_root,
        "memory_bytes": int(limits.memory_mb) * 1024 * 1024,
        "cpu_seconds": int(limits.timeout) + 1,
        "file_bytes": int(limits.file_mb) * 1024 * 1024,
        "max_procs": int(limits.max_procs),
    }
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    started = time.monotonic()
    timed_out = False
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
        )
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
        out.seek(0, os.SEEK_END)
        size = out.tell()
        out.seek(max(0, size - 2000))
        output = out.read().decode("utf-8", "replace")
    shutil.rmtree(workdir, ignore_errors=True)
    if timed_out:
        return ExecResult(False, "timeout", None, seconds, output)
    passed = proc.returncode == 0
    return ExecResult(passed, "passed" if passed else "failed", proc.returncode, seconds, output)


def run_programs(
    sources: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    *,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> list[ExecResult]:
    """Run many programs, ``workers`` at a time (each worker slot has its own uid); results in input order."""
    workers = max(1, min(workers, 32, len(sources) or 1))
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(source: str) -> ExecResult:
        slot = slots.get()
        try:
            return run_program(source, limits, slot=slot)
        finally:
            slots.put(slot)
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, sources))
