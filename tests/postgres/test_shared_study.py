"""Two `exme run` workers share one study on a real PostgreSQL server; one is killed mid-run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent
SRC = HERE.parents[1] / "src"


def _config(path: Path, sft_run, output: Path, suite: str) -> Path:
    raw = {
        "base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": suite, "output": str(output),
        "alpha": {"grid": [0.1, 0.3, 0.5]}, "beta": {"grid": [0.2, 0.4, 0.6, 0.8]}, "baselines": ["linear"],
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def _exme_run(config: Path, storage: str | None, log: Path, sft_run, *, kill_at: int | None = None, sleep: float = 0.0):
    env = {
        **os.environ, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(SRC), os.environ.get("PYTHONPATH", "")]),
        "EXME_PG_LOG": str(log), "EXME_PG_SLEEP": str(sleep), "EXME_PG_KILL_AT": "" if kill_at is None else str(kill_at),
        "EXME_PG_BASE": str(sft_run.base), "EXME_PG_SFT1": str(sft_run.ckpts[0]), "EXME_PG_SFT2": str(sft_run.ckpts[1]),
    }
    cmd = [sys.executable, "-c", "from exme.cli import _entry; _entry()", "run", str(config), "--quiet", "--threads", "1"]
    if storage:
        cmd += ["--storage", storage]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, expect: int = 0) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _choices(output: Path) -> dict:
    """What a run chose, read as the pipeline's resume tests read it (one definition for both)."""
    spec = importlib.util.spec_from_file_location("exme_test_resume", HERE.parent / "pipeline" / "test_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._choices(output)


def _in_process_run(config: Path, storage: str | None, log: Path, sft_run) -> None:
    """The same pipeline and objective in this process (no interpreter start-up), writing no model or report."""
    sys.path.insert(0, str(HERE.parent / "pipeline"))
    from conftest import P1, P2, W1, W2
    from pipeline_worker import LoggingEvaluator

    from exme.pipeline import PipelineConfig, run_pipeline

    ev = LoggingEvaluator(log, None, 0.0, sft_run.base, sft_run.ckpts[0], sft_run.ckpts[1], P1, P2, W1, W2)
    cfg = PipelineConfig.from_yaml(config, storage=storage)
    run_pipeline(cfg, evaluator=ev, progress=False, write_model=False, report=False)


@pytest.mark.slow
def test_two_workers_one_killed_share_a_postgres_study_exactly_once(pg_cluster, sft_run, tmp_path):
    suite = "pg_objective:score"
    # Two `exme run` workers on PostgreSQL; A kills itself during its 4th evaluation, holding that point's claim.
    kill_at = 4
    configs = [_config(tmp_path / f"{w}.yaml", sft_run, tmp_path / f"out_{w}", suite) for w in "ab"]
    a = _exme_run(configs[0], pg_cluster.url(), tmp_path / "a1.log", sft_run, kill_at=kill_at, sleep=0.05)
    b = _exme_run(configs[1], pg_cluster.url(), tmp_path / "b.log", sft_run, sleep=0.05)
    # Meanwhile, the reference: one worker alone on SQLite.
    ref_config = _config(tmp_path / "ref.yaml", sft_run, tmp_path / "ref", suite)
    _in_process_run(ref_config, None, tmp_path / "ref.log", sft_run)
    _finish(a, expect=-9)
    _finish(b)
    ref_lines = _lines(tmp_path / "ref.log")
    assert len(set(ref_lines)) == len(ref_lines) > kill_at  # every candidate of this config is distinct
    a1, b_lines = _lines(tmp_path / "a1.log"), _lines(tmp_path / "b.log")
    assert len(a1) == kill_at and b_lines
    # Every grid point was evaluated once in total; the point A died on was taken over by B.
    assert Counter(a1[:-1] + b_lines) == Counter(ref_lines)
    assert a1[-1] in b_lines
    # A, run again, finds every evaluation done and makes the same choices as B and the SQLite run.
    _in_process_run(configs[0], pg_cluster.url(), tmp_path / "a2.log", sft_run)
    assert _lines(tmp_path / "a2.log") == []
    assert _choices(tmp_path / "out_a") == _choices(tmp_path / "out_b") == _choices(tmp_path / "ref")
