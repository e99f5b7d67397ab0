"""Re-scoring a sample of items in another batch composition counts exactly the items whose score changed."""

from __future__ import annotations

import json

import pytest

from exme.evaluate import Suite, SuiteEvaluator
from exme.evaluate.determinism import rescore_sample, sample_items


@pytest.fixture(scope="module")
def scored(tiny_models, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("rescore")
    rows = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), f"{a}{b}"], "label": 0}
            for a in range(1, 9) for b in range(1, 4)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "suite.yaml").write_text("split: {seed: 0, dev_fraction: 0.5}\ntasks:\n  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n")
    evaluator = SuiteEvaluator(Suite.from_yaml(root / "suite.yaml"), mc_batch_size=8)
    model = AutoModelForCausalLM.from_pretrained(tiny_models.sft1).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models.sft1)
    return evaluator, model, tok, evaluator.evaluate(model, tok, "test")


def test_rescore_counts_the_items_whose_score_differs(scored):
    evaluator, model, tok, scores = scored
    per_item = {t: dict(v) for t, v in scores.per_item.items()}
    assert len(per_item["mc"]) == 12
    sample = sample_items(per_item, 8, seed=5)
    assert sample == sample_items(per_item, 8, seed=5) and len(sample["mc"]) == 8  # seeded: the same items
    same = rescore_sample(evaluator, model, tok, per_item, model="ExMe", n=8, seed=5)
    # On a CPU in float32 this model's accuracies do not move with the batch: none changed.
    assert (same.sampled, same.changed) == ({"mc": 8}, {"mc": 0})
    # Flip the recorded score of three sampled items and one item outside the sample: exactly three change.
    flipped = {"mc": dict(per_item["mc"])}
    outside = next(i for i in per_item["mc"] if int(i) not in sample["mc"])
    for i in [str(i) for i in sample["mc"][:3]] + [outside]:
        flipped["mc"][i] = 1.0 - flipped["mc"][i]
    moved = rescore_sample(evaluator, model, tok, flipped, model="ExMe", n=8, seed=5)
    assert moved.changed == {"mc": 3} and moved.total_changed == 3 and moved.total_sampled == 8


def test_the_report_shows_the_rescore_section():
    from exme.report.render import _rescore_section

    text = _rescore_section({"model": "ExMe", "split": "test", "sampled": {"mc": 8, "gen": 4}, "changed": {"mc": 1, "gen": 0},
                             "backend": "vllm", "batch_invariant": False})
    assert "1 of 12 items changed score" in text and "| mc | 8 | 1 |" in text
