"""Record mergekit 0.1.5's outputs on its own example configs, adapted to tiny local models.

Run once (it needs mergekit, which the tests do not):

    python benchmarks/bench_merge.py --build-only     # or any venv with mergekit==0.1.5 at benchmarks/.mergekit-venv
    PYTHONPATH=src python tests/merge/mergekit_0_1_5/record.py
    PYTHONPATH=src python tests/merge/mergekit_0_1_5/record.py --add NAME ...   # new configs only

It builds four tiny Llama models (a base and three seeded fine-tunes, float32, 4 layers), writes
each config of ``configs/`` with the model paths filled in, runs ``mergekit-yaml CONFIG OUT`` from
``benchmarks/.mergekit-venv``, and stores the inputs and every output tensor in
``tensors.safetensors`` (keys ``input/<model>/<tensor>`` and ``<config>/<tensor>``), with the
models' ``config.json``. The test (``tests/merge/test_mergekit_examples.py``) rebuilds the input
folders from these tensors, so it never depends on seeded initialisation being the same on
another machine. ``--add NAME ...`` records only the named configs of ``configs/`` on the inputs
already recorded (rebuilt from ``tensors.safetensors``), leaving every other recorded tensor as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
MERGEKIT = REPO / "benchmarks" / ".mergekit-venv" / "bin" / "mergekit-yaml"
MODELS = ("base", "ft1", "ft2", "ft3")
SHAPE = dict(hidden_size=16, num_layers=4, intermediate_size=32, num_heads=4)


def read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def fill(text: str, paths: dict[str, Path]) -> str:
    for name, path in paths.items():
        text = text.replace(f"<{name}>", str(path))
    return text


def run_mergekit(cfg: Path, paths: dict[str, Path], root: Path) -> dict[str, torch.Tensor]:
    filled = root / cfg.name
    filled.write_text(fill(cfg.read_text(), paths))
    out = root / f"out-{cfg.stem}"
    subprocess.run([str(MERGEKIT), str(filled), str(out), "--quiet"], check=True)
    found = read(out)
    print(f"{cfg.stem}: {len(found)} tensors")
    return {f"{cfg.stem}/{k}": v.contiguous() for k, v in found.items()}


def add(names: list[str], version: str) -> None:
    """Record the configs ``names`` on the recorded inputs; keep every recorded tensor."""
    with safe_open(HERE / "tensors.safetensors", framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = {}
        for model in MODELS:
            folder = root / model
            folder.mkdir()
            prefix = f"input/{model}/"
            save_file({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                      folder / "model.safetensors", metadata={"format": "pt"})
            (folder / "config.json").write_text((HERE / "config.json").read_text())
            paths[model] = folder
        for name in names:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}/")}
            tensors.update(run_mergekit(HERE / "configs" / f"{name}.yml", paths, root))
        save_file(tensors, HERE / "tensors.safetensors", metadata={"mergekit": version})


def main() -> None:
    from exme.testing import make_finetuned, make_tiny_model

    version = subprocess.run(
        [str(MERGEKIT.parent / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if version != "0.1.5":
        sys.exit(f"mergekit {version} at {MERGEKIT}; this fixture records 0.1.5")
    if sys.argv[1:2] == ["--add"]:
        add(sys.argv[2:], version)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = {"base": make_tiny_model(root / "base", seed=0, **SHAPE)}
        for i in (1, 2, 3):
            paths[f"ft{i}"] = make_finetuned(paths["base"], root / f"ft{i}", seed=i, scale=0.02)
        tensors = {f"input/{m}/{k}": v for m in MODELS for k, v in read(paths[m]).items()}
        for cfg in sorted((HERE / "configs").glob("*.yml")):
            tensors.update(run_mergekit(cfg, paths, root))
        save_file(tensors, HERE / "tensors.safetensors", metadata={"mergekit": version})
        config = json.loads((paths["base"] / "config.json").read_text())
        (HERE / "config.json").write_text(json.dumps(config, indent=1) + "\n")


if __name__ == "__main__":
    main()
