"""Custom evaluators named as module:function."""

import sys

import pytest

from exme.errors import ExmeError
from exme.evaluate import CustomEvaluator, load_evaluator


def test_module_function_evaluator(tmp_path, monkeypatch, tiny_lm):
    model, tok, _ = tiny_lm
    (tmp_path / "my_scores.py").write_text(
        "def score(model, tokenizer, split):\n"
        "    n = sum(p.numel() for p in model.parameters())\n"
        "    return {'params_mod_7': n % 7, 'is_dev': 1.0 if split == 'dev' else 0.0}\n"
        "def bad(model, tokenizer, split):\n"
        "    return {'x': 'high'}\n"
        "def limited(model, tokenizer, split, limit=None):\n"
        "    return {'limit': float(limit or 0)}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_scores", None)
    evaluator = load_evaluator("my_scores:score", weights={"is_dev": 3.0})
    assert isinstance(evaluator, CustomEvaluator)
    n = sum(p.numel() for p in model.parameters())
    scores = evaluator.evaluate(model, tok, "dev")
    assert scores.tasks == {"params_mod_7": float(n % 7), "is_dev": 1.0}
    assert scores.overall == pytest.approx((n % 7 + 3.0) / 4)
    assert evaluator.evaluate(model, tok, "test").tasks["is_dev"] == 0.0
    assert load_evaluator("my_scores:limited").evaluate(model, tok, "dev", limit=4).tasks == {"limit": 4.0}
    with pytest.raises(ExmeError, match="score for 'x' is not a number"):
        load_evaluator("my_scores:bad").evaluate(model, tok, "dev")
    with pytest.raises(ExmeError, match="has no attribute"):
        load_evaluator("my_scores:absent")
    with pytest.raises(ExmeError, match="split 'train'"):
        evaluator.evaluate(model, tok, "train")
