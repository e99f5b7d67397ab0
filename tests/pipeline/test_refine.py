"""α refinement in the pipeline (:class:`exme.search.refine.Refine`): the points, counts and notes of the
coarse-then-fine search, worked out by hand, and a resumed run reading every one back."""

from __future__ import annotations

import pytest

from exme.pipeline import PipelineConfig, run_pipeline

GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


def _config(tmp_path, sft_run, tiny_suite, **extra) -> PipelineConfig:
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(tmp_path / "out"), "baselines": [], "alpha": {"grid": GRID, "refine": True}}
    raw.update(extra)
    return PipelineConfig.from_dict(raw)


def _fine(center: float) -> list[float]:
    """Step 0.1 / 5 = 0.02, four either side of the centre, written out."""
    return [round(center + 0.02 * j, 10) for j in (-4, -3, -2, -1, 1, 2, 3, 4)]


def _synthetic(sft_run):
    from synthetic import SyntheticEvaluator

    # 1 + α₁ = 1.26 lies between grid points (coarse best 0.3); 1 + α₂ = 1.5 is the grid's last point.
    return SyntheticEvaluator(sft_run.base, sft_run.ckpts[0], sft_run.ckpts[1], 1.26, 1.5)


@pytest.mark.slow
def test_refine_scores_the_coarse_grid_then_the_fine_one_and_resumes(tmp_path, sft_run, tiny_suite):
    ev = _synthetic(sft_run)
    cfg = _config(tmp_path, sft_run, tiny_suite)
    res = run_pipeline(cfg, evaluator=ev, progress=False, write_model=False, report=False)
    searches = {s.checkpoint: s for s in res.alpha_search}
    expected = {"checkpoint-10": sorted(GRID + _fine(0.3)), "checkpoint-20": sorted(GRID + _fine(0.5))}
    for name, alphas in expected.items():
        assert [t.params["alpha"] for t in searches[name].trials] == pytest.approx(alphas)
        assert not any(t.pruned for t in searches[name].trials)
    assert searches["checkpoint-10"].best_params["alpha"] == pytest.approx(0.26)
    assert searches["checkpoint-20"].best_params["alpha"] == pytest.approx(0.5)
    # Evaluations: rank 4 (base, three checkpoints); α 2 × (6 + 8) less α = 0 (the checkpoint itself,
    # read back): 26; β 11 less β ∈ {0, 1} (EXPO points already scored): 9; test 6 rows. 45, 4 shared.
    assert res.evaluations["evaluations"] == 45 and res.evaluations["shared"] == 4
    assert [s for s, lim in ev.calls].count("dev") == 4 + 26 + 9
    assert all(lim is None for _, lim in ev.calls)
    # Run again on the same folder: every evaluation is read back from the same studies, none repeated.
    again = run_pipeline(cfg, evaluator=ev, progress=False, write_model=False, report=False)
    assert len(ev.calls) == 45
    assert [t.params for s in again.alpha_search for t in s.trials] == [t.params for s in res.alpha_search for t in s.trials]
    assert any("this invocation evaluated 0 candidates" in n for n in again.notes)


@pytest.mark.slow
def test_refine_after_successive_halving(tmp_path, sft_run, tiny_suite):
    """The coarse grid is pruned, the fine grid around its survivor is scored in full, and the pruning note
    counts the coarse grid only: 6 points on 10 items, 2 on 30, 1 in full (100) = 220 of 6 × 100."""
    ev = _synthetic(sft_run)
    cfg = _config(tmp_path, sft_run, tiny_suite, search={"prune": True, "prune_min_items": 10, "prune_eta": 3})
    res = run_pipeline(cfg, evaluator=ev, progress=False, write_model=False, report=False)
    first = next(s for s in res.alpha_search if s.checkpoint == "checkpoint-10")
    full = sorted(t.params["alpha"] for t in first.trials if not t.pruned)
    assert full == pytest.approx(sorted([0.3] + _fine(0.3)))
    assert sorted(t.params["alpha"] for t in first.trials if t.pruned) == [0.0, 0.1, 0.2, 0.4, 0.5]
    assert first.best_params["alpha"] == pytest.approx(0.26)
    note = next(n for n in res.notes if n.startswith("α for checkpoint-10"))
    assert note.startswith("α for checkpoint-10: successive halving scored 220 items where the full grid needs 600 "
                           "(63% saved; 5 of 6 candidates dropped early)")
    # Per checkpoint: 6 looks on 10 items, 2 on 30. The β grid's own halving: 11 on 10 items, less β = 0,
    # which is α₂ = 0.5 on 10 items (coarse, scored); β = 1 is α₁ = 0.26, a fine point only ever scored in full.
    limits = [lim for split, lim in ev.calls if split == "dev"]
    assert limits.count(10) == 2 * 6 + 11 - 1
