"""`exme demo --lora --quick`: the demo's SFT run is LoRA adapters, and the pipeline runs on them."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_lora_demo_runs_the_pipeline_on_adapter_checkpoints(tmp_path):
    import torch

    from exme.demo.run import run_demo
    from exme.report.render import load_results

    workdir, output = tmp_path / "work", tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        report = run_demo(workdir=workdir, output=output, quick=True, progress=False, lora=True)
    finally:
        torch.set_num_threads(threads)
    checkpoints = sorted((workdir / "sft-lora").glob("checkpoint-*"))
    assert len(checkpoints) >= 3
    for c in checkpoints:
        assert json.loads((c / "adapter_config.json").read_text())["r"] == 16
        assert not (c / "model.safetensors").exists()
    results = load_results(output)
    assert sorted(r.name for r in results.ranking) == sorted(c.name for c in checkpoints)
    assert report.is_file() and (output / "model" / "model.safetensors").is_file()
