"""Defects a first run of SmolLM2-135M-Instruct on the real records showed, each checked on completions
the real model wrote (recorded once by ``record_completions.py``; no generation here).

``*_before``: the chat user turn as exme's defaults were (the bare record); ``*_now``: the defaults now.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from exme.evaluate import prompts
from exme.evaluate.code import drop_example_usage, humaneval_program, mbpp_program, strip_fence
from exme.evaluate.extract import extract_final_number, truncate_at_stop
from exme.evaluate.suite import Suite

from .conftest import read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_completions.json"
OLD_GSM8K_STOP = ["\n\n", "Question:"]  # the gsm8k default a chat task kept
OLD_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)  # the pattern that read a closing fence as opening


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(FIXTURE.read_text())["tasks"]


def _chat_task(kind: str, data: Path):
    return Suite.from_dict({"name": "t", "tasks": [{"name": "t", "kind": kind, "data": str(data), "chat_template": True}]}).tasks[0]


def test_gsm8k_chat_stops_keep_the_answer(real, recorded):
    """Cut at the old "\\n\\n" stop, real chat answers lose their number; lm-eval's stops (the chat default now) keep it."""
    task = _chat_task("gsm8k", real.data("gsm8k", "test"))
    assert prompts.stop_strings(task) == ["Question:", "</s>", "<|im_end|>"]
    lost = 0
    for item in recorded["gsm8k_before"] + recorded["gsm8k_now"]:
        full = truncate_at_stop(item["completion"], prompts.stop_strings(task))
        cut = truncate_at_stop(item["completion"], OLD_GSM8K_STOP)
        if extract_final_number(cut) is None and extract_final_number(full) is not None:
            lost += 1
    assert lost >= 2, f"only {lost} recorded answers lose their number at the old stop"


def test_gsm8k_chat_prompt_asks_for_the_answer_format(real, recorded):
    questions = [r["question"] for r in read_jsonl(real.data("gsm8k", "test"))]
    for name in ("gsm8k_before", "gsm8k_now"):
        for item in recorded[name]:
            assert any(q in item["prompt"] for q in questions)
            assert ("The final answer is [answer]" in item["prompt"]) == (name == "gsm8k_now")
    said = {name: sum("final answer is" in it["completion"].lower() for it in recorded[name])
            for name in ("gsm8k_before", "gsm8k_now")}
    assert said["gsm8k_now"] > said["gsm8k_before"], said  # the format reaches the model


def test_code_chat_prompts_carry_instructions(recorded):
    for item in recorded["humaneval_now"]:
        assert "Write a solution to the following problem and make sure that it passes the tests:" in item["prompt"]
    for item in recorded["mbpp_before"]:
        assert "[BEGIN]" in item["prompt"]
    for item in recorded["mbpp_now"]:
        assert "[BEGIN]" not in item["prompt"] and "Your code should pass these tests:" in item["prompt"]


def _code_items(recorded, *names):
    return [(name, item) for name in names for item in recorded[name]]


def test_a_lone_closing_fence_ends_the_code_instead_of_starting_it(real, recorded):
    """Real answers that write the body, close an implied fence and go on in prose: the old pattern ran the
    prose as the program; now the code before the fence runs (lm-eval's instruct tasks cut there too)."""
    humaneval = {r["task_id"]: r for r in read_jsonl(real.data("humaneval", "test"))}
    found = 0
    for name, item in _code_items(recorded, "humaneval_before", "humaneval_now"):
        record = humaneval[item["id"]]
        completion = item["completion"]
        old = OLD_FENCE.search(completion)
        fence = re.search(r"^[ \t]*```[ \t]*$", completion, re.MULTILINE)
        if old is None or fence is None or completion[: fence.start()].strip() == "":
            continue
        before = completion[: fence.start()]
        if not _compiles(record["prompt"] + before):
            continue
        found += 1
        assert strip_fence(completion, prefix=record["prompt"]) == before, (name, item["id"])
        assert old.group(1) != before
        program, _ = humaneval_program(record, completion)
        assert program.startswith(record["prompt"]) and before.strip().splitlines()[0] in program
    assert found >= 1, "no recorded completion closes an implied fence"


def _compiles(source: str) -> bool:
    try:
        compile(source, "<t>", "exec")
    except SyntaxError:
        return False
    return True


def test_example_usage_after_the_function_is_not_run(real, recorded):
    """Real chat answers append example lines to the function; they are dropped, the function kept."""
    humaneval = {r["task_id"]: r for r in read_jsonl(real.data("humaneval", "test"))}
    mbpp = {r["task_id"]: r for r in read_jsonl(real.data("mbpp", "test"))}
    found = 0
    for name, item in _code_items(recorded, "humaneval_now", "humaneval_before", "mbpp_now", "mbpp_before"):
        record = humaneval.get(item["id"]) if name.startswith("humaneval") else mbpp.get(item["id"])
        code = strip_fence(item["completion"], prefix=record.get("prompt", "") if name.startswith("humaneval") else "")
        kept = drop_example_usage(code)
        if kept == code:
            continue
        found += 1
        import ast

        defs = [n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)]
        assert defs and defs == [n.name for n in ast.parse(kept).body if isinstance(n, ast.FunctionDef)]
        gone = [line for line in code.splitlines() if line not in kept.splitlines() and line.strip()]
        assert gone and all(re.search(r"\b(" + "|".join(defs) + r"|print)\b", line) or line.startswith((" ", "\t", "else", "elif"))
                            for line in gone), gone
    assert found >= 1, "no recorded completion has example lines"


def test_humaneval_52_a_right_function_with_examples_and_prose_now_passes(real, recorded):
    """HumanEval/52, the real model's answer under the bare prompt: a right function, two example prints,
    a closing fence, then prose. As scored before (the prose after the fence as the program) it failed."""
    from exme.evaluate.sandbox import SandboxLimits, run_program

    record = next(r for r in read_jsonl(real.data("humaneval", "test")) if r["task_id"] == "HumanEval/52")
    item = next(it for it in recorded["humaneval_before"] if it["id"] == "HumanEval/52")
    program, tests = humaneval_program(record, item["completion"])
    assert "print(" not in program and "In this implementation" not in program
    assert run_program(program, SandboxLimits(timeout=10), tests=tests).passed
    old_program = record["prompt"] + OLD_FENCE.search(item["completion"]).group(1)
    assert not run_program(old_program, SandboxLimits(timeout=10), tests=tests).passed


def test_whole_function_answers_run_after_the_prompts_imports(real, recorded):
    """Real chat answers restate the function with ``List``/``Optional`` annotations but without the
    prompt's ``from typing import ...``: run alone (as before) they died of NameError at definition."""
    from exme.evaluate.sandbox import SandboxLimits, run_programs

    humaneval = {r["task_id"]: r for r in read_jsonl(real.data("humaneval", "test"))}
    cases = []
    for item in recorded["humaneval_now"]:
        record = humaneval[item["id"]]
        code = strip_fence(item["completion"], prefix=record["prompt"])
        if ("from typing import" in record["prompt"] and "import" not in code and _compiles(code)
                and re.search(r"\b(List|Optional|Tuple)\[", code)):
            cases.append((record, code))
    assert len(cases) >= 1, [c[0]["task_id"] for c in cases]  # HumanEval/9 in the recorded set
    new = [humaneval_program(record, code)[0] for record, code in cases]
    old = [drop_example_usage(code) + "\n" for _, code in cases]  # the answer alone
    results = run_programs(new + old, SandboxLimits(timeout=10), workers=2)
    assert all(r.passed for r in results[: len(cases)])  # defining the function works now
    assert all(not r.passed and "NameError" in r.output for r in results[len(cases):])
