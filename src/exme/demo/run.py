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
    pipeline: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def full(cls, seed: int = 0) -> "DemoSettings":
        return cls(
            sizes=DemoSizes(),
            base=BaseModelSpec(seed=seed),
            sft_learning_rate=1e-3,
            sft_steps=180,
            sft_save_steps=30,
            sft_batch_size=16,
        )

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoSettings":
        return cls(
            sizes=DemoSizes.quick(),
            base=BaseModelSpec.quick().model_copy(update={"seed": seed}),
            sft_learning_rate=3e-3,
            sft_steps=12,
            sft_save_steps=4,
            sft_batch_size=8,
        )


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=False).print(message)


def prepare_data(workdir: Path, seed: int, sizes: DemoSizes) -> DemoData:
    return write_demo_data(workdir / "data", seed=seed, sizes=sizes)


def prepare_base(workdir: Path, data: DemoData, spec: BaseModelSpec, *, progress: bool = True) -> Path:
    sft_text = [line for line in data.sft.read_text(encoding="utf-8").splitlines() if line]
    folder, built = build_base(workdir / "base", data.corpus, spec, extra_tokenizer_text=sft_text, progress=progress)
    stamp = read_stamp(folder) or {}
    verb = "built" if built else "reused cached"
    _say(
        f"[bold]base[/]: {verb} {folder} — {stamp.get('n_parameters', 0) / 1e6:.2f}M parameters, "
        f"pretraining loss {stamp.get('loss_first', float('nan')):.2f} → {stamp.get('loss_last', float('nan')):.2f}"
        + (f" in {stamp.get('seconds', 0):.0f}s" if built else "")
    )
    return folder


def prepare_sft(workdir: Path, base: Path, data: DemoData, settings: DemoSettings, seed: int, *, progress: bool = True) -> list[Path]:
    """Fine-tune the base unless a finished run with the same settings and base is already there."""
    run_dir = workdir / "sft"
    config = FinetuneConfig(
        model=base, data=data.sft, output=run_dir, learning_rate=settings.sft_learning_rate,
        max_steps=settings.sft_steps, save_steps=settings.sft_save_steps, batch_size=settings.sft_batch_size,
        max_length=256, warmup_ratio=0.05, lr_scheduler="constant_with_warmup", seed=seed,
        logging_steps=max(1, settings.sft_save_steps), progress=progress, force=True,
    )
    base_key = (read_stamp(base) or {}).get("fingerprint")
    key = {"config": json.loads(config.model_dump_json(exclude={"progress", "force"})), "base": base_key, "data": _digest(data.sft)}
    stamp_path = run_dir / "exme_demo_sft.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == key and list_checkpoints(run_dir):
        checkpoints = list_checkpoints(run_dir)
        _say(f"[bold]sft[/]: reused cached run {run_dir} ({len(checkpoints)} checkpoints)")
        return checkpoints
    started = time.perf_counter()
    result = finetune(config)
    stamp_path.write_text(json.dumps(key, indent=2))
    first, last = (result.loss_history[0][1], result.loss_history[-1][1]) if result.loss_history else (float("nan"),) * 2
    _say(
        f"[bold]sft[/]: {len(result.checkpoints)} checkpoints in {run_dir} "
        f"(loss {first:.2f} → {last:.2f}, {time.perf_counter() - started:.0f}s)"
    )
    return result.checkpoints


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_demo(*, workdir: Path = Path(".demo"), output: Path = Path("demo_run"), fresh: bool = False, quick: bool = False, seed: int = 0, progress: bool = True) -> Path:
    """Run every stage; returns the path of ``report.md``."""
    workdir, output = Path(workdir), Path(output)
    if output.resolve() == workdir.resolve() or workdir.resolve() in output.resolve().parents:
        raise ExmeError(f"--output {output} must not be inside --workdir {workdir}")
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = DemoSettings.quick(seed) if quick else DemoSettings.full(seed)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    data = prepare_data(workdir, seed, settings.sizes)
    timings["data"] = time.perf_counter() - started

    started = time.perf_counter()
    base = prepare_base(workdir, data, settings.base, progress=progress)
    timings["base"] = time.perf_counter() - started

    started = time.perf_counter()
    checkpoints = prepare_sft(workdir, base, data, settings, seed, progress=progress)
    timings["sft"] = time.perf_counter() - started
    _say(f"timings: {', '.join(f'{k} {v:.1f}s' for k, v in timings.items())}")
    return workdir / "sft"
