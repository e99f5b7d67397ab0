"""`exme merge` and `exme extrapolate`. Thin wrappers: parse options, call the library, print."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from exme.cli._common import start, threads_option, verbose_option
from exme.cli.app import app
from exme.errors import ExmeError

_DEVICE = typer.Option("cpu", "--device", help="Where the arithmetic runs: cpu, cuda or cuda:N.")
_CUDA = typer.Option(False, "--cuda", help="Same as --device cuda (mergekit's spelling).")
_SHARD = typer.Option(
    "5GB", "--max-shard-size", "--out-shard-size", metavar="SIZE",
    help="Largest output shard with its unit, e.g. 5GB, 500MB, 2GiB. --out-shard-size is mergekit's name.",
)
_FORCE = typer.Option(False, "--force", help="Replace an existing non-empty output folder.")
_SEED = typer.Option(0, "--seed", help="Seed of the DARE drop masks (same seed, same model).")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary.")
_FORMAT = typer.Option(
    None, "--format",
    help="model: a full model folder (default). peft: one LoRA adapter that is exactly the merge of LoRA adapters "
    "(linear methods: extrapolate, exme, task_arithmetic, linear); overrides the config's output_format.",
)
_INTERRUPTED = "nothing was written (the output folder appears only once complete); run the same command again to start over"

def shard_size(text: str, option: str = "--max-shard-size") -> int:
    """Bytes of a shard size written with its unit (``5GB``, ``500MB``, ``2GiB``, ``64KB``).

    A bare number is refused: ``5`` meant as 5GB would be 5 bytes, one shard per tensor.
    """
    from exme.io.writer import parse_size

    if re.fullmatch(r"\s*[0-9.]+\s*", str(text)):
        raise ExmeError(f"{option} {text.strip()}: give a unit, e.g. {text.strip()}GB or {text.strip()}MB")
    return parse_size(text)


def dtype_option(value: Optional[str], what: str = "output dtype") -> Optional[str]:
    """The one dtype table (:func:`exme.common.parse_dtype`): fp16/bf16/float16/... → canonical name."""
    if value is None or value == "auto":
        return value
    from exme.common import parse_dtype
    from exme.io.writer import dtype_name

    return dtype_name(parse_dtype(value, what))


@contextmanager
def _parents_of(out: Path) -> Iterator[None]:
    """Create the missing parent folders of ``out`` (as mergekit does), and remove them again if the
    command fails, so a refused merge leaves nothing behind."""
    out = Path(out).expanduser().absolute()
    created: list[Path] = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    from exme.io.writer import write_faults

    try:
        for folder in reversed(created):
            with write_faults(folder, "creating the output's parent folder"):
                folder.mkdir()
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    try:
        yield
    except BaseException:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _with_format(config, output_format: Optional[str]):
    if output_format is None:
        return config
    if output_format not in ("model", "peft"):
        raise ExmeError(f"--format {output_format!r} is not one of model, peft")
    return config.model_copy(update={"output_format": output_format})


def _finish(path: Path, quiet: bool) -> None:
    if not quiet:
        typer.echo(f"wrote {path}")


@app.command("merge")
def merge_command(
    config: Path = typer.Argument(..., metavar="CONFIG", help="mergekit-style YAML (merge_method, base_model, models, parameters)."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output model folder (created atomically, parent folders too)."),
    device: str = _DEVICE,
    cuda: bool = _CUDA,
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Output dtype: float32, float16 (fp16), bfloat16 (bf16). Overrides the config's out_dtype."
    ),
    max_shard_size: str = _SHARD,
    force: bool = _FORCE,
    seed: int = _SEED,
    quiet: bool = _QUIET,
    output_format: Optional[str] = _FORMAT,
    threads: Optional[str] = threads_option(),
    verbose: bool = verbose_option(),
) -> None:
    """Merge models as described by a mergekit-style YAML config.

    Models may be full model folders or LoRA adapter folders (over base_model, or written BASE+ADAPTER).
    """
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge

    device = "cuda" if cuda and device == "cpu" else device
    start(device=device, threads=threads, verbose=verbose, header=verbose and not quiet, interrupted=_INTERRUPTED)
    size = shard_size(max_shard_size)
    dtype = dtype_option(dtype)
    merge_config = _with_format(MergeConfig.from_yaml(config), output_format)
    with _parents_of(out):
        path = run_merge(
            merge_config, out, device=device, out_dtype=dtype, max_shard_size=size, force=force, seed=seed,
            progress=not quiet,
        )
    _finish(path, quiet)


@app.command("extrapolate")
def extrapolate_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Output model folder (created atomically, parent folders too)."),
    base: Path = typer.Option(..., "--base", help="The base model folder θ_b."),
    model: Path = typer.Option(..., "--model", help="The fine-tuned model folder θ, or a LoRA adapter folder over --base."),
    alpha: float = typer.Option(..., "--alpha", help="Extrapolation strength α ≥ 0: θ + α(θ − θ_b)."),
    device: str = _DEVICE,
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Output dtype: float32, float16 (fp16), bfloat16 (bf16) [default: the fine-tuned model's]."
    ),
    max_shard_size: str = _SHARD,
    force: bool = _FORCE,
    quiet: bool = _QUIET,
    output_format: Optional[str] = _FORMAT,
    threads: Optional[str] = threads_option(),
    verbose: bool = verbose_option(),
) -> None:
    """ExPO: write θ + α(θ − θ_b), the fine-tuned model pushed further along its own task vector.

    No --seed: extrapolation draws nothing at random.
    """
    import math

    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge

    if base.expanduser().resolve() == model.expanduser().resolve():
        raise ExmeError(
            f"--base and --model are the same folder ({base.expanduser().resolve()}); give the fine-tuned model's folder "
            "as --model and the model it was fine-tuned from as --base"
        )
    if not math.isfinite(alpha) or alpha < 0:
        raise ExmeError(f"--alpha {alpha} must be a number ≥ 0 (0 copies the fine-tuned model; ExPO uses e.g. 0.1 to 0.5)")
    start(device=device, threads=threads, verbose=verbose, header=verbose and not quiet, interrupted=_INTERRUPTED)
    size = shard_size(max_shard_size)
    dtype = dtype_option(dtype)
    merge_config = _with_format(MergeConfig.extrapolation(base, model, alpha), output_format)
    with _parents_of(out):
        path = run_merge(
            merge_config, out, device=device, out_dtype=dtype, max_shard_size=size, force=force,
            progress=not quiet,
        )
    _finish(path, quiet)
