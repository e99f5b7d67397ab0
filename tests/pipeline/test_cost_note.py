"""A pipeline run states its cost after the first evaluation (kept in the notes)."""

from __future__ import annotations


def test_a_run_says_its_cost_in_the_notes(tmp_path, sft_run, tiny_suite, synthetic):
    from exme.pipeline import PipelineConfig, run_pipeline

    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(tmp_path / "out"), "baselines": [], "alpha": {"grid": [0.1, 0.3]}, "beta": {"grid": [0.4, 0.6]}}
    res = run_pipeline(PipelineConfig.from_dict(raw), evaluator=synthetic, progress=False, write_model=False)
    note = next(n for n in res.notes if n.startswith("cost after the first evaluation"))
    # 4 rank + 2×2 α + 2 β + 6 rows = 16 candidates, one done; the synthetic evaluator gives no item counts.
    assert "at most 15 candidates left" in note
