"""ExMe on a real SFT run: LoRA (or full) SFT of SmolLM2-135M-Instruct on real multiple-choice records,
then ``exme run`` on real ARC-Easy and MMLU suites, with per-stage wall time and peak RSS.

    python benchmarks/real_sft.py --size smoke|cpu|gpu [--sft lora|full] [--workdir DIR] [--threads N]

Training records (disjoint from everything evaluated): MMLU ``dev`` (285, the few-shot split) and
ARC-Challenge ``validation`` + ``test`` (299 + 1,172), as prompt/completion pairs in the evaluation's
own prompt (lm-eval's ``Question: ...\\nAnswer:``; MMLU's subject line) with the gold answer text as
the completion. Evaluated: ARC-Easy (dev = validation, test = test) and MMLU (dev = validation,
test = test), the suites of :mod:`exme.assets`, multiple choice, no chat template. GSM8K is left out:
a 135M model scores near 0 on it and a run where every model scores 0 tells nothing.

Sizes (``smoke`` proves the script end to end in minutes; ``cpu`` is meant for ~30 min on an idle
2-core machine; ``gpu`` is the real size, full dev/test sets with ``backend: vllm`` on one GPU):

| size | SFT steps × batch (saves) | dev / test items per task | search |
|---|---|---|---|
| smoke | 6 × 4 (every 2) on 64 records | 8 / 16 | α {0, 0.5}, β {0, 0.5, 1}, linear |
| cpu | 40 × 8 (every 10) | 40 / 100 | α {0, .3, .7, 1}, β 5 points, linear, task_arithmetic, ties |
| gpu | 400 × 16 (every 100) | all / all | α default grid, β default grid, every baseline, vllm |

Each stage runs as its own process (``exme finetune``, ``exme run``), so its peak RSS is that
process's own (``wait4``). Writes ``<workdir>/real_sft.json`` and prints a Markdown block for
benchmarks/RESULTS.md with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES: dict[str, dict] = {
    "smoke": {"train": 64, "steps": 6, "batch": 4, "save": 2, "dev": 8, "test": 16, "lora_r": 8, "max_length": 192,
              "pipeline": {"dev": {"confirm_fraction": 0}, "alpha": {"grid": [0.0, 0.5]},
                           "beta": {"grid": [0.0, 0.5, 1.0]}, "baselines": ["linear"]}},
    "cpu": {"train": None, "steps": 40, "batch": 8, "save": 10, "dev": 40, "test": 100, "lora_r": 16, "max_length": 256,
            "pipeline": {"dev": {"confirm_fraction": 0}, "alpha": {"grid": [0.0, 0.3, 0.7, 1.0]},
                         "beta": {"grid": [0.0, 0.25, 0.5, 0.75, 1.0]},
                         "baselines": ["linear", "task_arithmetic", "ties"]}},
    "gpu": {"train": None, "steps": 400, "batch": 16, "save": 100, "dev": None, "test": None, "lora_r": 16,
            "max_length": 256, "pipeline": {"backend": "vllm", "device": "cuda", "dtype": "bfloat16"}},
}
EVAL_TASKS = ("arc_easy", "mmlu")
LEARNING_RATE = {"lora": 5e-4, "full": 2e-5}


def _mc(record: dict) -> tuple[list[str], int]:
    """Choices as a list and the gold index, read as exme's multiple-choice kind reads them."""
    from exme.evaluate.kinds import get_kind

    record = dict(record)
    get_kind("multiple_choice").check_record(record, "training record")
    return record["choices"], record["label"]


def write_training_data(records, path: Path, limit: int | None, seed: int) -> dict[str, int]:
    """MMLU dev + ARC-Challenge validation/test as prompt/completion JSONL; counts per source."""
    rows, counts = [], {}
    for task, split in (("mmlu", "dev"), ("arc_challenge", "validation"), ("arc_challenge", "test")):
        lines = [json.loads(line) for line in Path(records.data(task, split)).open(encoding="utf-8")]
        counts[f"{task}.{split}"] = len(lines)
        for record in lines:
            choices, label = _mc(record)
            rows.append({"prompt": record["query"], "completion": " " + choices[label]})
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    counts["used"] = len(rows)
    return counts


def write_suite(records, folder: Path, n_dev: int | None, n_test: int | None, seed: int) -> Path:
    """One suite with ARC-Easy and MMLU: the assets' task specs, on seeded subsets when sizes are given."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for task in EVAL_TASKS:
        suite_path = Path(records.suite(task))
        spec = yaml.safe_load(suite_path.read_text(encoding="utf-8"))["tasks"][0]
        for split, n in (("dev", n_dev), ("test", n_test)):
            source = (suite_path.parent / spec[split]).resolve()
            if n is None:
                spec[split] = str(source)
                continue
            lines = source.read_text(encoding="utf-8").splitlines()
            picked = sorted(random.Random(f"{seed}-{task}-{split}").sample(range(len(lines)), min(n, len(lines))))
            subset = folder / f"{task}.{split}.jsonl"
            subset.write_text("".join(lines[i] + "\n" for i in picked), encoding="utf-8")
            spec[split] = str(subset)
        tasks.append(spec)
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "real_mc", "tasks": tasks}, sort_keys=False))
    return path


def run_stage(name: str, argv: list[str], log: Path, env: dict) -> dict:
    """Run one stage as a child process; its wall time, CPU time and own peak RSS (wait4)."""
    started = time.perf_counter()
    load = os.getloadavg()[0]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(log.read_text()[-3000:])
        raise SystemExit(f"stage {name} failed with exit code {code}; log: {log}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="smoke")
    parser.add_argument("--sft", choices=("lora", "full"), default="lora")
    parser.add_argument("--workdir", type=Path, default=None, help="default: benchmarks/_work/real_sft_<size>_<sft>")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = SIZES[args.size]
    work = (args.workdir or ROOT / "benchmarks" / "_work" / f"real_sft_{args.size}_{args.sft}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    exme = [sys.executable, "-m", "exme"]
    stages: dict[str, dict] = {}

    # 1. assets (cached after the first time; this stage then only reads stamps)
    stages["assets"] = run_stage("assets", [sys.executable, "-m", "exme.assets", "all"], work / "assets.log", env)
    sys.path.insert(0, str(ROOT / "src"))
    from exme.assets import real_model, real_records

    records = real_records()
    base = real_model("float32")

    # 2. data: training JSONL and the evaluation suite
    started = time.perf_counter()
    train_counts = write_training_data(records, work / "train.jsonl", size["train"], args.seed)
    suite = write_suite(records, work / "suite", size["dev"], size["test"], args.seed)
    stages["data"] = {"wall_s": round(time.perf_counter() - started, 1)}

    # 3. SFT: a few checkpoints of one run
    sft_dir = work / f"sft-{args.sft}"
    device = "cuda" if args.size == "gpu" else "cpu"
    argv = [*exme, "finetune", str(base), str(work / "train.jsonl"), "--output", str(sft_dir),
            "--max-steps", str(size["steps"]), "--save-steps", str(size["save"]), "--batch-size", str(size["batch"]),
            "--max-length", str(size["max_length"]), "--learning-rate", str(LEARNING_RATE[args.sft]),
            "--warmup-ratio", "0.05", "--seed", str(args.seed), "--device", device, "--force"]
    if args.sft == "lora":
        argv += ["--lora-r", str(size["lora_r"])]
    if device == "cpu":
        argv += ["--threads", str(args.threads)]
    stages["sft"] = run_stage("sft", argv, work / "sft.log", env)

    # 4. exme run on the real suite
    import yaml

    pipeline = {"base": str(base), "checkpoints": str(sft_dir), "suite": str(suite), "top_k": 2,
                "device": device, "dtype": "float32", "output": str(work / "run"), "seed": args.seed,
                **size["pipeline"]}
    if args.sft == "lora":
        pipeline.setdefault("output_format", "peft")
    (work / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run_argv = [*exme, "run", str(work / "pipeline.yaml"), "--quiet"]
    if device == "cpu":
        run_argv += ["--threads", str(args.threads)]
    stages["run"] = run_stage("run", run_argv, work / "run.log", env)

    results = json.loads((work / "run" / "results.json").read_text())
    final = {r["name"]: {"dev": None if r.get("dev") is None else r["dev"]["overall"], "test": r["test"]["overall"],
                         "test_tasks": r["test"]["tasks"]} for r in results["final"]}
    import torch

    summary = {"size": args.size, "sft": args.sft, "train": train_counts, "stages": stages, "final": final,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
               "threads": args.threads, "report": str(work / "run" / "report.md")}
    (work / "real_sft.json").write_text(json.dumps(summary, indent=2))

    print(f"### real SFT run: size {args.size}, {args.sft} SFT ({summary['machine']}, torch {torch.__version__})\n")
    print(f"training records: {train_counts}\n")
    print("| stage | wall s | CPU s | peak RSS MB | load before → after |\n|---|---|---|---|---|")
    for name, s in stages.items():
        print(f"| {name} | {s['wall_s']} | {s.get('cpu_s', '–')} | {s.get('peak_rss_mb', '–')} | "
              f"{s.get('load_before', '–')} → {s.get('load_after', '–')} |")
    print("\n| model | dev | test | " + " | ".join(EVAL_TASKS) + " |\n|---|---|---|" + "---|" * len(EVAL_TASKS))
    for name, row in final.items():
        dev = "–" if row["dev"] is None else f"{row['dev']:.3f}"
        print(f"| {name} | {dev} | {row['test']:.3f} | "
              + " | ".join(f"{row['test_tasks'].get(t, float('nan')):.3f}" for t in EVAL_TASKS) + " |")
    print(f"\nreport: {summary['report']}")


if __name__ == "__main__":
    main()
