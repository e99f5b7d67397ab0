"""Per-item scores: every evaluation returns each item's primary score by id, and their mean is the task score."""

from __future__ import annotations

import pytest

from exme.evaluate import Suite, SuiteEvaluator, load_evaluator
from exme.evaluate.suite import SplitRule, split_indices

from .conftest import write_jsonl, write_suite

MC = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "label": (a * b) % 3}
      for a in range(1, 7) for b in range(1, 5)]
GSM = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a in range(1, 6) for b in range(1, 3)]
PPL = [{"text": f"the number {i} comes after {i - 1}."} for i in range(1, 13)]


@pytest.fixture
def suite(tmp_path):
    for name, rows in {"mc": MC, "gsm": GSM, "ppl": PPL}.items():
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return Suite.from_yaml(write_suite(tmp_path / "s.yaml", (
        "split: {seed: 1, dev_fraction: 0.5}\ntasks:\n"
        "  - {name: mc, kind: multiple_choice, data: mc.jsonl, metric: acc_norm}\n"
        "  - {name: gsm, kind: gsm8k, data: gsm.jsonl, max_new_tokens: 4}\n"
        "  - {name: ppl, kind: perplexity, data: ppl.jsonl}\n")))


def test_per_item_scores_average_to_every_task_score(tiny_lm, suite):
    model, tok, _ = tiny_lm
    scores = SuiteEvaluator(suite, keep_items=True).evaluate(model, tok, "dev")
    for task, value in scores.tasks.items():
        items = scores.per_item[task]
        assert sorted(items, key=int) == [str(i) for i in range(scores.n_items[task])]
        assert sum(items.values()) / len(items) == pytest.approx(value, abs=1e-12)
    # 0/1 where the metric is an accuracy, from the item records the evaluator kept
    recs = scores.details["mc"]["items"]
    assert [scores.per_item["mc"][str(i)] for i in range(len(recs))] == [float(r["prediction_norm"] == r["label"]) for r in recs]


def test_an_item_subset_scores_exactly_those_items_with_the_same_values(tiny_lm, suite):
    model, tok, _ = tiny_lm
    ev = SuiteEvaluator(suite)
    whole = ev.evaluate(model, tok, "dev")
    part = ev.evaluate(model, tok, "dev", items={"mc": [5, 1, 7], "gsm": [0, 2]})
    assert part.n_items["mc"] == 3 and set(part.per_item["mc"]) == {"5", "1", "7"}
    assert {i: whole.per_item["mc"][i] for i in ("1", "5", "7")} == part.per_item["mc"]
    assert part.per_item["gsm"] == {i: whole.per_item["gsm"][i] for i in ("0", "2")}
    assert part.per_item["ppl"].keys() == whole.per_item["ppl"].keys()  # tasks not named: all items
    limited = ev.evaluate(model, tok, "dev", limit=2, items={"mc": [5, 1, 7]})
    assert set(limited.per_item["mc"]) == {"5", "1"}


@pytest.mark.slow
def test_lm_eval_per_document_scores_match_the_suite_scorer_item_by_item(tiny_lm, tmp_path):
    pytest.importorskip("lm_eval")
    from .test_lm_eval import RECORDS, TASK, _task_folder

    model, tok, _ = tiny_lm
    ev = load_evaluator(f"lm-eval:{TASK}", include_path=str(_task_folder(tmp_path)), batch_size=4, seed=3, dev_fraction=0.5)
    write_jsonl(tmp_path / "mc.jsonl", RECORDS)
    ours_suite = Suite.from_yaml(write_suite(tmp_path / "s.yaml", (
        f"split: {{seed: 3, dev_fraction: 0.5}}\ntasks:\n  - {{name: {TASK}, kind: multiple_choice, data: mc.jsonl}}\n")))
    theirs = ev.evaluate(model, tok, "dev")
    ours = SuiteEvaluator(ours_suite).evaluate(model, tok, "dev")
    assert sum(theirs.per_item[TASK].values()) / len(theirs.per_item[TASK]) == pytest.approx(theirs.tasks[TASK])
    # map both kinds of position back to the record index: lm-eval lists dev documents sorted, the suite in
    # permutation order
    dev, _ = split_indices(len(RECORDS), SplitRule(seed=3, dev_fraction=0.5), TASK)
    by_doc_theirs = {sorted(dev)[int(p)]: v for p, v in theirs.per_item[TASK].items()}
    by_doc_ours = {dev[int(p)]: v for p, v in ours.per_item[TASK].items()}
    assert by_doc_theirs == by_doc_ours
    part = ev.evaluate(model, tok, "dev", items={TASK: [0, 4]})
    assert part.per_item[TASK] == {p: theirs.per_item[TASK][p] for p in ("0", "4")}
