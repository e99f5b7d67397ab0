"""Suite files: validation errors that name the file and line, and the seeded dev/test split."""

import json

import pytest

from exme.errors import ExmeError
from exme.evaluate import Suite, load_evaluator
from exme.evaluate.suite import SplitRule, split_indices

from .conftest import write_jsonl, write_suite


def _mc(n):
    return [{"question": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(n)]


def test_split_is_a_deterministic_partition(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", _mc(41))
    text = "split: {seed: 7, dev_fraction: 0.25}\ntasks:\n  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n"
    suite_a = Suite.from_yaml(write_suite(tmp_path / "a.yaml", text))
    suite_b = Suite.from_yaml(write_suite(tmp_path / "b.yaml", text))
    dev = [r["question"] for r in suite_a.tasks[0].records("dev")]
    test = [r["question"] for r in suite_a.tasks[0].records("test")]
    assert dev == [r["question"] for r in suite_b.tasks[0].records("dev")]
    assert len(dev) == round(41 * 0.25) == 10 and len(test) == 31
    assert set(dev).isdisjoint(test) and set(dev) | set(test) == {f"q{i}" for i in range(41)}
    assert dev != [f"q{i}" for i in range(10)]  # a permutation, not the file order
    assert suite_a.counts() == {"dev": {"mc": 10}, "test": {"mc": 31}}
    assert suite_a.split_rule == {"method": "seeded_permutation", "seed": 7, "dev_fraction": 0.25}


def test_split_depends_on_seed_and_task_name():
    a = split_indices(50, SplitRule(seed=0), "x")
    assert a == split_indices(50, SplitRule(seed=0), "x")
    assert a != split_indices(50, SplitRule(seed=1), "x")
    assert a != split_indices(50, SplitRule(seed=0), "y")


def test_explicit_split_files_and_size_limit(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", _mc(5))
    write_jsonl(tmp_path / "test.jsonl", _mc(9))
    suite = Suite.from_yaml(
        write_suite(
            tmp_path / "s.yaml",
            "tasks:\n  - {name: mc, kind: multiple_choice, dev: dev.jsonl, test: test.jsonl, limit: 7}\n",
        )
    )
    assert suite.counts() == {"dev": {"mc": 5}, "test": {"mc": 7}}
    assert suite.split_rule["explicit_files"] == {"mc": {"dev": "dev.jsonl", "test": "test.jsonl"}}


def test_arc_style_choices_and_letter_labels_are_read(tmp_path):
    record = {"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "label": "C"}
    write_jsonl(tmp_path / "arc.jsonl", [record, dict(record, label="A")])
    suite = Suite.from_yaml(write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: arc, kind: multiple_choice, data: arc.jsonl}\n"))
    records = suite.tasks[0].records("dev") + suite.tasks[0].records("test")
    assert sorted(r["label"] for r in records) == [0, 2]
    assert all(r["choices"] == ["x", "y", "z"] for r in records)


@pytest.mark.parametrize(
    "yaml_text, data, message",
    [
        ("tasks:\n  - {name: t, kind: trivia, data: d.jsonl}\n", None, "unknown kind 'trivia'"),
        ("tasks:\n  - {name: t, kind: gsm8k, data: d.jsonl, temprature: 1}\n", None, "unknown key"),
        ("tasks:\n  - {name: t, kind: generate, data: d.jsonl, regex: 'ans(wer'}\n", None, "does not compile"),
        ("tasks:\n  - {name: t, kind: multiple_choice, data: d.jsonl, metric: f1}\n", None, "metric 'f1'"),
        ("tasks: []\n", None, "tasks"),
        ("tasks:\n  - {name: t, kind: gsm8k}\n", None, "either 'data'"),
        ("tasks:\n  - {name: t, kind: gsm8k, data: missing.jsonl}\n", None, "does not exist"),
        ("tasks:\n  - {name: t, kind: gsm8k, data: d.jsonl}\n", "", "is empty"),
        ("tasks:\n  - {name: t, kind: gsm8k, data: d.jsonl}\n", "\n\n", "is empty"),
    ],
)
def test_bad_suite_is_one_clear_error(tmp_path, yaml_text, data, message):
    (tmp_path / "d.jsonl").write_text(data if data is not None else json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "p", "answer": "#### 2"}) + "\n")
    path = write_suite(tmp_path / "suite.yaml", yaml_text)
    with pytest.raises(ExmeError, match=message) as err:
        Suite.from_yaml(path)
    assert "suite.yaml" in str(err.value) or "d.jsonl" in str(err.value) or "missing.jsonl" in str(err.value)


@pytest.mark.parametrize(
    "kind, good, bad, message",
    [
        ("gsm8k", {"question": "q", "answer": "#### 3"}, {"question": "q"}, r"lacks field\(s\) \['answer'\]"),
        ("gsm8k", {"question": "q", "answer": "#### 3"}, {"question": "q", "answer": "3"}, "must hold exactly one '#### <number>'"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"], "label": 0}, {"question": "q", "choices": ["a", "b"], "label": 2}, "'label' must be an index"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"], "label": 0}, {"question": "q", "choices": "ab", "label": 0}, "'choices' must be a list"),
        ("humaneval", {"task_id": "t", "prompt": "p", "test": "t", "entry_point": "f"}, {"task_id": "t", "prompt": "p", "test": "t"}, "entry_point"),
        ("mbpp", {"text": "t", "test_list": ["assert 1"]}, {"text": "t", "test_list": []}, "test_list"),
        ("generate", {"prompt": "p", "target": "t"}, {"prompt": "p"}, "target"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, kind, good, bad, message):
    lines = [json.dumps(good), json.dumps(good), "", json.dumps(bad)]  # the bad record is on line 4
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    path = write_suite(tmp_path / "s.yaml", f"tasks:\n  - {{name: t, kind: {kind}, data: data.jsonl}}\n")
    with pytest.raises(ExmeError, match=message) as err:
        Suite.from_yaml(path)
    assert f"{tmp_path / 'data.jsonl'}:4:" in str(err.value)


def test_invalid_json_line_is_named(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "target": "b"}\n{"prompt": \n')
    path = write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: t, kind: generate, data: data.jsonl}\n")
    with pytest.raises(ExmeError, match=r"data.jsonl:2: not valid JSON"):
        Suite.from_yaml(path)


def test_num_fewshot_larger_than_examples_is_an_error(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", _mc(4))
    path = write_suite(
        tmp_path / "s.yaml",
        "tasks:\n  - name: mc\n    kind: multiple_choice\n    data: mc.jsonl\n    fewshot: [{question: x, choices: [a, b], label: 0}]\n    num_fewshot: 3\n",
    )
    with pytest.raises(ExmeError, match="num_fewshot=3 but only 1"):
        Suite.from_yaml(path)


def test_load_evaluator_rejects_unknown_spec(tmp_path):
    with pytest.raises(ExmeError, match="neither a suite YAML"):
        load_evaluator("nonsense")
    with pytest.raises(ExmeError, match="does not exist"):
        load_evaluator(tmp_path / "absent.yaml")
    with pytest.raises(ExmeError, match="cannot import module"):
        load_evaluator("no_such_module_xyz:score")


def test_inline_fewshot_records_are_checked(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", _mc(4))
    path = write_suite(  # YAML reads bare yes/no as booleans, which are not choice texts
        tmp_path / "s.yaml",
        "tasks:\n  - name: mc\n    kind: multiple_choice\n    data: mc.jsonl\n    fewshot: [{question: x, choices: [yes, no], label: 0}]\n",
    )
    with pytest.raises(ExmeError, match="task 'mc' few-shot example 0: 'choices' must be a list of at least two strings"):
        Suite.from_yaml(path)


def test_suite_errors_name_the_yaml_line(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", _mc(4))
    text = (
        "name: s\n"
        "tasks:\n"
        "  - name: ok\n"
        "    kind: multiple_choice\n"
        "    data: mc.jsonl\n"
        "  - name: broken\n"
        "    kind: generate\n"
        "    data: mc.jsonl\n"
        "    regex: '(unclosed'\n"
    )
    with pytest.raises(ExmeError, match=r"s.yaml:9: task 'broken' key 'regex': regex '\(unclosed' does not compile"):
        Suite.from_yaml(write_suite(tmp_path / "s.yaml", text))
    with pytest.raises(ExmeError, match=r"s.yaml:7: task 'broken' key 'kind': unknown kind 'chat'"):
        Suite.from_yaml(write_suite(tmp_path / "s.yaml", text.replace("kind: generate", "kind: chat")))


def test_perplexity_text_file_is_one_document_per_paragraph(tmp_path):
    (tmp_path / "corpus.txt").write_text("First paragraph\nstill first.\n\n\nSecond one.\n  \nThird.\n\nFourth.\n")
    suite = Suite.from_yaml(write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: p, kind: perplexity, data: corpus.txt}\n"))
    docs = sorted(r["text"] for split in ("dev", "test") for r in suite.tasks[0].records(split))
    assert docs == sorted(["First paragraph\nstill first.", "Second one.", "Third.", "Fourth."])


def test_answer_filter_is_for_gsm8k_only(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "target": "t"}\n{"prompt": "q", "target": "u"}\n')
    (tmp_path / "s.yaml").write_text("tasks:\n  - {name: t, kind: generate, data: d.jsonl, answer_filter: strict-match}\n")
    with pytest.raises(ExmeError, match="answer_filter applies to gsm8k"):
        Suite.from_yaml(tmp_path / "s.yaml")
