"""Fixtures for evaluation tests: one tiny live model, data writers, and a scripted generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """(model, tokenizer) of a tiny random Llama with a character tokenizer, loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exme.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("eval_model") / "m", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path), path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_suite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose greedy output is scripted: ``answers`` maps a prompt's last line to a reply.

    Random tiny models emit junk, so checking that a *correct* answer is scored as correct needs
    control over the text; this object follows ``model.generate``'s contract (left-padded ids in,
    prompt + new tokens out, EOS then pads after a row finishes).
    """

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answers = answers
        self.config = None
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        self.calls += 1
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            key = next((k for k in self.answers if prompt.rstrip().endswith(k)), None)
            reply = self.answers.get(key, "I do not know.")
            new = self.tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(new + [self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        out = [r + [pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(out, dtype=torch.long)], dim=1)
