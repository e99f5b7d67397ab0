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
    with pytest.raises(ExmeError, match="has no task 'exme_no_such_task'"):
        load_evaluator("lm-eval:exme_no_such_task", include_path=str(folder))


# -- local tasks, names checked before the model loads, offline data ------------------------------

def _cli(argv):
    from .test_cli import main

    return main(argv)


def test_unknown_task_is_an_error_before_the_model_loads(tmp_path, capsys):
    folder = _task_folder(tmp_path)
    missing_model = tmp_path / "no-model-here"  # never reached: the task name fails first
    code = _cli(["eval", str(missing_model), "--suite", "lm-eval:exme_tiny_mcq", "--include-path", str(folder)])
    err = capsys.readouterr().err
    assert code == 2
    assert "has no task 'exme_tiny_mcq'" in err and TASK in err and str(folder) in err  # names the close match and the folder
    assert "no-model-here" not in err and len(err.strip().splitlines()) == 1


def test_include_path_must_be_a_folder(tmp_path, capsys):
    code = _cli(["eval", str(tmp_path), "--suite", f"lm-eval:{TASK}", "--include-path", str(tmp_path / "nope")])
    assert code == 2 and "is not a folder" in capsys.readouterr().err


def test_task_yaml_path_names_the_task_and_its_folder(tmp_path):
    from exme.evaluate import parse_evaluator_spec

    folder = _task_folder(tmp_path)
    spec = parse_evaluator_spec(f"lm-eval:{folder / (TASK + '.yaml')}")
    assert spec.kind == "lm-eval" and spec.tasks == (TASK,) and spec.include_path == (folder.resolve(),)
    relative = parse_evaluator_spec(f"lm-eval:lm_eval_tasks/{TASK}.yaml,arc_easy", root=tmp_path, include_path=["lm_eval_tasks"])
    assert relative.tasks == (TASK, "arc_easy") and relative.include_path == (tmp_path / "lm_eval_tasks",)


@pytest.mark.parametrize(
    "text, kind",
    [("suite.yaml", "suite"), ("lm-eval:a,b", "lm-eval"), ("pkg.mod:score", "custom"), ("pkg.mod:obj.attr", "custom")],
)
def test_one_parser_for_every_spec(text, kind):
    from exme.evaluate import parse_evaluator_spec

    assert parse_evaluator_spec(text).kind == kind


def test_include_path_with_a_suite_is_an_error(tmp_path):
    from exme.errors import ExmeError
    from exme.evaluate import parse_evaluator_spec

    with pytest.raises(ExmeError, match="applies to lm-eval tasks only"):
        parse_evaluator_spec("suite.yaml", include_path=[tmp_path])


@pytest.mark.slow
@pytest.mark.parametrize("form", ["include-path", "yaml-path"])
def test_cli_scores_a_local_task(tiny_lm, tmp_path, form):
    """``--include-path DIR`` and ``lm-eval:/path/task.yaml`` both reach a local task (the second once
    failed with "options ['progress'] do not apply to lm-eval tasks")."""
    model, tok, model_dir = tiny_lm
    folder = _task_folder(tmp_path)
    out = tmp_path / "scores.json"
    if form == "include-path":
        argv = ["--suite", f"lm-eval:{TASK}", "--include-path", str(folder)]
    else:
        argv = ["--suite", f"lm-eval:{folder / (TASK + '.yaml')}"]
    assert _cli(["eval", str(model_dir), *argv, "--split", "dev", "--json", str(out), "--batch-size", "4"]) == 0
    got = json.loads(out.read_text())["scores"]["dev"]["tasks"][TASK]
    expected = load_evaluator(f"lm-eval:{TASK}", include_path=str(folder), batch_size=4).evaluate(model, tok, "dev")
    assert got == pytest.approx(expected.tasks[TASK])


def _hub_task(tmp_path: Path) -> Path:
    folder = tmp_path / "hub_tasks"
    folder.mkdir()
    (folder / "exme_hub_mc.yaml").write_text(
        "task: exme_hub_mc\n"
        "dataset_path: exme-test-org/no-such-dataset\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - {metric: acc}\n"
    )
    return folder


@pytest.mark.parametrize("how", ["offline-env", "unreachable-hub"])
def test_data_that_cannot_be_fetched_is_one_line_and_fast(tmp_path, capsys, monkeypatch, how):
    import time

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if how == "offline-env":
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    else:  # no offline setting, but the hub does not answer: the short probe finds it
        monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    folder = _hub_task(tmp_path)
    start = time.monotonic()
    code = _cli(["eval", str(tmp_path / "unused-model"), "--suite", "lm-eval:exme_hub_mc", "--include-path", str(folder)])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "could not be fetched" in lines[0] and "--include-path" in lines[0], err
    assert "exme-test-org/no-such-dataset" in lines[0]
    assert elapsed < 15, elapsed  # retries against an unreachable hub took 20 s and more
