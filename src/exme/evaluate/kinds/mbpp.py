"""``mbpp``: write a Python function from a description and its asserts (MBPP's format and prompt)."""

from __future__ import annotations

from typing import Any

from exme.errors import ExmeError
from exme.evaluate.kinds.sandboxed import CodeKind


class MBPP(CodeKind):
    name = "mbpp"
    required = ("text", "test_list")
    prompt = (
        "You are an expert Python programmer, and here is your task: {text} "
        "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )
    chat_prompt = "You are an expert Python programmer, and here is your task:\n{text}\nYour code should pass these tests:\n{tests}"
    target = "{code}\n[DONE]"
    stop = ("[DONE]", "\n[BEGIN]")

    def check_record(self, record: dict[str, Any], where: str) -> None:
        if not isinstance(record["test_list"], list) or not record["test_list"]:
            raise ExmeError(f"{where}: 'test_list' must be a non-empty list of assert statements")

    def fields(self, record: dict[str, Any]) -> dict[str, Any]:
        view = dict(record)
        view.setdefault("tests", "\n".join(record["test_list"]))
        return view
