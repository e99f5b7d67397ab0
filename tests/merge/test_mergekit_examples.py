"""mergekit's own example configs give mergekit 0.1.5's tensors.

The outputs were recorded once with mergekit 0.1.5 (``mergekit_0_1_5/record.py`` says how), with
the inputs, so the test needs neither mergekit nor the same seeded initialisation: it rebuilds the
four input folders from the recorded tensors, runs ``exme merge`` on the same configs and compares
every tensor within float32 rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exme.merge.config import MergeConfig
from exme.merge.engine import run_merge

FIXTURE = Path(__file__).parent / "mergekit_0_1_5"
CONFIGS = sorted(p.stem for p in (FIXTURE / "configs").glob("*.yml"))


@pytest.fixture(scope="module")
def recorded():
    with safe_open(FIXTURE / "tensors.safetensors", framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


@pytest.fixture(scope="module")
def inputs(recorded, tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit-inputs")
    paths = {}
    for model in ("base", "ft1", "ft2", "ft3"):
        folder = root / model
        folder.mkdir()
        prefix = f"input/{model}/"
        save_file({k[len(prefix):]: v for k, v in recorded.items() if k.startswith(prefix)}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        shutil.copy(FIXTURE / "config.json", folder / "config.json")
        paths[model] = folder
    return paths


def float32_steps(x: torch.Tensor, y: torch.Tensor, operands: list[torch.Tensor]) -> torch.Tensor:
    """|x − y| in float32 steps at the operands' scale: max(|x|, |y|, |θ| of every input) per element.

    Why the operands: where a combination cancels (a result near 0 from inputs near 0.02), float32
    rounding of the inputs' terms is the error scale, not the result's own step.
    """
    mag = torch.maximum(x.abs(), y.abs())
    for t in operands:
        mag = torch.maximum(mag, t.abs())
    step = torch.exp2(torch.floor(torch.log2(mag.clamp_min(2.0**-100))) - 23)
    return (x.double() - y.double()).abs() / step.double()


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("name", CONFIGS)
def test_mergekit_example_gives_mergekits_tensors(name, recorded, inputs, tmp_path):
    text = (FIXTURE / "configs" / f"{name}.yml").read_text()
    for model, path in inputs.items():
        text = text.replace(f"<{model}>", str(path))
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    out = run_merge(MergeConfig.from_yaml(cfg), tmp_path / "out", progress=False)
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        ours = {k: fh.get_tensor(k) for k in fh.keys()}
    theirs = {k[len(name) + 1:]: v for k, v in recorded.items() if k.startswith(f"{name}/")}
    assert set(ours) == set(theirs)
    for tensor, expected in theirs.items():
        assert ours[tensor].dtype == expected.dtype == torch.float32
        operands = [recorded[f"input/{m}/{tensor}"] for m in inputs]
        worst = float(float32_steps(ours[tensor], expected, operands).max())
        assert worst <= 8, f"{tensor}: {worst:.1f} float32 steps from mergekit 0.1.5"


#: The merge.yaml files a pipeline run writes, recorded as configs: the coefficients each was written with.
PIPELINE_CONFIGS = {
    "exme-global": ("global", [1.08, 0.36]),
    "exme-module": ("module", {"attention": (1.3, 0.0), "mlp": (0.45, 0.66), "other": (0.9, 0.15)}),
    "exme-layers": ("layers:2", {"layers 0-1": (0.5, 0.7), "layers 2-3": (1.25, 0.05), "other": (0.6, 0.4)}),
}


@pytest.mark.parametrize("name", sorted(PIPELINE_CONFIGS))
def test_recorded_pipeline_configs_are_what_the_pipeline_writes(name, recorded):
    """The exme-* configs checked against mergekit above are the pipeline's own merge.yaml, byte for
    byte in content: the spec the run writes for these coefficients, with the paths as placeholders."""
    import yaml

    from exme.merge.groups import GroupCoefficients, group_rule
    from exme.pipeline.stages import mergekit_spec

    granularity, coeffs = PIPELINE_CONFIGS[name]
    names = sorted(k[len("input/base/"):] for k in recorded if k.startswith("input/base/"))
    if granularity != "global":
        coeffs = GroupCoefficients.from_groups(group_rule(granularity, names), coeffs)
    spec = mergekit_spec(Path("<base>"), [Path("<ft1>"), Path("<ft2>")], coeffs, "float32")
    assert yaml.safe_load((FIXTURE / "configs" / f"{name}.yml").read_text()) == spec
