"""`exme eval`: an end-to-end run on a tiny local model, and bad input as one line with exit code 2."""

import json

import pytest

from exme.cli import main as cli_main


def main(argv):
    """``exme eval ...``; while ``eval`` is the only command, Typer runs it without its name."""
    import typer.main

    from exme.cli.app import app

    command = typer.main.get_command(app)
    return cli_main(argv if hasattr(command, "commands") else argv[1:])

from .conftest import write_jsonl, write_suite
from .test_scoring import GSM, MC_RECORDS


@pytest.fixture
def suite_file(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    write_jsonl(tmp_path / "gsm.jsonl", GSM * 2)
    return write_suite(
        tmp_path / "suite.yaml",
        "name: tiny\nsplit: {seed: 4, dev_fraction: 0.5}\ntasks:\n"
        "  - {name: mc, kind: multiple_choice, data: mc.jsonl, weight: 2}\n"
        "  - {name: gsm, kind: gsm8k, data: gsm.jsonl, max_new_tokens: 8}\n",
    )


@pytest.mark.slow
def test_eval_end_to_end_writes_json_matching_library_scores(tiny_lm, suite_file, tmp_path, capsys):
    from exme.evaluate import load_evaluator

    model, tok, model_dir = tiny_lm
    out = tmp_path / "scores.json"
    assert main(["eval", str(model_dir), "--suite", str(suite_file), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "acc_norm" in printed
    document = json.loads(out.read_text())
    assert document["suite"]["split"] == {"method": "seeded_permutation", "seed": 4, "dev_fraction": 0.5}
    assert document["suite"]["n_items"] == {"dev": {"mc": 3, "gsm": 4}, "test": {"mc": 3, "gsm": 4}}
    evaluator = load_evaluator(suite_file)
    for split in ("dev", "test"):
        expected = evaluator.evaluate(model, tok, split)  # the in-memory model is the one on disk
        got = document["scores"][split]
        assert got["tasks"] == pytest.approx(expected.tasks)
        assert got["overall"] == pytest.approx((2 * got["tasks"]["mc"] + got["tasks"]["gsm"]) / 3)


def test_eval_single_split_with_limit(tiny_lm, suite_file, tmp_path):
    _, _, model_dir = tiny_lm
    out = tmp_path / "dev.json"
    assert main(["eval", str(model_dir), "--suite", str(suite_file), "--split", "dev", "--limit", "2", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert list(document["scores"]) == ["dev"]
    assert document["scores"]["dev"]["n_items"] == {"mc": 2, "gsm": 2}


@pytest.mark.parametrize(
    "suite_text, data, message",
    [
        ("tasks:\n  - {name: t, kind: essay, data: d.jsonl}\n", '{"prompt": "p", "target": "t"}\n', "unknown kind 'essay'"),
        ("tasks:\n  - {name: t, kind: generate, data: d.jsonl}\n", '{"prompt": "p", "target": "t"}\n{"prompt": "q"}\n', "d.jsonl:2: record lacks field"),
        ("tasks:\n  - {name: t, kind: generate, data: d.jsonl}\n", "", "is empty"),
        ("tasks:\n  - {name: t, kind: generate, data: d.jsonl, regex: '(['}\n", '{"prompt": "p", "target": "t"}\n', "does not compile"),
    ],
)
def test_bad_suite_exits_2_with_one_line(tiny_lm, tmp_path, capsys, suite_text, data, message):
    _, _, model_dir = tiny_lm
    (tmp_path / "d.jsonl").write_text(data)
    suite = write_suite(tmp_path / "bad.yaml", suite_text)
    assert main(["eval", str(model_dir), "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exme: error:") and message in err and "\n" not in err
    assert "bad.yaml" in err or "d.jsonl" in err


def test_bad_model_folder_and_split_exit_2(suite_file, tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--suite", str(suite_file)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--suite", str(suite_file), "--split", "train"]) == 2
    assert "--split 'train'" in capsys.readouterr().err


def test_split_all_scores_every_item_once_and_output_path_writes_the_same_json(tiny_lm, suite_file, tmp_path):
    _, _, model_dir = tiny_lm
    both, every = tmp_path / "both.json", tmp_path / "lm_eval_style"
    assert main(["eval", str(model_dir), "--suite", str(suite_file), "--json", str(both)]) == 0
    assert main(["eval", str(model_dir), "--suite", str(suite_file), "--split", "all", "--output_path", str(every)]) == 0
    halves = json.loads(both.read_text())["scores"]
    whole = json.loads((every / "results.json").read_text())["scores"]
    assert list(halves) == ["dev", "test"] and list(whole) == ["all"]
    for task in ("mc", "gsm"):
        n_dev, n_test = halves["dev"]["n_items"][task], halves["test"]["n_items"][task]
        assert whole["all"]["n_items"][task] == n_dev + n_test
        # Accuracy and exact match are means over items: the whole set is the item-weighted mean of its halves.
        pooled = (n_dev * halves["dev"]["tasks"][task] + n_test * halves["test"]["tasks"][task]) / (n_dev + n_test)
        assert whole["all"]["tasks"][task] == pytest.approx(pooled)


def test_log_samples_writes_one_line_per_scored_item_consistent_with_the_score(tiny_lm, suite_file, tmp_path):
    _, _, model_dir = tiny_lm
    out = tmp_path / "out"
    assert main(["eval", str(model_dir), "--suite", str(suite_file), "--split", "dev", "--output_path", str(out), "--log-samples"]) == 0
    scores = json.loads((out / "results.json").read_text())["scores"]["dev"]
    lines = [json.loads(line) for line in (out / "samples_dev.jsonl").read_text().splitlines()]
    by_task = {}
    for line in lines:
        by_task.setdefault(line["task"], []).append(line)
    assert {t: len(v) for t, v in by_task.items()} == scores["n_items"]
    # Each task's score is the mean of its items' outcomes, recomputed from the logged lines.
    gsm = by_task["gsm"]
    assert sum(bool(x["correct"]) for x in gsm) / len(gsm) == pytest.approx(scores["tasks"]["gsm"])
    mc = by_task["mc"]
    assert sum(x["prediction"] == x["label"] for x in mc) / len(mc) == pytest.approx(scores["details"]["mc"]["metrics"]["acc"])
    assert all("doc" in x and "items" not in scores["details"][x["task"]] for x in lines)
    # the prompt the model saw: the record's question, in the task's default template
    assert all(x["prompt"].endswith(f"Question: {x['doc']['question']}\nAnswer:") for x in lines)


def test_eval_table_shows_generation_statistics(tiny_lm, suite_file, tmp_path, capsys):
    _, _, model_dir = tiny_lm
    out = tmp_path / "s.json"
    assert main(["eval", str(model_dir), "--suite", str(suite_file), "--split", "dev", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    generation = json.loads(out.read_text())["scores"]["dev"]["details"]["gsm"]["generation"]
    rows = {line.split("│")[2].strip(): line.split("│")[3].strip() for line in printed.splitlines()
            if line.count("│") >= 4 and line.split("│")[2].strip() in ("hit_limit", "no_stop", "mean_new_tokens")}
    assert rows == {"hit_limit": f"{generation['hit_limit']:.4f}", "no_stop": f"{generation['no_stop']:.4f}",
                    "mean_new_tokens": f"{generation['mean_new_tokens']:.4g}"}


def test_log_samples_without_an_output_folder_is_refused_first(tmp_path):
    code = main(["eval", str(tmp_path / "no_model"), "--suite", "s.yaml", "--log-samples"])
    assert code == 2
