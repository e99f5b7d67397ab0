"""How generations end (EOS, stop string, token limit) and the per-task statistics built from it,
checked on models whose ending is forced: EOS logit at −inf (never stops), EOS at +inf (stops at
once), and a scripted model whose replies hold a stop string at a known token."""

from __future__ import annotations

import json

import pytest
import torch

from exme.evaluate import Suite, SuiteEvaluator
from exme.evaluate.backends import generation_stats
from exme.evaluate.lm import Generation

QUESTIONS = [{"question": f"What is {a} plus {a + 3}?", "answer": f"#### {2 * a + 3}"} for a in range(1, 9)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exme.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("stats") / "m", seed=3)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _suite(tmp_path, max_new_tokens: int, stop: list[str]) -> Suite:
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
    (tmp_path / "s.yaml").write_text(
        "split: {seed: 0, dev_fraction: 0.5}\n"
        f"tasks:\n  - {{name: math, kind: gsm8k, data: q.jsonl, max_new_tokens: {max_new_tokens}, stop: {json.dumps(stop)}}}\n"
    )
    return Suite.from_yaml(tmp_path / "s.yaml")


def _force_eos(model, eos_id: int, value: float):
    """A forward hook that sets the EOS logit of every position to ``value`` (±inf)."""

    def hook(module, inputs, output):
        output[..., eos_id] = value
        return output

    return model.lm_head.register_forward_hook(hook)


def test_model_that_never_emits_eos_hits_the_limit_on_every_item(tiny, tmp_path):
    model, tok = tiny
    handle = _force_eos(model, tok.eos_token_id, float("-inf"))
    try:
        scores = SuiteEvaluator(_suite(tmp_path, 7, []), batch_size=3, keep_items=True).evaluate(model, tok, "dev")
    finally:
        handle.remove()
    gen = scores.details["math"]["generation"]
    assert gen == {"mean_new_tokens": 7.0, "hit_limit": 1.0, "no_stop": 1.0, "n": 4}
    assert all(item["finish"] == "length" and item["new_tokens"] == 7 for item in scores.details["math"]["items"])


def test_model_that_emits_eos_at_once_stops_after_one_token(tiny, tmp_path):
    model, tok = tiny
    handle = _force_eos(model, tok.eos_token_id, float("inf"))
    try:
        scores = SuiteEvaluator(_suite(tmp_path, 7, ["\n"]), batch_size=3, keep_items=True).evaluate(model, tok, "test")
    finally:
        handle.remove()
    gen = scores.details["math"]["generation"]
    assert gen["mean_new_tokens"] <= 1 and gen["mean_new_tokens"] == 1.0  # the EOS token itself
    assert gen["hit_limit"] == 0.0 and gen["no_stop"] == 0.0 and gen["n"] == 4
    assert all(item["finish"] == "eos" and item["completion"] == "" for item in scores.details["math"]["items"])


class ScriptedLM(torch.nn.Module):
    """``model.generate``'s contract with scripted replies: each prompt's last line picks a reply,
    then EOS and padding; a row also ends as soon as the stop string is spelled (as the stopping
    criterion would end it)."""

    def __init__(self, tokenizer, answers: dict[str, str], stop: str):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.stop, self.config = tokenizer, answers, stop, None

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            reply = next((v for k, v in self.answers.items() if prompt.rstrip().endswith(k + "\nAnswer:")), "I do not know.")
            if self.stop in reply:
                reply = reply[: reply.index(self.stop) + len(self.stop)]
                new = self.tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new_tokens]
            else:
                new = (self.tokenizer(reply, add_special_tokens=False)["input_ids"] + eos_token_id[:1])[:max_new_tokens]
            rows.append(new)
        width = max(len(r) for r in rows)
        out = [r + [pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(out, dtype=torch.long)], dim=1)


def test_stop_string_ending_counts_the_tokens_up_to_the_stop(tmp_path):
    """Character tokenizer: one token per character, so the count is the reply's length up to the
    end of the stop string, worked out by hand below."""
    from exme.testing import char_tokenizer

    tok = char_tokenizer()
    replies = {"What is 1 plus 4?": "so 5\nQuestion: next", "What is 2 plus 5?": "7 and on and on and on"}
    model = ScriptedLM(tok, replies, "\nQuestion:")
    suite = _suite(tmp_path, 16, ["\nQuestion:"])
    rows = {}
    for split in ("dev", "test"):
        scores = SuiteEvaluator(suite, batch_size=4, keep_items=True).evaluate(model, tok, split)
        for record, item in zip(suite.tasks[0].records(split), scores.details["math"]["items"]):
            rows[record["question"]] = item
    first = rows["What is 1 plus 4?"]
    assert (first["completion"], first["finish"], first["new_tokens"]) == ("so 5", "stop", len("so 5\nQuestion:"))
    second = rows["What is 2 plus 5?"]  # 22 characters, limit 16, no stop: cut by the limit
    assert (second["completion"], second["finish"], second["new_tokens"]) == ("7 and on and on ", "length", 16)
    other = rows["What is 3 plus 6?"]  # "I do not know." (14 characters) then EOS
    assert (other["completion"], other["finish"], other["new_tokens"]) == ("I do not know.", "eos", 15)


def test_generation_stats_against_a_hand_count():
    rows = [Generation("a", 3, "eos"), Generation("b", 10, "length"), Generation("c", 10, "stop"), Generation("", 1, "eos")]
    assert generation_stats(rows, 10) == {"mean_new_tokens": 6.0, "hit_limit": 0.5, "no_stop": 0.25, "n": 4}
    empty = generation_stats([], 10)
    assert empty["n"] == 0


def test_only_generative_tasks_get_generation_stats(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "label": i % 2}) + "\n" for i in range(4)))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
    (tmp_path / "s.yaml").write_text(
        "split: {seed: 0, dev_fraction: 0.5}\ntasks:\n"
        "  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n"
        "  - {name: math, kind: gsm8k, data: q.jsonl, max_new_tokens: 5}\n"
    )
    suite = Suite.from_yaml(tmp_path / "s.yaml")
    scores = SuiteEvaluator(suite).evaluate(model, tok, "dev")
    assert "generation" not in scores.details["mc"]
    gen = scores.details["math"]["generation"]
    assert set(gen) == {"mean_new_tokens", "hit_limit", "no_stop", "n"}
    assert gen["n"] == len(suite.tasks[1].records("dev")) == scores.n_items["math"]
    assert 1 <= gen["mean_new_tokens"] <= 5
