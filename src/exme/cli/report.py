"""`exme report`: re-render a run folder's report from its results.json. A thin wrapper."""

from __future__ import annotations

from pathlib import Path

import typer

from exme.cli.app import app


@app.command("report")
def report(run_dir: Path = typer.Argument(..., help="Run folder holding results.json (written by `exme run`).")) -> None:
    """Re-render report.md and the plots of RUN_DIR from its results.json."""
    from exme.report import load_results, render

    path = render(load_results(run_dir), run_dir)
    print(path)
