"""The live model writes exactly the merged weights, in place, for every kind of candidate."""

from __future__ import annotations

import pytest
import torch

from exme.errors import ExmeError
from exme.io import Checkpoint
from exme.merge import methods
from exme.pipeline import exme_coefficients
from exme.search import LiveModel


def _tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.get(n) for n in ckpt.names}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """fp32 and bf16 models whose MLP matrices (64 × 1100) exceed one CPU chunk and are not a multiple of it."""
    from exme.testing import make_finetuned, make_tiny_model

    root = tmp_path_factory.mktemp("wide")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        base = make_tiny_model(root / name / "base", seed=3, dtype=dtype, hidden_size=64, intermediate_size=1100, num_layers=1)
        out[dtype] = [base] + [make_finetuned(base, root / name / f"sft{i}", seed=10 + i, scale=0.05) for i in (1, 2)]
    return out


def test_apply_matches_the_float64_formula(tiny_models):
    live = LiveModel.load(tiny_models.base)
    live.set_models([tiny_models.sft1, tiny_models.sft2])
    coeffs = [1.3 * 0.6, 1.5 * 0.4]
    live.apply(coeffs)
    b, m1, m2 = _tensors(tiny_models.base), _tensors(tiny_models.sft1), _tensors(tiny_models.sft2)
    state = live.model.state_dict()
    for name in live.targets:
        expected = b[name].double() + coeffs[0] * (m1[name].double() - b[name].double()) + coeffs[1] * (m2[name].double() - b[name].double())
        torch.testing.assert_close(state[name].double(), expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps * expected.abs().max().item())


@pytest.mark.parametrize("store", ["checkpoints", "float32-deltas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_is_bitwise_the_exme_method(wide_models, dtype, store):
    base, sft1, sft2 = wide_models[dtype]
    live = LiveModel.load(base, store=store)
    assert live.dtype == dtype
    live.set_models([sft1, sft2])
    b, m1, m2 = _tensors(base), _tensors(sft1), _tensors(sft2)
    for weights, alphas in [([0.6, 0.4], [0.3, 0.5]), ([1.0, 0.0], [0.7, 0.2]), ([0.25, 0.75], [0.0, 1.0])]:
        live.apply(exme_coefficients(weights, alphas))
        state = live.model.state_dict()
        assert max(p.numel() for p in live.targets.values()) > 65536
        for name in live.targets:
            expected = methods.exme(b[name], [m1[name], m2[name]], weights, alphas, out_dtype=dtype)
            assert torch.equal(state[name], expected), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_live_weights_are_bitwise_the_streaming_engine_output(wide_models, dtype, tmp_path):
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge

    base, sft1, sft2 = wide_models[dtype]
    beta, alphas = 0.7, [0.4, 0.9]
    config = MergeConfig.model_validate({
        "merge_method": "exme", "base_model": str(base), "dtype": "float32", "out_dtype": str(dtype).removeprefix("torch."),
        "models": [{"model": str(sft1), "parameters": {"weight": beta, "alpha": alphas[0]}},
                   {"model": str(sft2), "parameters": {"weight": 1 - beta, "alpha": alphas[1]}}],
    })
    written = _tensors(run_merge(config, tmp_path / "merged", progress=False))
    live = LiveModel.load(base)
    live.set_models([sft1, sft2])
    live.apply(exme_coefficients([beta, 1 - beta], alphas))
    state = live.model.state_dict()
    assert set(written) == set(live.targets)
    for name, tensor in written.items():
        assert tensor.dtype == dtype and torch.equal(state[name], tensor), name


@pytest.mark.parametrize("store", ["checkpoints", "float32-deltas"])
def test_switching_back_and_forth_is_exact(tiny_models, store):
    live = LiveModel.load(tiny_models.base, store=store)
    live.set_models([tiny_models.sft1, tiny_models.sft2])
    live.apply([0.9, 0.4])
    first = {n: t.clone() for n, t in live.model.state_dict().items()}
    live.apply([1.7, 0.1])
    live.load_checkpoint(tiny_models.sft2)
    assert all(torch.equal(live.model.state_dict()[n], t) for n, t in _tensors(tiny_models.sft2).items())
    live.apply_base()
    assert all(torch.equal(live.model.state_dict()[n], t) for n, t in _tensors(tiny_models.base).items())
    live.apply([0.9, 0.4])
    assert all(torch.equal(live.model.state_dict()[n], first[n]) for n in first)


def test_tied_embeddings_are_written_once_and_stay_tied(tmp_path):
    from exme.testing import make_finetuned, make_tiny_model

    base = make_tiny_model(tmp_path / "base", seed=0, tie_word_embeddings=True)
    sft = make_finetuned(base, tmp_path / "sft", seed=1, scale=0.05)
    assert "lm_head.weight" not in Checkpoint.open(base).names
    live = LiveModel.load(base)
    live.set_models([sft])
    live.apply([1.5])
    emb = live.model.get_input_embeddings().weight
    assert live.model.get_output_embeddings().weight is emb
    b, m = _tensors(base)["model.embed_tokens.weight"], _tensors(sft)["model.embed_tokens.weight"]
    assert torch.equal(emb.detach(), methods.exme(b, [m], [1.0], [0.5]))


@pytest.mark.parametrize("store", ["checkpoints", "float32-deltas"])
def test_baselines_apply_per_tensor_like_the_methods(tiny_models, store):
    live = LiveModel.load(tiny_models.base, store=store)
    live.set_models([tiny_models.sft1, tiny_models.sft2])
    b, m1, m2 = _tensors(tiny_models.base), _tensors(tiny_models.sft1), _tensors(tiny_models.sft2)
    live.apply_method("ties", weights=[1.0, 1.0], density=0.5, normalize=True)
    for name in live.targets:
        assert torch.equal(live.model.state_dict()[name], methods.ties(b[name], [m1[name], m2[name]], [1.0, 1.0], 0.5)), name
    live.apply_method("dare_ties", seed=7, weights=[1.0, 1.0], density=0.3, normalize=True)
    for name in live.targets:
        gen = methods.tensor_generator(7, name)
        expected = methods.dare_ties(b[name], [m1[name], m2[name]], [1.0, 1.0], 0.3, gen, normalize=True)
        assert torch.equal(live.model.state_dict()[name], expected), name
    live.apply_method("linear", weights=[0.3, 0.7])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(live.model.state_dict()[name], methods.linear([m1[name], m2[name]], [0.3, 0.7]))


def test_a_checkpoint_of_another_shape_is_refused_by_name(tiny_models, tmp_path):
    from exme.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=0, intermediate_size=48, max_shard_size="20KB")
    live = LiveModel.load(tiny_models.base)
    with pytest.raises(ExmeError, match=r"shape mismatch in tensor .model\.layers\.0\.mlp\.\w+_proj\.weight.: base \(\d+, \d+\), model 1 \(\d+, \d+\), model 2"):
        live.set_models([tiny_models.sft1, other])
    with pytest.raises(ExmeError, match="2 coefficients given for 0 held checkpoints"):
        LiveModel.load(tiny_models.base).apply([1.0, 1.0])


def test_a_candidate_that_overflows_is_refused_and_the_base_restored(tmp_path):
    from exme.search.live import NonFiniteCandidate
    from exme.testing import make_finetuned, make_tiny_model

    base = make_tiny_model(tmp_path / "base", seed=0, dtype=torch.float16)
    sfts = [make_finetuned(base, tmp_path / f"sft{i}", seed=i, scale=0.05) for i in (1, 2)]
    live = LiveModel.load(base)
    live.set_models(sfts)
    live.apply([1.0, 2.0])  # fine
    # 1e7·Δ with |Δ| ~ 0.05 is far beyond float16's 65504: the cast gives Inf.
    with pytest.raises(NonFiniteCandidate, match=r"candidate θ_b \+ Σ cᵢΔᵢ with c = \[10000000.0, 0.0\]: tensor .* has NaN or Inf in float16"):
        live.apply([1e7, 0.0])
    assert isinstance(NonFiniteCandidate("x"), ExmeError)
    expected = _tensors(base)
    assert all(torch.equal(p, expected[n]) for n, p in live.state_dict().items())
    assert live.current == ("base",)


@pytest.mark.parametrize("granularity", ["module", "layers:2"])
def test_per_group_apply_matches_the_float64_formula_per_tensor(tiny_models, granularity):
    """Each tensor gets its group's coefficients: θ_b + Σ c_{g(t),i} Δᵢ, checked in float64."""
    from exme.merge.groups import GroupCoefficients, group_rule

    live = LiveModel.load(tiny_models.base)
    live.set_models([tiny_models.sft1, tiny_models.sft2])
    rule = group_rule(granularity, list(live.targets))
    by_group = {g: (0.4 + 0.3 * j, 1.1 - 0.2 * j) for j, g in enumerate(rule.groups)}
    live.apply(GroupCoefficients.from_groups(rule, by_group))
    b, m1, m2 = _tensors(tiny_models.base), _tensors(tiny_models.sft1), _tensors(tiny_models.sft2)
    state = live.model.state_dict()
    seen = set()
    for name in live.targets:
        c1, c2 = by_group[rule.group_of(name)]
        seen.add(rule.group_of(name))
        expected = b[name].double() + c1 * (m1[name].double() - b[name].double()) + c2 * (m2[name].double() - b[name].double())
        torch.testing.assert_close(state[name].double(), expected, rtol=0,
                                   atol=4 * torch.finfo(torch.float32).eps * expected.abs().max().item())
    assert seen == set(rule.groups)  # every group holds a tensor of this model


def test_per_group_apply_is_bitwise_global_apply_per_tensor(wide_models):
    """A tensor's weights under per-group coefficients are bitwise a global candidate's with its group's cᵢ,
    and equal coefficients in every group are exactly the global candidate."""
    from exme.merge.groups import GroupCoefficients, group_rule

    base, sft1, sft2 = wide_models[torch.bfloat16]
    live = LiveModel.load(base)
    live.set_models([sft1, sft2])
    rule = group_rule("module", list(live.targets))
    by_group = {"attention": (0.9, 0.2), "mlp": (0.3, 1.4), "other": (1.0, 0.0)}
    live.apply(GroupCoefficients.from_groups(rule, by_group))
    per_group = {n: p.clone() for n, p in live.state_dict().items()}
    for group, coeffs in by_group.items():
        live.apply(list(coeffs))
        for name, p in live.state_dict().items():
            if rule.group_of(name) == group:
                assert torch.equal(per_group[name], p), name
    live.apply(GroupCoefficients(rule, ((0.7, 0.6),) * 3))
    assert live.current == ("coeffs", (0.7, 0.6))
    uniform = {n: p.clone() for n, p in live.state_dict().items()}
    live.apply([0.7, 0.6])
    assert all(torch.equal(uniform[n], p) for n, p in live.state_dict().items())
