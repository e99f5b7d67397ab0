"""Per-tensor parameters (filters, per-layer gradients, slices) for every method, against float64 references.

The references here re-derive mergekit's rules independently: a layer's position is
``i / (L − 1)``, a gradient is ``numpy.interp`` over evenly spaced points, non-layer tensors sit
at position 0, and the first entry whose filter is a substring of the name wins.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from exme.errors import ExmeError
from exme.merge.config import MergeConfig
from exme.merge.engine import run_merge
from exme.merge.parameters import LayerLayout, Setting, tensor_point

LAYERS = 4


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A base and two fine-tunes with four layers (so gradients interpolate between their points)."""
    from exme.testing import make_finetuned, make_tiny_model

    root = tmp_path_factory.mktemp("deep")
    shape = dict(hidden_size=16, num_layers=LAYERS, intermediate_size=32, num_heads=4, with_tokenizer=False, vocab_size=40)
    base = make_tiny_model(root / "base", seed=0, **shape)
    return {"base": base, "ft1": make_finetuned(base, root / "ft1", seed=1, scale=0.02),
            "ft2": make_finetuned(base, root / "ft2", seed=2, scale=0.02)}


def read(folder) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k).double() for k in fh.keys()})
    return out


def position(name: str) -> float:
    """Reference gradient position: layer i of L at i/(L−1); outside the layers 0."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return int(parts[2]) / (LAYERS - 1)
    return 0.0


def value(setting, name: str):
    """Reference evaluation of one written setting for tensor ``name`` (None: no entry matches)."""
    entries = setting if isinstance(setting, list) and setting and isinstance(setting[0], dict) else [{"value": setting}]
    for e in entries:
        f = e.get("filter")
        if f is None or f == "*" or f in name:
            v = e["value"]
            if isinstance(v, list):
                return float(np.interp(position(name), np.linspace(0.0, 1.0, len(v)), v))
            return v
    return None


def merge(deep, tmp_path, data) -> tuple[dict, dict]:
    cfg = tmp_path / "m.yaml"
    text = yaml.safe_dump(data)
    for k, p in deep.items():
        text = text.replace(f"<{k}>", str(p))
    cfg.write_text(text)
    out = run_merge(MergeConfig.from_yaml(cfg), tmp_path / "out", progress=False)
    return read(out), {k: read(p) for k, p in deep.items()}


def close(ours: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = float(expected.abs().max()) + 1e-12
    err = float((ours - expected).abs().max())
    assert err <= 1e-6 * max(1.0, scale), f"{name}: max error {err:.3g}"


W1 = [{"filter": "self_attn", "value": [1.6, 0.2, 0.9]}, {"filter": "embed_tokens", "value": 0.3}, {"value": 0.8}]
W2 = [{"filter": "mlp", "value": [0.1, 1.2]}, {"value": 0.5}]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_linear_methods_with_filters_and_gradients(deep, tmp_path, method):
    lam = [0.7, 1.3]
    data = {"merge_method": method, "models": [{"model": "<ft1>", "parameters": {"weight": W1}},
                                               {"model": "<ft2>", "parameters": {"weight": W2}}]}
    if method == "task_arithmetic":
        data.update(base_model="<base>", parameters={"lambda": lam})
    ours, inp = merge(deep, tmp_path, data)
    for name, got in ours.items():
        w1, w2 = value(W1, name), value(W2, name)
        t1, t2 = inp["ft1"][name], inp["ft2"][name]
        if method == "linear":
            expected = (w1 * t1 + w2 * t2) / (w1 + w2)
        else:
            b = inp["base"][name]
            expected = b + value(lam, name) * (w1 * (t1 - b) + w2 * (t2 - b))
        close(got, expected, name)


def test_ties_with_graded_density_and_filtered_weight(deep, tmp_path):
    d1 = [1.0, 0.7, 0.1]
    w2 = [{"filter": "mlp", "value": 0.5}, {"value": [0.0, 1.0]}]
    data = {"merge_method": "ties", "base_model": "<base>",
            "models": [{"model": "<ft1>", "parameters": {"weight": 1.0, "density": d1}},
                       {"model": "<ft2>", "parameters": {"weight": w2, "density": 0.5}}]}
    ours, inp = merge(deep, tmp_path, data)
    for name, got in ours.items():
        b = inp["base"][name]
        deltas, weights = [], []
        for ft, w, d in (("ft1", 1.0, value(d1, name)), ("ft2", value(w2, name), 0.5)):
            delta = (inp[ft][name] - b).reshape(-1)
            k = max(1, int(d * delta.numel()))
            keep = torch.zeros_like(delta, dtype=torch.bool)
            keep[torch.topk(delta.abs(), k).indices] = True
            deltas.append(torch.where(keep, delta, 0.0) * w)
            weights.append(w)
        sign = torch.where(sum(deltas) >= 0, 1.0, -1.0)
        agree = [(torch.sign(x) == sign).double() for x in deltas]
        mixed = sum(x * a for x, a in zip(deltas, agree))
        divisor = sum(w * a for w, a in zip(weights, agree))
        divisor = torch.where(divisor == 0, 1.0, divisor)
        close(got, b + (mixed / divisor).reshape(b.shape), name)


def test_dare_density_per_tensor(deep, tmp_path):
    """density 1 (no drop) on mlp tensors: exactly task arithmetic there; elsewhere about half is kept, rescaled."""
    dens = [{"filter": "mlp", "value": 1.0}, {"value": 0.5}]
    data = {"merge_method": "dare_linear", "base_model": "<base>",
            "models": [{"model": "<ft1>", "parameters": {"weight": 1.0, "density": dens}}]}
    ours, inp = merge(deep, tmp_path, data)
    kept = total = 0
    for name, got in ours.items():
        b, delta = inp["base"][name], inp["ft1"][name] - inp["base"][name]
        if "mlp" in name:
            close(got, b + delta, name)
        else:
            moved = got - b
            on = moved != 0
            close(moved[on], 2.0 * delta[on], name)  # kept entries rescaled by 1/density
            kept, total = kept + int(on.sum()), total + on.numel()
    assert abs(kept / total - 0.5) < 0.05


def slerp64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    na, nb = a.norm(), b.norm()
    dot = float(((a / na) * (b / nb)).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    om = math.acos(dot)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


def test_slerp_two_slices_restart_the_gradient(deep, tmp_path):
    t0, t1 = [0.1, 0.9], [{"filter": "mlp", "value": 0.2}, {"value": [0.4, 0.6]}]
    data = {"merge_method": "slerp", "base_model": "<base>", "slices": [
        {"sources": [{"model": "<base>", "layer_range": [0, 2]}, {"model": "<ft1>", "layer_range": [0, 2]}],
         "parameters": {"t": t0}},
        {"sources": [{"model": "<base>", "layer_range": [2, 4]}, {"model": "<ft1>", "layer_range": [2, 4]}],
         "parameters": {"t": t1}},
    ]}
    ours, inp = merge(deep, tmp_path, data)
    for name, got in ours.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            i = int(parts[2])
            setting, pos = (t0, i / 1) if i < 2 else (t1, (i - 2) / 1)  # two layers per slice: 0 and 1
        else:
            setting, pos = (t0 if "embed" in name else t1), 0.0
        entries = setting if isinstance(setting[0], dict) else [{"value": setting}]
        v = next(e["value"] for e in entries if e.get("filter") is None or e["filter"] in name)
        t = float(np.interp(pos, np.linspace(0, 1, len(v)), v)) if isinstance(v, list) else v
        close(got, slerp64(inp["base"][name], inp["ft1"][name], t), name)


def test_exme_per_module_alpha_and_extrapolate_gradient(deep, tmp_path):
    a1 = [{"filter": "self_attn", "value": 0.8}, {"filter": "mlp", "value": [0.0, 1.5]}, {"value": 0.1}]
    data = {"merge_method": "exme", "base_model": "<base>", "parameters": {"beta": 0.3},
            "models": [{"model": "<ft1>", "parameters": {"alpha": a1}}, {"model": "<ft2>", "parameters": {"alpha": 0.4}}]}
    ours, inp = merge(deep, tmp_path, data)
    for name, got in ours.items():
        b = inp["base"][name]
        expected = b + 0.3 * (1 + value(a1, name)) * (inp["ft1"][name] - b) + 0.7 * 1.4 * (inp["ft2"][name] - b)
        close(got, expected, name)
    alpha = [0.0, 2.0]
    data = {"merge_method": "extrapolate", "base_model": "<base>", "models": [{"model": "<ft2>", "parameters": {"alpha": alpha}}]}
    (tmp_path / "x").mkdir()
    ours, inp = merge(deep, tmp_path / "x", data)
    for name, got in ours.items():
        b, th = inp["base"][name], inp["ft2"][name]
        close(got, th + value(alpha, name) * (th - b), name)


def test_dare_ties_weight_gradient(deep, tmp_path):
    """density 1: DARE-TIES is TIES without trimming; the weight gradient is read per layer."""
    w = [0.2, 1.0]
    data = {"merge_method": "dare_ties", "base_model": "<base>",
            "models": [{"model": "<ft1>", "parameters": {"weight": w, "density": 1.0}},
                       {"model": "<ft2>", "parameters": {"weight": 0.6, "density": 1.0}}]}
    ours, inp = merge(deep, tmp_path, data)
    for name, got in ours.items():
        b = inp["base"][name]
        d = [value(w, name) * (inp["ft1"][name] - b), 0.6 * (inp["ft2"][name] - b)]
        sign = torch.where(d[0] + d[1] >= 0, 1.0, -1.0)
        close(got, b + sum(x * (torch.sign(x) == sign) for x in d), name)  # normalize off (mergekit's default)


# ------------------------------------------------------------------------------------ the resolution itself


def test_setting_rules():
    s = Setting.parse([{"filter": "mlp", "value": [0, 1]}, {"filter": "*", "value": 3}], "parameters.weight")
    assert s.evaluate("model.layers.1.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert s.evaluate("model.norm.weight", 0.25) == 3
    lone = Setting.parse({"filter": "mlp", "value": 2.0}, "parameters.weight")  # one entry without the list
    assert lone.evaluate("x.mlp.y", 0.0) == 2.0 and lone.evaluate("x.attn.y", 0.0) is None
    grad = Setting.parse([1.0, 0.7, 0.1], "parameters.density")
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        assert grad.evaluate("n", t) == pytest.approx(np.interp(t, [0, 0.5, 1], [1.0, 0.7, 0.1]))
    assert Setting.parse("1e-3", "parameters.weight").evaluate("n", 0) == 0.001  # YAML 1.1 reads 1e-3 as text


def test_layer_layout_and_points():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    layout = LayerLayout.from_names(names, 5)
    assert layout.prefix == "model.layers" and layout.num_layers == 5
    assert LayerLayout.from_names(names, 6).prefix is None  # blocks 0..4 are not 6 layers
    assert tensor_point("model.layers.3.mlp.up_proj.weight", layout).t == pytest.approx(0.75)
    assert tensor_point("lm_head.weight", layout, (0, 2)).slice == 1
    assert tensor_point("model.embed_tokens.weight", layout, (0, 2)).slice == 0
    p = tensor_point("model.layers.3.mlp.up_proj.weight", layout, (0, 3))
    assert (p.slice, p.t) == (1, 0.0)  # slice [3, 5): first of two layers
    assert tensor_point("model.layers.2.mlp.up_proj.weight", layout, (0, 2, 3)).t == 1.0  # a one-layer slice


def test_precedence_model_then_slice_then_global():
    cfg = MergeConfig.from_dict({
        "merge_method": "task_arithmetic", "base_model": "b", "parameters": {"weight": 0.1},
        "slices": [{"sources": [{"model": "m", "layer_range": [0, 2], "parameters": {"weight": [{"filter": "mlp", "value": 0.9}]}}],
                    "parameters": {"weight": 0.5}},
                   {"sources": [{"model": "m", "layer_range": [2, 4]}]}],
    })
    table = cfg.table
    from exme.merge.parameters import TensorPoint

    assert table.value("weight", TensorPoint("model.layers.0.mlp.x", 0.0, 0), 0) == 0.9
    assert table.value("weight", TensorPoint("model.layers.0.attn.x", 0.0, 0), 0) == 0.5  # no filter matches: slice
    assert table.value("weight", TensorPoint("model.layers.2.mlp.x", 0.0, 1), 0) == 0.1  # global
    with pytest.raises(ExmeError, match="varies from tensor to tensor"):
        cfg.weights()
