"""benchmarks/budget_study.py: the cut runs' schedules, the cross-run paired differences and the mean over seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

@pytest.fixture(scope="module")
def study(benchmark_script):
    return benchmark_script("budget_study")


@pytest.mark.parametrize("fraction,steps,save", [(0.25, 45, 8), (0.5, 90, 15), (1.0, 180, 30)])
def test_each_budget_is_its_own_run_with_six_checkpoints(study, fraction, steps, save):
    s = study.settings_for(0, fraction, quick=False)
    assert (s.sft_steps, s.sft_save_steps) == (steps, save)
    assert len(range(save, steps + 1, save)) + (steps % save != 0) == 6  # every `save` steps, and the last
    assert s.pipeline["baselines"] == [] and s.pipeline["alpha"]["grid"][-2:] == [1.5, 2.0]
    full = study.settings_for(0, 1.0, quick=False)
    assert s.sizes == full.sizes and s.sft_learning_rate == full.sft_learning_rate  # same items, same schedule


def _row(name: str, kind: str, per: list[float], dev: float) -> dict:
    s = float(np.mean(per))
    split = {"overall": s, "tasks": {"t": s}, "n_items": {"t": len(per)},
             "per_item": {"t": {str(i): x for i, x in enumerate(per)}}}
    return {"name": name, "kind": kind, "params": {"alpha_1": 0.5, "alpha_2": 0.0, "beta": 0.7} if kind == "exme" else {},
            "dev": {**split, "overall": dev}, "test": split}


def test_cross_run_differences_are_paired_over_the_same_items(study):
    rng = np.random.default_rng(0)
    full_sft = rng.integers(0, 2, 60).astype(float)
    cut_sft = rng.integers(0, 2, 60).astype(float)
    cut_exme = rng.integers(0, 2, 60).astype(float)
    cut = {"suite": {"weights": {"t": 1.0}}, "final": [
        _row("SFT-1", "sft", list(cut_sft), 0.5), _row("SFT-2", "sft", [0.0] * 60, 0.4), _row("ExMe", "exme", list(cut_exme), 0.6)]}
    full = {"suite": {"weights": {"t": 1.0}}, "final": [
        _row("SFT-1", "sft", [1.0] * 60, 0.3), _row("SFT-2", "sft", list(full_sft), 0.7), _row("ExMe", "exme", list(full_sft), 0.8)]}
    out = study.seed_summary({0.25: cut, 1.0: full}, seed=0)
    r = out["0.25"]
    assert r["best_sft"] == "SFT-1" and out["1.0"]["best_sft"] == "SFT-2"  # chosen on dev, not test
    d = cut_exme - full_sft
    assert r["exme_minus_full_sft"]["diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert r["exme_minus_full_sft"]["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(60), rel=1e-9)
    assert r["sft_minus_full_sft"]["diff"] == pytest.approx((cut_sft - full_sft).mean(), abs=1e-12)
    assert r["exme_minus_sft"]["diff"] == pytest.approx((cut_exme - cut_sft).mean(), abs=1e-12)


def test_mean_over_seeds_has_a_t_interval(study):
    from scipy import stats

    xs = [0.02, -0.01, 0.05, 0.00, 0.03]
    mean, sd = float(np.mean(xs)), float(np.std(xs, ddof=1))
    half = stats.t.ppf(0.975, len(xs) - 1) * sd / math.sqrt(len(xs))
    expected = f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]".replace("-", "−")
    assert study._over_seeds(xs) == expected
