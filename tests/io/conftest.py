"""Fixtures of the I/O fault tests: small tmpfs disks (full, read-only) and the pipeline's tiny SFT run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

PIPELINE_TESTS = Path(__file__).parents[1] / "pipeline"

# The pipeline tests' fixtures (a tiny SFT run, the synthetic objective), shared without copying them.
if "exme_pipeline_test_fixtures" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("exme_pipeline_test_fixtures", PIPELINE_TESTS / "conftest.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)
_pipeline = sys.modules["exme_pipeline_test_fixtures"]
sft_run = _pipeline.sft_run
synthetic = _pipeline.synthetic
_one_torch_thread = _pipeline._one_torch_thread


@pytest.fixture
def tmpfs(tmp_path):
    """``make(size_kb, readonly=False)`` mounts a fresh tmpfs of that size under ``tmp_path`` (root only,
    as in CI); every mount is undone afterwards."""
    mounted: list[Path] = []

    def make(size_kb: int, *, readonly: bool = False, name: str = "disk") -> Path:
        where = tmp_path / name
        where.mkdir()
        options = f"size={size_kb}k,mode=0777" + (",ro" if readonly else "")
        if os.getuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            message = f"cannot mount a tmpfs here: {done.stderr.strip()}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)

