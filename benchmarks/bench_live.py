"""Candidate switch time of the live model vs writing the merged model to disk and loading it again.

A search evaluates dozens of candidates. Without a live model each one is a merge written to disk
(`run_merge`) and a `from_pretrained` of the result; with one it is `LiveModel.apply`, a pass over
memory. This measures both on the same ~550M-parameter bf16 Llama-style models (hidden 1536,
16 layers, intermediate 4096, vocab 32000, untied), alternating them, several repetitions, and
checks that the two paths give bitwise the same weights.

    python benchmarks/bench_live.py [--models /tmp/exme-bench/models] [--reps 3] [--store float32-deltas]

The models are reused from the merge benchmark's folder when present, else built there once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPE = dict(hidden_size=1536, num_layers=16, intermediate_size=4096, vocab_size=32000, num_heads=16)


def rss_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_models(root: Path) -> None:
    """base (random init, seed 0) and ft1/ft2 = base + N(0, 0.002²) noise (seeds 1, 2), bf16, untied."""
    from transformers import LlamaForCausalLM

    from exme.testing import char_tokenizer, tiny_llama_config

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = tiny_llama_config(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"], num_layers=SHAPE["num_layers"],
        intermediate_size=SHAPE["intermediate_size"], num_heads=SHAPE["num_heads"],
    )
    cfg.num_key_value_heads = SHAPE["num_heads"]
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for seed, name in ((1, "ft1"), (2, "ft2")):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_((base[k].float() + torch.randn(p.shape, generator=gen) * 0.002).to(torch.bfloat16))
        model.save_pretrained(root / name)
        char_tokenizer().save_pretrained(root / name)
    del model, base
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path("/tmp/exme-bench/models"))
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "live")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--switches", type=int, default=5, help="live candidate switches per repetition")
    ap.add_argument("--store", choices=["checkpoints", "float32-deltas"], default="checkpoints",
                    help="what the live model holds (see exme.search.live)")
    ap.add_argument("--ties", action="store_true", help="also time one TIES baseline applied live (slow on a CPU)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import transformers
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge
    from exme.pipeline import exme_coefficients
    from exme.search import LiveModel

    if not all((args.models / n / "config.json").is_file() for n in ("base", "ft1", "ft2")):
        print(f"building the models in {args.models} ...", flush=True)
        build_models(args.models)
    base, ft1, ft2 = (args.models / n for n in ("base", "ft1", "ft2"))
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    rss0 = rss_gib()
    live = LiveModel.load(base, store=args.store)
    live.set_models([ft1, ft2])
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in live.targets.values())
    print(f"live model ({args.store}): {n_params / 1e6:.0f}M parameters ({live.dtype}), loaded base + 2 checkpoints in {load_s:.1f} s, "
          f"RSS +{rss_gib() - rss0:.2f} GiB", flush=True)

    candidates = [(b, [a1, a2]) for b, a1, a2 in [(0.3, 0.2, 0.5), (0.5, 0.4, 0.1), (0.7, 0.6, 0.9), (0.6, 0.3, 0.5),
                                                   (0.4, 0.8, 0.2), (0.5, 0.5, 0.5)]]
    apply_s: list[float] = []
    disk_s: list[float] = []
    merge_s: list[float] = []
    load_from_disk_s: list[float] = []
    identical = True
    for rep in range(args.reps):
        # live: several switches between candidates
        for j in range(args.switches):
            beta, alphas = candidates[(rep * args.switches + j) % len(candidates)]
            t = time.perf_counter()
            live.apply(exme_coefficients([beta, 1 - beta], alphas))
            apply_s.append(time.perf_counter() - t)
        # disk: write the candidate with the streaming engine, load it with transformers
        beta, alphas = candidates[rep % len(candidates)]
        config = MergeConfig.model_validate({
            "merge_method": "exme", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": str(ft1), "parameters": {"weight": beta, "alpha": alphas[0]}},
                       {"model": str(ft2), "parameters": {"weight": 1 - beta, "alpha": alphas[1]}}],
        })
        out = args.work / "candidate"
        t = time.perf_counter()
        run_merge(config, out, force=True, progress=False)
        t_merge = time.perf_counter() - t
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        # from_pretrained may map the file lazily: touch every 4 KiB page of the weights once, so the
        # load is complete (reading the weights in full is the evaluation's cost on both paths).
        with torch.no_grad():
            for p in model.parameters():
                flat = p.detach().reshape(-1)
                flat[:: max(1, 4096 // flat.element_size())].float().sum()
        t_total = time.perf_counter() - t
        merge_s.append(t_merge)
        load_from_disk_s.append(t_total - t_merge)
        disk_s.append(t_total)
        # the same candidate live, and the bitwise check
        live.apply(exme_coefficients([beta, 1 - beta], alphas))
        disk_state = model.state_dict()
        identical &= all(torch.equal(p.data, disk_state[n]) for n, p in live.targets.items())
        del model, disk_state
        gc.collect()
        print(f"rep {rep + 1}: apply median {statistics.median(apply_s[-args.switches:]):.3f} s, "
              f"run_merge {t_merge:.2f} s + from_pretrained and first touch {t_total - t_merge:.2f} s", flush=True)
    shutil.rmtree(args.work / "candidate", ignore_errors=True)

    ties_s = None
    if args.ties:
        ties_t = time.perf_counter()
        live.apply_method("ties", weights=[1.0, 1.0], density=0.5, normalize=True)
        ties_s = round(time.perf_counter() - ties_t, 2)
    load_after = os.getloadavg()
    med_apply, med_disk = statistics.median(apply_s), statistics.median(disk_s)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "params": n_params,
        "store": args.store,
        "live_load_s": round(load_s, 2),
        "apply_s": {"median": round(med_apply, 3), "min": round(min(apply_s), 3), "max": round(max(apply_s), 3), "n": len(apply_s)},
        "disk_s": {"median": round(med_disk, 2), "min": round(min(disk_s), 2), "max": round(max(disk_s), 2), "n": len(disk_s)},
        "run_merge_s_median": round(statistics.median(merge_s), 2),
        "from_pretrained_and_touch_s_median": round(statistics.median(load_from_disk_s), 2),
        "speedup": round(med_disk / med_apply, 1),
        "ties_apply_s": ties_s,
        "bitwise_identical": identical,
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "loadavg_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }
    print(json.dumps(result, indent=2))
    if not identical:
        sys.exit("live weights differ from the written model")


if __name__ == "__main__":
    main()
