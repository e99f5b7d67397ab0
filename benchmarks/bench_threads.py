"""`exme eval` wall time per torch thread count, with and without other processes busy on the CPU.

Why: torch's default (one OpenMP thread per core) spin-waits at every operation; when another
process holds a core, each operation waits for the descheduled thread. This measures the thread
counts a user can pick (and exme's default, ``auto``) on one model, one suite, one split, each in a
fresh ``exme eval`` process, so start-up and model load are included as a user sees them.

    python benchmarks/bench_threads.py --model DIR --suite SUITE.yaml --settings 1,2,auto --hogs 0,1

``--hogs N`` starts N busy-loop processes (this script's own children, stopped by pid at the end)
beside each timed run; the machine's other load is reported with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _time_eval(exme: str, model: str, suite: str, split: str, threads: str) -> tuple[float, str]:
    cmd = [exme, "eval", model, "--suite", suite, "--split", split, "--threads", threads]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    header = next((line for line in proc.stdout.splitlines() if "threads:" in line), "")
    return seconds, header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--suite", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--settings", default="1,2,auto", help="comma-separated --threads values")
    parser.add_argument("--hogs", default="0,1", help="comma-separated counts of busy-loop processes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--exme", default=str(Path(sys.executable).with_name("exme")))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rows = []
    for hogs in [int(h) for h in args.hogs.split(",")]:
        procs = [_hog() for _ in range(hogs)]
        try:
            time.sleep(2.0 if hogs else 0.0)
            for threads in args.settings.split(","):
                times, header = [], ""
                load_before = os.getloadavg()[0]
                for _ in range(args.repeats):
                    seconds, header = _time_eval(args.exme, args.model, args.suite, args.split, threads)
                    times.append(seconds)
                row = {
                    "hogs": hogs, "threads": threads, "header": header.strip(), "times_s": [round(t, 2) for t in times],
                    "best_s": round(min(times), 2), "median_s": round(statistics.median(times), 2),
                    "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
