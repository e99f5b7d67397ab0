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
def run_cli(capsys):
    """Run ``exme ARGS`` in-process; return (exit code, stdout, stderr)."""
    from exme.cli import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
