"""Tiny local base model and PEFT LoRA adapters over it (nothing is downloaded)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def lora_models(tmp_path_factory):
    """A float32 base, three LoRA adapters (plain, plain, rsLoRA with modules_to_save), and PEFT's merges of them."""
    from exme.testing import make_lora_adapter, make_tiny_model, merge_lora_adapter

    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_model(root / "base", seed=0)
    adapters = [
        make_lora_adapter(base, root / "run" / "checkpoint-10", seed=1, r=4, lora_alpha=8),
        make_lora_adapter(base, root / "run" / "checkpoint-20", seed=2, r=2, lora_alpha=4,
                          target_modules=("q_proj", "v_proj", "up_proj")),
        make_lora_adapter(base, root / "run" / "checkpoint-30", seed=3, r=4, lora_alpha=16, use_rslora=True,
                          target_modules=("q_proj", "k_proj", "down_proj"), modules_to_save=("lm_head",)),
    ]
    merged = [merge_lora_adapter(base, a, root / "merged" / a.name) for a in adapters]
    return SimpleNamespace(root=root, base=base, adapters=adapters, merged=merged)


@pytest.fixture
def lora_suite(tmp_path):
    """A tiny suite with a likelihood task and a perplexity task: scores move with every weight."""
    import json

    mc = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "label": 0}
          for a in range(1, 5) for b in range(1, 4)]
    ppl = [{"text": f"the number {i} comes after {i - 1}."} for i in range(1, 9)]
    for name, rows in {"mc.jsonl": mc, "ppl.jsonl": ppl}.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: tiny\nsplit: {seed: 0, dev_fraction: 0.5}\ntasks:\n"
        "  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n"
        "  - {name: ppl, kind: perplexity, data: ppl.jsonl}\n"
    )
    return suite
