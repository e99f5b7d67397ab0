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


def _records(real, task: str) -> list[dict]:
    suite = Suite.from_dict({"name": task, "tasks": [{"name": task, "kind": task, "data": str(real.data(task, "test"))}]})
    return suite.tasks[0].records("dev")


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
    assert lost >= 3, f"only {lost} recorded answers lose their number at the old stop"


def test_gsm8k_chat_prompt_asks_for_the_answer_format(real, recorded):
    record = _records(real, "gsm8k")[0]
    before, now = recorded["gsm8k_before"][0], recorded["gsm8k_now"][0]
    assert record["question"] in before["prompt"] and record["question"] in now["prompt"]
    assert "The final answer is [answer]" not in before["prompt"] and "The final answer is [answer]" in now["prompt"]
    said = sum("final answer is" in it["completion"].lower() for it in recorded["gsm8k_now"])
    assert said >= len(recorded["gsm8k_now"]) // 2  # the model follows the instruction on most items


def test_code_chat_prompts_carry_instructions(recorded):
    for item in recorded["humaneval_now"]:
        assert "Write a solution to the following problem and make sure that it passes the tests:" in item["prompt"]
    for item in recorded["mbpp_before"]:
        assert "[BEGIN]" in item["prompt"]
    for item in recorded["mbpp_now"]:
        assert "[BEGIN]" not in item["prompt"] and "Your code should pass these tests:" in item["prompt"]
