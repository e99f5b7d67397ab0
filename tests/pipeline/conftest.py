"""Fixtures of the pipeline tests: a tiny SFT run (checkpoint-* folders) and a tiny real suite."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).parent
if str(HERE) not in sys.path:  # the synthetic evaluator and worker scripts live beside the tests
    sys.path.insert(0, str(HERE))

# The hidden optimum of the synthetic objective: 1 + αᵢ = pᵢ and β = w₁p₁² / (w₁p₁² + w₂p₂²) = 0.6.
P1, P2 = 1.3, 1.5
W2 = 1.0
W1 = 1.5 * W2 * P2**2 / P1**2


@pytest.fixture(scope="session")
def sft_run(tiny_models, tmp_path_factory):
    """A base and an SFT run folder with checkpoint-10, -20 and -100 (so numeric step order matters)."""
    from exme.testing import make_finetuned

    root = tmp_path_factory.mktemp("sft_run")
    run = root / "run"
    steps = {10: 1, 20: 2, 100: 3}
    for step, seed in steps.items():
        make_finetuned(tiny_models.base, run / f"checkpoint-{step}", seed=seed, scale=0.02)
    return SimpleNamespace(base=tiny_models.base, run=run, ckpts=[run / f"checkpoint-{s}" for s in steps])


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    """A three-task suite in public formats (multiple choice, GSM8K-style generation, perplexity)."""
    root = tmp_path_factory.mktemp("suite")
    mc = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "label": 0}
          for a in range(1, 5) for b in range(1, 4)]
    gsm = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
           for a in range(1, 4) for b in range(1, 3)]
    ppl = [{"text": f"the number {i} comes after {i - 1}."} for i in range(1, 9)]
    for name, rows in {"mc.jsonl": mc, "gsm.jsonl": gsm, "ppl.jsonl": ppl}.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = root / "suite.yaml"
    suite.write_text(
        "name: tiny\n"
        "split: {seed: 0, dev_fraction: 0.5}\n"
        "tasks:\n"
        "  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n"
        "  - {name: gsm, kind: gsm8k, data: gsm.jsonl, max_new_tokens: 6}\n"
        "  - {name: ppl, kind: perplexity, data: ppl.jsonl}\n"
    )
    return suite


@pytest.fixture
def synthetic(sft_run):
    """The synthetic objective over checkpoint-10 (Δ₁) and checkpoint-20 (Δ₂)."""
    from synthetic import SyntheticEvaluator

    return SyntheticEvaluator(sft_run.base, sft_run.ckpts[0], sft_run.ckpts[1], P1, P2, W1, W2)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and on a shared machine torch's threads stall each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
