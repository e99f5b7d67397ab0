"""Adapters merge and search exactly like the full models PEFT's merge_and_unload() writes for them."""

from __future__ import annotations

import pytest
import torch

from exme.io import Checkpoint
from exme.io.source import AdapterSource
from exme.merge.config import MergeConfig
from exme.merge.engine import run_merge
from exme.search import LiveModel


def _tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {n: ckpt.get(n) for n in ckpt.names}


def _exme_config(base, models, spell_base_plus=False):
    entries = [{"model": f"{base}+{m}" if spell_base_plus else str(m), "parameters": {"weight": w, "alpha": a}}
               for m, w, a in zip(models, [0.5, 0.3, 0.2], [0.4, 0.1, 0.7])]
    return MergeConfig.from_dict({"merge_method": "exme", "base_model": str(base), "models": entries})


@pytest.mark.parametrize("spell_base_plus", [False, True])
def test_exme_merge_of_adapters_is_bitwise_the_merge_of_their_full_models(lora_models, tmp_path, spell_base_plus):
    from_adapters = run_merge(_exme_config(lora_models.base, lora_models.adapters, spell_base_plus), tmp_path / "a", progress=False)
    from_full = run_merge(_exme_config(lora_models.base, lora_models.merged), tmp_path / "f", progress=False)
    a, f = _tensors(from_adapters), _tensors(from_full)
    assert set(a) == set(f)
    assert all(torch.equal(a[n], f[n]) for n in a)


def test_ties_over_adapters_equals_ties_over_full_models(lora_models, tmp_path):
    def cfg(models):
        return MergeConfig.from_dict({"merge_method": "ties", "base_model": str(lora_models.base),
                                      "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in models]})

    a = _tensors(run_merge(cfg(lora_models.adapters), tmp_path / "a", progress=False))
    f = _tensors(run_merge(cfg(lora_models.merged), tmp_path / "f", progress=False))
    assert all(torch.equal(a[n], f[n]) for n in a)


@pytest.mark.parametrize("store", ["checkpoints", "float32-deltas"])
@pytest.mark.parametrize("lora_cache", [False, True])
def test_live_model_on_adapters_is_bitwise_the_live_model_on_full_models(lora_models, store, lora_cache):
    on_adapters = LiveModel.load(lora_models.base, store=store, lora_cache=lora_cache)
    on_adapters.set_models(lora_models.adapters)
    # Without the cache the factors are held, never a full θᵢ; with it θᵢ of the targeted tensors.
    assert all(isinstance(m, AdapterSource) for m in on_adapters.models) is (not lora_cache)
    on_full = LiveModel.load(lora_models.base, store=store)
    on_full.set_models(lora_models.merged)

    def same() -> bool:
        a, f = on_adapters.state_dict(), on_full.state_dict()
        return all(torch.equal(a[n], f[n]) for n in a)

    for coeffs in ([0.7, 0.4, 0.2], [1.5, 0.0, -0.3]):
        on_adapters.apply(coeffs), on_full.apply(coeffs)
        assert same()
    for adapter, merged in zip(lora_models.adapters, lora_models.merged):
        on_adapters.load_checkpoint(adapter), on_full.load_checkpoint(merged)
        assert same()
    kwargs = {"weights": [1.0, 1.0, 1.0], "density": 0.5, "normalize": True}
    on_adapters.apply_method("dare_ties", seed=3, **kwargs), on_full.apply_method("dare_ties", seed=3, **kwargs)
    assert same()


def test_live_weights_equal_the_engine_output_for_adapters(lora_models, tmp_path):
    out = run_merge(_exme_config(lora_models.base, lora_models.adapters), tmp_path / "m", progress=False)
    live = LiveModel.load(lora_models.base)
    live.set_models(lora_models.adapters)
    live.apply([0.5 * 1.4, 0.3 * 1.1, 0.2 * 1.7])
    written = _tensors(out)
    assert all(torch.equal(p, written[n]) for n, p in live.state_dict().items())
