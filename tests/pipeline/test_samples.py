"""`exme run --log-samples`: every final-table row's test items as JSONL, consistent with its recorded score."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from exme.cli import main
from exme.errors import ExmeError


def _by_task(path):
    out: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        out.setdefault(item["task"], []).append(item)
    return out


@pytest.mark.slow
def test_run_log_samples_writes_each_rows_test_items_and_they_recompute_its_score(tmp_path, sft_run, tiny_suite, capsys):
    from exme.evaluate import load_evaluator
    from exme.pipeline import PipelineConfig, run_pipeline
    from exme.report import load_results

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
        "output": str(tmp_path / "run"), "alpha": {"grid": [0.0, 1.0]}, "beta": {"grid": [0.0, 0.5]},
        "baselines": ["linear"], "seed": 1,
        "dev": {"confirm_fraction": 0},  # the tiny suite has too few dev items to hold some out
    }))
    assert main(["run", str(config), "--quiet", "--log-samples"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    results = load_results(run)
    test_counts = load_evaluator(tiny_suite).counts()["test"]
    names = [r.name for r in results.final]
    assert names == ["base", "SFT-1", "SFT-2", "EXPO-1", "EXPO-2", "ExMe", "linear"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == sorted(f"{n}_test.jsonl" for n in names)
    for row in results.final:
        items = _by_task(run / "samples" / f"{row.name}_test.jsonl")
        # one line per test item of every task, in split order
        assert {t: len(v) for t, v in items.items()} == dict(test_counts) == row.test.n_items
        assert all([x["position"] for x in v] == list(range(len(v))) and x["split"] == "test"
                   for v in items.values() for x in v)
        # each task's score recomputed by hand from the lines: accuracy for mc and gsm, and for
        # perplexity the pooled −Σ nll / Σ tokens
        mc, gsm, ppl = items["mc"], items["gsm"], items["ppl"]
        recomputed = {
            "mc": sum(x["prediction"] == x["label"] for x in mc) / len(mc),
            "gsm": sum(bool(x["correct"]) for x in gsm) / len(gsm),
            "ppl": -math.fsum(x["nll"] for x in ppl) / sum(x["tokens"] for x in ppl),
        }
        for task, value in recomputed.items():
            assert value == pytest.approx(row.test.tasks[task], rel=1e-9, abs=1e-12), (row.name, task)
        assert sum(recomputed.values()) / 3 == pytest.approx(row.test.overall, rel=1e-9)
    # the study keeps the scores, not the items: results.json carries no per-item records
    assert '"prediction_norm"' not in (run / "results.json").read_text()

    # Resumed: scores are read back, the files already written stay; a removed file is named in the notes.
    before = (run / "samples" / "ExMe_test.jsonl").read_text()
    (run / "samples" / "linear_test.jsonl").unlink()
    again = run_pipeline(PipelineConfig.from_yaml(config, log_samples=True), progress=False, write_model=False,
                         report=False)
    assert (run / "samples" / "ExMe_test.jsonl").read_text() == before
    assert not (run / "samples" / "linear_test.jsonl").exists()
    missing = [n for n in again.notes if n.startswith("log_samples: no samples file for")]
    assert len(missing) == 1 and "linear" in missing[0] and "ExMe" not in missing[0]


def test_log_samples_with_an_evaluator_that_keeps_no_items_is_refused_before_any_work(tmp_path, sft_run, tiny_suite):
    from exme.pipeline import PipelineConfig, run_pipeline

    out = tmp_path / "run"
    config = PipelineConfig.from_dict({
        "base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite), "output": str(out),
        "log_samples": True,
    })

    class Untouchable:  # a custom objective: no model may be loaded or scored
        def evaluate(self, *a, **k):
            raise AssertionError("evaluated before the log_samples check")

    with pytest.raises(ExmeError, match=r"log_samples: true \(--log-samples\) needs a suite YAML file"):
        run_pipeline(config, evaluator=Untouchable(), progress=False)
    assert not out.exists()  # nothing left behind in a new output folder


def test_log_samples_with_an_lm_eval_suite_is_one_error_naming_the_key(tmp_path, sft_run, capsys):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": "lm-eval:arc_easy",
        "output": str(tmp_path / "run"),
    }))
    assert main(["run", str(config), "--log-samples", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "log_samples" in err and "lm-eval:arc_easy" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
