"""Shared test set-up: no hub, ever; tiny local models built once per session."""

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A sharded tiny Llama base and two seeded 'SFT' checkpoints of it (read-only: copy before changing)."""
    from exme.testing import make_finetuned, make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    base = make_tiny_model(root / "base", seed=0, max_shard_size="20KB")
    sft1 = make_finetuned(base, root / "sft1", seed=1, scale=0.02, max_shard_size="20KB")
    sft2 = make_finetuned(base, root / "sft2", seed=2, scale=0.02)
    return SimpleNamespace(root=root, base=base, sft1=sft1, sft2=sft2)


@pytest.fixture
def run_cli(capsys):
    """Run ``exme ARGS`` in-process; return (exit code, stdout, stderr)."""
    from exme.cli import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def benchmark_script():
    """``load(name)``: the script ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    folder = Path(__file__).parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
