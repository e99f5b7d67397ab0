"""`exme finetune`: completion-only labels, checkpoints that load and improved the loss, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from exme.errors import ExmeError
from exme.finetune import (
    IGNORE_INDEX,
    FinetuneConfig,
    SFTExample,
    encode_example,
    finetune,
    list_checkpoints,
    load_examples,
    pad_batch,
)
from exme.testing import char_tokenizer, make_tiny_model


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _float64_completion_nll(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """Sum of -log p(token) over the completion tokens (and EOS), from the logits in float64."""
    p_ids = tokenizer(prompt)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = 0.0
    for pos in range(len(p_ids), len(p_ids) + len(c_ids)):
        total -= float(logp[pos - 1, ids[0, pos]])
    return total, len(c_ids)


def test_prompt_tokens_are_masked_and_completion_ends_with_eos():
    tok = char_tokenizer()
    vocab = tok.get_vocab()
    enc = encode_example(SFTExample(prompt="ab", completion="c"), tok, max_length=64)
    # Hand-worked: <s> a b | c </s>; only c and </s> are learned.
    assert enc["input_ids"] == [vocab["<s>"], vocab["a"], vocab["b"], vocab["c"], vocab["</s>"]]
    assert enc["labels"] == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, vocab["c"], vocab["</s>"]]


def test_truncation_keeps_prompt_mask_and_drops_examples_without_completion():
    tok = char_tokenizer()
    vocab = tok.get_vocab()
    enc = encode_example(SFTExample(prompt="ab", completion="cd"), tok, max_length=4)
    assert enc["labels"] == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, vocab["c"]]
    assert encode_example(SFTExample(prompt="abcdef", completion="g"), tok, max_length=4) is None


def test_model_loss_on_a_padded_batch_is_the_completion_only_mean(tmp_path):
    """The loss the Trainer optimises equals a float64 mean over completion tokens only."""
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(tmp_path / "base", seed=3)
    tok = char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(base)
    pairs = [("Q: 1+1=", "2"), ("Question: what is two plus three?\nA:", " five")]
    batch = pad_batch([encode_example(SFTExample(p, c), tok, 128) for p, c in pairs], tok.pad_token_id)
    with torch.no_grad():
        loss = float(model(**batch).loss)
    sums = [_float64_completion_nll(model, tok, p, c) for p, c in pairs]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_finetune_writes_loadable_checkpoints_and_lowers_training_loss(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_tiny_model(tmp_path / "base", seed=0)
    records = [{"prompt": f"Q: {i}+1=", "completion": f"{i + 1}"} for i in range(8)] * 4
    data = _write_jsonl(tmp_path / "train.jsonl", records)
    result = finetune(
        FinetuneConfig(
            model=base, data=data, output=tmp_path / "run", max_steps=12, save_steps=5,
            learning_rate=1e-2, batch_size=8, progress=False,
        )
    )
    # Every 5 steps plus the last step.
    assert [c.name for c in result.checkpoints] == ["checkpoint-5", "checkpoint-10", "checkpoint-12"]
    assert list_checkpoints(tmp_path / "run") == result.checkpoints

    def mean_nll(model_dir: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        sums = [_float64_completion_nll(model, tokenizer, r["prompt"], r["completion"]) for r in records[:8]]
        return sum(s for s, _ in sums) / sum(n for _, n in sums)

    before = mean_nll(base)
    after = [mean_nll(c) for c in result.checkpoints]
    assert after[-1] < before - 0.5, (before, after)
    assert all(math.isfinite(x) for x in after)
    # The tokenizer travels with every checkpoint and is the base's.
    assert AutoTokenizer.from_pretrained(result.checkpoints[0]).get_vocab() == char_tokenizer().get_vocab()
    summary = json.loads((tmp_path / "run" / "exme_finetune.json").read_text())
    assert summary["checkpoints"] == ["checkpoint-5", "checkpoint-10", "checkpoint-12"]


def test_chat_messages_use_the_template_and_learn_the_last_assistant_turn(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    data = _write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    (example,) = load_examples(data, tok)
    assert example == SFTExample(prompt="[user]hi\n[assistant]", completion="yo\n", chat=True)
    enc = encode_example(example, tok, 64)
    n_prompt = len("[user]hi\n[assistant]")  # chat text: no BOS added, one id per character
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(enc["labels"][n_prompt:]) == "yo\n"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "completion": "b"}', "{not json"], "train.jsonl:2: not valid JSON"),
        (['{"prompt": "a"}'], "train.jsonl:1: missing field 'completion'"),
        (['{"prompt": "a", "completion": 3}'], "train.jsonl:1: field 'completion' must be a string"),
        (["[1, 2]"], "train.jsonl:1: expected a JSON object"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], "train.jsonl:1: the last message must have role 'assistant'"),
        (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'], "need a tokenizer with a chat template"),
        ([""], "no training records"),
    ],
)
def test_bad_training_files_name_file_and_line(tmp_path, lines, message):
    data = _write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(ExmeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_examples(data, char_tokenizer())


def test_bad_inputs_fail_before_training(tmp_path, tiny_models):
    data = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ExmeError, match="missing.jsonl: training data file not found"):
        finetune(FinetuneConfig(model=tiny_models.base, data=tmp_path / "missing.jsonl", output=tmp_path / "o"))
    with pytest.raises(ExmeError, match="model folder not found"):
        finetune(FinetuneConfig(model=tmp_path / "nope", data=data, output=tmp_path / "o"))
    (tmp_path / "o" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ExmeError, match="already holds 1 checkpoint"):
        finetune(FinetuneConfig(model=tiny_models.base, data=data, output=tmp_path / "o"))
    with pytest.raises(ExmeError, match="learning_rate"):
        FinetuneConfig.from_options(model=tiny_models.base, data=data, output=tmp_path / "o", learning_rate=-1.0)
    with pytest.raises(ExmeError, match="device"):
        FinetuneConfig.from_options(model=tiny_models.base, data=data, output=tmp_path / "o", device="tpu")
    with pytest.raises(ExmeError, match="give epochs or max_steps, not both"):
        FinetuneConfig.from_options(model=tiny_models.base, data=data, output=tmp_path / "o", epochs=2.0, max_steps=5)
    assert FinetuneConfig(model=tiny_models.base, data=data, output=tmp_path / "o").epochs == 1.0


def test_cli_finetune_reports_a_bad_line_in_one_line_with_exit_2(tmp_path, tiny_models, capsys):
    from exme.cli import main

    data = _write_jsonl(tmp_path / "train.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'])
    code = main(["finetune", str(tiny_models.base), str(data), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "train.jsonl:2: missing field 'completion'" in err


def test_cli_finetune_writes_checkpoints_and_says_where(tmp_path, tiny_models, capsys):
    from exme.cli import main

    data = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}:", "completion": str(i)} for i in range(6)])
    code = main([
        "finetune", str(tiny_models.base), str(data), "--output", str(tmp_path / "run"),
        "--max-steps", "4", "--save-steps", "2", "--batch-size", "3", "--lr", "1e-3",
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 checkpoints in" in out and "checkpoint-2, checkpoint-4" in out
    assert list_checkpoints(tmp_path / "run") == [tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"]
