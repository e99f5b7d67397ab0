"""`exme run` on tiny models with a tiny real suite: every artefact exists and the numbers hold up."""

from __future__ import annotations

import json

import torch
import yaml

from exme.cli import main


def test_run_writes_results_report_and_a_model_that_reproduces_its_test_score(tmp_path, sft_run, tiny_suite, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exme.evaluate import load_evaluator
    from exme.report import load_results

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
        "output": str(tmp_path / "run"), "alpha": {"grid": [0.0, 0.5, 1.0]}, "beta": {"grid": [0.0, 0.5, 1.0]},
        "baselines": ["linear", "ties", "dare_linear"], "seed": 3,
        "dev": {"confirm_fraction": 0},  # the tiny suite has too few dev items to hold some out
    }))
    assert main(["run", str(config), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ExMe" in printed and f"report: {tmp_path / 'run' / 'report.md'}" in printed
    # the verdict and the recommendation end every run, as in the report
    assert "ExMe vs best SFT (SFT-" in printed and "\nRecommended: " in printed

    run = tmp_path / "run"
    results = load_results(run)  # validates results.json against the schema
    assert (run / "report.md").is_file() and (run / "plots" / "final.png").is_file()
    names = [r.name for r in results.final]
    assert names == ["base", "SFT-1", "SFT-2", "EXPO-1", "EXPO-2", "ExMe", "linear", "ties", "dare_linear"]
    assert [len(s.trials) for s in results.alpha_search] == [3, 3] and len(results.beta_search.trials) == 3
    assert set(results.final[0].test.n_items) == {"mc", "gsm", "ppl"}
    assert results.final_model == str(run / "model")
    # Every choice is the best dev score of its search (ties: the first candidate).
    for search in [*results.alpha_search, results.beta_search, *results.baseline_search]:
        top = max(t.dev.overall for t in search.trials)
        assert search.best_dev == top
        first_best = next(t for t in search.trials if t.dev.overall == top)
        assert search.best_params == first_best.params

    # The written model is the evaluated one: same test scores when loaded from disk and re-evaluated.
    exme_row = next(r for r in results.final if r.kind == "exme")
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32).eval()
    scores = load_evaluator(tiny_suite).evaluate(model, AutoTokenizer.from_pretrained(run / "model"), "test")
    assert scores.overall == exme_row.test.overall
    assert scores.tasks == exme_row.test.tasks
    card = (run / "model" / "README.md").read_text()
    assert "exme" in card

    # A second run reads every evaluation back from the study: nothing is evaluated again.
    assert main(["rank", str(config), "--quiet"]) == 0
    assert "checkpoint-100" in capsys.readouterr().out
    from exme.pipeline import PipelineConfig, run_pipeline

    class Refuse:
        def evaluate(self, *a, **k):
            raise AssertionError("a finished evaluation was repeated")

        def describe(self):
            return json.loads(json.dumps(results.suite))

    model_inode = (run / "model").stat().st_ino
    again = run_pipeline(PipelineConfig.from_yaml(config), evaluator=Refuse(), progress=False)
    assert [r.test for r in again.final] == [r.test for r in results.final]
    assert (run / "model").stat().st_ino == model_inode  # the same model is not written twice
    assert any(n.startswith("this invocation evaluated 0 candidates;") and "read back" in n for n in again.notes)
    # The run folder's copy of the configuration is itself a valid PIPELINE.yaml, equal to the one given.
    copy = PipelineConfig.from_yaml(run / "pipeline.yaml")
    assert copy.model_dump() == PipelineConfig.from_yaml(config).model_dump()
