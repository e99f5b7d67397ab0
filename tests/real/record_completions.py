"""Record real completions of SmolLM2-135M-Instruct once, for tests that need no generation.

    PYTHONPATH=src python tests/real/record_completions.py [--limit 16] [--out tests/real/fixtures/smollm2_completions.json]

Greedy, float32, on the first ``limit`` dev items of the real gsm8k, humaneval and mbpp records
under the chat template, each with the user turn a first run had (``before``: the bare record, as
exme's defaults were) and the one exme has now (``now``: lm-eval's instruct instructions). GSM8K is
generated with lm-eval's stops only, so a test can cut a completion at any other stop itself (greedy
decoding with a stop string equals the longer completion cut at its first occurrence).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from exme.assets import real_model, real_records
from exme.common import load_model, load_tokenizer
from exme.evaluate import SuiteEvaluator
from exme.evaluate.kinds import get_kind
from exme.evaluate.suite import Suite

STOPS = ["Question:", "</s>", "<|im_end|>"]


def variants(records) -> dict[str, dict]:
    data = lambda task: str(records.data(task, "test"))  # noqa: E731
    return {
        "humaneval_before": {"kind": "humaneval", "data": data("humaneval"), "prompt": "{prompt}", "max_new_tokens": 320},
        "gsm8k_before": {"kind": "gsm8k", "data": data("gsm8k"), "prompt": get_kind("gsm8k").prompt, "stop": STOPS, "max_new_tokens": 200},
        "humaneval_now": {"kind": "humaneval", "data": data("humaneval"), "max_new_tokens": 320},
        "mbpp_now": {"kind": "mbpp", "data": data("mbpp"), "max_new_tokens": 320},
        "gsm8k_now": {"kind": "gsm8k", "data": data("gsm8k"), "stop": STOPS, "max_new_tokens": 200},
        "mbpp_before": {"kind": "mbpp", "data": data("mbpp"), "prompt": get_kind("mbpp").prompt, "max_new_tokens": 320},
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "fixtures" / "smollm2_completions.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a shared machine: one thread does not fight the others for cores
    model_dir = real_model("float32")
    model, tokenizer = load_model(model_dir, dtype="float32"), load_tokenizer(model_dir)
    out = {"command": "PYTHONPATH=src python tests/real/record_completions.py " + " ".join(sys.argv[1:]),
           "model": "exme.assets.real_model('float32') (SmolLM2-135M-Instruct Q4_1, dequantized)",
           "torch": torch.__version__, "machine": platform.machine(), "limit": args.limit, "tasks": {}}
    for name, task in variants(real_records()).items():
        started = time.monotonic()
        suite = Suite.from_dict({"name": name, "tasks": [{"name": name, "chat_template": True, **task}]})
        scores = SuiteEvaluator(suite, keep_items=True, batch_size=8).evaluate(model, tokenizer, "dev", limit=args.limit)
        items = scores.details[name]["items"]
        out["tasks"][name] = [
            {"position": i, "id": it.get("id"), "prompt": it["prompt"], "completion": it["completion"],
             "finish": it["finish"], "new_tokens": it["new_tokens"]}
            for i, it in enumerate(items)
        ]
        print(f"{name}: {len(items)} items, score {scores.tasks[name]:.3f}, {time.monotonic() - started:.0f} s", flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")  # after each task: usable if stopped
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
