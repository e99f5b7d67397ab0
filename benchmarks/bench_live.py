"""Candidate switch time of the live model vs writing the merged model to disk and loading it again.

A search evaluates dozens of candidates. Without a live model each one is a merge written to disk
(`run_merge`) and a `from_pretrained` of the result; with one it is `LiveModel.apply`, a pass over
memory. This measures both on the same ~550M-parameter bf16 Llama-style models (hidden 1536,
16 layers, intermediate 4096, vocab 32000, untied), alternating them, several repetitions, and
checks that the two paths give bitwise the same weights.

    python benchmarks/bench_live.py [--models /tmp/exme-bench/models] [--reps 3] [--store float32-deltas]

The models are reused from the merge benchmark's folder when present, else built there once.

``--lora`` measures memory instead: peak RSS of a live model holding K LoRA adapters against the
same live model holding the K full models PEFT's ``merge_and_unload()`` writes for them, each in a
fresh subprocess (so each peak is its own), plus the median ``apply`` time of both paths and a
bitwise comparison of their live weights.

    python benchmarks/bench_live.py --lora [--lora-rank 16] [--lora-k 3]

The LoRA run holds the adapters twice, with θᵢ of the targeted tensors cached (``lora_cache=True``,
what ``"auto"`` picks when memory allows) and with the factors only (``lora_cache=False``), so the
switch time of each against the full models is one run.

``--per-tensor`` measures ``apply`` with per-tensor coefficients (module groups: attention, MLP, the
rest, each with its own cᵢ) against global coefficients on the same live model, interleaved (global,
per-tensor, global, ...) so machine load falls on both alike, and checks that each tensor's weights
are bitwise those of the global candidate with its group's coefficients. It uses the LoRA run's
float32 base and PEFT-merged full models as two full checkpoints.

    python benchmarks/bench_live.py --per-tensor [--switches 10]
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


#: The LoRA memory benchmark's model: ~180M parameters in float32 (0.7 GB), small enough that K + 2
#: copies fit a shared 24 GiB machine.
LORA_SHAPE = dict(hidden_size=1024, num_layers=12, intermediate_size=2816, vocab_size=32000, num_heads=16)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_lora_inputs(root: Path, k: int, rank: int) -> tuple[Path, list[Path], list[Path]]:
    """A float32 base, K PEFT adapters (all linear projections, rank ``rank``) and their merged full models."""
    from transformers import LlamaForCausalLM

    from exme.testing import char_tokenizer, make_lora_adapter, merge_lora_adapter, tiny_llama_config

    base = root / "base"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        cfg = tiny_llama_config(vocab_size=LORA_SHAPE["vocab_size"], hidden_size=LORA_SHAPE["hidden_size"],
                                num_layers=LORA_SHAPE["num_layers"], intermediate_size=LORA_SHAPE["intermediate_size"],
                                num_heads=LORA_SHAPE["num_heads"])
        LlamaForCausalLM(cfg).save_pretrained(base)
        char_tokenizer().save_pretrained(base)
    adapters, merged = [], []
    for i in range(1, k + 1):
        adapter, full = root / f"adapter{i}-r{rank}", root / f"merged{i}-r{rank}"
        if not (adapter / "adapter_config.json").is_file():
            make_lora_adapter(base, adapter, seed=i, r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, scale=0.01)
        if not (full / "config.json").is_file():
            merge_lora_adapter(base, adapter, full)
        adapters.append(adapter)
        merged.append(full)
    gc.collect()
    return base, adapters, merged


def hwm_gib() -> float:
    """Peak RSS of this process image (VmHWM). Unlike getrusage's ru_maxrss, it starts afresh at exec,
    so a child's figure does not inherit its parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _lora_child(base: str, inputs: list[str], out: str, lora_cache: bool = False) -> None:
    """One path of the LoRA benchmark, alone in its process: load, hold, apply; report peak RSS (VmHWM)."""
    from exme.search import LiveModel

    peak_rss_gib = hwm_gib  # noqa: N806 - this process's own peak, see hwm_gib
    before = peak_rss_gib()
    t0 = time.perf_counter()
    live = LiveModel.load(base, lora_cache=lora_cache)
    loaded_base = peak_rss_gib()
    live.set_models(inputs)
    load_s = time.perf_counter() - t0
    held = rss_gib()
    times = []
    for coeffs in ([0.6, 0.3, 0.2], [1.2, 0.4, 0.1], [0.3, 0.9, 0.5], [0.5, 0.5, 0.5], [0.9, 0.1, 0.7])[:5]:
        t = time.perf_counter()
        live.apply(coeffs[: len(inputs)])
        times.append(time.perf_counter() - t)
    peak = peak_rss_gib()  # before the copy below, which only serves the bitwise check
    torch.save({n: p.detach().clone() for n, p in live.targets.items()}, out)
    json.dump({"load_s": round(load_s, 2), "apply_s_median": round(statistics.median(times), 3),
               "apply_s_min_max": [round(min(times), 3), round(max(times), 3)],
               "rss_after_base_gib": round(loaded_base, 2), "rss_holding_gib": round(held, 2),
               "peak_rss_gib": round(peak, 2), "startup_rss_gib": round(before, 2)}, sys.stdout)


def main_lora(args: argparse.Namespace) -> None:
    import subprocess

    root = args.models.parent / "lora-models"
    base, adapters, merged = build_lora_inputs(root, args.lora_k, args.lora_rank)
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    results = {}
    runs = (("adapters", adapters, False), ("adapters cached", adapters, True), ("full models", merged, False))
    for name, inputs, cache in runs:
        out = args.work / f"{name.replace(' ', '-')}.pt"
        code = ("import sys, json; sys.path.insert(0, %r); import bench_live; "
                "bench_live._lora_child(%r, json.loads(sys.argv[1]), %r, %r)") % (
                    str(Path(__file__).parent), str(base), str(out), cache)
        proc = subprocess.run([sys.executable, "-c", code, json.dumps([str(p) for p in inputs])],
                              capture_output=True, text=True, check=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    a, c, f = (torch.load(args.work / f"{n}.pt") for n in ("adapters", "adapters-cached", "full-models"))
    identical = all(torch.equal(a[n], f[n]) and torch.equal(c[n], f[n]) for n in a)
    adapter_mb = sum(sum(p.stat().st_size for p in d.glob("adapter_model.*")) for d in adapters) / 2**20
    model_gb = sum(p.stat().st_size for p in (base).glob("*.safetensors")) / 2**30
    import transformers

    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "model_gib_float32": round(model_gb, 2), "k": args.lora_k, "rank": args.lora_rank,
        "adapters_mib_total": round(adapter_mb, 1), **{f"{k} ": v for k, v in results.items()},
        "peak_rss_ratio_full_over_adapters": round(results["full models"]["peak_rss_gib"] / results["adapters"]["peak_rss_gib"], 2),
        "apply_ratio_adapters_over_full": round(results["adapters"]["apply_s_median"] / results["full models"]["apply_s_median"], 2),
        "apply_ratio_adapters_cached_over_full": round(
            results["adapters cached"]["apply_s_median"] / results["full models"]["apply_s_median"], 2),
        "live_weights_bitwise_identical": identical,
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(summary, indent=2))
    if not identical:
        sys.exit("live weights from adapters differ from those from the merged full models")


def main_per_tensor(args: argparse.Namespace) -> None:
    """Global vs per-tensor (module groups) ``apply`` on one live model, interleaved; see the module docstring."""
    from exme.merge.groups import GroupCoefficients, group_rule
    from exme.search import LiveModel

    root = args.models.parent / "lora-models"
    base, _, merged = build_lora_inputs(root, max(2, args.lora_k), args.lora_rank)
    load_before = os.getloadavg()
    live = LiveModel.load(base)
    live.set_models(merged[:2])
    rule = group_rule("module", list(live.targets))
    by_group = {"attention": (0.9, 0.2), "mlp": (0.3, 1.4), "other": (1.0, 0.5)}
    per_tensor = GroupCoefficients.from_groups(rule, by_group)
    glob = [0.6, 0.7]
    live.apply(glob), live.apply(per_tensor)  # warm-up: pages resident, buffers allocated
    global_s, per_tensor_s = [], []
    for _ in range(args.switches):
        t = time.perf_counter()
        live.apply(glob)
        global_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        live.apply(per_tensor)
        per_tensor_s.append(time.perf_counter() - t)
    state = {n: p.detach().clone() for n, p in live.targets.items()}
    identical = True
    for group, coeffs in by_group.items():
        live.apply(list(coeffs))
        identical &= all(torch.equal(state[n], p) for n, p in live.targets.items() if rule.group_of(n) == group)
    import transformers

    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "params": sum(p.numel() for p in live.targets.values()), "dtype": str(live.dtype), "n": args.switches,
        "global_apply_s": {"median": round(statistics.median(global_s), 3), "min": round(min(global_s), 3), "max": round(max(global_s), 3)},
        "per_tensor_apply_s": {"median": round(statistics.median(per_tensor_s), 3), "min": round(min(per_tensor_s), 3),
                               "max": round(max(per_tensor_s), 3)},
        "ratio_per_tensor_over_global_median": round(statistics.median(per_tensor_s) / statistics.median(global_s), 3),
        "ratio_per_tensor_over_global_min": round(min(per_tensor_s) / min(global_s), 3),
        "bitwise_per_group": identical,
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(summary, indent=2))
    if not identical:
        sys.exit("per-tensor weights differ from the global candidate with the group's coefficients")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path("/tmp/exme-bench/models"))
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "_work" / "live")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--switches", type=int, default=5, help="live candidate switches per repetition")
    ap.add_argument("--store", choices=["checkpoints", "float32-deltas"], default="checkpoints",
                    help="what the live model holds (see exme.search.live)")
    ap.add_argument("--ties", action="store_true", help="also time one TIES baseline applied live (slow on a CPU)")
    ap.add_argument("--lora", action="store_true", help="peak RSS with LoRA adapters vs their merged full models")
    ap.add_argument("--lora-k", type=int, default=3, help="adapters held (--lora)")
    ap.add_argument("--lora-rank", type=int, default=16, help="rank of each adapter (--lora)")
    ap.add_argument("--per-tensor", action="store_true", help="apply with per-tensor coefficients vs global ones")
    args = ap.parse_args()
    if args.per_tensor:
        main_per_tensor(args)
        return
    if args.lora:
        main_lora(args)
        return

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
