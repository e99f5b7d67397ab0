"""Item evaluations of the demo pipeline before and after a change, per seed, with the choices each made.

    python benchmarks/bench_fewer_evals.py run --seeds 0 1 --label before --src /path/to/old/src
    python benchmarks/bench_fewer_evals.py run --seeds 0 1 --label after --set '{"search": {"prune": true}}'
    python benchmarks/bench_fewer_evals.py table --labels before after [--seeds 0 1]

``run`` builds (or reuses) one demo base and SFT run per seed in ``<work>/seed<S>/.demo`` (the demo's
own cached steps), then runs the pipeline with the source tree ``--src`` (default: this checkout) into
``<work>/seed<S>/<label>``, with ``--set`` merged into the demo's PIPELINE.yaml keys. Every call of the
evaluator is counted exactly (items scored, by what they were scored for: the search part of dev, the
confirm part, test), so the count does not depend on how a version of exme records its evaluations.
The counts and the choices (kept checkpoints, α, β, baseline settings, ExMe's test score) go to
``<work>/seed<S>/<label>.json``. ``table`` prints the Markdown table of RESULTS.md from those files.

The demo base and SFT run depend only on the seed, so every label of one seed chooses among the
same checkpoints. Each pipeline runs in a subprocess with ``PYTHONPATH=<src>`` so two versions of
exme can be compared on the same machine in one session.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def worker(seed: int, work: Path, label: str, overrides: dict[str, Any], threads: int) -> None:
    """One seed, one label, in this process (imports exme from ``PYTHONPATH``)."""
    import torch

    from exme.demo.run import DemoSettings, demo_evaluator, prepare_base, prepare_data, prepare_sft
    from exme.evaluate import SuiteEvaluator
    from exme.pipeline import PipelineConfig, run_pipeline

    torch.set_num_threads(threads)
    workdir = work / f"seed{seed}" / ".demo"
    output = work / f"seed{seed}" / label
    workdir.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.full(seed)
    data = prepare_data(workdir, seed, settings.sizes)
    base, _ = prepare_base(workdir, data, settings.base, progress=False)
    checkpoints, _ = prepare_sft(workdir, base, data, settings, seed, progress=False)
    inner = demo_evaluator(data.suite)
    counts = {"search": 0, "confirm": 0, "test": 0, "calls": 0}
    confirm_ids: dict[str, set[int]] = {}

    class Counting(SuiteEvaluator):
        """The demo's evaluator, counting every item it scores."""

        def __init__(self) -> None:
            self.__dict__.update(inner.__dict__)

        def evaluate(self, model, tokenizer, split, limit=None, items=None, **kwargs):  # type: ignore[override]
            scores = SuiteEvaluator.evaluate(self, model, tokenizer, split, limit=limit, items=items, **kwargs)
            n = int(sum(scores.n_items.values()))
            if split == "test":
                counts["test"] += n
            elif items and any(set(map(int, ids)) & confirm_ids.get(t, set()) for t, ids in items.items()):
                counts["confirm"] += n
            else:
                counts["search"] += n
            counts["calls"] += 1
            return scores

    document = {
        "base": str(base.resolve()), "checkpoints": str((workdir / settings.sft_folder).resolve()),
        "suite": str(data.suite.resolve()), "top_k": 2, **settings.pipeline, "device": "cpu",
        "dtype": "float32", "output": str(output.resolve()), "seed": seed,
    }
    document = _merge(document, overrides)
    config = PipelineConfig.from_dict(document)
    from exme.pipeline.stages import dev_split

    split = dev_split(dict(inner.counts()["dev"]), config.dev.confirm_fraction, seed)
    confirm_ids.update({t: set(v) for t, v in split.confirm.items()})
    if output.exists():
        import shutil

        shutil.rmtree(output)
    started = time.perf_counter()
    results = run_pipeline(config, progress=False, evaluator=Counting(), write_model=False, report=False)
    seconds = time.perf_counter() - started
    choices = {
        "kept": [r.name for r in results.ranking if r.kept],
        "alpha": {s.checkpoint or s.name: s.best_params.get("alpha") for s in results.alpha_search},
        "beta": results.beta_search.best_params.get("beta") if results.beta_search else None,
        "baselines": {s.name: s.best_params for s in results.baseline_search},
    }
    exme = next(r for r in results.final if r.kind == "exme")
    row = {"seed": seed, "label": label, "overrides": overrides, "items": counts, "seconds": seconds,
           "load": os.getloadavg()[0], "choices": choices, "exme_test": exme.test.overall,
           "exme_test_items": exme.test.per_item}
    (work / f"seed{seed}" / f"{label}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps({k: row[k] for k in ("seed", "label", "items", "seconds", "choices", "exme_test")}))


def run(seeds: list[int], work: Path, label: str, src: Path, overrides: dict[str, Any], threads: int) -> None:
    for seed in seeds:
        env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, __file__, "_worker", "--seed", str(seed), "--work", str(work), "--label", label,
               "--set", json.dumps(overrides), "--threads", str(threads)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"seed {seed} {label}: failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        print(proc.stdout.strip().splitlines()[-1])
        print(f"seed {seed} {label}: {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.1f}",
              file=sys.stderr, flush=True)


def _paired_se(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> float:
    """Standard error of the mean paired difference over the items both have (one pooled list)."""
    d = [a[t][i] - b[t][i] for t in a if t in b for i in a[t] if i in b[t]]
    if len(d) < 2:
        return float("nan")
    m = sum(d) / len(d)
    return (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def table(seeds: list[int] | None, work: Path, labels: list[str]) -> str:
    before, *afters = labels
    lines = ["| seed | variant | search items | total items | same choices | kept | α | β | ExMe test (Δ vs before ± SE) |",
             "|---:|:---|---:|---:|:---|:---|:---|---:|:---|"]
    found = sorted(int(p.name[4:]) for p in work.glob("seed*") if p.name[4:].isdigit())
    for seed in seeds if seeds is not None else found:
        path = work / f"seed{seed}" / f"{before}.json"
        if not path.is_file():
            continue
        ref = json.loads(path.read_text())
        for label in labels:
            p = work / f"seed{seed}" / f"{label}.json"
            if not p.is_file():
                continue
            row = json.loads(p.read_text())
            c, items = row["choices"], row["items"]
            total = items["search"] + items["confirm"] + items["test"]
            same = "–" if label == before else ("yes" if c == ref["choices"] else _diff(ref["choices"], c))
            diff = row["exme_test"] - ref["exme_test"]
            se = _paired_se(row["exme_test_items"], ref["exme_test_items"])
            test = f"{row['exme_test']:.3f}" + ("" if label == before else f" ({diff:+.3f} ± {se:.3f})")
            alphas = ", ".join(f"{v:g}" for v in c["alpha"].values())
            beta = "–" if c["beta"] is None else f"{c['beta']:g}"
            ref_items = ref["items"]
            ref_total = ref_items["search"] + ref_items["confirm"] + ref_items["test"]
            share = "" if label == before else f" ({100 * items['search'] / ref_items['search']:.0f}%)"
            share_total = "" if label == before else f" ({100 * total / ref_total:.0f}%)"
            lines.append(f"| {seed} | {label} | {items['search']}{share} | {total}{share_total} | {same} | {', '.join(c['kept'])} | "
                         f"{alphas} | {beta} | {test} |")
    return "\n".join(lines)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    return "no: " + ", ".join(k for k in a if a[k] != b.get(k))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "_worker"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "fewer_evals")
        p.add_argument("--label", required=True)
        p.add_argument("--set", default="{}", help="JSON merged into the demo's PIPELINE.yaml keys")
        p.add_argument("--threads", type=int, default=1)
        if name == "run":
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
            p.add_argument("--src", type=Path, default=ROOT / "src")
        else:
            p.add_argument("--seed", type=int, required=True)
    t = sub.add_parser("table")
    t.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "fewer_evals")
    t.add_argument("--labels", nargs="+", required=True)
    t.add_argument("--seeds", type=int, nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "_worker":
        worker(args.seed, args.work, args.label, json.loads(args.set), args.threads)
    elif args.cmd == "run":
        run(args.seeds, args.work.resolve(), args.label, args.src.resolve(), json.loads(args.set), args.threads)
    else:
        print(table(args.seeds, args.work, args.labels))


if __name__ == "__main__":
    main()
