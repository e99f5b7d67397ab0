"""HumanEval and MBPP formats: programs built from completions, run with their tests, pass@1."""

import pytest

from exme.evaluate import Suite, SuiteEvaluator
from exme.evaluate.code import humaneval_program, mbpp_program, strip_fence
from exme.testing import char_tokenizer

from .conftest import ScriptedLM, write_jsonl, write_suite

HUMANEVAL = [
    {
        "task_id": "t/0",
        "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "t/1",
        "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n",
        "test": "def check(candidate):\n    assert candidate(4) == 8\n",
        "entry_point": "double",
    },
    {
        "task_id": "t/2",
        "prompt": "def spin():\n    \"\"\"Return 1.\"\"\"\n",
        "test": "def check(candidate):\n    assert candidate() == 1\n",
        "entry_point": "spin",
    },
]
MBPP = [
    {"text": "Write a function to square a number.", "test_list": ["assert square(3) == 9", "assert square(-2) == 4"]},
    {"text": "Write a function to reverse a string.", "test_list": ["assert rev('ab') == 'ba'"], "test_setup_code": "import string"},
]


def test_humaneval_pass_at_1_with_hostile_and_fenced_completions(tmp_path):
    tok = char_tokenizer()
    write_jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    suite = Suite.from_yaml(
        write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: he, kind: humaneval, dev: he.jsonl, test: he.jsonl, timeout: 4, stop: [\"\\ndef unrelated\"]}\n")
    )
    answers = {
        '"""Sum of a and b."""': "    return a + b\ndef unrelated():\n    pass",  # stop string "\ndef " cuts the tail
        '"""Twice x."""': "```python\ndef double(x):\n    return 2 * x\n```",  # a whole function in a fence
        '"""Return 1."""': "    while True:\n        pass",  # killed on time, scored as a failure
    }
    scores = SuiteEvaluator(suite, keep_items=True, workers=2).evaluate(ScriptedLM(tok, answers), tok, "dev")
    statuses = [item["status"] for item in scores.details["he"]["items"]]
    assert statuses == ["passed", "passed", "timeout"], scores.details["he"]["items"]
    assert scores.tasks["he"] == pytest.approx(2 / 3)
    assert scores.details["he"]["items"][0]["completion"] == "    return a + b"


def test_mbpp_pass_at_1(tmp_path):
    tok = char_tokenizer()
    write_jsonl(tmp_path / "mbpp.jsonl", MBPP)
    suite = Suite.from_yaml(write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: mbpp, kind: mbpp, dev: mbpp.jsonl, test: mbpp.jsonl}\n"))
    answers = {
        "assert square(-2) == 4\n[BEGIN]": "def square(x):\n    return x * x\n[DONE] trailing",
        "assert rev('ab') == 'ba'\n[BEGIN]": "def rev(s):\n    return s\n[DONE]",
    }
    scores = SuiteEvaluator(suite).evaluate(ScriptedLM(tok, answers), tok, "test")
    assert scores.tasks["mbpp"] == 0.5


def test_program_assembly():
    record = HUMANEVAL[0]
    program, tests = humaneval_program(record, "    return a + b\n")
    assert program.rstrip() == record["prompt"] + "    return a + b"
    assert tests.startswith(record["test"]) and tests.rstrip().endswith("check(add)")
    program, tests = mbpp_program(MBPP[1], "def rev(s): return s[::-1]")
    # the setup runs after the answer, before the asserts (MBPP 367's setup uses the answer's Node class)
    assert program.startswith("def rev") and tests == "import string\n" + "\n".join(MBPP[1]["test_list"]) + "\n"
    assert strip_fence("text\n```py\nx = 1\n```\nmore") == "x = 1\n"
    assert strip_fence("x = 2") == "x = 2"
