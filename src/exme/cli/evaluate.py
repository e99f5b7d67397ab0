"""`exme` commands for the evaluate area. Thin wrappers: parse options, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from exme.cli.app import app


@app.command("eval")
def eval_command(
    model_dir: Path = typer.Argument(..., help="A HF model folder (config.json, weights, tokenizer)."),
    suite: str = typer.Option(..., "--suite", help="Suite YAML, 'lm-eval:task1,task2', or 'module:function'."),
    split: str = typer.Option("all", "--split", help="dev, test, or all."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda:0."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, float16 or bfloat16."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many items per task."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Generation batch size (suites, lm-eval)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all scores and the suite description here."),
    backend: str = typer.Option("hf", "--backend", help="Evaluation engine: hf (transformers) or vllm (suite tasks)."),
    include_path: Optional[list[Path]] = typer.Option(
        None, "--include-path", help="A folder of lm-eval task YAML files (repeatable), as lm-eval's --include_path."
    ),
) -> None:
    """Score a model folder on a suite and print a table (one column per split)."""
    from rich.console import Console
    from rich.table import Table

    from exme.evaluate import parse_evaluator_spec
    from exme.evaluate.run import evaluate_folder

    opts: dict = {} if batch_size is None else {"batch_size": batch_size}
    kind = parse_evaluator_spec(suite, include_path=include_path or None).kind
    if kind == "suite":
        opts["progress"] = True
    if include_path:
        opts["include_path"] = list(include_path)
    results = evaluate_folder(
        model_dir, suite, split=split, device=device, dtype=dtype, limit=limit, json_out=json_out, backend=backend, **opts
    )
    splits = list(results)
    table = Table(title=f"{model_dir}")
    table.add_column("task")
    table.add_column("metric")
    for s in splits:
        table.add_column(f"{s} (n)", justify="right")
    first = results[splits[0]]
    for task in first.tasks:
        metrics = first.metrics(task) or {"score": first.tasks[task]}
        primary = first.details.get(task, {}).get("metric", "score")
        for name in [primary] + [m for m in metrics if m != primary]:
            cells = []
            for s in splits:
                value = results[s].metrics(task).get(name, results[s].tasks[task] if name == primary else None)
                cells.append("" if value is None else f"{value:.4f}" + (f" ({results[s].n_items[task]})" if name == primary and task in results[s].n_items else ""))
            table.add_row(task if name == primary else "", name, *cells)
    table.add_row("overall", "weighted mean", *[f"{results[s].overall:.4f}" for s in splits], style="bold")
    Console().print(table)
    if json_out is not None:
        Console().print(f"wrote {json_out}")
