"""``humaneval``: complete a Python function from its signature and docstring (HumanEval's format)."""

from __future__ import annotations

from exme.evaluate.kinds.sandboxed import CodeKind


class HumanEval(CodeKind):
    name = "humaneval"
    required = ("task_id", "prompt", "test", "entry_point")
    prompt = "{prompt}"
    chat_prompt = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{prompt}\n```\n"
    target = "{canonical_solution}"
    stop = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")

