"""The local fixtures themselves: seeded, loadable, and really perturbed by the stated amount."""

import torch
from transformers import AutoModelForCausalLM

from exme.testing import char_tokenizer, make_finetuned, make_tiny_model, read_index


def test_char_tokenizer_round_trips_text():
    tok = char_tokenizer()
    text = "x = 12 * (3 + 4)\n\nprint(x)\r\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tiny_model_is_seeded_sharded_and_finetune_noise_has_the_stated_scale(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=3, max_shard_size="20KB")
    b = make_tiny_model(tmp_path / "b", seed=3)
    assert len(set(read_index(a).values())) > 1  # really sharded
    ma = AutoModelForCausalLM.from_pretrained(a)
    mb = AutoModelForCausalLM.from_pretrained(b)
    for (n, pa), (_, pb) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(pa, pb), n
    ft = AutoModelForCausalLM.from_pretrained(make_finetuned(a, tmp_path / "ft", seed=1, scale=0.01))
    diffs = torch.cat([(p - q).flatten() for p, q in zip(ft.parameters(), ma.parameters())])
    assert abs(diffs.std().item() - 0.01) < 0.001
