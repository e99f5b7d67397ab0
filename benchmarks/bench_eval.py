"""Evaluation throughput: items/s for generation and multiple choice, batched vs one item at a time.

Run:  PYTHONPATH=src python benchmarks/bench_eval.py [--quick]
      .venv-vllm/bin/python benchmarks/bench_eval.py --backends [--quick]   (HF vs vLLM backends)
      .venv-vllm/bin/python benchmarks/bench_eval.py --memory               (peak RSS of a vLLM search)

``--backends`` compares the evaluation backends instead (it needs vLLM: ``make venv-vllm``):
the ~100M model is saved to a temporary folder, one vLLM engine is started on it, and the same
``SuiteEvaluator`` scores the same items through the HF backend (batched) and the vLLM backend;
when ``lm_eval`` is importable its own vLLM model scores the same MC items as a peer. Candidate
swap time: ``LiveModel.apply`` (what the HF backend pays per candidate) against ``apply`` plus
loading the candidate into the running engine and resetting its prefix cache.

Two locally built, random-init Llama models with the character tokenizer of ``exme.testing``: the
tiny test model and a ~100M-parameter one. For each, a GSM8K-format task (greedy generation,
fixed ``max_new_tokens``) and a 4-choice multiple-choice task are scored by the same
``SuiteEvaluator`` with batching on (the default) and with batch size 1 (the named peer), in one
process. When ``lm_eval`` is installed, its ``HFLM`` scores the same MC items as a second peer.
Each figure is the best of ``--repeats`` timed calls after a one-item warm-up call (which builds
the whole split's tokenization cache, as the first evaluation of a search does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from exme.evaluate import Suite, SuiteEvaluator
from exme.testing import char_tokenizer, tiny_llama_config

WORDS = "apple river stone cloud seven orange table light forest number paper garden window music".split()


def build_data(folder: Path, n_gen: int, n_mc: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(folder / "gen.jsonl", "w") as fh:
        for i in range(n_gen):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            q = f"{rng.choice(WORDS).title()} has {a} {rng.choice(WORDS)}s and buys {b} more. How many now?"
            fh.write(json.dumps({"question": q, "answer": f"{a}+{b}={a + b}\n#### {a + b}"}) + "\n")
    with open(folder / "mc.jsonl", "w") as fh:
        for i in range(n_mc):
            words = rng.sample(WORDS, 4)
            q = f"Which word is closest in meaning to '{rng.choice(WORDS)}' in this sentence about {words[0]}?"
            fh.write(json.dumps({"question": q, "choices": [w + " " + rng.choice(WORDS) for w in words], "label": i % 4}) + "\n")
    suite = folder / "suite.yaml"
    suite.write_text(
        "name: bench\ntasks:\n"
        "  - {name: gen, kind: gsm8k, dev: gen.jsonl, test: gen.jsonl, max_new_tokens: 32, stop: []}\n"
        "  - {name: mc, kind: multiple_choice, dev: mc.jsonl, test: mc.jsonl}\n"
    )
    return suite


def build_model(kind: str, vocab: int):
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    if kind == "tiny":
        config = tiny_llama_config(vocab_size=vocab)
    elif kind == "small":  # ~3M parameters: the engine's per-request work shows beside the forward passes
        config = tiny_llama_config(vocab_size=vocab, hidden_size=256, num_layers=4, intermediate_size=1024, num_heads=8)
    else:  # ~100M parameters, Llama-style (GQA, SwiGLU, RMSNorm)
        config = tiny_llama_config(vocab_size=vocab, hidden_size=768, num_layers=16, intermediate_size=2048, num_heads=12)
    return LlamaForCausalLM(config).eval()


def time_task(model, tok, suite_path: Path, task: str, batch: int, repeats: int) -> tuple[float, int, object]:
    suite = Suite.from_yaml(suite_path)
    suite.tasks = [t for t in suite.tasks if t.name == task]
    evaluator = SuiteEvaluator(suite, batch_size=batch, mc_batch_size=batch * 4 if batch > 1 else 1, keep_items=True)
    scores = evaluator.evaluate(model, tok, "dev", limit=1)  # warm-up: builds the whole split's token cache
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        scores = evaluator.evaluate(model, tok, "dev")
        best = min(best, time.perf_counter() - start)
    return best, scores.n_items[task], scores


def time_lm_eval_mc(model, tok, folder: Path, repeats: int, batch: int) -> float | None:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        return None
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    (folder / "lm_eval").mkdir(exist_ok=True)
    (folder / "lm_eval" / "bench_mc.yaml").write_text(
        "task: bench_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    manager = TaskManager(include_path=str(folder / "lm_eval"), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        lm_eval.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=manager, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
        best = min(best, time.perf_counter() - start)
    return best


def time_threads(model, tok, threads: list[int], repeats: int = 3) -> dict[int, float]:
    """Seconds of one forward pass over 16 rows of 96 tokens, best of ``repeats``, per torch thread count."""
    ids = torch.randint(4, len(tok), (16, 96), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    out = {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            best = float("inf")
            with torch.inference_mode():
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(input_ids=ids)
                    best = min(best, time.perf_counter() - start)
            out[n] = best
    finally:
        torch.set_num_threads(before)
    return out


def _lm_eval_vllm_on(engine):
    """lm-eval's own ``VLLM`` model built around exme's running engine (its ``LLM`` object), so both
    score on the very same engine (imported through ``exme.testing.lm_eval_vllm_module``, which
    lets lm-eval's module load beside vLLM's CPU wheel)."""
    from exme.testing import lm_eval_vllm_module

    peer_module = lm_eval_vllm_module()
    made = peer_module.LLM
    peer_module.LLM = lambda **kwargs: engine.llm  # the engine that is already running
    try:
        return peer_module.VLLM(pretrained=str(engine.model_path), dtype="float32", batch_size="auto",
                                enable_prefix_caching=True)
    finally:
        peer_module.LLM = made


def mc_side_by_side(engine, tok, folder: Path, repeats: int) -> dict:
    """Multiple choice on one engine, the same items: exme's suite path (with and without shared-context
    prefill), exme's lm-eval adapter and lm-eval's own VLLM model on the same lm-eval task, alternated.

    Two item sets: ``mc`` (the short questions above, ~100 tokens: under one 128-token CPU cache
    block, so nothing to share) and ``mc_long`` (a three-example few-shot preamble before each
    question, as lm-eval's few-shot tasks send: ~450 tokens shared by the four choices).
    """
    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager

    from exme.evaluate.lm_eval_adapter import backend_lm

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    records = [json.loads(line) for line in (folder / "mc.jsonl").read_text().splitlines()]
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['choices'][r['label']]}\n\n" for r in records[:3])
    with open(folder / "mc_long.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps({**r, "question": shots + "Question: " + r["question"]}) + "\n")
    (folder / "side").mkdir(exist_ok=True)
    for name, text in (("mc", 'doc_to_text: "Question: {{question}}\\nAnswer:"'), ("mc_long", 'doc_to_text: "{{question}}\\nAnswer:"')):
        (folder / "side" / f"side_{name}.yaml").write_text(
            f"task: side_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / (name + '.jsonl')}\n"
            f"test_split: test\noutput_type: multiple_choice\n{text}\n"
            'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
            "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        )
    (folder / "side_suite.yaml").write_text(
        "name: side\ntasks:\n"
        "  - {name: mc, kind: multiple_choice, dev: mc.jsonl, test: mc.jsonl}\n"
        "  - {name: mc_long, kind: multiple_choice, dev: mc_long.jsonl, test: mc_long.jsonl, prompt: \"{question}\\nAnswer:\"}\n"
    )
    manager = TaskManager(include_path=str(folder / "side"), include_defaults=False)
    peer = _lm_eval_vllm_on(engine)
    ours_lm = backend_lm(engine, tok)
    out: dict = {}
    for name in ("mc", "mc_long"):
        suite = Suite.from_yaml(folder / "side_suite.yaml")
        suite.tasks = [t for t in suite.tasks if t.name == name]
        evaluator = SuiteEvaluator(suite)
        evaluator.evaluate(engine, tok, "dev", limit=1)  # the token cache

        def suite_call(reuse: bool) -> None:
            engine.prefix_reuse = reuse
            engine.reset_cache()
            evaluator.evaluate(engine, tok, "dev")

        def harness(lm) -> None:
            engine.prefix_reuse = True
            engine.reset_cache()
            lm_eval.simple_evaluate(model=lm, tasks=[f"side_{name}"], task_manager=manager, log_samples=False,
                                    bootstrap_iters=0, verbosity="ERROR")

        calls = {"exme_suite": lambda: suite_call(True), "exme_suite_no_reuse": lambda: suite_call(False),
                 "exme_lm_eval_adapter": lambda: harness(ours_lm), "lm_eval_vllm": lambda: harness(peer)}
        best = {k: float("inf") for k in calls}
        for _ in range(repeats + 1):  # the first round warms each path up
            for key, call in calls.items():
                t0 = time.perf_counter()
                call()
                best[key] = min(best[key], time.perf_counter() - t0)
        n = len(records)
        out[name] = {"items": n, "prompt_tokens": len(tok(shots + records[0]["question"])["input_ids"]) if name == "mc_long"
                     else len(tok("Question: " + records[0]["question"])["input_ids"]),
                     **{f"{k}_items_per_s": n / v for k, v in best.items()}}
        out[name]["exme_over_lm_eval_vllm"] = out[name]["exme_suite_items_per_s"] / out[name]["lm_eval_vllm_items_per_s"]
        print(json.dumps({name: out[name]}), flush=True)
    engine.prefix_reuse = True
    return out


def bench_backends(args) -> None:
    """HF backend (batched) vs vLLM backend on the ~100M model: items/s and candidate swap time."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from exme.evaluate.backends.vllm import VLLMBackend
    from exme.search.live import LiveModel

    tok = char_tokenizer()
    n_gen, n_mc = (8, 16) if args.quick else (16, 32)
    load_before = os.getloadavg()
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        suite = build_data(folder, n_gen, n_mc)
        model = build_model(args.size, len(tok))
        base = folder / "base"
        model.save_pretrained(base)
        tok.save_pretrained(base)
        gen = torch.Generator().manual_seed(1)
        for k in (1, 2):  # two "fine-tunes": the base plus seeded noise
            with torch.no_grad():
                tuned = {n: p + 0.01 * torch.randn(p.shape, generator=gen) for n, p in model.state_dict().items()}
            copy = build_model(args.size, len(tok))
            copy.load_state_dict(tuned)
            copy.save_pretrained(folder / f"sft{k}")
            del copy, tuned
        start = time.perf_counter()
        engine = VLLMBackend(base, dtype="float32", kv_cache_gib=2)
        rows["engine_start_s"] = time.perf_counter() - start
        n_params = sum(p.numel() for p in model.parameters())
        rows["params"] = n_params
        for task in ("gen", "mc"):
            one = Suite.from_yaml(suite)
            one.tasks = [t for t in one.tasks if t.name == task]
            evaluator = SuiteEvaluator(one, batch_size=args.batch, mc_batch_size=args.batch * 4, keep_items=True)
            evaluator.evaluate(model, tok, "dev", limit=1)  # warm-up: the token cache
            evaluator.evaluate(engine, tok, "dev", limit=1)
            timing, scores = {}, {}
            for name, target in (("hf", model), ("vllm", engine)):
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    scores[name] = evaluator.evaluate(target, tok, "dev")
                    best = min(best, time.perf_counter() - t0)
                timing[name] = best
            n = scores["hf"].n_items[task]
            row = {"items": n, "hf_items_per_s": n / timing["hf"], "vllm_items_per_s": n / timing["vllm"],
                   "vllm_over_hf": timing["hf"] / timing["vllm"]}
            a, b = scores["hf"].details[task]["items"], scores["vllm"].details[task]["items"]
            if task == "gen":
                row["identical_completions"] = sum(x["completion"] == y["completion"] for x, y in zip(a, b)) / len(a)
                row["generation_stats"] = {"hf": scores["hf"].details[task]["generation"], "vllm": scores["vllm"].details[task]["generation"]}
            else:
                row["same_prediction"] = sum(x["prediction"] == y["prediction"] for x, y in zip(a, b)) / len(a)
                row["max_abs_loglik_diff"] = max(abs(x - y) for i, j in zip(a, b) for x, y in zip(i["loglik"], j["loglik"]))
            rows[task] = row
            print(json.dumps({task: row}), flush=True)
        # Candidate swap: what each backend pays between two candidates.
        live = LiveModel(model, base)
        live.set_models([folder / "sft1", folder / "sft2"])
        coeffs = [[1.2, 0.3], [0.4, 0.9], [0.7, 0.7]]
        applies, loads = [], []
        for c in coeffs * max(1, args.repeats):
            t0 = time.perf_counter()
            live.apply(c)
            t1 = time.perf_counter()
            engine.load_from(live)
            t2 = time.perf_counter()
            applies.append(t1 - t0)
            loads.append(t2 - t1)
        rows["swap"] = {"live_apply_s": min(applies), "engine_load_and_reset_s": min(loads),
                        "hf_total_s": min(applies), "vllm_total_s": min(a + b for a, b in zip(applies, loads))}
        print(json.dumps({"swap": rows["swap"]}), flush=True)
        if not args.no_lm_eval:
            rows["mc_side_by_side"] = mc_side_by_side(engine, tok, folder, args.repeats)
        del engine
    info = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "torch": torch.__version__,
        "vllm": __import__("vllm").__version__,
        "torch_threads_after_engine_start": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__,
        "batch": args.batch,
        "repeats": args.repeats,
        "size": args.size,
        **rows,
    }
    out = args.json.with_name("bench_eval_backends.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"\n{args.size} model ({rows['params'] / 1e6:.0f}M params, random init), vLLM engine start {rows['engine_start_s']:.1f} s")
    print("| task | items | HF batched items/s | vLLM items/s | vLLM / HF | lm-eval vLLM items/s |")
    print("|---|---|---|---|---|---|")
    for task in ("gen", "mc"):
        r = rows[task]
        peer = f"{r['lm_eval_vllm_items_per_s']:.2f}" if "lm_eval_vllm_items_per_s" in r else "-"
        print(f"| {task} | {r['items']} | {r['hf_items_per_s']:.2f} | {r['vllm_items_per_s']:.2f} | {r['vllm_over_hf']:.1f}x | {peer} |")
    if "mc_side_by_side" in rows:
        print("\nMultiple choice on one engine, same items (items/s, best of the alternated calls):")
        print("| items | prompt tokens | exme suite | exme suite, no shared prefill | exme lm-eval adapter | lm-eval VLLM | exme / lm-eval |")
        print("|---|---|---|---|---|---|---|")
        for name, r in rows["mc_side_by_side"].items():
            print(f"| {name} ({r['items']}) | {r['prompt_tokens']} | {r['exme_suite_items_per_s']:.2f} | {r['exme_suite_no_reuse_items_per_s']:.2f} | "
                  f"{r['exme_lm_eval_adapter_items_per_s']:.2f} | {r['lm_eval_vllm_items_per_s']:.2f} | {r['exme_over_lm_eval_vllm']:.2f}x |")
    sw = rows["swap"]
    print(f"swap: LiveModel.apply {sw['live_apply_s']:.3f} s; + engine load & prefix reset {sw['engine_load_and_reset_s']:.3f} s")
    print(f"load average (1 min) before/after: {info['load_avg_1min_before_after']} on {info['cpus']} CPUs")


# ---------------------------------------------------------------- memory of a vLLM search
MEMORY_SHAPE = dict(hidden_size=768, num_layers=12, intermediate_size=2048, num_heads=12)


def _rss_bytes() -> int:
    return _rss_split()["rss"]


def _rss_split() -> dict[str, int]:
    """Resident memory by kind (``/proc/self/status``): ``anon`` (heap, tensors: what the process
    holds), ``file`` (mapped file pages: libraries and checkpoints read through ``mmap``; the kernel
    can drop these under pressure), ``shmem`` (shared memory), and their sum ``rss``."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
    out = dict.fromkeys(keys.values(), 0)
    with open("/proc/self/status") as fh:
        for line in fh:
            key = keys.get(line.split(":", 1)[0] + ":")
            if key:
                out[key] = int(line.split()[1]) * 1024
    return out


class _RssSampler:
    """Samples the RSS split every ``interval`` seconds on a thread and keeps, per named phase, the
    sample with the highest total (so a transient peak is seen with its anon/file split)."""

    def __init__(self, interval: float = 0.01):
        import threading

        self.interval, self.phase, self.peaks = interval, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        now = _rss_split()
        best = self.peaks.get(self.phase)
        if best is None or now["rss"] > best["rss"]:
            self.peaks[self.phase] = now

    def mark(self, phase: str) -> dict[str, int]:
        """Close the current phase (one last sample) and open ``phase``; returns the split now."""
        self.sample()
        self.phase = phase
        now = _rss_split()
        self.peaks[phase] = now
        return now

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()


def _malloc_trim() -> None:
    """Return freed heap memory to the kernel (glibc): tells allocator retention from held tensors."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_variant(variant: str, folder: Path) -> dict:
    """One variant in this (fresh) process: peak RSS above the RSS after imports, split by kind.

    ``engine``: the vLLM engine alone (its weights, KV cache and runtime). ``module``: what a vLLM
    search held before the engine-only live model: a live model with a transformers module holding
    θ_b, two checkpoints and the candidate, the engine beside it, one candidate applied and loaded.
    ``sink``: the engine-only live model (meta-device shell, candidates streamed into the engine).
    ``sink-dynamic``: the same with glibc's dynamic mmap threshold left on (what exme did before
    ``freed_tensors_leave_the_process``). Every phase's peak is sampled (anonymous vs file-backed vs shared memory), and after the swaps
    the RSS is read again after ``malloc_trim`` (memory freed but kept by the C allocator).
    """
    import resource

    import vllm  # noqa: F401  (imports counted in the baseline)
    import transformers  # noqa: F401

    from exme.evaluate.backends.vllm import VLLMBackend, start_live
    from exme.search.live import LiveModel

    if variant == "sink-dynamic":
        import exme.evaluate.backends.vllm as vllm_backend

        vllm_backend.freed_tensors_leave_the_process = contextlib.nullcontext
    base, sfts = folder / "base", [folder / "sft1", folder / "sft2"]
    baseline_split = _rss_split()
    baseline = baseline_split["rss"]
    sampler = _RssSampler()
    steady: dict[str, dict[str, int]] = {}
    t0 = time.perf_counter()
    sampler.mark("engine start")
    if variant == "engine":
        engine = VLLMBackend(base, dtype="float32", kv_cache_gib=1)
        steady["engine started"] = sampler.mark("idle")
    elif variant == "module":
        from exme.evaluate.backends import LiveTarget

        live = LiveModel.load(base, dtype="float32")
        live.set_models(sfts)
        target = LiveTarget("vllm", lambda: live, model_path=base, dtype="float32", kv_cache_gib=1)
        live.apply([0.8, 0.5])
        engine = target()
    else:
        live, engine = start_live(base, dtype="float32", kept=2, kv_cache_gib=1)
        steady["engine started"] = sampler.mark("hold checkpoints")
        live.set_models(sfts)
        steady["checkpoints held"] = sampler.mark("first candidate")
        live.apply([0.8, 0.5])
    swaps = []
    if variant != "engine":
        steady["first candidate"] = sampler.mark("swaps")
        for coeffs in ([1.2, 0.3], [0.4, 0.9]):
            t1 = time.perf_counter()
            live.apply(coeffs)
            if variant == "module":
                target()
            swaps.append(time.perf_counter() - t1)
    steady["after swaps"] = sampler.mark("end")
    _malloc_trim()
    steady["after swaps, malloc_trim"] = _rss_split()
    sampler.stop()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "baseline_rss": baseline, "baseline_split": baseline_split, "peak_rss": peak,
            "above_baseline": peak - baseline, "phase_peaks": sampler.peaks, "steady": steady,
            "swap_s": swaps, "wall_s": wall}


def bench_memory(args) -> None:
    """Peak RSS of a vLLM search's live state as a multiple of the model's bytes, before and after."""
    import subprocess
    import sys

    from transformers import LlamaForCausalLM

    from exme.testing import make_finetuned

    folder = Path(args.memory_dir) if args.memory_vocab == 32000 else Path(f"{args.memory_dir}-vocab{args.memory_vocab}")
    if not (folder / "sft2" / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        tok = char_tokenizer()
        torch.manual_seed(0)
        cfg = tiny_llama_config(vocab_size=args.memory_vocab, **MEMORY_SHAPE)
        LlamaForCausalLM(cfg).save_pretrained(folder / "base")
        tok.save_pretrained(folder / "base")
        for k in (1, 2):
            make_finetuned(folder / "base", folder / f"sft{k}", seed=k, scale=0.002)
    from exme.io import Checkpoint

    ckpt = Checkpoint.open(folder / "base")
    model_bytes = sum(ckpt.spec(n).numel * ckpt.spec(n).dtype.itemsize for n in ckpt.names)
    load_before = os.getloadavg()
    rows = {}
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    variants = [v for v in ("engine", "module", "sink-dynamic", "sink") if v in args.memory_variants.split(",")]
    if "engine" not in variants:
        raise SystemExit("--memory-variants: include engine (the copies are counted with its KV cache and runtime taken out)")
    for variant in variants:
        proc = subprocess.run([sys.executable, __file__, "--memory-variant", variant, "--memory-dir", str(folder)],
                              capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(line[7:])
        rows[variant]["copies_above_baseline"] = rows[variant]["above_baseline"] / model_bytes
        print(json.dumps(rows[variant]), flush=True)
    engine_extra = rows["engine"]["above_baseline"] - model_bytes  # KV cache and runtime, not weights
    for variant in [v for v in ("module", "sink-dynamic", "sink") if v in rows]:
        r = rows[variant]
        r["model_copies"] = (r["above_baseline"] - engine_extra) / model_bytes
        held = r["steady"]["checkpoints held" if "checkpoints held" in r["steady"] else "first candidate"]["anon"]
        r["swap_peak_over_held_copies"] = (r["phase_peaks"]["swaps"]["anon"] - held) / model_bytes
        r["retained_after_swaps_copies"] = (r["steady"]["after swaps"]["anon"] - held) / model_bytes
    info = {"model_bytes": model_bytes, "shape": {**MEMORY_SHAPE, "vocab_size": args.memory_vocab}, "kept": 2, "cpus": os.cpu_count(),
            "load_avg_1min_before_after": [load_before[0], os.getloadavg()[0]],
            "vllm": __import__("vllm").__version__, "torch": torch.__version__, **rows}
    out = args.json.with_name("bench_eval_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    gib = 2**30
    print(f"\nmodel {model_bytes / gib:.2f} GiB (float32), K = 2 kept checkpoints; peak RSS above the post-import baseline:")
    print("| state held | peak RSS above baseline (GiB) | anon / file at the peak (GiB) | in model copies | model copies "
          "(engine's KV cache and runtime taken out) | swap peak over the held state (copies) | kept after the swaps (copies) |")
    print("|---|---|---|---|---|---|---|")
    labels = (("engine", "engine alone"), ("module", "transformers module beside the engine"),
              ("sink-dynamic", "engine-only live model, glibc's dynamic mmap threshold"),
              ("sink", "engine-only live model, 1 MiB mmap threshold while weights load"))
    for variant, label in labels:
        if variant not in rows:
            continue
        r = rows[variant]
        at_peak = max(r["phase_peaks"].values(), key=lambda x: x["rss"])
        split = (f"{(at_peak['anon'] - r['baseline_split']['anon']) / gib:.2f} / "
                 f"{(at_peak['file'] - r['baseline_split']['file']) / gib:.2f}")
        copies = f"{r['model_copies']:.2f}" if "model_copies" in r else "1 (by definition)"
        swap = (f"{r['swap_peak_over_held_copies']:.2f} | {r['retained_after_swaps_copies']:.2f}"
                if "swap_peak_over_held_copies" in r else "– | –")
        print(f"| {label} | {r['above_baseline'] / gib:.2f} | {split} | {r['copies_above_baseline']:.2f} | {copies} | {swap} |")
    print(f"load average (1 min) before/after: {info['load_avg_1min_before_after']} on {info['cpus']} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items (a smoke run)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1 by default: on a shared, oversubscribed CPU more threads than free cores can be much slower;"
        " the run measures this on the ~100M model)",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/_work/bench_eval.json"))
    parser.add_argument("--backends", action="store_true", help="HF vs vLLM backends on the ~100M model (needs vLLM)")
    parser.add_argument("--no-lm-eval", action="store_true", help="skip lm-eval's vLLM model as a peer")
    parser.add_argument("--size", default="100M", choices=["small", "100M"], help="--backends: the model (default ~100M)")
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS of a vLLM search's live state (needs vLLM), before and after the engine-only live model")
    parser.add_argument("--memory-dir", default="/tmp/exme-bench/memory", help="where the --memory models are built once")
    parser.add_argument("--memory-vocab", type=int, default=32000,
                        help="--memory: vocabulary size (the embedding's share of the model sets the in-flight part of a swap)")
    parser.add_argument("--memory-variants", default="engine,module,sink-dynamic,sink",
                        help="--memory: the variants to run (engine is needed for the copies count)")
    parser.add_argument("--memory-variant", help=argparse.SUPPRESS)  # internal: one variant in a fresh process
    args = parser.parse_args()
    if args.memory_variant:
        print("RESULT " + json.dumps(memory_variant(args.memory_variant, Path(args.memory_dir))), flush=True)
        return
    if args.memory:
        bench_memory(args)
        return
    if args.backends:
        bench_backends(args)
        return

    torch.set_num_threads(args.threads)
    tok = char_tokenizer()
    sizes = {"tiny": (64, 64), "100M": (8, 16)}
    if args.quick:
        sizes = {"tiny": (16, 16), "100M": (4, 8)}
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (n_gen, n_mc) in sizes.items():
            folder = Path(tmp) / kind
            folder.mkdir()
            suite = build_data(folder, n_gen, n_mc)
            model = build_model(kind, len(tok))
            n_params = sum(p.numel() for p in model.parameters())
            row = {"model": kind, "params": n_params}
            for task in ("gen", "mc"):
                batched, n, sb = time_task(model, tok, suite, task, args.batch, args.repeats)
                single, _, s1 = time_task(model, tok, suite, task, 1, args.repeats)
                row[task] = {"items": n, "batched_items_per_s": n / batched, "batch1_items_per_s": n / single,
                             "speedup": single / batched}
                if task == "gen":
                    same = [a["completion"] == b["completion"] for a, b in zip(sb.details["gen"]["items"], s1.details["gen"]["items"])]
                    row[task]["identical_completions"] = sum(same) / len(same)
                else:
                    a, b = sb.details["mc"]["items"], s1.details["mc"]["items"]
                    row[task]["max_abs_loglik_diff"] = max(abs(x - y) for i, j in zip(a, b) for x, y in zip(i["loglik"], j["loglik"]))
            if kind == "100M":
                row["forward_s_by_threads"] = time_threads(model, tok, [1, 2])
            lm_eval_s = time_lm_eval_mc(model, tok, folder, args.repeats, args.batch)
            if lm_eval_s is not None:
                row["mc"]["lm_eval_items_per_s"] = n_mc / lm_eval_s
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "batch": args.batch,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=2) + "\n")
    print("\n| model | params | task | items | batched items/s | batch-1 items/s | speed-up | lm-eval items/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for task in ("gen", "mc"):
            r = row[task]
            peer = f"{r['lm_eval_items_per_s']:.1f}" if "lm_eval_items_per_s" in r else "-"
            print(f"| {row['model']} | {row['params'] / 1e6:.1f}M | {task} | {r['items']} | {r['batched_items_per_s']:.2f} | "
                  f"{r['batch1_items_per_s']:.2f} | {r['speedup']:.1f}x | {peer} |")
    for row in rows:
        if "forward_s_by_threads" in row:
            print(f"\n{row['model']} forward (16x96 tokens), seconds by torch threads: {row['forward_s_by_threads']}")
    print(f"load average (1 min) before/after: {info['load_avg_1min_before_after']} on {info['cpus']} CPUs")


if __name__ == "__main__":
    main()
