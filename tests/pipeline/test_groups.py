"""Tensor groups for per-module coefficients: the rule in mergekit's filter semantics, checked by hand."""

from __future__ import annotations

import pytest

from exme.errors import ExmeError
from exme.merge.groups import GroupCoefficients, group_rule, parse_granularity

LLAMA_12 = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{part}" for i in range(12) for part in (
        "self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight")
]


def test_module_groups_attention_mlp_and_the_rest():
    rule = group_rule("module", LLAMA_12)
    assert rule.groups == ("attention", "mlp", "other")
    assert rule.group_of("model.layers.3.self_attn.q_proj.weight") == "attention"
    assert rule.group_of("model.layers.3.mlp.up_proj.weight") == "mlp"
    # a norm whose name holds "attention" is not attention; embeddings, head and norms are "other"
    for name in ("model.layers.3.post_attention_layernorm.weight", "model.layers.3.input_layernorm.weight",
                 "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert rule.group_of(name) == "other", name


def test_layer_blocks_are_contiguous_and_layer_1_is_not_layer_10():
    rule = group_rule("layers:5", LLAMA_12)
    # 12 layers in 5 blocks: bounds floor(j*12/5) = 0, 2, 4, 7, 9, 12
    expected = {0: "layers 0-1", 1: "layers 0-1", 2: "layers 2-3", 3: "layers 2-3", 4: "layers 4-6", 6: "layers 4-6",
                7: "layers 7-8", 8: "layers 7-8", 9: "layers 9-11", 10: "layers 9-11", 11: "layers 9-11"}
    for layer, group in expected.items():
        assert rule.group_of(f"model.layers.{layer}.mlp.up_proj.weight") == group, layer
    assert rule.groups == ("layers 0-1", "layers 2-3", "layers 4-6", "layers 7-8", "layers 9-11", "other")
    assert rule.group_of("model.embed_tokens.weight") == "other"
    assert ("model.layers.1.", "layers 0-1") in rule.filters


def test_bad_granularity():
    for bad in ("layer:2", "layers:0", "layers:x", "modules", ""):
        with pytest.raises(ValueError, match="granularity"):
            parse_granularity(bad)
    with pytest.raises(ExmeError, match="alpha.granularity: layers:13 .* 12 decoder layers"):
        group_rule("layers:13", LLAMA_12)
    assert group_rule("global", LLAMA_12) is None


def test_group_coefficients_are_canonical_and_hashable():
    rule = group_rule("module", LLAMA_12)
    a = GroupCoefficients(rule, ((1, 0.5), (2.0, 0.5), (1.0, 0.5)))
    b = GroupCoefficients.from_groups(rule, {"other": [1.0, 0.5], "mlp": (2, 0.5), "attention": (1.0, 0.5)})
    assert a == b and hash(a) == hash(b)
    assert a.for_tensor("model.layers.7.mlp.up_proj.weight") == (2.0, 0.5)
    assert a.uniform() is None
    assert GroupCoefficients(rule, ((1, 2),) * 3).uniform() == (1.0, 2.0)
    with pytest.raises(ExmeError):
        GroupCoefficients(rule, ((1.0, 2.0),) * 2)


def test_layer_groups_use_the_layers_that_gradients_use():
    # One rule for "which layer is this tensor": a group's layers are the layers a mergekit
    # gradient sees (exme.merge.parameters.LayerLayout), for GPT-2's names as for Llama's.
    from exme.merge.parameters import LayerLayout

    gpt2 = ["transformer.wte.weight", "transformer.ln_f.weight"] + [
        f"transformer.h.{i}.{part}" for i in range(6) for part in ("attn.c_attn.weight", "mlp.c_fc.weight", "ln_1.weight")
    ]
    for names, n in ((LLAMA_12, 12), (gpt2, 6)):
        rule = group_rule("layers:3", names)
        layout = LayerLayout.from_names(names, None)
        assert layout.num_layers == n
        for name in names:
            layer = layout.layer_of(name)
            expected = "other" if layer is None else rule.groups[layer * 3 // n]
            assert rule.group_of(name) == expected, name
    with pytest.raises(ExmeError, match="alpha.granularity: no decoder layers"):
        group_rule("layers:2", ["embed.weight", "head.weight"])
