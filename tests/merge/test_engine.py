"""End to end: merge tiny Llama models, load with transformers, run them, compare with the formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from exme.merge import methods
from exme.merge.config import MergeConfig
from exme.merge.engine import run_merge


def load_and_run(folder):
    """Load with AutoModelForCausalLM unchanged and run one forward pass; return the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("merge me", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    return model


def cfg(method, base, models, params=None, **top):
    return MergeConfig.from_dict(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(m), "parameters": p} for m, p in models],
            **({"parameters": params} if params else {}),
            **top,
        }
    )


def test_task_arithmetic_end_to_end_matches_float64_formula(tiny_models, tmp_path, model_files):
    config = cfg("task_arithmetic", tiny_models.base, [(tiny_models.sft1, {"weight": 0.7}), (tiny_models.sft2, {"weight": 0.5})], {"lambda": 1.3})
    out = run_merge(config, tmp_path / "out", progress=False)
    model = load_and_run(out)
    assert model.dtype == torch.float32
    b, s1, s2 = (model_files.read_all(p) for p in (tiny_models.base, tiny_models.sft1, tiny_models.sft2))
    merged = model_files.read_all(out)
    assert set(merged) == set(b)
    for name, tb in b.items():
        expected = tb.double() + 1.3 * (0.7 * (s1[name].double() - tb.double()) + 0.5 * (s2[name].double() - tb.double()))
        np.testing.assert_allclose(merged[name].double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    # the loaded model holds exactly those tensors
    for name, param in model.state_dict().items():
        if name in merged:
            assert torch.equal(param, merged[name])


def test_exme_with_beta_and_bf16_output_is_one_rounding_of_the_formula(tiny_models, tmp_path, model_files):
    config = cfg(
        "exme", tiny_models.base,
        [(tiny_models.sft1, {"alpha": 0.5}), (tiny_models.sft2, {"alpha": 1.5})],
        {"beta": 0.3}, out_dtype="bfloat16",
    )
    out = run_merge(config, tmp_path / "out", progress=False, max_shard_size="10KB")
    model = load_and_run(out)
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    b, s1, s2 = (model_files.read_all(p) for p in (tiny_models.base, tiny_models.sft1, tiny_models.sft2))
    merged = model_files.read_all(out)
    for name, tb in b.items():
        d1, d2 = s1[name].double() - tb.double(), s2[name].double() - tb.double()
        expected = (tb.double() + 0.3 * 1.5 * d1 + 0.7 * 2.5 * d2).to(torch.bfloat16)
        got = merged[name]
        assert got.dtype == torch.bfloat16
        step = expected.double().abs() * 2.0**-7
        assert torch.all((got.double() - expected.double()).abs() <= step), name


def test_output_is_sharded_with_a_valid_index(tiny_models, tmp_path, model_files):
    config = cfg("linear", tiny_models.base, [(tiny_models.sft1, {"weight": 1.0}), (tiny_models.sft2, {"weight": 3.0})])
    out = run_merge(config, tmp_path / "out", progress=False, max_shard_size="8KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    merged = model_files.read_all(out)
    assert set(index["weight_map"]) == set(merged)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    s1, s2 = model_files.read_all(tiny_models.sft1), model_files.read_all(tiny_models.sft2)
    for name, t in merged.items():  # linear without base: (1·θ1 + 3·θ2) / 4
        expected = (s1[name].double() + 3 * s2[name].double()) / 4
        np.testing.assert_allclose(t.double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    load_and_run(out)


def test_side_files_and_model_card(tiny_models, tmp_path):
    config = cfg("ties", tiny_models.base, [(tiny_models.sft1, {"weight": 1.0, "density": 0.4}), (tiny_models.sft2, {"weight": 0.5, "density": 0.6})])
    out = run_merge(config, tmp_path / "out", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "merge_method | ties" in card and "densities | [0.4, 0.6]" in card and "weights | [1.0, 0.5]" in card
    assert str(tiny_models.sft1) in card and str(tiny_models.base) in card
    front = yaml.safe_load(card.split("---")[1])
    assert "exme" in front["tags"]
    # no temporary folder left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.usefixtures("both_paths")
def test_ties_engine_equals_methods_per_tensor(tiny_models, tmp_path, model_files):
    config = cfg(
        "ties", tiny_models.base,
        [(tiny_models.sft1, {"weight": 0.8, "density": 0.3}), (tiny_models.sft2, {"weight": 0.6, "density": 0.7})],
        {"majority_sign_method": "count"},
    )
    out = run_merge(config, tmp_path / "out", progress=False)
    b, s1, s2 = (model_files.read_all(p) for p in (tiny_models.base, tiny_models.sft1, tiny_models.sft2))
    merged = model_files.read_all(out)
    for name, tb in b.items():
        expected = methods.ties(tb, [s1[name], s2[name]], [0.8, 0.6], [0.3, 0.7], "count", True)
        assert torch.equal(merged[name], expected), name
    load_and_run(out)


@pytest.mark.usefixtures("both_paths")
def test_dare_is_reproducible_from_the_seed(tiny_models, tmp_path, model_files):
    config = cfg("dare_ties", tiny_models.base, [(tiny_models.sft1, {"weight": 0.5, "density": 0.5}), (tiny_models.sft2, {"weight": 0.5, "density": 0.5})])
    a = model_files.read_all(run_merge(config, tmp_path / "a", progress=False, seed=11))
    b = model_files.read_all(run_merge(config, tmp_path / "b", progress=False, seed=11, max_shard_size="9KB"))
    c = model_files.read_all(run_merge(config, tmp_path / "c", progress=False, seed=12))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    base, s1, s2 = (model_files.read_all(p) for p in (tiny_models.base, tiny_models.sft1, tiny_models.sft2))
    for name in a:  # the masks are those of tensor_generator(seed, name)
        gen = methods.tensor_generator(11, name, "cpu")
        assert torch.equal(a[name], methods.dare_ties(base[name], [s1[name], s2[name]], [0.5, 0.5], 0.5, gen))


def test_extrapolate_and_slerp(tiny_models, tmp_path, model_files):
    out = run_merge(MergeConfig.extrapolation(tiny_models.base, tiny_models.sft1, 0.4), tmp_path / "ex", progress=False)
    b, s1, s2 = (model_files.read_all(p) for p in (tiny_models.base, tiny_models.sft1, tiny_models.sft2))
    for name, t in model_files.read_all(out).items():
        expected = s1[name].double() + 0.4 * (s1[name].double() - b[name].double())
        np.testing.assert_allclose(t.double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    config = MergeConfig.from_dict(
        {"merge_method": "slerp", "base_model": str(tiny_models.sft1), "models": [{"model": str(tiny_models.sft1)}, {"model": str(tiny_models.sft2)}], "parameters": {"t": 0.3}}
    )
    out = run_merge(config, tmp_path / "sl", progress=False)
    for name, t in model_files.read_all(out).items():
        assert torch.equal(t, methods.slerp(s1[name], s2[name], 0.3))
    load_and_run(out)


# ------------------------------------------------------------------------------ tied embeddings, added tokens


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory):
    from exme.testing import make_finetuned, make_tiny_model

    root = tmp_path_factory.mktemp("tied")
    base = make_tiny_model(root / "base", seed=3, tie_word_embeddings=True)
    sft = make_finetuned(base, root / "sft", seed=4, scale=0.02)
    return base, sft


def test_tied_embeddings_stay_tied_and_are_reported(tied_models, tmp_path, model_files):
    base, sft = tied_models
    notes: list[str] = []
    out = run_merge(MergeConfig.extrapolation(base, sft, 0.5), tmp_path / "out", progress=False, plan_notes=notes)
    merged = model_files.read_all(out)
    assert "lm_head.weight" not in merged
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert any("tied embeddings" in n for n in notes)
    assert "tied embeddings" in (out / "README.md").read_text()
    model = load_and_run(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    b, s = model_files.read_all(base), model_files.read_all(sft)
    name = "model.embed_tokens.weight"
    np.testing.assert_allclose(
        merged[name].double().numpy(), (s[name].double() * 1.5 - 0.5 * b[name].double()).numpy(), rtol=1e-6, atol=1e-7
    )


def test_untied_base_with_tied_model_uses_its_embeddings_as_head(tiny_models, tied_models, tmp_path, model_files):
    # A tied checkpoint of the same shapes as the untied base: its head is its embedding matrix.
    _, tied_sft = tied_models
    b = model_files.read_all(tiny_models.base)
    tied_like = model_files.rewrite_model(
        tied_sft, tmp_path / "tied_like", lambda ts: {n: t + 0.01 for n, t in b.items() if n != "lm_head.weight"}
    )
    notes: list[str] = []
    config = cfg("task_arithmetic", tiny_models.base, [(tied_like, {"weight": 1.0})])
    out = run_merge(config, tmp_path / "out", progress=False, plan_notes=notes)
    merged = model_files.read_all(out)
    assert any("used as its output head" in n for n in notes)
    expected = b["lm_head.weight"].double() + (b["model.embed_tokens.weight"].double() + 0.01 - b["lm_head.weight"].double())
    np.testing.assert_allclose(merged["lm_head.weight"].double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_extra_embedding_rows_follow_the_tokenizer_source(tiny_models, tmp_path, model_files):
    b = model_files.read_all(tiny_models.base)
    s1 = model_files.read_all(tiny_models.sft1)
    extra = torch.randn(3, b["model.embed_tokens.weight"].shape[1])

    def add_rows(ts):
        ts = dict(s1)
        ts["model.embed_tokens.weight"] = torch.cat([s1["model.embed_tokens.weight"], extra])
        ts["lm_head.weight"] = torch.cat([s1["lm_head.weight"], extra * 2])
        return ts

    bigger = model_files.rewrite_model(tiny_models.sft1, tmp_path / "bigger", add_rows)
    cfg_json = json.loads((bigger / "config.json").read_text())
    cfg_json["vocab_size"] += 3
    (bigger / "config.json").write_text(json.dumps(cfg_json))
    rows = b["model.embed_tokens.weight"].shape[0]

    # Tokenizer from the model with added tokens: the output keeps its rows.
    notes: list[str] = []
    config = cfg("task_arithmetic", tiny_models.base, [(bigger, {"weight": 0.5})], tokenizer_source=str(bigger))
    out = run_merge(config, tmp_path / "keep", progress=False, plan_notes=notes)
    merged = model_files.read_all(out)
    emb = merged["model.embed_tokens.weight"]
    assert emb.shape[0] == rows + 3
    assert torch.equal(emb[rows:], extra)
    assert torch.equal(merged["lm_head.weight"][rows:], extra * 2)
    expected = b["model.embed_tokens.weight"].double() * 0.5 + s1["model.embed_tokens.weight"].double() * 0.5
    np.testing.assert_allclose(emb[:rows].double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows + 3
    assert any(f"rows {rows}..{rows + 2}" in n and "copied from" in n for n in notes)
    load_and_run(out)

    # Tokenizer from the base: the extra rows are not in the output, and that is reported.
    notes = []
    out = run_merge(cfg("task_arithmetic", tiny_models.base, [(bigger, {"weight": 0.5})]), tmp_path / "crop", progress=False, plan_notes=notes)
    assert model_files.read_all(out)["model.embed_tokens.weight"].shape[0] == rows
    assert any("are not in the output" in n for n in notes)
    load_and_run(out)


def test_inputs_are_byte_identical_after_a_merge(tiny_models, tmp_path, model_files):
    before = {p: model_files.snapshot(p) for p in (tiny_models.base, tiny_models.sft1, tiny_models.sft2)}
    run_merge(cfg("ties", tiny_models.base, [(tiny_models.sft1, {"weight": 1, "density": 0.5}), (tiny_models.sft2, {"weight": 1, "density": 0.5})]), tmp_path / "o", progress=False)
    assert before == {p: model_files.snapshot(p) for p in before}


def test_force_replaces_an_existing_output(tiny_models, tmp_path, model_files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    config = MergeConfig.extrapolation(tiny_models.base, tiny_models.sft1, 0.1)
    run_merge(config, out, progress=False, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize(
    "method, params",
    [
        ("task_arithmetic", {"weight": 0.7}),
        ("ties", {"weight": 0.7, "density": 0.35}),
        ("exme", {"weight": 0.5, "alpha": 0.4}),
        ("dare_linear", {"weight": 0.7, "density": 0.5}),
    ],
)
def test_results_do_not_depend_on_the_chunk_size(tiny_models, tmp_path, model_files, method, params):
    # 97 elements per chunk: every tensor spans many chunks, with boundaries mid-row.
    config = cfg(method, tiny_models.base, [(tiny_models.sft1, params), (tiny_models.sft2, params)])
    small = model_files.read_all(run_merge(config, tmp_path / "small", progress=False, chunk_elements=97))
    whole = model_files.read_all(run_merge(config, tmp_path / "whole", progress=False, chunk_elements=10**9))
    assert small.keys() == whole.keys()
    assert all(torch.equal(small[n], whole[n]) for n in small)


@pytest.mark.usefixtures("both_paths")
def test_ties_top_k_across_chunks_equals_the_whole_tensor_top_k(model_files):
    # Heavy magnitude ties (values on a coarse grid) so the tie quota must carry across chunks.
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(5000)
    models = [(torch.randint(-4, 5, (5000,), generator=g) * 0.25) for _ in range(2)]
    whole = methods.ties(base, models, [1.0, 0.5], 0.3)
    selectors = [methods.MagnitudeSelector.from_magnitudes((m - base).abs(), 0.3) for m in models]
    parts = [
        methods.ties(base[i : i + 333], [m[i : i + 333] for m in models], [1.0, 0.5], 0.3, selectors=selectors)
        for i in range(0, 5000, 333)
    ]
    assert torch.equal(torch.cat(parts), whole)
    kept = [(methods.magnitude_mask(m - base, 0.3)).sum().item() for m in models]
    assert kept == [1500, 1500]


def test_output_folder_gets_the_permissions_of_a_plain_mkdir(tiny_models, tmp_path):
    """The temporary folder is private while it is written; the finished model must not stay so."""
    import os
    import stat

    (tmp_path / "plain").mkdir()
    expected = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    config = cfg("linear", tiny_models.base, [(tiny_models.sft1, {"weight": 1.0}), (tiny_models.sft2, {"weight": 1.0})])
    out = run_merge(config, tmp_path / "out", progress=False)
    assert stat.S_IMODE(os.stat(out).st_mode) == expected


@pytest.mark.usefixtures("both_paths")
def test_ties_engine_on_a_tensor_above_the_sampling_size_equals_the_whole_tensor_merge(tiny_models, tmp_path, model_files):
    # One extra 400×400 tensor (above the size at which the threshold is found by histograms): the
    # engine's magnitude pass (coarse histogram, kept task vectors) and merge pass in 30k-element
    # chunks give the floats of methods.ties on the whole tensor, whose top-k comes from a sample.
    # Every value on a grid of 2**-9 (exact in bf16): task vectors of few distinct magnitudes, so the
    # k-th largest ties with thousands of entries and the kept ties end mid-tensor.
    g = torch.Generator().manual_seed(4)
    grid = lambda r: (torch.randint(-r, r + 1, (400, 400), generator=g) * 2.0**-9).bfloat16()  # noqa: E731
    big = grid(20)
    extra = {"base": big, "sft1": (big.float() + grid(3).float()).bfloat16(), "sft2": (big.float() + grid(3).float()).bfloat16()}
    folders = {}
    for role in ("base", "sft1", "sft2"):
        folders[role] = model_files.rewrite_model(getattr(tiny_models, role), tmp_path / role,
                                                  lambda ts, r=role: {**ts, "extra.weight": extra[r]})
    config = cfg("ties", folders["base"], [(folders["sft1"], {"weight": 0.6, "density": 0.5}),
                                           (folders["sft2"], {"weight": 0.4, "density": 0.3})])
    merged = model_files.read_all(run_merge(config, tmp_path / "out", progress=False, chunk_elements=30_000))
    expected = methods.ties(extra["base"], [extra["sft1"], extra["sft2"]], [0.6, 0.4], [0.5, 0.3])
    assert torch.equal(merged["extra.weight"], expected)
    assert not torch.equal(merged["extra.weight"], extra["base"])
