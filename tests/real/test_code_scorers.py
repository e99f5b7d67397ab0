"""Every real HumanEval canonical solution and MBPP reference solution passes exme's code scorer, and a
wrong body of each fails: the program builders of :mod:`exme.evaluate.code` run in the real sandbox.

The sandbox costs tens of milliseconds per program, so records are run in batches: one sandboxed
program holds many (program, tests) pairs and runs each in a fresh module namespace, as the sandbox
runner does for one; the batch passes only when every pair came out as expected, and it prints the
ids that did not.
"""

from __future__ import annotations

import ast
import json
import warnings

import pytest

from exme.evaluate.code import humaneval_program, mbpp_program
from exme.evaluate.sandbox import SandboxLimits, run_programs

from .conftest import read_jsonl

pytestmark = pytest.mark.slow

_HARNESS = """
import json
_items = json.loads({payload!r})
_expect = {expect!r}
mismatched = []
for _key, _program, _tests in _items:
    _ns = {{"__name__": "exme_program"}}
    try:
        exec(compile(_program, _key, "exec"), _ns)
        exec(compile(_tests, _key + ":tests", "exec"), _ns)
        _ok = True
    except BaseException:
        _ok = False
    if _ok != _expect:
        mismatched.append(_key)
print("MISMATCHED", json.dumps(mismatched), flush=True)  # the runner exits without flushing on failure
"""


def run_batched(items: list[tuple[str, str, str]], expect: bool, batch: int = 60) -> list[str]:
    """Ids of ``(id, program, tests)`` items whose outcome differs from ``expect`` (pass / fail)."""
    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    sources = [_HARNESS.format(payload=json.dumps(chunk), expect=expect) for chunk in chunks]
    results = run_programs(sources, SandboxLimits(timeout=120, memory_mb=2048), workers=2,
                           tests=["assert not mismatched, mismatched\n"] * len(sources))
    bad: list[str] = []
    for chunk, result in zip(chunks, results):
        if result.passed:
            continue
        marker = [line for line in result.output.splitlines() if line.startswith("MISMATCHED ")]
        bad.extend(json.loads(marker[-1][len("MISMATCHED "):]) if marker else [f"batch from {chunk[0][0]}: {result.status}"])
    return bad


def returns_none(code: str) -> str:
    """``code`` with every module-level function's body replaced by ``return None`` (classes kept)."""
    with warnings.catch_warnings():  # some references hold invalid escape sequences
        warnings.simplefilter("ignore")
        tree = ast.parse(code)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.body = [ast.Return(ast.Constant(None))]
    return ast.unparse(tree)


def test_humaneval_canonical_pass_and_wrong_bodies_fail(real):
    records = read_jsonl(real.data("humaneval", "test"))
    assert len(records) == 164
    right = [(r["task_id"], *humaneval_program(r, r["canonical_solution"])) for r in records]
    wrong = [(r["task_id"], *humaneval_program(r, "    return None\n")) for r in records]
    assert run_batched(right, True) == []
    assert run_batched(wrong, False) == []


def test_humaneval_canonical_as_a_fenced_whole_function_without_imports_passes(real):
    """How chat models answer: the whole function in a fence, the prompt's imports left out, then prose."""
    records = read_jsonl(real.data("humaneval", "test"))
    answers = []
    for r in records:
        function = "".join(line for line in (r["prompt"] + r["canonical_solution"]).splitlines(keepends=True)
                           if not line.startswith(("import ", "from ")))
        answers.append((r["task_id"], *humaneval_program(r, f"Here it is:\n```python\n{function}```\nThis works.")))
    assert run_batched(answers, True) == []


def test_mbpp_references_pass_with_setup_and_wrong_ones_fail(real):
    records = read_jsonl(real.data("mbpp", "test"))
    assert len(records) == 500
    # MBPP 367 is the one record with test_setup_code, and it builds trees from the answer's Node
    # class: the setup must run after the answer (it failed with NameError when run before it).
    assert [r["task_id"] for r in records if r["test_setup_code"].strip()] == [367]
    right = [(str(r["task_id"]), *mbpp_program(r, r["code"])) for r in records]
    wrong = [(str(r["task_id"]), *mbpp_program(r, returns_none(r["code"]))) for r in records]
    assert run_batched(right, True) == []
    assert run_batched(wrong, False) == []


def test_batch_harness_reports_the_item_that_differs():
    items = [("ok", "x = 1\n", "assert x == 1\n"), ("bad", "x = 1\n", "assert x == 2\n")]
    assert run_batched(items, True) == ["bad"]
    assert run_batched(items, False) == ["ok"]
