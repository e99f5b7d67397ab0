"""`exme` commands for the evaluate area. Thin wrappers: parse options, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from exme.cli._common import start, threads_option, verbose_option
from exme.cli.app import app
from exme.errors import ExmeError

_SPLIT_HELP = (
    "dev, test, both (dev and test columns) or all (every item of each task in one score). exme divides "
    "every task, lm-eval's included, into dev and test halves, so only 'all' is comparable with "
    "published full-set numbers."
)


@app.command("eval")
def eval_command(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A HF model folder (config.json, weights, tokenizer), or a LoRA adapter: BASE+ADAPTER, or its folder when adapter_config.json names a local base."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Suite YAML, 'lm-eval:task1,task2', or 'module:function'."),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", help="lm-eval task names, comma-separated (lm-eval's spelling; same as --suite lm-eval:TASKS)."
    ),
    split: str = typer.Option("both", "--split", help=_SPLIT_HELP),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu, cuda or cuda:1."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the folder's), float32, float16 (fp16) or bfloat16 (bf16)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many items per task (≥ 1)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Generation batch size (suites, lm-eval)."),
    json_out: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write all scores and the suite description to FILE."),
    output_path: Optional[Path] = typer.Option(
        None, "--output_path", "--output-path", metavar="DIR", help="Write the same JSON as DIR/results.json (lm-eval's spelling)."
    ),
    backend: str = typer.Option("hf", "--backend", help="Evaluation engine: hf (transformers) or vllm (suite and lm-eval tasks)."),
    backend_option: Optional[list[str]] = typer.Option(
        None, "--backend-option", metavar="KEY=VALUE",
        help="An engine option of the backend (repeatable), e.g. --backend-option max_model_len=2048 for vllm; "
        "a value is read as YAML (numbers, true/false, null).",
    ),
    include_path: Optional[list[Path]] = typer.Option(
        None, "--include-path", help="A folder of lm-eval task YAML files (repeatable), as lm-eval's --include_path."
    ),
    log_samples: bool = typer.Option(
        False, "--log-samples", help="Also write each item's record, output and score as samples_<split>.jsonl "
        "beside the JSON (--output_path DIR or --json FILE's folder), as lm-eval's --log_samples.",
    ),
    threads: Optional[str] = threads_option(),
    verbose: bool = verbose_option(),
) -> None:
    """Score a model folder on a suite and print a table (one column per split)."""
    from rich.console import Console
    from rich.table import Table

    from exme.cli.merge import dtype_option
    from exme.evaluate import parse_evaluator_spec
    from exme.evaluate.run import evaluate_folder

    spec = _suite_spec(suite, tasks)
    engine_options = _key_values(backend_option or [], "--backend-option")
    if limit is not None and limit < 1:
        raise ExmeError(f"--limit {limit}: give a positive number of items per task, or leave --limit out for all")
    dtype = dtype_option(dtype, "--dtype") or "auto"
    samples_dir = output_path if output_path is not None else (json_out.parent if json_out is not None else None)
    if log_samples and samples_dir is None:
        raise ExmeError("--log-samples needs a place to write: add --output_path DIR (or --json FILE)")
    start(device=device, threads=threads, verbose=verbose, interrupted="nothing was saved (scores are written when every split is done)")
    opts: dict = {} if batch_size is None else {"batch_size": batch_size}
    if parse_evaluator_spec(spec, include_path=include_path or None).kind == "suite":
        opts["progress"] = True
    if include_path:
        opts["include_path"] = list(include_path)
    outputs = [p for p in (json_out, output_path / "results.json" if output_path else None) if p is not None]
    results = evaluate_folder(
        model_dir, spec, split=split, device=device, dtype=dtype, limit=limit, backend=backend,
        engine_options=engine_options, json_out=outputs[0] if outputs else None, log_samples=samples_dir if log_samples else None, **opts,
    )
    for extra in outputs[1:]:
        extra.parent.mkdir(parents=True, exist_ok=True)
        extra.write_text(outputs[0].read_text())
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
        # how generations ended: a model rambling to the token limit shows here, not only in the JSON
        for stat in ("hit_limit", "no_stop", "mean_new_tokens"):
            values = [results[s].details.get(task, {}).get("generation", {}).get(stat) for s in splits]
            if any(v is not None for v in values):
                table.add_row("", stat, *["" if v is None else f"{v:.4g}" if stat == "mean_new_tokens" else f"{v:.4f}" for v in values], style="dim")
    table.add_row("overall", "weighted mean", *[f"{results[s].overall:.4f}" for s in splits], style="bold")
    Console().print(table)
    for path in outputs + ([samples_dir / f"samples_{s}.jsonl" for s in splits] if log_samples else []):
        Console().print(f"wrote {path}")


def _key_values(items: list[str], flag: str) -> dict[str, object]:
    """``KEY=VALUE`` pairs as a dict, each value read as YAML (``2048`` an int, ``null`` None); the
    backend's options model validates them (exme.evaluate.backends.BackendEntry.parse_options)."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ExmeError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} max_model_len=2048")
        if key in out:
            raise ExmeError(f"{flag} {key!r} is given twice; give each option once")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key] = value
    return out


def _suite_spec(suite: str | None, tasks: str | None) -> str:
    """``--suite`` as given, or ``lm-eval:<tasks>`` from lm-eval's ``--tasks``; exactly one of them."""
    if suite and tasks:
        raise ExmeError("give either --suite or --tasks (lm-eval task names), not both")
    if tasks:
        return tasks if tasks.startswith("lm-eval:") else f"lm-eval:{tasks}"
    if not suite:
        raise ExmeError("name what to score: --suite SUITE.yaml, --suite lm-eval:TASKS, or --tasks TASKS (see exme eval --help)")
    return suite
