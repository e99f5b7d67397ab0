"""One policy for added vocabulary rows, shared by `exme merge` and the live model of `exme run`."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from exme.io import Checkpoint
from exme.merge.config import MergeConfig
from exme.merge.engine import run_merge
from exme.search import LiveModel

EXTRA = 5


def _resized(tmp_path, base, seed):
    """A fine-tuned checkpoint whose embeddings and head gained EXTRA rows (tokens added during SFT)."""
    from exme.testing import make_finetuned

    path = make_finetuned(base, tmp_path / f"resized{seed}", seed=seed, scale=0.05)
    file = path / "model.safetensors"
    sd = load_file(str(file))
    gen = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], torch.randn(EXTRA, sd[name].shape[1], generator=gen)])
    save_file(sd, str(file), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] += EXTRA
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _tensors(path):
    ckpt = Checkpoint.open(path)
    return {n: ckpt.get(n) for n in ckpt.names}


def test_added_rows_merge_alike_in_exme_merge_and_exme_run(tiny_models, tmp_path):
    resized = _resized(tmp_path, tiny_models.base, seed=4)
    models = [tiny_models.sft1, resized]
    config = {"merge_method": "exme", "base_model": str(tiny_models.base),
              "models": [{"model": str(m), "parameters": {"alpha": a}} for m, a in zip(models, [0.3, 0.6])],
              "parameters": {"beta": 0.4}}
    written = _tensors(run_merge(MergeConfig.from_dict(config), tmp_path / "base-vocab", progress=False))
    b = _tensors(tiny_models.base)
    assert written["model.embed_tokens.weight"].shape == b["model.embed_tokens.weight"].shape
    live = LiveModel.load(tiny_models.base)
    live.set_models(models)  # accepted, as exme merge accepts it
    live.apply([0.4 * 1.3, 0.6 * 1.6])
    assert all(torch.equal(p, written[n]) for n, p in live.state_dict().items())


def test_rows_beyond_the_base_come_from_the_tokenizer_source_unextrapolated(tiny_models, tmp_path):
    resized = _resized(tmp_path, tiny_models.base, seed=4)
    config = {"merge_method": "extrapolate", "base_model": str(tiny_models.base), "tokenizer_source": str(resized),
              "models": [{"model": str(resized), "parameters": {"alpha": 0.5}}]}
    written = _tensors(run_merge(MergeConfig.from_dict(config), tmp_path / "out", progress=False))
    b, m = _tensors(tiny_models.base), _tensors(resized)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = b[name].shape[0]
        assert written[name].shape[0] == rows + EXTRA
        assert torch.equal(written[name][rows:], m[name][rows:])  # copied as stored, not extrapolated
        expected = m[name][:rows].double() + 0.5 * (m[name][:rows].double() - b[name].double())
        torch.testing.assert_close(written[name][:rows].double(), expected, rtol=0, atol=1e-6)
