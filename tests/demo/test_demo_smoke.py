"""`exme demo --quick` end to end: every stage runs, the report holds its numbers, the final model reproduces them."""

from __future__ import annotations

import json
import math

import pytest

from exme.demo.run import demo_evaluator, run_demo


@pytest.mark.slow
def test_quick_demo_reports_numbers_that_the_final_model_reproduces(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exme.report.render import load_results

    workdir, output = tmp_path / "work", tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        report = run_demo(workdir=workdir, output=output, quick=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert report == output / "report.md"
    text = report.read_text()
    results = load_results(output)

    # Stage 1 made real checkpoints; the pipeline ranked them all and kept two.
    checkpoints = sorted(p.name for p in (workdir / "sft").glob("checkpoint-*"))
    assert len(checkpoints) >= 3
    assert sorted(r.name for r in results.ranking) == checkpoints
    assert sum(r.kept for r in results.ranking) == 2
    assert len(results.alpha_search) == 2 and results.beta_search is not None

    rows = {r.name: r for r in results.final}
    assert {"base", "SFT-1", "SFT-2", "EXPO-1", "EXPO-2", "ExMe", "linear", "ties"} <= set(rows)
    for row in rows.values():
        assert set(row.test.tasks) == {"arith", "choice", "code"}
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in row.test.tasks.values())
        assert row.test.overall == pytest.approx(sum(row.test.tasks.values()) / 3)
        assert all(n > 0 for n in row.test.n_items.values())
    exme = rows["ExMe"]
    # The report states the outcome with the test numbers and the number of test items.
    assert f"{sum(exme.test.n_items.values())} test items" in text
    assert "best SFT checkpoint" in text

    # The final model on disk is the reported ExMe model: the same test scores when evaluated afresh.
    model = AutoModelForCausalLM.from_pretrained(output / "model")
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    scores = demo_evaluator(workdir / "data" / "suite.yaml").evaluate(model, tokenizer, "test")
    assert scores.tasks == exme.test.tasks
    assert scores.n_items == exme.test.n_items

    # A second run reuses the base and the SFT run (same files) and reads every evaluation back.
    base_mtime = (workdir / "base" / "model.safetensors").stat().st_mtime_ns
    sft_mtime = (workdir / "sft" / checkpoints[-1] / "model.safetensors").stat().st_mtime_ns
    run_demo(workdir=workdir, output=output, quick=True, progress=False, threads=None)
    assert (workdir / "base" / "model.safetensors").stat().st_mtime_ns == base_mtime
    assert (workdir / "sft" / checkpoints[-1] / "model.safetensors").stat().st_mtime_ns == sft_mtime
    again = load_results(output)
    assert [r.test.tasks for r in again.final] == [r.test.tasks for r in results.final]
    assert any("read back" in note for note in again.notes)
    assert json.loads((output / "demo_timings.json").read_text())["total"] > 0
