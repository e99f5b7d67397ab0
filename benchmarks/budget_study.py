"""Does ExMe on an SFT run cut short recover the full run? The demo world at 25%, 50% and 100% of its SFT steps.

    python benchmarks/budget_study.py [--seeds 0 1 2 3 4] [--budgets 0.25 0.5 1.0] [--work benchmarks/_work/budget]
                                      [--threads 1] [--quick]

ExPO found extrapolation pays most when training stopped early (its best α fell from 8.0 at 10% of
the DPO steps to 0.3 at 100%). This script asks the same of ExMe on the demo world. Per seed:

1. the demo's seeded data and base model (:mod:`exme.demo`), built once and shared by every budget;
2. for each budget ``f``, an SFT run of its own (``exme finetune`` through the demo's
   :func:`exme.demo.run.prepare_sft`): ``round(f · 180)`` steps with the demo's learning rate, batch and
   schedule (5% warmup, then constant), saving 6 evenly spaced checkpoints (every ``steps / 6``
   steps, rounded up, and the last step). Each budget is a separate run with its own warmup, the
   way a run given a smaller compute budget is trained; it is *not* the 100% run's early
   checkpoints. With the demo's constant schedule the two differ only in the warmup's length;
3. for each budget, the ExMe pipeline (rank → α → β, test table) on that run's checkpoints, with the
   demo's dev/confirm/test items and grids, except that the α grid also tries 1.5 and 2.0 (a cut run
   may want more extrapolation than the demo's grid allows) and the baselines are skipped (CPU).

Then, on the demo's test items (480), paired over items (:func:`exme.report.stats.paired_comparison`,
stratified by task, 95% bootstrap CI): for each budget, ExMe − that run's best SFT checkpoint (chosen on
dev), ExMe − the 100% run's best SFT checkpoint (does ExMe on a cut run recover the full run?), and the
cut run's best SFT − the 100% run's (what the cut cost). Over seeds: the mean of each difference with a
t-interval over seeds (training seeds vary more than test items do). Seeded is not reproducible across
processors: quote the spread over seeds, not one seed's floats.

A second invocation reuses every finished base, SFT run and pipeline (delete ``--work`` to redo them);
``--quick`` runs the demo's tiny smoke sizes to check the script (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FULL_STEPS = 180  # the demo's SFT length (DemoSettings.full); checked against it in settings_for
CHECKPOINTS = 6  # as many checkpoints per run as the demo's full run keeps
ALPHA_GRID = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def settings_for(seed: int, fraction: float, *, quick: bool):
    """The demo's settings with the SFT length cut to ``fraction`` of its steps and 6 checkpoints."""
    from exme.demo.run import DemoSettings

    demo = DemoSettings.quick(seed) if quick else DemoSettings.full(seed)
    steps = max(1, round(fraction * demo.sft_steps))
    save = max(1, math.ceil(steps / CHECKPOINTS))
    pipeline = {**demo.pipeline, "baselines": []}
    if not quick:
        assert demo.sft_steps == FULL_STEPS, "the demo's SFT length changed: update FULL_STEPS and the docs"
        pipeline["alpha"] = {**pipeline["alpha"], "grid": ALPHA_GRID}
    return replace(demo, sft_steps=steps, sft_save_steps=save, pipeline=pipeline)


def run_budget(seed_dir: Path, base: Path, data: Any, seed: int, fraction: float, *, quick: bool) -> tuple[dict[str, Any], dict[str, float]]:
    """SFT at one budget and its pipeline; (results.json as a dict, seconds per stage). Cached."""
    from exme.demo.run import demo_evaluator, prepare_sft, write_pipeline_yaml
    from exme.pipeline import PipelineConfig, run_pipeline

    settings = settings_for(seed, fraction, quick=quick)
    workdir = seed_dir / f"budget{round(fraction * 100):03d}"
    output = workdir / "run"
    times: dict[str, float] = {}
    started = time.perf_counter()
    _, trained = prepare_sft(workdir, base, data, settings, seed, progress=False)
    times["sft"] = time.perf_counter() - started
    results_path, done = output / "results.json", workdir / "pipeline_done.json"
    if trained:
        import shutil

        done.unlink(missing_ok=True)
        shutil.rmtree(output, ignore_errors=True)  # records of an older SFT run must not be read back
    if not done.is_file():  # results.json alone may be a stage's partial save: the run resumes from its study
        started = time.perf_counter()
        config = PipelineConfig.from_yaml(write_pipeline_yaml(workdir, base, data, output, settings, seed))
        run_pipeline(config, progress=False, evaluator=demo_evaluator(data.suite), write_model=False)
        times["pipeline"] = time.perf_counter() - started
        done.write_text(json.dumps({"seconds": times["pipeline"], "load_1min_end": os.getloadavg()[0]}))
    return json.loads(results_path.read_text()), times


def _row(results: dict[str, Any], kind: str) -> dict[str, Any]:
    from exme.report.verdict import best_sft_row
    from exme.report.schema import FinalRow

    rows = [FinalRow.model_validate(r) for r in results["final"]]
    if kind == "sft":
        row = best_sft_row(rows)
    else:
        row = next(r for r in rows if r.kind == kind)
    return row


def paired(a_row: Any, b_row: Any, weights: dict[str, float], seed: int) -> dict[str, Any]:
    """``a − b`` on test, paired over the items both scored (the same demo test items at every budget)."""
    from exme.report.stats import paired_comparison

    p = paired_comparison(a_row.test, b_row.test, weights, n_resamples=2000, seed=seed)
    if p is None:
        raise SystemExit(f"no per-item test scores for {a_row.name} or {b_row.name}")
    return {"diff": p.diff, "ci": [p.ci_low, p.ci_high], "se": p.se, "p": p.p_value, "n": p.n, "verdict": p.verdict}


def seed_summary(per_budget: dict[float, dict[str, Any]], seed: int) -> dict[str, Any]:
    """Per budget: scores, choices and the three paired differences of the question."""
    from exme.report.stats import task_weights

    full = per_budget[max(per_budget)]
    weights = task_weights(full["suite"], list(_row(full, "exme").test.tasks))
    sft_full = _row(full, "sft")
    out: dict[str, Any] = {}
    for fraction, results in sorted(per_budget.items()):
        exme, sft = _row(results, "exme"), _row(results, "sft")
        out[str(fraction)] = {
            "exme_test": exme.test.overall, "sft_test": sft.test.overall, "sft_full_test": sft_full.test.overall,
            "best_sft": sft.name, "params": exme.params,
            "exme_minus_sft": paired(exme, sft, weights, seed),
            "exme_minus_full_sft": paired(exme, sft_full, weights, seed),
            "sft_minus_full_sft": paired(sft, sft_full, weights, seed),
            "recommended": (results.get("recommended") or {}).get("name"),
        }
    return out


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def _cell(d: dict[str, Any]) -> str:
    return f"{_signed(d['diff'])} [{_signed(d['ci'][0])}, {_signed(d['ci'][1])}]"


def _params(params: dict[str, Any]) -> str:
    a1, a2, b = params.get("alpha_1"), params.get("alpha_2"), params.get("beta")
    if a1 is None:
        return ", ".join(f"{k}={v}" for k, v in params.items())
    return f"α=({a1:g}, {a2:g}) β={b:g}"


def tables(summaries: dict[int, dict[str, Any]]) -> str:
    """Per-seed rows and the mean over seeds with a t-interval, one block per budget."""
    lines = ["| seed | budget | best SFT (test) | ExMe (test) | ExMe's α, β | ExMe − its best SFT [95% CI] | "
             "ExMe − 100% best SFT [95% CI] | its best SFT − 100% best SFT [95% CI] |",
             "|---:|---:|---:|---:|:---|---:|---:|---:|"]
    budgets = sorted({b for s in summaries.values() for b in s}, key=float)
    for seed, summary in summaries.items():
        for b in budgets:
            r = summary.get(b)
            if r is None:
                continue
            lines.append(f"| {seed} | {float(b):.0%} | {r['sft_test']:.3f} ({r['best_sft']}) | {r['exme_test']:.3f} | "
                         f"{_params(r['params'])} | {_cell(r['exme_minus_sft'])} | {_cell(r['exme_minus_full_sft'])} | "
                         f"{_cell(r['sft_minus_full_sft'])} |")
    lines += ["", "| budget | seeds | ExMe − its best SFT | ExMe − 100% best SFT | its best SFT − 100% best SFT |",
              "|---:|---:|---:|---:|---:|"]
    for b in budgets:
        cells = []
        rows = [s[b] for s in summaries.values() if b in s]
        for key in ("exme_minus_sft", "exme_minus_full_sft", "sft_minus_full_sft"):
            xs = [r[key]["diff"] for r in rows]
            cells.append(_over_seeds(xs))
        lines.append(f"| {float(b):.0%} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _over_seeds(xs: list[float]) -> str:
    """Mean over seeds with its 95% t-interval (``mean ± t₀.₉₇₅,ₙ₋₁ · sd/√n``)."""
    if not xs:
        return "–"
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return _signed(mean)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = T_975.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))
    return f"{_signed(mean)} [{_signed(mean - half)}, {_signed(mean + half)}]"


def tabulate(args: argparse.Namespace) -> None:
    """The table over the seeds whose every budget's pipeline finished; the others are named, not run."""
    summaries, missing = {}, []
    for seed in args.seeds:
        seed_dir = args.work / ("quick" if args.quick else "full") / f"seed{seed}"
        dirs = {f: seed_dir / f"budget{round(f * 100):03d}" for f in args.budgets}
        if not all((d / "pipeline_done.json").is_file() for d in dirs.values()):
            missing.append(seed)
            continue
        per_budget = {f: json.loads((d / "run" / "results.json").read_text()) for f, d in dirs.items()}
        summaries[seed] = seed_summary(per_budget, seed)
    print(f"Finished seeds: {sorted(summaries) or 'none'}; not finished: {missing or 'none'}.\n")
    if summaries:
        print(tables(summaries))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "budget")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tabulate", action="store_true",
                        help="train and evaluate nothing: print the table of the seeds whose budgets all finished")
    args = parser.parse_args(argv)
    if max(args.budgets) != 1.0 or not all(0 < b <= 1 for b in args.budgets):
        raise SystemExit("--budgets: fractions in (0, 1], and 1.0 among them (the full run every budget is compared with)")

    import torch
    from transformers.utils import logging as hf_logging

    from exme.demo.run import prepare_base, prepare_data

    if args.tabulate:
        tabulate(args)
        return
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    load0, started_all = os.getloadavg()[0], time.perf_counter()
    summaries: dict[int, dict[str, Any]] = {}
    timings: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        seed_dir = args.work / ("quick" if args.quick else "full") / f"seed{seed}"
        settings = settings_for(seed, 1.0, quick=args.quick)
        started = time.perf_counter()
        data = prepare_data(seed_dir, seed, settings.sizes)
        base, _ = prepare_base(seed_dir, data, settings.base, progress=False)
        times = {"base": time.perf_counter() - started}
        per_budget = {}
        for fraction in sorted(args.budgets):
            per_budget[fraction], t = run_budget(seed_dir, base, data, seed, fraction, quick=args.quick)
            times.update({f"{k} {fraction:.0%}": v for k, v in t.items()})
        summaries[seed] = seed_summary(per_budget, seed)
        timings[seed] = times
        (seed_dir / "budget_summary.json").write_text(json.dumps({"summary": summaries[seed], "seconds": times}, indent=2))
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
              + f"; 1-minute load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch threads "
          f"{args.threads}; 1-minute load {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"{time.perf_counter() - started_all:.0f} s for {len(summaries)} seeds{' (--quick)' if args.quick else ''}.\n")
    print(tables(summaries))


if __name__ == "__main__":
    main()
