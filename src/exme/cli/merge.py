"""`exme merge` and `exme extrapolate`. Thin wrappers: parse options, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from exme.cli.app import app

_DEVICE = typer.Option("cpu", "--device", help="Where the arithmetic runs: cpu, cuda or cuda:N.")
_DTYPE = typer.Option(None, "--dtype", help="Output dtype (float32, float16, bfloat16); overrides the config.")
_SHARD = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")
_FORCE = typer.Option(False, "--force", help="Replace an existing non-empty output folder.")
_SEED = typer.Option(0, "--seed", help="Seed of the DARE drop masks (same seed, same model).")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary.")
_FORMAT = typer.Option(
    None, "--format",
    help="model: a full model folder (default). peft: one LoRA adapter that is exactly the merge of LoRA adapters "
    "(linear methods: extrapolate, exme, task_arithmetic, linear); overrides the config's output_format.",
)


def _with_format(config, output_format: Optional[str]):
    if output_format is None:
        return config
    from exme.errors import ExmeError

    if output_format not in ("model", "peft"):
        raise ExmeError(f"--format {output_format!r} is not one of model, peft")
    return config.model_copy(update={"output_format": output_format})


def _finish(path: Path, quiet: bool) -> None:
    if not quiet:
        typer.echo(f"wrote {path}")


@app.command("merge")
def merge_command(
    config: Path = typer.Argument(..., help="mergekit-style YAML (merge_method, base_model, models, parameters)."),
    out: Path = typer.Argument(..., help="Output model folder (created atomically)."),
    device: str = _DEVICE,
    dtype: Optional[str] = _DTYPE,
    max_shard_size: str = _SHARD,
    force: bool = _FORCE,
    seed: int = _SEED,
    quiet: bool = _QUIET,
    output_format: Optional[str] = _FORMAT,
) -> None:
    """Merge models as described by a mergekit-style YAML config.

    Models may be full model folders or LoRA adapter folders (over base_model, or written BASE+ADAPTER).
    """
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge

    merge_config = _with_format(MergeConfig.from_yaml(config), output_format)
    path = run_merge(
        merge_config, out, device=device, out_dtype=dtype, max_shard_size=max_shard_size, force=force, seed=seed,
        progress=not quiet,
    )
    _finish(path, quiet)


@app.command("extrapolate")
def extrapolate_command(
    out: Path = typer.Argument(..., help="Output model folder (created atomically)."),
    base: Path = typer.Option(..., "--base", help="The base model folder θ_b."),
    model: Path = typer.Option(..., "--model", help="The fine-tuned model folder θ, or a LoRA adapter folder over --base."),
    alpha: float = typer.Option(..., "--alpha", help="Extrapolation strength α ≥ 0: θ + α(θ − θ_b)."),
    device: str = _DEVICE,
    dtype: Optional[str] = _DTYPE,
    max_shard_size: str = _SHARD,
    force: bool = _FORCE,
    quiet: bool = _QUIET,
    output_format: Optional[str] = _FORMAT,
) -> None:
    """ExPO: write θ + α(θ − θ_b), the fine-tuned model pushed further along its own task vector.

    No --seed: extrapolation draws nothing at random.
    """
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge

    merge_config = _with_format(MergeConfig.extrapolation(base, model, alpha), output_format)
    path = run_merge(
        merge_config, out, device=device, out_dtype=dtype, max_shard_size=max_shard_size, force=force,
        progress=not quiet,
    )
    _finish(path, quiet)
