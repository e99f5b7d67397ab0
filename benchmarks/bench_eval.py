"""Evaluation throughput: items/s for generation and multiple choice, batched vs one item at a time.

Run:  PYTHONPATH=src python benchmarks/bench_eval.py [--quick]

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
    args = parser.parse_args()

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
