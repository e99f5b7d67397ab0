"""Fixtures of the merge tests: independent tensor reading, folder snapshots, CLI runs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, read with the safetensors library (not exme.io)."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


def snapshot(folder: Path) -> dict[str, str]:
    """File name → SHA-256 of everything under ``folder`` (to prove inputs are untouched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def rewrite_model(src: Path, dst: Path, edit) -> Path:
    """Copy a model folder, then replace its weights by ``edit(tensors)`` in one model.safetensors."""
    shutil.copytree(src, dst)
    tensors = read_all(dst)
    for f in list(dst.glob("*.safetensors")) + list(dst.glob("model.safetensors.index.json")):
        f.unlink()
    tensors = edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def model_files():
    return SimpleNamespace(read_all=read_all, snapshot=snapshot, rewrite_model=rewrite_model)



@pytest.fixture(params=["native", "torch"])
def both_paths(request, monkeypatch):
    """Run a TIES/DARE-TIES test over the fused numba kernels and over the torch path (exme.merge.native)."""
    from exme.merge import native

    if request.param == "native" and not native._HAVE_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(native, "ENABLED", request.param == "native")
    return request.param
