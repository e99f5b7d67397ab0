"""Code tasks (HumanEval and MBPP formats): build each program from a completion and run it with its tests."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from exme.evaluate.sandbox import SandboxLimits, run_programs
from exme.evaluate.suite import Task

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def strip_fence(completion: str) -> str:
    """The code inside the first Markdown code fence, or the completion unchanged when it has none."""
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def humaneval_program(record: dict[str, Any], completion: str) -> tuple[str, str]:
    """(prompt + completion, tests + ``check(entry_point)``), as HumanEval's own harness runs them.

    A completion that restates the whole function (chat models often do) is run without the prompt.
    The two parts run in one namespace; the sandbox counts a pass only when the second ran to its end.
    """
    code = strip_fence(completion)
    entry = record["entry_point"]
    body = code if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE) else record["prompt"] + code
    return f"{body}\n", f"{record['test']}\n\ncheck({entry})\n"


def mbpp_program(record: dict[str, Any], completion: str) -> tuple[str, str]:
    """(setup code + completion, the record's asserts)."""
    setup = record.get("test_setup_code") or ""
    tests = "\n".join(record["test_list"])
    return f"{setup}\n{strip_fence(completion)}\n", f"{tests}\n"


def score_code(
    task: Task,
    records: list[dict[str, Any]],
    completions: list[str],
    *,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """pass@1 with greedy decoding: the share of programs whose every test ran to the end within the time limit."""
    build = humaneval_program if task.kind == "humaneval" else mbpp_program
    parts = [build(r, c) for r, c in zip(records, completions)]
    results = run_programs(
        [p for p, _ in parts],
        SandboxLimits(timeout=task.spec.timeout),
        workers=workers,
        progress=progress,
        tests=[t for _, t in parts],
    )
    passed = [r.passed for r in results]
    items = [
        {"completion": c, "status": r.status, "seconds": round(r.seconds, 3), "output": r.output[-500:],
         "fs_isolated": r.fs_isolated}
        for c, r in zip(completions, results)
    ]
    return {"pass@1": sum(passed) / len(passed) if passed else float("nan")}, items
