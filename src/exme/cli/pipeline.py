"""`exme rank` and `exme run`: thin wrappers over :mod:`exme.pipeline` (parse options, call, print)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from exme.cli.app import app

_STORAGE = typer.Option(None, "--storage", help="Optuna storage URL shared by workers (default: sqlite:///<output>/study.db).")
_DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (overrides the file).")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")


@app.command("run")
def run(
    config: Path = typer.Argument(..., help="PIPELINE.yaml: base, checkpoints, suite, search, output."),
    storage: Optional[str] = _STORAGE,
    device: Optional[str] = _DEVICE,
    quiet: bool = _QUIET,
) -> None:
    """Rank the checkpoints, search α and β on dev, evaluate on test, write the model and the report.

    Run it again after an interruption to resume; run it on several machines with one --storage
    URL to share the evaluations.
    """
    from exme.io.writer import remove_stale_temp_folders
    from exme.pipeline import PipelineConfig, run_pipeline
    from exme.search.study import check_storage

    cfg = PipelineConfig.from_yaml(config, storage=storage, device=device)
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
    config: Path = typer.Argument(..., help="PIPELINE.yaml (its base, checkpoints, suite, top_k and output)."),
    storage: Optional[str] = _STORAGE,
    device: Optional[str] = _DEVICE,
    quiet: bool = _QUIET,
) -> None:
    """Score every checkpoint on the dev split and show which top_k are kept (recorded for `exme run`)."""
    from rich.console import Console
    from rich.table import Table

    from exme.pipeline import PipelineConfig, rank_checkpoints
    from exme.search.study import check_storage

    cfg = PipelineConfig.from_yaml(config, storage=storage, device=device)
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
