"""LoRA adapters read as full models: Δ as PEFT merges it, bad adapters refused by file and module."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from exme.errors import ExmeError
from exme.io import Checkpoint
from exme.io.source import AdapterSource, open_source


def _tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.get(n) for n in ckpt.names}


@pytest.mark.parametrize("i", [0, 1, 2], ids=["lora", "lora-r2", "rslora-modules_to_save"])
def test_adapter_reads_as_peft_merge_and_unload(lora_models, i):
    """θ from the adapter equals PEFT's own merge, per tensor; Δ = θ − θ_b is zero off the target modules."""
    base = Checkpoint.open(lora_models.base)
    source = open_source(lora_models.adapters[i], base)
    assert isinstance(source, AdapterSource)
    merged, b = _tensors(lora_models.merged[i]), _tensors(lora_models.base)
    assert set(merged) == set(source.names)
    changed = set()
    for name, expected in merged.items():
        got = source.get(name)
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=2 * torch.finfo(torch.float32).eps * expected.abs().max().item())
        if not torch.equal(expected, b[name]):
            changed.add(name)
    targeted = set(source.factors) | set(source.replaced)
    assert changed == targeted  # untargeted modules: Δ = 0 exactly
    if i == 2:
        assert "lm_head.weight" in source.replaced


def test_scaling_is_alpha_over_r_or_over_sqrt_r(lora_models):
    """Δ = (α/r)·B@A, rsLoRA (α/√r)·B@A, checked in float64 against the saved factors."""
    base = Checkpoint.open(lora_models.base)
    for adapter, alpha, r, rs in [(lora_models.adapters[0], 8, 4, False), (lora_models.adapters[2], 16, 4, True)]:
        saved = load_file(str(adapter / "adapter_model.safetensors"))
        key = "base_model.model.model.layers.1.self_attn.q_proj"
        a, bm = saved[f"{key}.lora_A.weight"].double(), saved[f"{key}.lora_B.weight"].double()
        expected = (alpha / (r**0.5 if rs else r)) * (bm @ a)
        got = open_source(adapter, base).delta("model.layers.1.self_attn.q_proj.weight").double()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_base_plus_adapter_spelling(lora_models):
    source = open_source(f"{lora_models.base}+{lora_models.adapters[0]}")
    assert isinstance(source, AdapterSource) and source.base.path == lora_models.base


def test_an_adapter_without_a_base_is_refused(lora_models):
    with pytest.raises(ExmeError, match="is a LoRA adapter; it needs the model it was trained on"):
        open_source(lora_models.adapters[0])


def _copy(adapter, dst):
    shutil.copytree(adapter, dst)
    return dst


def test_adapter_of_another_architecture_names_its_config(lora_models, tmp_path, run_cli):
    from exme.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "other-base", seed=0, hidden_size=48)
    bad = _copy(lora_models.adapters[0], tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(other)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli("extrapolate", out, "--base", lora_models.base, "--model", bad, "--alpha", "0.5", "-q")
    assert code == 2 and not out.exists()
    assert err.strip().count("\n") == 0
    assert f"{bad / 'adapter_config.json'}: the adapter was trained on {other} (hidden_size = 48)" in err


def _rewrite_weights(adapter, dst, edit):
    bad = _copy(adapter, dst)
    file = bad / "adapter_model.safetensors"
    save_file(edit(load_file(str(file))), str(file))
    return bad


def test_target_module_absent_in_the_base_is_named(lora_models, tmp_path):
    def rename(sd):
        return {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qkv_proj"): v for k, v in sd.items()}

    bad = _rewrite_weights(lora_models.adapters[0], tmp_path / "bad", rename)
    with pytest.raises(ExmeError, match=r"adapter_model.safetensors: target module 'model.layers.1.self_attn.qkv_proj' is not in the base"):
        open_source(bad, Checkpoint.open(lora_models.base))


def test_rank_mismatch_between_a_and_b_is_named(lora_models, tmp_path):
    def cut(sd):
        key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        return {**sd, key: sd[key][:, :3].contiguous()}

    bad = _rewrite_weights(lora_models.adapters[0], tmp_path / "bad", cut)
    with pytest.raises(ExmeError, match=r"module 'model.layers.0.self_attn.v_proj' has lora_A \(4, 32\) and lora_B \(16, 3\), whose ranks do not match"):
        open_source(bad, Checkpoint.open(lora_models.base))


def test_truncated_adapter_file_is_named(lora_models, tmp_path):
    bad = _copy(lora_models.adapters[0], tmp_path / "bad")
    file = bad / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ExmeError, match="adapter_model.safetensors is truncated"):
        open_source(bad, Checkpoint.open(lora_models.base))
