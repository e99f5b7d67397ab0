"""`--format peft`: one PEFT adapter that is exactly the linear merge of LoRA adapters."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from exme.io import Checkpoint


def _config(tmp_path, lora_models, method="exme", **extra):
    models = [{"model": str(m), "parameters": p} for m, p in zip(
        lora_models.adapters, [{"weight": 0.5, "alpha": 0.4}, {"weight": 0.3, "alpha": 0.1}, {"weight": 0.2, "alpha": 0.7}])]
    data = {"merge_method": method, "base_model": str(lora_models.base), "models": models, **extra}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _modules(adapter) -> list[str]:
    from safetensors.torch import load_file

    keys = load_file(str(adapter / "adapter_model.safetensors"))
    return sorted(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in keys if k.endswith("lora_A.weight"))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def test_peft_adapter_is_the_exme_merge(lora_models, tmp_path, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, lora_models)
    code, out, err = run_cli("merge", cfg, tmp_path / "adapter", "--format", "peft", "-q")
    assert code == 0, err
    code, _, err = run_cli("merge", cfg, tmp_path / "full", "-q")
    assert code == 0, err
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # Every layer's projections of these types are targeted, so the types name them exactly.
    assert written["target_modules"] == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    # Rank grows with the adapters that target a module: q_proj is in all three (4 + 2 + 4).
    ranks = {m: written["rank_pattern"].get(m, written["r"]) for m in _modules(tmp_path / "adapter")}
    assert ranks["model.layers.0.self_attn.q_proj"] == 10 and ranks["model.layers.0.mlp.up_proj"] == 2
    assert all(written["alpha_pattern"].get(m, written["lora_alpha"]) == r for m, r in ranks.items())  # s* = 1
    assert written["modules_to_save"] == ["lm_head"]

    base = AutoModelForCausalLM.from_pretrained(lora_models.base)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ids = torch.randint(4, 100, (3, 17), generator=torch.Generator().manual_seed(0))
    expected = _logits(full, ids)
    got = _logits(peft_model, ids)
    tol = 64 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)

    merged = peft_model.merge_and_unload().state_dict()
    full_tensors = {n: Checkpoint.open(tmp_path / "full").get(n) for n in Checkpoint.open(tmp_path / "full").names}
    for name, t in full_tensors.items():
        torch.testing.assert_close(merged[name], t, rtol=0, atol=8 * torch.finfo(torch.float32).eps * max(1.0, t.abs().max().item()))


def test_nonlinear_method_with_peft_format_is_one_clear_error(lora_models, tmp_path, run_cli):
    models = [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in lora_models.adapters]
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(lora_models.base), "models": models}))
    out = tmp_path / "out"
    code, _, err = run_cli("merge", cfg, out, "--format", "peft")
    assert code == 2 and not out.exists()
    assert err.strip().count("\n") == 0
    assert "merge_method ties is not, so it cannot be one LoRA adapter" in err


def test_peft_format_refuses_full_models(lora_models, tmp_path, run_cli):
    code, _, err = run_cli("extrapolate", tmp_path / "out", "--base", lora_models.base, "--model", lora_models.merged[0],
                           "--alpha", "0.5", "--format", "peft")
    assert code == 2 and "is a full model; --format peft merges LoRA adapters of one base only" in err


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_extrapolated_adapter_scales_b_by_one_plus_alpha(lora_models, tmp_path, run_cli, alpha):
    from safetensors.torch import load_file

    adapter = lora_models.adapters[0]
    code, _, err = run_cli("extrapolate", tmp_path / "out", "--base", lora_models.base, "--model", adapter,
                           "--alpha", str(alpha), "--format", "peft", "-q")
    assert code == 0, err
    src, out = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(out[f"{key}.lora_A.weight"], src[f"{key}.lora_A.weight"], rtol=0, atol=0)
    # s₁ = 8/4 = 2, s* = 1: B* = (1 + α)·2·B₁
    torch.testing.assert_close(out[f"{key}.lora_B.weight"].double(), (1 + alpha) * 2 * src[f"{key}.lora_B.weight"].double(),
                               rtol=1e-6, atol=0)


def test_adapter_of_coefficient_zero_is_dropped(lora_models, tmp_path, run_cli):
    """β = 0 on an adapter: its factors are left out (rank and size shrink), and the adapter is still the merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = [{"model": str(m), "parameters": p} for m, p in zip(
        lora_models.adapters, [{"weight": 0.6, "alpha": 0.4}, {"weight": 0.0, "alpha": 0.1}, {"weight": 0.4, "alpha": 0.7}])]
    cfg = tmp_path / "zero.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "exme", "base_model": str(lora_models.base), "models": models}))
    assert run_cli("merge", cfg, tmp_path / "adapter", "--format", "peft", "-q")[0] == 0
    assert run_cli("merge", cfg, tmp_path / "full", "-q")[0] == 0
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ranks = {m: written["rank_pattern"].get(m, written["r"]) for m in _modules(tmp_path / "adapter")}
    # up_proj was adapter 2's alone: gone; q_proj holds adapters 1 and 3 only (4 + 4, not 4 + 2 + 4)
    assert not any(m.endswith("up_proj") for m in ranks)
    assert ranks["model.layers.0.self_attn.q_proj"] == 8 and ranks["model.layers.0.self_attn.v_proj"] == 4
    assert written["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"]

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_models.base), str(tmp_path / "adapter")).eval()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ids = torch.randint(4, 100, (2, 13), generator=torch.Generator().manual_seed(1))
    expected = _logits(full, ids)
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=0,
                               atol=64 * torch.finfo(torch.float32).eps * expected.abs().max().item())


def test_target_modules_are_types_only_when_exact():
    from exme.merge.peft_output import target_module_names

    base = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")] + ["lm_head.weight"]
    every = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert target_module_names(every, base) == ["q_proj"]
    # only layer 0's q_proj: "q_proj" would also select layer 1's, so full paths are kept
    assert target_module_names(every[:1], base) == every[:1]


def test_per_tensor_weights_give_the_full_merge(lora_models, tmp_path, run_cli):
    """Filters and a gradient list: each module's B is scaled by that module's own coefficient."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    weights = [
        [{"filter": "self_attn", "value": [0.2, 1.0]}, {"value": 0.6}],  # a gradient over the layers
        [{"filter": "mlp", "value": 0.0}, {"value": 0.5}],  # dropped from the MLP modules
        0.3,
    ]
    models = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(lora_models.adapters, weights)]
    cfg = tmp_path / "per_tensor.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(lora_models.base), "models": models}))
    code, _, err = run_cli("merge", cfg, tmp_path / "adapter", "--format", "peft", "-q")
    assert code == 0, err
    code, _, err = run_cli("merge", cfg, tmp_path / "full", "-q")
    assert code == 0, err

    base = AutoModelForCausalLM.from_pretrained(lora_models.base)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ids = torch.randint(4, 100, (3, 17), generator=torch.Generator().manual_seed(0))
    expected = _logits(full, ids)
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=0, atol=64 * torch.finfo(torch.float32).eps * expected.abs().max().item())
    merged = peft_model.merge_and_unload().state_dict()
    ck = Checkpoint.open(tmp_path / "full")
    for name in ck.names:
        t = ck.get(name)
        torch.testing.assert_close(merged[name], t, rtol=0, atol=8 * torch.finfo(torch.float32).eps * max(1.0, t.abs().max().item()))
