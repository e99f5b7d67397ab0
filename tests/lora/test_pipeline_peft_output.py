"""`output_format: peft` in PIPELINE.yaml: the run's ExMe model written as one PEFT adapter."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from exme.errors import ExmeError
from exme.io import Checkpoint



def _spec(base, checkpoints, suite, output, **extra):
    return {
        "base": str(base), "checkpoints": str(checkpoints), "suite": str(suite), "output": str(output),
        "alpha": {"grid": [0.0, 0.5, 1.0]}, "beta": {"grid": [0.0, 0.5, 1.0]}, "baselines": ["linear"],
        "seed": 1, "dev": {"confirm_fraction": 0}, **extra,
    }


@pytest.mark.slow
def test_peft_output_merged_equals_the_full_exme_model(lora_suite, lora_models, tmp_path):
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge
    from exme.pipeline import PipelineConfig, run_pipeline
    from exme.testing import merge_lora_adapter

    torch.set_num_threads(1)
    suite = lora_suite
    out = tmp_path / "run"
    config = PipelineConfig.model_validate(_spec(lora_models.base, lora_models.root / "run", suite, out,
                                                 output_format="peft"))
    run_pipeline(config, progress=False, report=False)
    adapter = out / "model"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    spec = json.loads((out / "model.spec.json").read_text())
    assert spec["output_format"] == "peft" and len(spec["models"]) == 2
    # The full ExMe model of the same choices, as the run writes it with output_format: model.
    full_spec = {k: v for k, v in spec.items() if k != "output_format"} | {"out_dtype": "float32"}
    full = Checkpoint.open(run_merge(MergeConfig.model_validate(full_spec), tmp_path / "full", progress=False))
    merged = Checkpoint.open(merge_lora_adapter(lora_models.base, adapter, tmp_path / "peft-merged"))
    base = Checkpoint.open(lora_models.base)
    assert set(merged.names) == set(full.names)
    moved = 0
    for name in full.names:
        f, m = full.get(name).double(), merged.get(name).double()
        torch.testing.assert_close(m, f, rtol=0, atol=1e-6 * max(1.0, f.abs().max().item()))
        moved += not torch.equal(full.get(name), base.get(name))
    assert moved > 0  # the chosen merge moved some weights: the comparison is not base against base


def test_peft_output_with_full_checkpoints_is_one_error(lora_suite, lora_models, tmp_path):
    from exme.pipeline import PipelineConfig

    out = tmp_path / "run"
    path = tmp_path / "PIPELINE.yaml"
    path.write_text(yaml.safe_dump(_spec(lora_models.base, lora_models.root / "merged", lora_suite, out,
                                         output_format="peft")))
    with pytest.raises(ExmeError, match="output_format") as err:
        PipelineConfig.from_yaml(path)
    assert str(lora_models.root / "merged") in str(err.value)
    assert not out.exists()
    # The default (model) accepts the same full checkpoints.
    spec = _spec(lora_models.base, lora_models.root / "merged", lora_suite, out)
    path.write_text(yaml.safe_dump(spec))
    assert PipelineConfig.from_yaml(path).output_format == "model"
