"""Fixtures for the backend tests: tiny models vLLM's CPU kernels accept (head size 32), a suite of
every built-in task kind, and the switch that runs or skips the vLLM tests.

The vLLM tests run in the second virtual environment that ``make test`` builds (``.venv-vllm``,
``EXME_REQUIRE_VLLM=1``), where a missing vLLM is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("EXME_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("EXME_REQUIRE_VLLM=1 but vllm is not importable in this environment")
    skip = pytest.mark.skip(reason="vllm is not installed here; `make test` runs these in .venv-vllm")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory):
    """Base A and a fine-tune-like B = A + noise, float32, head size 32 (64 hidden, 2 heads)."""
    from exme.testing import make_finetuned, make_tiny_model

    root = tmp_path_factory.mktemp("vllm_models")
    shape = dict(hidden_size=64, num_heads=2, intermediate_size=128, initializer_range=0.1)
    a = make_tiny_model(root / "A", seed=11, **shape)
    b = make_finetuned(a, root / "B", seed=12, scale=0.05)
    c = make_finetuned(a, root / "C", seed=13, scale=0.05)
    return SimpleNamespace(root=root, a=a, b=b, c=c)


MBPP = [
    {"text": "Write a function to square a number.", "test_list": ["assert square(3) == 9"]},
    {"text": "Write a function to add two numbers.", "test_list": ["assert add(1, 2) == 3"]},
    {"text": "Write a function to negate x.", "test_list": ["assert neg(1) == -1"]},
    {"text": "Write a function to double x.", "test_list": ["assert double(2) == 4"]},
]


@pytest.fixture(scope="session")
def all_kinds_suite(tmp_path_factory) -> Path:
    """Generation (GSM8K and regex), multiple choice, perplexity and MBPP, with long shared prefixes."""
    root = tmp_path_factory.mktemp("kinds")
    preamble = "Solve each problem carefully and give the final number after four hash marks. " * 3
    gsm = [{"question": f"{preamble}What is {a} plus {b}?", "answer": f"#### {a + b}"} for a in range(1, 7) for b in range(1, 3)]
    gen = [{"prompt": f"Name the colour number {i}:", "target": ["red", "blue"]} for i in range(8)]
    mc = [{"question": f"{preamble}{a} + {b} =", "choices": [str(a + b), str(a + b + 1), f"{a}{b}"], "label": 0}
          for a in range(1, 6) for b in range(1, 3)]
    ppl = [{"text": f"the number {i} comes after {i - 1} and before {i + 1}."} for i in range(1, 9)]
    files = {"gsm.jsonl": gsm, "gen.jsonl": gen, "mc.jsonl": mc, "ppl.jsonl": ppl, "mbpp.jsonl": MBPP}
    for name, rows in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = root / "suite.yaml"
    suite.write_text(
        "name: kinds\nsplit: {seed: 0, dev_fraction: 0.5}\ntasks:\n"
        "  - {name: gsm, kind: gsm8k, data: gsm.jsonl, max_new_tokens: 24}\n"
        "  - {name: gen, kind: generate, data: gen.jsonl, max_new_tokens: 12, stop: [\"\\n\"]}\n"
        "  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n"
        "  - {name: ppl, kind: perplexity, data: ppl.jsonl}\n"
        "  - {name: mbpp, kind: mbpp, data: mbpp.jsonl, max_new_tokens: 24}\n"
    )
    return suite
