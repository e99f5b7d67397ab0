"""`exme eval` on a LoRA adapter scores the same as on the folder PEFT's merge_and_unload() writes."""

from __future__ import annotations

import json

import pytest


def _scores(run_cli, model, suite, out):
    code, _, err = run_cli("eval", model, "--suite", suite, "--json", out, "--threads", "1")
    assert code == 0, err
    return {s: (v["tasks"], v["overall"]) for s, v in json.loads(out.read_text())["scores"].items()}


@pytest.mark.parametrize("index", [0, 2])  # plain LoRA; rsLoRA with modules_to_save
def test_eval_adapter_matches_peft_merge(lora_suite, lora_models, run_cli, tmp_path, index):
    suite = lora_suite
    adapter, merged = lora_models.adapters[index], lora_models.merged[index]
    full = _scores(run_cli, merged, suite, tmp_path / "full.json")
    plus = _scores(run_cli, f"{lora_models.base}+{adapter}", suite, tmp_path / "plus.json")
    bare = _scores(run_cli, adapter, suite, tmp_path / "bare.json")  # base from adapter_config.json
    base = _scores(run_cli, lora_models.base, suite, tmp_path / "base.json")
    assert set(full) == {"dev", "test"}
    assert plus == full and bare == full
    assert base != full  # the adapter's weights were written in: a base-only load would not match


def test_eval_adapter_without_local_base_is_one_error(lora_suite, lora_models, run_cli, tmp_path):
    import shutil

    adapter = shutil.copytree(lora_models.adapters[0], tmp_path / "adapter")
    cfg = adapter / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": "org/not-here-7b"}))
    code, _, err = run_cli("eval", adapter, "--suite", lora_suite)
    assert code == 2
    assert str(adapter) in err and "BASE+ADAPTER" in err and "Traceback" not in err
