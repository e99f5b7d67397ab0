"""`exme rank` and `exme run`: thin wrappers over :mod:`exme.pipeline` (parse options, call, print)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from exme.cli._common import start, threads_option, verbose_option
from exme.cli.app import app

_STORAGE = typer.Option(None, "--storage", help="Optuna storage URL shared by workers (default: sqlite:///<output>/study.db).")
_DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (overrides the file).")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
_CONFIG = typer.Argument(..., metavar="CONFIG", help="PIPELINE.yaml: base, checkpoints, suite, search, output.")


def _start(cfg, threads: Optional[str], verbose: bool, quiet: bool) -> None:
    """Device and threads (``--threads`` over the file's ``threads:``) before any folder is created."""
    where = cfg.storage or str(Path(cfg.output) / "study.db")
    start(
        device=cfg.device, threads=threads if threads is not None else cfg.threads, verbose=verbose,
        header=not quiet, threads_source="--threads" if threads is not None else "threads",
        interrupted=f"finished evaluations are kept in {where}; run the same command again to resume",
    )
    warning = _few_trials_warning(cfg)
    if warning and not quiet:
        print(warning)


def _few_trials_warning(cfg) -> str | None:
    """TPE with under 10 trials per searched dimension (α and w per kept checkpoint) is close to random search."""
    if cfg.search.mode != "tpe":
        return None
    dims = 2 * cfg.top_k
    if cfg.search.n_trials >= 10 * dims:
        return None
    return (
        f"warning: search.n_trials {cfg.search.n_trials} for {dims} searched parameters (α and w for each of top_k "
        f"{cfg.top_k}); TPE has little to learn from under ~10 trials per parameter, so the choice is close to a "
        f"random search's: consider n_trials ≥ {10 * dims}"
    )


@app.command("run")
def run(
    config: Path = _CONFIG,
    storage: Optional[str] = _STORAGE,
    device: Optional[str] = _DEVICE,
    quiet: bool = _QUIET,
    threads: Optional[str] = threads_option(),
    verbose: bool = verbose_option(),
    log_samples: bool = typer.Option(
        False, "--log-samples",
        help="Write each final-table row's test items (record, output, score) to <output>/samples/<row>_test.jsonl, "
        "as lm-eval's --log_samples (suite YAML files only; same as log_samples: true in the file).",
    ),
) -> None:
    """Rank the checkpoints, search α and β on dev, evaluate on test, write the model and the report.

    Run it again after an interruption to resume; run it on several machines with one --storage
    URL to share the evaluations.
    """
    from exme.io.writer import remove_stale_temp_folders
    from exme.pipeline import PipelineConfig, run_pipeline
    from exme.search.study import check_storage

    cfg = PipelineConfig.from_yaml(config, storage=storage, device=device, log_samples=log_samples or None)
    _start(cfg, threads, verbose, quiet)
    check_storage(cfg.storage_url)  # before anything is created: a bad URL leaves no output folder
    remove_stale_temp_folders(cfg.output)  # a final write killed mid-way left these behind
    results = run_pipeline(cfg, progress=not quiet)
    _print_final(results)
    from exme.report.verdict import summary_lines

    for line in summary_lines(results):
        print(line)
    print(f"report: {Path(cfg.output) / 'report.md'}")


@app.command("rank")
def rank(
    config: Path = typer.Argument(..., metavar="CONFIG", help="PIPELINE.yaml (its base, checkpoints, suite, top_k and output)."),
    storage: Optional[str] = _STORAGE,
    device: Optional[str] = _DEVICE,
    quiet: bool = _QUIET,
    threads: Optional[str] = threads_option(),
    verbose: bool = verbose_option(),
) -> None:
    """Score every checkpoint on the dev split and show which top_k are kept (recorded for `exme run`)."""
    from rich.console import Console
    from rich.table import Table

    from exme.pipeline import PipelineConfig, rank_checkpoints
    from exme.search.study import check_storage

    cfg = PipelineConfig.from_yaml(config, storage=storage, device=device)
    _start(cfg, threads, verbose, quiet)
    check_storage(cfg.storage_url)
    ranking = rank_checkpoints(cfg, progress=not quiet)
    order = sorted(ranking, key=lambda c: (-c.dev.overall, -(c.step if c.step is not None else -1)))
    tasks = list(order[0].dev.tasks) if order else []
    table = Table(title="Checkpoints on dev")
    for col in ["rank", "checkpoint", "step", "overall", *tasks, "kept"]:
        table.add_column(col, justify="left" if col in ("checkpoint", "kept") else "right")
    for i, c in enumerate(order, start=1):
        table.add_row(str(i), c.name, "–" if c.step is None else str(c.step), f"{c.dev.overall:.4f}",
                      *[f"{c.dev.tasks.get(t, float('nan')):.4f}" for t in tasks], "yes" if c.kept else "")
    Console().print(table)


def _print_final(results) -> None:
    from rich.console import Console
    from rich.table import Table

    tasks = list(results.final[0].test.tasks) if results.final else []
    table = Table(title="Final table (test split; every choice was made on dev)")
    for col in ["model", "settings", *tasks, "test overall", "dev overall"]:
        table.add_column(col, justify="left" if col in ("model", "settings") else "right")
    for r in results.final:
        settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items())
        table.add_row(r.name, settings, *[f"{r.test.tasks.get(t, float('nan')):.4f}" for t in tasks],
                      f"{r.test.overall:.4f}", "–" if r.dev is None else f"{r.dev.overall:.4f}")
    Console().print(table)
