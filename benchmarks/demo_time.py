"""Wall-clock time of `exme demo` from a fresh clone (package installation excluded), then again cached.

    python benchmarks/demo_time.py [--threads 1] [--keep]

Clones the repository's committed HEAD into benchmarks/_work/demo_clone, runs
`python -m exme demo` there with this interpreter (so no package is installed or downloaded), and
prints a Markdown block for benchmarks/RESULTS.md: machine, versions, the stage timings the demo
wrote, the wall time of the whole command, and the CPU time it got. The CPU-time/wall-time ratio
shows how much of the machine the run had: on a machine shared with other work it is well under
the number of cores, and the wall time is longer than on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"


def run_once(clone: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(clone / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "exme", "demo", "--workdir", ".demo", "--output", "demo_run", "--threads", str(threads)],
        cwd=clone, env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"exme demo failed with exit code {proc.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stages = json.loads((clone / "demo_run" / "demo_timings.json").read_text())
    results = json.loads((clone / "demo_run" / "results.json").read_text())
    return {
        "wall_s": wall, "cpu_s": cpu, "load_before": load_before, "load_after": os.getloadavg()[0],
        "stages": stages, "final": {r["name"]: r["test"]["overall"] for r in results["final"]},
        "tail": proc.stdout[-2500:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the clone afterwards")
    args = parser.parse_args()

    import torch
    import transformers

    clone = WORK / "demo_clone"
    if clone.exists():
        shutil.rmtree(clone)
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()

    fresh = run_once(clone, args.threads)
    cached = run_once(clone, args.threads)
    print(fresh["tail"])
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in fresh["stages"].items())
    print(f"""
### `make demo` (exme demo) — wall time from a fresh clone

- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()},
  torch {torch.__version__}, transformers {transformers.__version__}; commit {commit}; `--threads {args.threads}`.
- Command: `python benchmarks/demo_time.py --threads {args.threads}` (clones HEAD, runs `exme demo`
  with the installed environment: package installation not counted).
- Fresh clone: **{fresh['wall_s']:.0f} s** wall ({stages}); CPU time {fresh['cpu_s']:.0f} s,
  i.e. {fresh['cpu_s'] / fresh['wall_s']:.2f} of the {os.cpu_count()} cores on average; load average
  {fresh['load_before']:.1f} before, {fresh['load_after']:.1f} after.
- Second run (base, SFT run and every evaluation reused): {cached['wall_s']:.0f} s wall
  ({fresh['wall_s'] / cached['wall_s']:.1f}× faster than the fresh run).
- Test overall scores: {', '.join(f'{k} {v:.3f}' for k, v in fresh['final'].items())}.
""")
    if not args.keep:
        shutil.rmtree(clone)


if __name__ == "__main__":
    main()
