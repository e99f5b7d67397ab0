"""The demo's finding across seeds: ExMe − best SFT and ExMe − each baseline on test, per seed, with paired CIs.

    python benchmarks/demo_seeds.py [--seeds 0 1 2 3 4] [--work benchmarks/_work/seeds] [--quick] [--threads 1]
    python benchmarks/demo_seeds.py --runs 'benchmarks/_work/fewer_evals/seed{seed}/dedup'

Runs ``exme demo --seed S`` for each seed in its own work and run folders (data, base, SFT run and
pipeline all depend on the seed; a second invocation reuses what is cached), then reads each
``results.json`` and prints a Markdown table: per seed, ExMe's test difference against the best SFT
checkpoint and against each baseline with the paired 95% CI, and the recommendation; then the mean
of each difference over seeds with its standard error (sample SD / √seeds), the spread a reader
should expect between machines and seeds. One seed's floats differ between processors: quote the
table's mean and spread, never one seed's number as what every machine prints.

``--quick`` runs the tiny smoke sizes (seconds per seed) to check the script itself; its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_seed(seed: int, work: Path, *, quick: bool, threads: int) -> Path:
    """``exme demo`` for one seed; returns its run folder."""
    workdir, output = work / f"seed{seed}" / ".demo", work / f"seed{seed}" / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "exme", "demo", "--workdir", str(workdir), "--output", str(output),
           "--seed", str(seed), "--threads", str(threads)] + (["--quick"] if quick else [])
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: exme demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return output


def seed_row(results: dict[str, Any]) -> dict[str, Any]:
    """ExMe − best SFT and ExMe − each baseline (overall, test) from one run's results.json."""
    final = results["final"]
    sfts = [r for r in final if r["kind"] == "sft"]
    best_sft = max(sfts, key=lambda r: r["dev"]["overall"]) if sfts else None
    exme = next(r for r in final if r["kind"] == "exme")
    refs = ([best_sft] if best_sft else []) + [r for r in final if r["kind"] == "baseline"]
    diffs: dict[str, dict[str, Any]] = {}
    for ref in refs:
        key = "best SFT" if ref is best_sft else ref["name"]
        comp = next((c for c in results.get("comparisons", [])
                     if c["b"] == ref["name"] and c["split"] == "test" and c["task"] == "overall"), None)
        diff = exme["test"]["overall"] - ref["test"]["overall"]
        diffs[key] = {"diff": comp["diff"] if comp else diff, "ci": (comp["ci_low"], comp["ci_high"]) if comp else None,
                      "se": comp["se"] if comp else None, "verdict": comp["verdict"] if comp else "–"}
    rec = results.get("recommended") or {}
    return {"diffs": diffs, "recommended": rec.get("name", "–"), "best_sft": best_sft["name"] if best_sft else "–",
            "n_test": sum(exme["test"]["n_items"].values())}


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def table(rows: dict[int, dict[str, Any]]) -> str:
    """The Markdown table: one line per seed, then mean ± SE over seeds."""
    refs: list[str] = []
    for r in rows.values():
        refs += [k for k in r["diffs"] if k not in refs]
    head = ["seed", "test items", *[f"ExMe − {k} [95% CI]" for k in refs], "recommended"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + ":---|"]
    for seed, r in rows.items():
        cells = []
        for k in refs:
            d = r["diffs"].get(k)
            if d is None:
                cells.append("–")
            elif d["ci"] is None:
                cells.append(_signed(d["diff"]))
            else:
                cells.append(f"{_signed(d['diff'])} [{_signed(d['ci'][0])}, {_signed(d['ci'][1])}]")
        lines.append(f"| {seed} | {r['n_test']} | " + " | ".join(cells) + f" | {r['recommended']} |")
    means = []
    for k in refs:
        xs = [r["diffs"][k]["diff"] for r in rows.values() if k in r["diffs"]]
        if len(xs) >= 2:
            mean = sum(xs) / len(xs)
            sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
            means.append(f"{_signed(mean)} ± {sd / math.sqrt(len(xs)):.3f}")
        else:
            means.append(_signed(xs[0]) if xs else "–")
    lines.append(f"| mean ± SE over {len(rows)} seeds | | " + " | ".join(means) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "seeds")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", help="read existing run folders instead of running the demo: a path with {seed}, e.g. "
                        "benchmarks/_work/fewer_evals/seed{seed}/dedup (bench_fewer_evals.py's demo pipelines)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    rows = {}
    for seed in args.seeds:
        out = Path(args.runs.format(seed=seed)) if args.runs else run_seed(seed, args.work, quick=args.quick, threads=args.threads)
        rows[seed] = seed_row(json.loads((out / "results.json").read_text()))
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"1-minute load {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"{time.perf_counter() - started:.0f} s for {len(rows)} seeds{' (--quick)' if args.quick else ''}.\n")
    print(table(rows))


if __name__ == "__main__":
    main()
