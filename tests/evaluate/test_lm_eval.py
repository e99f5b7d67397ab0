"""The lm-eval adapter on the live model against the ``lm_eval`` CLI on the same model saved to disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="optional extra exme[lm-eval] is not installed")

from exme.evaluate import Suite, SuiteEvaluator, load_evaluator  # noqa: E402

from .conftest import write_jsonl, write_suite  # noqa: E402

TASK = "exme_tiny_mc"
RECORDS = [
    {"question": f"What follows {w}?", "choices": [w[::-1], w + "s", "the end", w.upper() + "!"], "label": i % 4}
    for i, w in enumerate(["one", "two", "red", "cat", "sun", "map", "dog", "ice", "owl", "pen", "sea", "tea", "arc", "bee", "cup", "day", "egg", "fig"])
]


def _task_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "lm_eval_tasks"
    folder.mkdir()
    data = write_jsonl(folder / "mc.jsonl", RECORDS)
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return folder


@pytest.mark.slow
def test_live_model_scores_equal_lm_eval_cli_on_saved_model(tiny_lm, tmp_path):
    model, tok, model_dir = tiny_lm
    folder = _task_folder(tmp_path)
    evaluator = load_evaluator(f"lm-eval:{TASK}", include_path=str(folder), batch_size=4, seed=3, dev_fraction=0.5)
    counts = evaluator.counts()
    assert counts == {"dev": {TASK: 9}, "test": {TASK: 9}}
    dev = evaluator.evaluate(model, tok, "dev")
    test = evaluator.evaluate(model, tok, "test")

    out = tmp_path / "cli_out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cli = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={model_dir},dtype=float32",
         "--tasks", TASK, "--include_path", str(folder), "--device", "cpu", "--batch_size", "4",
         "--output_path", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    result_file = next(out.rglob("results_*.json"))
    cli_metrics = json.loads(result_file.read_text())["results"][TASK]
    for metric in ("acc", "acc_norm"):
        combined = (dev.metrics(TASK)[metric] * 9 + test.metrics(TASK)[metric] * 9) / 18
        assert combined == pytest.approx(cli_metrics[f"{metric},none"], abs=1e-9)
        assert f"{cli_metrics[f'{metric},none']:.4f}" in cli.stdout  # the number the CLI printed

    # The suite's own multiple-choice scorer, with the same prompt and split, agrees with lm-eval.
    write_jsonl(tmp_path / "mc.jsonl", RECORDS)
    suite = Suite.from_yaml(write_suite(tmp_path / "s.yaml", f"split: {{seed: 3, dev_fraction: 0.5}}\ntasks:\n  - {{name: {TASK}, kind: multiple_choice, data: mc.jsonl}}\n"))
    ours = SuiteEvaluator(suite).evaluate(model, tok, "dev")
    assert ours.metrics(TASK)["acc"] == pytest.approx(dev.metrics(TASK)["acc"])
    assert ours.metrics(TASK)["acc_norm"] == pytest.approx(dev.metrics(TASK)["acc_norm"])


@pytest.mark.slow
def test_limit_caps_documents_and_unknown_task_is_an_error(tiny_lm, tmp_path):
    from exme.errors import ExmeError

    model, tok, _ = tiny_lm
    folder = _task_folder(tmp_path)
    evaluator = load_evaluator(f"lm-eval:{TASK}", include_path=str(folder), batch_size=4)
    scores = evaluator.evaluate(model, tok, "dev", limit=3)
    assert scores.n_items == {TASK: 3}
    assert scores.tasks[TASK] in (0.0, 1 / 3, 2 / 3, 1.0)
    with pytest.raises(ExmeError, match="could not load tasks"):
        load_evaluator("lm-eval:exme_no_such_task", include_path=str(folder)).counts()
