"""`exme demo`: the whole ExMe story on a model built here, from data to report, in minutes on a CPU.

Stages, each cached in the work folder so a second run only redoes what changed:

1. write the seeded data (corpus, SFT mix, suite) — cheap, always rewritten, same bytes per seed;
2. build the base (tokenizer + short pretraining), reused when its settings and corpus match;
3. ``exme finetune`` on the SFT mix, saving ``checkpoint-*`` folders, reused when its settings match;
4. the pipeline (rank → α → β, baselines, test table, final model, report) into the run folder.

Nothing in the demo looks at the test split to choose anything: the sizes and schedules below were
set once for speed and for SFT to beat the base on dev, and the pipeline selects on dev only.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exme.demo.base import BaseModelSpec, build_base, read_stamp
from exme.demo.data import DemoData, DemoSizes, write_demo_data
from exme.errors import ExmeError
from exme.finetune import FinetuneConfig, finetune, list_checkpoints


@dataclass(frozen=True)
class DemoSettings:
    """Every size and schedule of one demo run (full or ``quick``)."""

    sizes: DemoSizes
    base: BaseModelSpec
    sft_learning_rate: float
    sft_steps: int
    sft_save_steps: int
    sft_batch_size: int
    pipeline: dict[str, Any] = field(default_factory=dict)  # PIPELINE.yaml keys: grids, baselines
    lora_r: int | None = None  # a LoRA SFT run (checkpoints are PEFT adapters) instead of full fine-tuning

    def with_lora(self, r: int = 16) -> "DemoSettings":
        """The same demo on a LoRA SFT run: rank ``r`` on every projection, alpha 2r, a 10x learning rate.

        Why 10x: LoRA trains far fewer weights from a zero update, and the usual LoRA learning rates
        are an order of magnitude above full fine-tuning's.
        """
        from dataclasses import replace

        return replace(self, lora_r=r, sft_learning_rate=self.sft_learning_rate * 10)

    @property
    def sft_folder(self) -> str:
        return "sft" if self.lora_r is None else "sft-lora"

    @classmethod
    def full(cls, seed: int = 0) -> "DemoSettings":
        return cls(
            sizes=DemoSizes(),
            base=BaseModelSpec(seed=seed),
            sft_learning_rate=1e-3,
            sft_steps=180,
            sft_save_steps=30,
            sft_batch_size=16,
            pipeline={
                # Fine near 0, where extrapolating a small model's checkpoints changes it most; coarse beyond.
                "alpha": {"grid": [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0], "refine": False},
                "beta": {"grid": [round(0.1 * i, 1) for i in range(11)]},
                "search": {"mode": "grid"},
                "baselines": ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"],
            },
        )

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoSettings":
        return cls(
            sizes=DemoSizes.quick(),
            base=BaseModelSpec.quick().model_copy(update={"seed": seed}),
            sft_learning_rate=3e-3,
            sft_steps=9,
            sft_save_steps=3,
            sft_batch_size=8,
            pipeline={
                "dev": {"confirm_fraction": 0},  # 4 dev items per task: too few to hold any out
                "alpha": {"grid": [0.0, 1.0]},
                "beta": {"grid": [0.0, 0.5, 1.0]},
                "baselines": ["linear", "ties"],
            },
        )


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=False).print(message)


def prepare_data(workdir: Path, seed: int, sizes: DemoSizes) -> DemoData:
    return write_demo_data(workdir / "data", seed=seed, sizes=sizes)


def prepare_base(workdir: Path, data: DemoData, spec: BaseModelSpec, *, progress: bool = True) -> tuple[Path, bool]:
    """The base model folder, and whether it was (re)built in this call."""
    sft_text = [line for line in data.sft.read_text(encoding="utf-8").splitlines() if line]
    folder, built = build_base(workdir / "base", data.corpus, spec, extra_tokenizer_text=sft_text, progress=progress)
    stamp = read_stamp(folder) or {}
    verb = "built" if built else "reused cached"
    _say(
        f"[bold]base[/]: {verb} {folder} — {stamp.get('n_parameters', 0) / 1e6:.2f}M parameters, "
        f"pretraining loss {stamp.get('loss_first', float('nan')):.2f} → {stamp.get('loss_last', float('nan')):.2f}"
        + (f" in {stamp.get('seconds', 0):.0f}s" if built else "")
    )
    return folder, built


def prepare_sft(workdir: Path, base: Path, data: DemoData, settings: DemoSettings, seed: int, *, progress: bool = True) -> tuple[list[Path], bool]:
    """Fine-tune the base unless a finished run with the same settings and base is there; (checkpoints, trained).

    The stamp is removed before training and written only after it finished, so a run killed half
    way is never taken for a finished one.
    """
    run_dir = workdir / settings.sft_folder
    lora = {} if settings.lora_r is None else {
        "lora_r": settings.lora_r, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    config = FinetuneConfig(
        model=base, data=data.sft, output=run_dir, learning_rate=settings.sft_learning_rate,
        max_steps=settings.sft_steps, save_steps=settings.sft_save_steps, batch_size=settings.sft_batch_size,
        max_length=256, warmup_ratio=0.05, lr_scheduler="constant_with_warmup", seed=seed,
        logging_steps=max(1, settings.sft_save_steps), progress=progress, force=True, **lora,
    )
    base_key = (read_stamp(base) or {}).get("fingerprint")
    key = {"config": json.loads(config.model_dump_json(exclude={"progress", "force"})), "base": base_key, "data": _digest(data.sft)}
    stamp_path = run_dir / "exme_demo_sft.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == key and list_checkpoints(run_dir):
        checkpoints = list_checkpoints(run_dir)
        _say(f"[bold]sft[/]: reused cached run {run_dir} ({len(checkpoints)} checkpoints)")
        return checkpoints, False
    stamp_path.unlink(missing_ok=True)
    started = time.perf_counter()
    result = finetune(config)
    stamp_path.write_text(json.dumps(key, indent=2))
    first, last = (result.loss_history[0][1], result.loss_history[-1][1]) if result.loss_history else (float("nan"),) * 2
    _say(
        f"[bold]sft[/]: {len(result.checkpoints)} checkpoints in {run_dir} "
        f"(loss {first:.2f} → {last:.2f}, {time.perf_counter() - started:.0f}s)"
    )
    return result.checkpoints, True


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


PIPELINE_FILE = "pipeline.yaml"
WORKDIR_ENTRIES = {"data", "base", "base.tmp", "sft", "sft-lora", PIPELINE_FILE}  # what --fresh may delete


def write_pipeline_yaml(workdir: Path, base: Path, data: DemoData, output: Path, settings: DemoSettings, seed: int) -> Path:
    """The demo's ``PIPELINE.yaml`` (absolute paths), so ``exme run .demo/pipeline.yaml`` redoes the last stage."""
    import yaml

    document = {
        "base": str(base.resolve()),
        "checkpoints": str((workdir / settings.sft_folder).resolve()),
        "suite": str(data.suite.resolve()),
        "top_k": 2,
        **settings.pipeline,
        "device": "cpu",
        "dtype": "float32",
        "output": str(output.resolve()),
        "seed": seed,
    }
    path = workdir / PIPELINE_FILE
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def demo_evaluator(suite_path: Path):
    """The suite evaluator with batch sizes that fit the demo's small items in one batch per task."""
    from exme.evaluate import SuiteEvaluator, Suite

    return SuiteEvaluator(Suite.from_yaml(suite_path), batch_size=64, mc_batch_size=128, workers=2)


def _is_run_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("results.json", "study.db", "report.md"))


_SYMBOLS = {"alpha": "α", "alpha_1": "α₁", "alpha_2": "α₂", "beta": "β", "weight_1": "w₁", "lambda": "λ"}


def _settings_text(params: dict[str, Any]) -> str:
    """``checkpoint-150 α=0.3`` rather than ``checkpoint=checkpoint-150, alpha=0.3``: short enough for a table cell."""
    parts = []
    for key, value in params.items():
        if key == "checkpoint":
            parts.append(str(value))
        else:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"{_SYMBOLS.get(key, key)}={shown}")
    return " ".join(parts)


def print_outcome(results: Any, report: Path) -> None:
    """The final dev/test table and ExMe's test difference against the best SFT and each baseline."""
    from rich.console import Console
    from rich.table import Table

    from exme.report.verdict import summary_lines

    tasks = sorted({t for row in results.final for t in row.test.tasks})
    table = Table(title="Test split (every choice made on dev)")
    table.add_column("model", no_wrap=True)
    table.add_column("settings", overflow="fold")
    table.add_column("dev", justify="right")
    table.add_column("test", justify="right")
    for task in tasks:
        table.add_column(task, justify="right")
    for row in results.final:
        settings = _settings_text(row.params)
        table.add_row(
            row.name, settings, "–" if row.dev is None else f"{row.dev.overall:.3f}", f"{row.test.overall:.3f}",
            *[f"{row.test.tasks.get(t, float('nan')):.3f}" for t in tasks],
        )
    console = Console()
    console.print(table)
    n_test = sum(next((r.test.n_items for r in results.final if r.kind == "exme"), {}).values())
    for line in summary_lines(results):
        console.print(line, markup=False, highlight=False)
    console.print(f"{n_test} test items in all. Report: [bold]{report}[/]")


def run_demo(
    *,
    workdir: Path = Path(".demo"),
    output: Path = Path("demo_run"),
    fresh: bool = False,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = True,
    lora: bool = False,
) -> Path:
    """Run every stage and print the final table; returns the path of ``report.md``.

    ``threads`` sets torch's intra-op threads: one is the default because the demo's matrices are
    small and, on a machine shared with other work, several OpenMP threads spin-waiting on each
    other can be many times slower than one (``None`` leaves torch's own choice). ``lora`` runs the
    demo on a LoRA SFT run (PEFT adapter checkpoints, in ``<workdir>/sft-lora``).
    """
    import torch
    from transformers.utils import logging as hf_logging

    from exme.pipeline import PipelineConfig, run_pipeline

    hf_logging.disable_progress_bar()  # dozens of checkpoint loads: the stage bars say enough

    workdir, output = Path(workdir), Path(output)
    if output.resolve() == workdir.resolve() or workdir.resolve() in output.resolve().parents:
        raise ExmeError(f"--output {output} must not be inside --workdir {workdir}")
    if output.exists() and any(output.iterdir()) and not _is_run_folder(output):
        raise ExmeError(f"--output {output} exists and is not an exme run folder; choose another folder or remove it")
    if threads is not None:
        if threads < 1:
            raise ExmeError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if fresh and workdir.exists():
        strangers = sorted(p.name for p in workdir.iterdir() if p.name not in WORKDIR_ENTRIES)
        if strangers:
            raise ExmeError(
                f"--workdir {workdir} holds files the demo did not write ({', '.join(strangers[:3])}); "
                "refusing to delete it with --fresh; choose an empty or demo-only folder"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.quick(seed) if quick else DemoSettings.full(seed)
    if lora:
        settings = settings.with_lora()
    timings: dict[str, float] = {}
    started_all = time.perf_counter()

    started = time.perf_counter()
    data = prepare_data(workdir, seed, settings.sizes)
    timings["data"] = time.perf_counter() - started

    started = time.perf_counter()
    base, base_built = prepare_base(workdir, data, settings.base, progress=progress)
    timings["base"] = time.perf_counter() - started

    started = time.perf_counter()
    checkpoints, sft_trained = prepare_sft(workdir, base, data, settings, seed, progress=progress)
    timings["sft"] = time.perf_counter() - started

    # Recorded evaluations are keyed by the base path and the suite, not by the checkpoints' bytes:
    # when the base or the SFT run was rebuilt, an old run folder's records must not be read back.
    if output.exists() and (fresh or base_built or sft_trained) and _is_run_folder(output):
        shutil.rmtree(output)

    started = time.perf_counter()
    pipeline_yaml = write_pipeline_yaml(workdir, base, data, output, settings, seed)
    _say(f"[bold]pipeline[/]: {len(checkpoints)} checkpoints, suite {data.suite} → {output}")
    config = PipelineConfig.from_yaml(pipeline_yaml)
    results = run_pipeline(config, progress=progress, evaluator=demo_evaluator(data.suite))
    timings["pipeline"] = time.perf_counter() - started
    report = output / "report.md"
    print_outcome(results, report)
    _say(f"Re-run the last stage alone with: exme run {pipeline_yaml}")
    timings["total"] = time.perf_counter() - started_all
    _say(f"timings: {', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}")
    (output / "demo_timings.json").write_text(json.dumps(timings, indent=2))
    return report
