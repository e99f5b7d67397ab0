"""`exme finetune` and `exme demo`. Thin wrappers: parse options, call the library, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from exme.cli._common import start, threads_option, verbose_option
from exme.cli.app import app


@app.command("finetune")
def finetune_command(
    model: Path = typer.Argument(..., metavar="MODEL", help="Base model folder (Hugging Face format, with its tokenizer)."),
    data: Path = typer.Argument(..., metavar="DATA", help="JSONL training file: prompt/completion or chat 'messages' records."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder; checkpoints go to OUTPUT/checkpoint-<step>."),
    learning_rate: float = typer.Option(5e-5, "--lr", "--learning-rate", help="Peak learning rate."),
    epochs: float | None = typer.Option(None, "--epochs", help="Passes over the data [default: 1]; or give --max-steps."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Optimizer steps, instead of --epochs."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per optimizer step (per device)."),
    max_length: int = typer.Option(512, "--max-length", help="Tokens per example; longer ones are cut."),
    save_steps: int = typer.Option(50, "--save-steps", help="Write a checkpoint every N steps (and at the end)."),
    warmup_ratio: float = typer.Option(0.0, "--warmup-ratio", help="Fraction of steps of linear warmup."),
    lr_scheduler: str = typer.Option("linear", "--lr-scheduler", help="linear, cosine, constant, ..."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order and dropout."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, mps or auto."),
    save_optimizer: bool = typer.Option(False, "--save-optimizer", help="Also save optimizer state (resumable, larger)."),
    force: bool = typer.Option(False, "--force", help="Replace checkpoint-* folders already in OUTPUT."),
    lora_r: int | None = typer.Option(None, "--lora-r", help="Train a LoRA adapter of rank R; checkpoints are PEFT adapters."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha (scaling alpha/r) [default: 2·r]."),
    lora_targets: str | None = typer.Option(None, "--lora-targets", help="Comma-separated modules, e.g. q_proj,v_proj."),
    logging_steps: int | None = typer.Option(None, "--logging-steps", help="Log the loss every N steps [default: every step up to 100 steps, else ~100 points]."),
    threads: Optional[str] = threads_option(),
    verbose: bool = verbose_option(),
) -> None:
    """Fine-tune MODEL on DATA (loss on completions only) and save checkpoint-* folders for `exme run`."""
    from exme.finetune import FinetuneConfig, finetune

    config = FinetuneConfig.from_options(
        model=model, data=data, output=output, learning_rate=learning_rate, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, max_length=max_length, save_steps=save_steps,
        warmup_ratio=warmup_ratio, lr_scheduler=lr_scheduler, seed=seed, device=device,
        save_optimizer=save_optimizer, force=force, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None,
        logging_steps=logging_steps,
    )
    start(
        device=device, threads=threads, verbose=verbose,
        interrupted=f"the checkpoint-* folders written so far are kept in {output} (a new run starts from step 0: pass --force)",
    )
    result = finetune(config)
    typer.echo(f"{len(result.checkpoints)} checkpoints in {result.output}: {', '.join(c.name for c in result.checkpoints)}")
    from exme.finetune import loss_summary

    line = loss_summary(result.loss_history)
    if line:
        typer.echo(line)


@app.command("demo")
def demo_command(
    workdir: Path = typer.Option(Path(".demo"), "--workdir", help="Folder for the demo's data, base model and SFT run (cached)."),
    output: Path = typer.Option(Path("demo_run"), "--output", help="Run folder of the pipeline: report.md, results.json, plots, final model."),
    fresh: bool = typer.Option(False, "--fresh", help="Rebuild everything instead of reusing the cached base and SFT run."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (seconds, not minutes): a smoke run of every stage."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the base model and the SFT run."),
    threads: int = typer.Option(1, "--threads", metavar="N", help="torch CPU threads (1 is fastest for the demo's small model on a busy machine; try 2+ on an idle one)."),
    lora: bool = typer.Option(False, "--lora", help="Fine-tune LoRA adapters (PEFT checkpoints) instead of every weight."),
    verbose: bool = verbose_option(),
) -> None:
    """Build a small model here, fine-tune it, and run the whole ExMe pipeline on it, ending in a report."""
    from exme.demo.run import run_demo

    start(
        threads=threads, verbose=verbose, header=False,
        interrupted=f"the data, base model and SFT run in {workdir} and the finished evaluations in {output} are kept; run the same command again to resume",
    )
    run_demo(workdir=workdir, output=output, fresh=fresh, quick=quick, seed=seed, threads=threads, lora=lora)
