"""Checkpoint reading: every layout gives the same tensors as an independent reader; bad files are named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exme.errors import ExmeError
from exme.io import Checkpoint, TensorSpec
from exme.testing import read_index


def all_tensors_by_safetensors(folder):
    """Independent reader: the safetensors library over every shard."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


def test_sharded_safetensors_reads_every_tensor_exactly(tiny_models):
    assert read_index(tiny_models.base), "fixture should be sharded"
    ckpt = Checkpoint.open(tiny_models.base)
    reference = all_tensors_by_safetensors(tiny_models.base)
    assert ckpt.names == sorted(reference)
    assert ckpt.format == "sharded safetensors"
    for name, tensor in reference.items():
        assert ckpt.spec(name) == TensorSpec(tuple(tensor.shape), tensor.dtype)
        assert torch.equal(ckpt.get(name), tensor)
    assert ckpt.config["model_type"] == "llama"
    assert ckpt.has(ckpt.names[0]) and not ckpt.has("nope")


def test_single_file_safetensors(tiny_models):
    ckpt = Checkpoint.open(tiny_models.sft2)
    assert ckpt.format == "safetensors"
    reference = all_tensors_by_safetensors(tiny_models.sft2)
    assert all(torch.equal(ckpt.get(n), reference[n]) for n in reference)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_read_with_weights_only(tiny_models, tmp_path, sharded):
    state = all_tensors_by_safetensors(tiny_models.sft2)
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(tiny_models.sft2 / "config.json", folder)
    names = sorted(state)
    if sharded:  # the layout transformers 4.x wrote: shards + pytorch_model.bin.index.json
        halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        weight_map = {}
        for file, part in halves.items():
            torch.save({n: state[n] for n in part}, folder / file)
            weight_map.update({n: file for n in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    ckpt = Checkpoint.open(folder)
    assert ckpt.format == ("sharded pytorch .bin" if sharded else "pytorch .bin")
    assert ckpt.names == names
    for name in names:
        assert torch.equal(ckpt.get(name), state[name])
        assert ckpt.spec(name) == TensorSpec(tuple(state[name].shape), state[name].dtype)


def test_pytorch_bin_with_code_in_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "m").mkdir()
    torch.save({"w": Evil()}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ExmeError, match=r"cannot read .*pytorch_model.bin with torch.load\(weights_only=True\)"):
        Checkpoint.open(tmp_path / "m")


def test_bf16_and_empty_tensors_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.zeros(0, 4), "c": torch.arange(6, dtype=torch.int64)}
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path / "m")
    for name, t in tensors.items():
        got = ckpt.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert ckpt.nbytes == 3 * 5 * 2 + 0 + 6 * 8


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ExmeError, match=r"model folder .*nowhere does not exist"):
        Checkpoint.open(tmp_path / "nowhere")


def test_folder_without_weights_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExmeError, match=r"no weights in .*empty"):
        Checkpoint.open(tmp_path / "empty")


def test_truncated_safetensors_is_refused_at_open(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models.sft2, tmp_path / "m")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ExmeError, match=r"model.safetensors is truncated: tensor '.*' ends at byte"):
        Checkpoint.open(folder)


def test_corrupt_header_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    file = tmp_path / "m" / "model.safetensors"
    file.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 16)
    with pytest.raises(ExmeError, match="corrupt safetensors header"):
        Checkpoint.open(tmp_path / "m")
    file.write_bytes(b"\x01\x02")
    with pytest.raises(ExmeError, match="truncated"):
        Checkpoint.open(tmp_path / "m")


def test_index_pointing_to_missing_shard_is_named(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models.base, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ExmeError, match=rf"{shard.name}.* is missing"):
        Checkpoint.open(folder)


def test_bad_config_json_is_named(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models.sft2, tmp_path / "m")
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ExmeError, match=r"config.json is not valid JSON"):
        Checkpoint.open(folder)


def test_unknown_tensor_is_named(tiny_models):
    with pytest.raises(ExmeError, match="tensor 'lm_head.bias' is not in"):
        Checkpoint.open(tiny_models.sft2).get("lm_head.bias")


def test_index_naming_a_tensor_absent_from_its_shard(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models.base, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first_shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["ghost.weight"] = first_shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ExmeError, match="'ghost.weight'"):
        Checkpoint.open(folder)
