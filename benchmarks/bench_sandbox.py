"""Cost of the code sandbox per program: this version (private mount + network namespaces, minimal
filesystem view, harness marker) against the sandbox of an earlier commit and against a bare ``python -I`` subprocess.

Run:  PYTHONPATH=src python benchmarks/bench_sandbox.py [--programs 40] [--peer-commit main]

Every variant runs the same small MBPP-style programs (a function and three asserts) with 2
workers, as a code task does; the figure is wall seconds per program over the whole batch, best of
``--repeats``. The earlier sandbox is read from git (``git show COMMIT:src/exme/evaluate/...``) into a
temporary folder, so both run in this process on the same machine in the same minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from exme.evaluate import sandbox

PROGRAM = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0\n"


def _load_peer(commit: str, folder: Path):
    for name in ("sandbox.py", "_sandbox_runner.py"):
        text = subprocess.run(["git", "show", f"{commit}:src/exme/evaluate/{name}"], capture_output=True, text=True, check=True).stdout
        (folder / name).write_text(text)
    os.chmod(folder, 0o755)
    spec = importlib.util.spec_from_file_location("exme_peer_sandbox", folder / "sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _bare(n: int) -> list[bool]:
    def one(_):
        done = subprocess.run([sys.executable, "-I", "-c", PROGRAM + TESTS], capture_output=True, timeout=30)
        return done.returncode == 0

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, range(n)))


def _timed(fn, repeats: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peer-commit", default="main")
    args = ap.parse_args()
    n = args.programs
    limits = sandbox.SandboxLimits(timeout=10)
    with tempfile.TemporaryDirectory() as tmp:
        peer = _load_peer(args.peer_commit, Path(tmp))
        variants = {
            "this version, isolated": lambda: [r.passed for r in sandbox.run_programs([PROGRAM] * n, limits, tests=[TESTS] * n)],
            "this version, minimal_view=False (whole host tree read-only)": lambda: [
                r.passed for r in sandbox.run_programs([PROGRAM] * n, sandbox.SandboxLimits(timeout=10, minimal_view=False), tests=[TESTS] * n)
            ],
            "this version, isolate_filesystem=False": lambda: [
                r.passed for r in sandbox.run_programs([PROGRAM] * n, sandbox.SandboxLimits(timeout=10, isolate_filesystem=False), tests=[TESTS] * n)
            ],
            f"sandbox at {args.peer_commit}": lambda: [r.passed for r in peer.run_programs([PROGRAM + TESTS] * n, peer.SandboxLimits(timeout=10))],
            "bare python -I subprocess": lambda: _bare(n),
        }
        rows = {}
        start = time.perf_counter()  # once per interpreter and process, not per program: reported apart
        view = sandbox.sandbox_view(sandbox.sandbox_python()[0])
        probe_ms = (time.perf_counter() - start) * 1000
        for name, fn in variants.items():
            seconds, passed = _timed(fn, args.repeats)
            assert all(passed), name
            rows[name] = seconds / n * 1000
    load = os.getloadavg()
    print(json.dumps({"ms_per_program": rows, "view_probe_ms_once": probe_ms, "view_paths": len(view), "programs": n, "load_avg": load, "python": platform.python_version(),
                      "isolation": sandbox.sandbox_isolation(), "uid": os.getuid()}, indent=2))


if __name__ == "__main__":
    main()
