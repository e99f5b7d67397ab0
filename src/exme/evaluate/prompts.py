"""Prompt text for every task kind: templates over a record's fields, few-shot blocks, chat templates.

A template is a ``str.format`` string over the record's fields plus a few derived ones
(``tests`` for MBPP, ``choices_lettered`` for multiple choice), declared by each kind
(:mod:`exme.evaluate.kinds`) with its default templates and stop strings. Defaults follow the
prompts the public evaluations of each format use, so numbers are comparable with what users
already know.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exme.errors import ExmeError
from exme.evaluate.kinds import get_kind

if TYPE_CHECKING:
    from exme.evaluate.suite import Task


def fields(record: dict[str, Any], kind: str) -> dict[str, Any]:
    """The record's fields plus the derived ones templates of ``kind`` may use."""
    return get_kind(kind).fields(record)


def render(template: str, record: dict[str, Any], task: "Task") -> str:
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


def prompt_text(task: "Task", record: dict[str, Any], tokenizer) -> tuple[str, bool]:
    """The full prompt for one record (few-shot examples first) and whether it came from a chat template.

    With ``chat_template: true`` the examples become user/assistant turns and the tokenizer's own
    template renders them (so its special tokens are already in the text).
    """
    spec = task.spec
    kind = get_kind(task.kind)
    # Under a chat template a user turn must say what to do (and MBPP's "[BEGIN]" means nothing to a chat
    # model): a kind's chat_prompt carries the instruction of lm-eval's instruct variant.
    prompt_tpl = spec.prompt or (kind.chat_prompt if spec.chat_template else None) or kind.prompt
    target_tpl = spec.target or kind.target
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


def stop_strings(task: "Task") -> list[str]:
    """The task's stop strings (its own, else its kind's defaults: :meth:`TaskKind.stop_strings`)."""
    return get_kind(task.kind).stop_strings(task)


def encode(tokenizer, text: str, *, from_chat_template: bool) -> list[int]:
    """Token ids of a prompt; special tokens (BOS) are added unless a chat template already wrote them."""
    return list(tokenizer(text, add_special_tokens=not from_chat_template)["input_ids"])
