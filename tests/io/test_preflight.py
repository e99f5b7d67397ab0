"""Preflight: every input opened, aligned and scanned before the first evaluation; unchanged files not rescanned."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from exme.errors import ExmeError
from exme.io import preflight
from exme.io.preflight import check_inputs


def _copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        save_file(edit(sd), str(f), metadata={"format": "pt"})
    return dst


def test_clean_run_passes_and_reports_every_input(tiny_models, tmp_path):
    report = check_inputs(tiny_models.base, [tiny_models.sft1, tiny_models.sft2], cache_dir=tmp_path / "run", progress=False)
    assert [i.path for i in report.inputs] == [tiny_models.base, tiny_models.sft1, tiny_models.sft2]
    assert report.cached == 0 and report.scanned_bytes > 0
    assert (tmp_path / "run" / "preflight.json").is_file()


def test_a_nan_tensor_is_named_with_its_checkpoint(tiny_models, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"

    def poison(sd):
        if name in sd:
            sd[name] = sd[name].clone()
            sd[name][3, 5] = float("nan")
        return sd

    bad = _copy_with(tiny_models.sft2, tmp_path / "checkpoint-9", poison)
    with pytest.raises(ExmeError, match=rf"checkpoint {bad}: tensor {name} holds 1 NaN/Inf value\(s\) of \d+; re-export"):
        check_inputs(tiny_models.base, [tiny_models.sft1, bad], cache_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # a failed check leaves nothing behind


def test_a_truncated_file_is_named(tiny_models, tmp_path):
    bad = shutil.copytree(tiny_models.sft2, tmp_path / "checkpoint-9")
    file = bad / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ExmeError, match=rf"{file} is truncated: tensor '.*' ends at byte"):
        check_inputs(tiny_models.base, [tiny_models.sft1, bad], progress=False)


def test_a_misshaped_checkpoint_is_named(tiny_models, tmp_path):
    from exme.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "checkpoint-9", seed=0, intermediate_size=48)
    with pytest.raises(ExmeError, match=r"shape mismatch in tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight': base \(\d+, \d+\), checkpoint checkpoint-9"):
        check_inputs(tiny_models.base, [tiny_models.sft1, other], progress=False)


def test_resized_embeddings_pass_with_a_note(tiny_models, tmp_path):
    def grow(sd):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in sd:
                sd[name] = torch.cat([sd[name], torch.zeros(3, sd[name].shape[1])])
        return sd

    resized = _copy_with(tiny_models.sft2, tmp_path / "checkpoint-9", grow)
    report = check_inputs(tiny_models.base, [resized], progress=False)
    assert any("extra vocabulary rows" in n for n in report.notes)


def test_a_resumed_check_does_not_rescan_unchanged_files(tiny_models, tmp_path, monkeypatch):
    work = shutil.copytree(tiny_models.sft2, tmp_path / "sft2")
    check_inputs(tiny_models.base, [tiny_models.sft1, work], cache_dir=tmp_path, progress=False)
    scanned = []
    real = preflight._first_non_finite
    monkeypatch.setattr(preflight, "_first_non_finite", lambda src, adv: scanned.append(src.path) or real(src, adv))
    again = check_inputs(tiny_models.base, [tiny_models.sft1, work], cache_dir=tmp_path, progress=False)
    assert scanned == [] and again.cached == 3
    # A file that changed (new mtime) is scanned again; the others still come from the cache.
    file = work / "model.safetensors"
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = check_inputs(tiny_models.base, [tiny_models.sft1, work], cache_dir=tmp_path, progress=False)
    assert scanned == [work] and third.cached == 2


def test_adapters_are_aligned_and_scanned(lora_models_for_io, tmp_path):
    base, adapter = lora_models_for_io
    report = check_inputs(base, [adapter, f"{base}+{adapter}"], progress=False)
    assert [i.kind for i in report.inputs] == ["safetensors", "peft lora adapter", "peft lora adapter"]
    bad = shutil.copytree(adapter, tmp_path / "bad")
    f = bad / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = float("inf")
    save_file(sd, str(f))
    module = key.removeprefix("base_model.model.").removesuffix(".weight")
    with pytest.raises(ExmeError, match=rf"checkpoint {bad}: tensor {module} holds 1 NaN/Inf"):
        check_inputs(base, [bad], progress=False)


@pytest.fixture
def lora_models_for_io(tmp_path):
    from exme.testing import make_lora_adapter, make_tiny_model

    base = make_tiny_model(tmp_path / "base", seed=0)
    return base, make_lora_adapter(base, tmp_path / "adapter", seed=1)
