"""Code tasks (HumanEval and MBPP formats): build each program from a completion and run it with its tests.

What a completion means, as chat models write them:

- **fences**: the code is inside the first Markdown fence pair. A completion may also *start* inside
  an implied fence (the prompt opened one, or the model wrote the body straight away) and then close
  it with a lone ````` before prose, as lm-eval's instruct tasks assume: then the code is what comes
  before that closing fence (:func:`strip_fence`).
- **example usage**: after the function, chat models add module-level lines that call it
  (``print(f(3))``, ``assert f(2) == 1``, ``result = f(x)``). HumanEval and MBPP score the function;
  those lines are not part of the answer, and a wrong example would fail a correct function. So
  top-level statements that are bare expressions, or that use a function or class the answer
  defines, are dropped (:func:`drop_example_usage`); imports, definitions and constants stay.
"""

from __future__ import annotations

import ast
import re
import warnings
from collections.abc import Callable
from typing import Any

from exme.evaluate.sandbox import SandboxLimits, run_programs
from exme.evaluate.suite import Task

_FENCE_LINE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[ \t]*$", re.MULTILINE)


def strip_fence(completion: str, prefix: str = "") -> str:
    """The code of a completion: inside its first fence pair, or before a first fence that closes an implied one.

    A first fence with a language tag (```` ```python ````), or with nothing but blank space before it,
    opens a block. A bare first fence after text closes a block the answer started in, when that text
    is code (it compiles, after ``prefix``: the HumanEval prompt the body continues) and what follows
    the fence is not; otherwise it opens one. Without fences the completion is returned unchanged.
    """
    fences = list(_FENCE_LINE.finditer(completion))
    if not fences:
        return completion
    first = fences[0]
    before, after = completion[: first.start()], completion[first.end() + 1 :]
    opens = bool(first.group(1)) or not before.strip()
    if not opens and not (_compiles(prefix + before) and not _compiles(prefix + _inside(after, fences[1:], first.end() + 1))):
        opens = True
    if not opens:
        return before
    return _inside(after, fences[1:], first.end() + 1)


def _inside(after: str, later: list[re.Match], offset: int) -> str:
    """The text after an opening fence up to the next fence line (or the end)."""
    return after[: later[0].start() - offset] if later else after


def _compiles(source: str) -> bool:
    try:
        with warnings.catch_warnings():  # a model's invalid escape sequence is not ours to report
            warnings.simplefilter("ignore")
            compile(source, "<completion>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def drop_example_usage(code: str) -> str:
    """``code`` without its module-level example lines (see the module docstring); unchanged if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    keep_types = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    lines = code.splitlines(keepends=True)
    dropped: list[tuple[int, int]] = []
    for node in tree.body:
        if isinstance(node, keep_types):
            continue
        uses = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        if isinstance(node, ast.Expr) or uses & defined or _is_main_guard(node):
            dropped.append((node.lineno, node.end_lineno or node.lineno))
    if not dropped:
        return code
    gone = {i for start, end in dropped for i in range(start, end + 1)}
    return "".join(line for i, line in enumerate(lines, 1) if i not in gone)


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


def humaneval_program(record: dict[str, Any], completion: str) -> tuple[str, str]:
    """(prompt + completion, tests + ``check(entry_point)``), as HumanEval's own harness runs them.

    A completion that restates the whole function (chat models often do) runs after the prompt, not
    appended to it: the prompt's imports and helpers (``from typing import List``, which chat answers
    leave out) are defined first, and the answer's ``def`` replaces the prompt's docstring-only one.
    The two parts run in one namespace; the sandbox counts a pass only when the second ran to its end.
    """
    code = strip_fence(completion, prefix=record["prompt"])
    entry = record["entry_point"]
    whole = re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE)
    body = record["prompt"] + ("\n" + code if whole else code)
    return f"{drop_example_usage(body)}\n", f"{record['test']}\n\ncheck({entry})\n"


def mbpp_program(record: dict[str, Any], completion: str) -> tuple[str, str]:
    """(completion, setup code + the record's asserts).

    The setup runs after the answer, just before the asserts: MBPP's ``test_setup_code`` builds test
    inputs, and for task 367 it builds trees from the ``Node`` class the answer defines.
    """
    setup = record.get("test_setup_code") or ""
    tests = "\n".join(record["test_list"])
    return f"{drop_example_usage(strip_fence(completion))}\n", f"{setup}\n{tests}\n"


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
        {"completion": c, "program": p, "status": r.status, "seconds": round(r.seconds, 3), "output": r.output[-500:],
         "fs_isolated": r.fs_isolated}
        for c, (p, _), r in zip(completions, parts, results)
    ]
    return {"pass@1": sum(passed) / len(passed) if passed else float("nan")}, items
