"""Three `exme run` workers on one PostgreSQL study and one run folder, killed at random moments and started
again and again: the run ends as an uninterrupted one does (bounded version of benchmarks/soak_workers.py)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# soak.py is loaded by its path: putting this folder first on sys.path would make every later
# `from conftest import ...` in the same test process find this folder's conftest, not the pipeline's.
_spec = importlib.util.spec_from_file_location("exme_soak_helpers", HERE / "soak.py")
_soak = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _soak
_spec.loader.exec_module(_soak)
comparable_results, leftovers, model_bytes = _soak.comparable_results, _soak.leftovers, _soak.model_bytes
run_reference, soak, worker_rows, write_config = _soak.run_reference, _soak.soak, _soak.worker_rows, _soak.write_config


def _choices(output: Path) -> dict:
    spec = importlib.util.spec_from_file_location("exme_test_resume", HERE.parent / "pipeline" / "test_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._choices(output)


@pytest.mark.slow
def test_workers_killed_again_and_again_end_like_one_uninterrupted_run(pg_database, sft_run, tmp_path):
    alphas, betas = [0.1, 0.3, 0.5, 0.7], [0.2, 0.4, 0.6, 0.8]
    ref_out, out = tmp_path / "ref", tmp_path / "shared"
    run_reference(write_config(tmp_path / "ref.yaml", sft_run.base, sft_run.run, ref_out, alphas, betas),
                  tmp_path / "ref.log", sft_run.base, sft_run.ckpts, sleep=0.0)
    storage = pg_database("exme_soak")
    seed = int(os.environ.get("EXME_SOAK_SEED", "0"))
    result = soak(write_config(tmp_path / "shared.yaml", sft_run.base, sft_run.run, out, alphas, betas), storage,
                  tmp_path / "logs", sft_run.base, sft_run.ckpts, tmp_path / "ref.log",
                  kills=6, seed=seed, sleep=0.5, kill_after=(1.0, 6.0), timeout_s=600)
    # Up to 6 kills: a run that finishes first ends the schedule (one evaluation per distinct model made the
    # run shorter), so at least 3 are asked for, one of them inside an evaluation.
    assert result.reference_evaluations >= 20 and 3 <= result.kills <= 6 and result.kills_mid_evaluation >= 1, result
    # Every candidate evaluated; each extra evaluation is the one a killed worker was doing when it died.
    assert result.missing == [] and result.unexplained == [], result
    assert result.evaluations - result.reference_evaluations == sum(result.extra.values()) <= result.kills
    # Same choices, same results.json, same model bytes as the uninterrupted single worker on SQLite.
    assert _choices(out) == _choices(ref_out)
    assert comparable_results(out) == comparable_results(ref_out)
    assert model_bytes(out) == model_bytes(ref_out) and model_bytes(out)
    # Nothing of the killed workers is left: no claim, no heartbeat row, no temporary folder or file.
    assert worker_rows(storage) == (0, 0)
    assert leftovers(out) == []
