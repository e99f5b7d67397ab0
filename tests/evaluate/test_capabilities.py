"""Evaluator capabilities are declared, not guessed from a signature, and callers ask for per-item
records per call instead of switching an evaluator's attribute."""

from __future__ import annotations

import pytest

from exme.errors import ExmeError
from exme.evaluate import Capabilities, CustomEvaluator, SuiteEvaluator, capabilities_of, load_evaluator

from .conftest import write_jsonl, write_suite


@pytest.fixture
def suite_path(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i} is here."} for i in range(40)])
    return write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: t, kind: perplexity, data: d.jsonl}\n")


class Forwarding:
    """Wraps the suite evaluator and forwards every keyword, so its signature says nothing."""

    def __init__(self, inner, capabilities=None):
        self.inner = inner
        if capabilities is not None:
            self.capabilities = capabilities

    def counts(self):
        return self.inner.counts()

    def evaluate(self, model, tokenizer, split, limit=None, **kwargs):
        return self.inner.evaluate(model, tokenizer, split, limit=limit, **kwargs)


class TakesItems:
    """Has an ``items`` parameter but declares nothing."""

    def counts(self):
        return {"dev": {"t": 20}, "test": {"t": 20}}

    def evaluate(self, model, tokenizer, split, limit=None, items=None):
        raise AssertionError("not called")


def _runner(tiny_models, tmp_path, suite_path, evaluator, **extra):
    from exme.pipeline import PipelineConfig
    from exme.pipeline.run import Runner

    raw = {"base": str(tiny_models.base), "checkpoints": [str(tiny_models.sft1), str(tiny_models.sft2)],
           "suite": str(suite_path), "output": str(tmp_path / "out"), "dev": {"confirm_fraction": 0.5}, **extra}
    return Runner(PipelineConfig.from_dict(raw), progress=False, evaluator=evaluator)


def test_the_confirm_split_follows_what_an_evaluator_declares(tiny_models, tmp_path, suite_path):
    inner = load_evaluator(suite_path)
    declared = _runner(tiny_models, tmp_path, suite_path, Forwarding(inner, SuiteEvaluator.capabilities))
    assert declared.dev_split is not None and len(declared.dev_split.confirm["t"]) == 10  # half of 20 dev items
    for undeclared in (Forwarding(inner), TakesItems()):
        runner = _runner(tiny_models, tmp_path, suite_path, undeclared)
        assert runner.dev_split is None
        assert any("cannot score a chosen subset of dev items" in note for note in runner.notes)


def test_log_samples_needs_declared_item_records(tiny_models, tmp_path, suite_path):
    inner = load_evaluator(suite_path)
    with pytest.raises(ExmeError, match="keeps no per-item records"):
        _runner(tiny_models, tmp_path, suite_path, Forwarding(inner, Capabilities(subset=True)), log_samples=True)
    runner = _runner(tiny_models, tmp_path, suite_path, Forwarding(inner, SuiteEvaluator.capabilities), log_samples=True)
    assert runner.config.log_samples


def test_built_in_evaluators_declare_their_capabilities(suite_path, tiny_lm):
    suite = load_evaluator(suite_path)
    assert capabilities_of(suite) == Capabilities(subset=True, item_records=True)
    assert capabilities_of(CustomEvaluator(lambda m, t, s: {"x": 1.0})) == Capabilities()
    assert capabilities_of(object()) == Capabilities()
    from exme.evaluate.lm_eval_adapter import LmEvalEvaluator

    assert capabilities_of(LmEvalEvaluator) == Capabilities(subset=True)
    # keep_items per call: the evaluator's own setting is left as it was.
    model, tok, _ = tiny_lm
    kept = suite.evaluate(model, tok, "dev", limit=3, keep_items=True)
    plain = suite.evaluate(model, tok, "dev", limit=3)
    assert suite.keep_items is False
    assert [it["tokens"] for it in kept.details["t"]["items"]] and "items" not in plain.details["t"]
    assert kept.per_item == plain.per_item
