"""Prompt text for each task kind: templates over a record's fields, few-shot blocks, chat templates.

A template is a ``str.format`` string over the record's fields plus a few derived ones
(``tests`` for MBPP, ``choices_lettered`` for multiple choice). Defaults follow the prompts the
public evaluations of each format use, so numbers are comparable with what users already know.
"""

from __future__ import annotations

import string
from typing import Any

from exme.errors import ExmeError
from exme.evaluate.suite import Task

DEFAULT_PROMPT = {
    "gsm8k": "Question: {question}\nAnswer:",
    "generate": "{prompt}",
    "humaneval": "{prompt}",
    "mbpp": (
        "You are an expert Python programmer, and here is your task: {text} "
        "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    ),
    "multiple_choice": "Question: {question}\nAnswer:",
    "perplexity": "{text}",
}
# Under a chat template a user turn must say what to do (and MBPP's "[BEGIN]" means nothing to a chat
# model): the instructions of lm-eval's instruct variants (gsm8k-cot-llama, humaneval_instruct, mbpp_instruct).
DEFAULT_CHAT_PROMPT = {
    "gsm8k": (
        "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\n"
        'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.\n'
    ),
    "humaneval": "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{prompt}\n```\n",
    "mbpp": "You are an expert Python programmer, and here is your task:\n{text}\nYour code should pass these tests:\n{tests}",
}
DEFAULT_TARGET = {
    "gsm8k": " {answer}",
    "generate": " {target}",
    "humaneval": "{canonical_solution}",
    "mbpp": "{code}\n[DONE]",
    "multiple_choice": " {answer_text}",
    "perplexity": "",
}
DEFAULT_STOP = {
    "gsm8k": ["\n\n", "Question:"],
    "generate": ["\n\n"],
    "humaneval": ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("],
    "mbpp": ["[DONE]", "\n[BEGIN]"],
    "multiple_choice": [],
    "perplexity": [],
}
# lm-eval's gsm8k stops: a chat answer's reasoning has blank lines, so "\n\n" would cut it before its number.
DEFAULT_CHAT_STOP = {"gsm8k": ["Question:", "</s>", "<|im_end|>"]}


def fields(record: dict[str, Any], kind: str) -> dict[str, Any]:
    """The record's fields plus the derived ones templates may use."""
    view = dict(record)
    if kind == "mbpp":
        view.setdefault("tests", "\n".join(record["test_list"]))
    if kind == "multiple_choice":
        choices = record["choices"]
        view.setdefault("choices_lettered", "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(choices)))
        view.setdefault("answer_text", choices[record["label"]])
    return view


def render(template: str, record: dict[str, Any], task: Task) -> str:
    """``template`` filled from ``record``; a missing field is a user error naming the task and field."""
    try:
        return template.format(**fields(record, task.kind))
    except KeyError as err:
        raise ExmeError(
            f"task {task.name!r}: template {template!r} uses field {err.args[0]!r}, which a record lacks; "
            "fix the template or the data"
        ) from None
    except (IndexError, ValueError) as err:
        raise ExmeError(f"task {task.name!r}: template {template!r} is not a valid format string ({err})") from None


def prompt_text(task: Task, record: dict[str, Any], tokenizer) -> tuple[str, bool]:
    """The full prompt for one record (few-shot examples first) and whether it came from a chat template.

    With ``chat_template: true`` the examples become user/assistant turns and the tokenizer's own
    template renders them (so its special tokens are already in the text).
    """
    spec = task.spec
    prompt_tpl = spec.prompt or (DEFAULT_CHAT_PROMPT.get(task.kind) if spec.chat_template else None) or DEFAULT_PROMPT[task.kind]
    target_tpl = spec.target or DEFAULT_TARGET[task.kind]
    if spec.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ExmeError(
                f"task {task.name!r} sets chat_template: true but the tokenizer has no chat template; "
                "set chat_template: false or use a tokenizer with one"
            )
        messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
        for example in task.fewshot:
            messages.append({"role": "user", "content": render(prompt_tpl, example, task).strip()})
            messages.append({"role": "assistant", "content": render(target_tpl, example, task).strip()})
        messages.append({"role": "user", "content": render(prompt_tpl, record, task).strip()})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    shots = [render(prompt_tpl, ex, task) + render(target_tpl, ex, task) for ex in task.fewshot]
    head = (spec.system_prompt + spec.fewshot_separator) if spec.system_prompt else ""
    return head + spec.fewshot_separator.join(shots + [render(prompt_tpl, record, task)]), False


def stop_strings(task: Task) -> list[str]:
    """The task's stop strings (its own, else the kind's defaults).

    Code tasks under a chat template get no default stops: chat models answer with a whole fenced
    function, which the HumanEval stops (``"\\ndef "``) would cut; their turn ends at EOS instead.
    """
    if task.spec.stop is not None:
        return list(task.spec.stop)
    if task.spec.chat_template and task.kind in ("humaneval", "mbpp"):
        return []
    if task.spec.chat_template and task.kind in DEFAULT_CHAT_STOP:
        return list(DEFAULT_CHAT_STOP[task.kind])
    return list(DEFAULT_STOP[task.kind])


def encode(tokenizer, text: str, *, from_chat_template: bool) -> list[int]:
    """Token ids of a prompt; special tokens (BOS) are added unless a chat template already wrote them."""
    return list(tokenizer(text, add_special_tokens=not from_chat_template)["input_ids"])
