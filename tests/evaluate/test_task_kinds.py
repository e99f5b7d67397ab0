"""The task-kind registry: a kind registered from outside loads, prompts, evaluates and scores with no
other change, and a suite naming a kind that is not registered is one line."""

from __future__ import annotations

import pytest

from exme.errors import ExmeError
from exme.evaluate import Suite, SuiteEvaluator, load_evaluator
from exme.evaluate.kinds import REGISTRY, GenerativeKind, get_kind, register_kind, unregister_kind
from exme.testing import char_tokenizer

from .conftest import ScriptedLM, write_jsonl, write_suite

WORDS = ["abc", "stop", "level", "moon", "tide"]


class Reverse(GenerativeKind):
    """A toy kind: answer with the word reversed; scored by exact match of the stripped completion."""

    name = "reverse_word"
    required = ("word",)
    metrics = ("exact_match",)
    prompt = "Reverse {word}:"
    target = " {reversed}"
    stop = ("|",)

    def fields(self, record):
        return {**record, "reversed": record["word"][::-1]}

    def score_completions(self, task, prep, completions, records, ctx):
        correct = [c.strip() == r["word"][::-1] for c, r in zip(completions, records)]
        items = [{"completion": c, "correct": ok} for c, ok in zip(completions, correct)]
        return {"exact_match": sum(correct) / len(correct)}, items


@pytest.fixture
def reverse_kind():
    register_kind(Reverse)
    yield REGISTRY["reverse_word"]
    unregister_kind("reverse_word")


def test_a_registered_kind_loads_evaluates_and_scores(tmp_path, reverse_kind):
    tok = char_tokenizer()
    write_jsonl(tmp_path / "w.jsonl", [{"word": w} for w in WORDS])
    path = write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: rev, kind: reverse_word, dev: w.jsonl, test: w.jsonl,"
                                            " fewshot: [{word: ab}], num_fewshot: 1}\n")
    evaluator = load_evaluator(path, keep_items=True)
    # Right for three words; "level" answered with its tail after the kind's stop string "|";
    # "tide" answered wrongly.
    answers = {"Reverse abc:": "cba", "Reverse stop:": "pots", "Reverse level:": "level|junk",
               "Reverse moon:": "noom", "Reverse tide:": "tied"}
    scores = evaluator.evaluate(ScriptedLM(tok, answers), tok, "test")
    expected = [w[::-1] == answers[f"Reverse {w}:"].split("|")[0] for w in WORDS]
    assert scores.tasks["rev"] == pytest.approx(sum(expected) / len(WORDS)) == pytest.approx(0.8)
    assert scores.per_item["rev"] == {str(i): float(ok) for i, ok in enumerate(expected)}
    items = scores.details["rev"]["items"]
    assert [it["completion"] for it in items][2] == "level"  # cut before the kind's stop string
    assert scores.details["rev"]["kind"] == "reverse_word"
    assert "generation" in scores.details["rev"]  # a generative kind records how its completions ended
    # The prompt came from the kind's templates, few-shot answer included.
    text, chat = reverse_kind.prompt_text(evaluator.suite.tasks[0], {"word": "moon"}, tok)
    assert (text, chat) == ("Reverse ab: ba\n\nReverse moon:", False)


def test_a_registered_kind_checks_its_records_and_metric(tmp_path, reverse_kind):
    write_jsonl(tmp_path / "w.jsonl", [{"word": "ab"}, {"text": "no word"}])
    path = write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: rev, kind: reverse_word, data: w.jsonl}\n")
    with pytest.raises(ExmeError, match=r"w.jsonl:2: record lacks field\(s\) \['word'\] that a 'reverse_word' task needs"):
        Suite.from_yaml(path)
    bad_metric = write_suite(tmp_path / "m.yaml", "tasks:\n  - {name: rev, kind: reverse_word, data: w.jsonl, metric: acc}\n")
    with pytest.raises(ExmeError, match=r"metric 'acc' is not one of \['exact_match'\] for kind 'reverse_word'"):
        Suite.from_yaml(bad_metric)
    # A key that another kind owns is refused for this one, as for every built-in kind.
    filt = write_suite(tmp_path / "f.yaml", "tasks:\n  - {name: rev, kind: reverse_word, data: w.jsonl, answer_filter: strict-match}\n")
    with pytest.raises(ExmeError, match="answer_filter applies to gsm8k tasks only, not kind 'reverse_word'"):
        Suite.from_yaml(filt)


def test_an_unregistered_kind_is_one_line_naming_the_known_ones(tmp_path, run_cli):
    write_jsonl(tmp_path / "w.jsonl", [{"word": "ab"}, {"word": "cd"}])
    path = write_suite(tmp_path / "s.yaml", "name: s\ntasks:\n  - {name: rev, kind: reverse_word, data: w.jsonl}\n")
    code, _, err = run_cli("eval", tmp_path, "--suite", path)  # refused before any model is looked for
    assert code == 2 and err.startswith("exme: error: ") and err.count("\n") == 1
    assert "s.yaml:3: task 'rev' key 'kind': unknown kind 'reverse_word'; use one of" in err
    assert str(list(REGISTRY)) in err
    with pytest.raises(ExmeError, match="unknown kind 'reverse_word'"):
        get_kind("reverse_word")


def test_built_in_kinds_declare_how_they_are_scored():
    """Generative kinds generate, the others score log-likelihoods; every kind's default metric is its first."""
    assert {name for name, kind in REGISTRY.items() if kind.generative} >= {"gsm8k", "generate", "humaneval", "mbpp"}
    assert not REGISTRY["multiple_choice"].generative and not REGISTRY["perplexity"].generative
    assert REGISTRY["multiple_choice"].metrics == ("acc", "acc_norm")
    assert REGISTRY["gsm8k"].required == ("question", "answer")
