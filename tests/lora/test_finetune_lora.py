"""`exme finetune --lora-r`: checkpoints are PEFT adapters that exme reads and that lowered the loss."""

from __future__ import annotations

import json

import pytest
from exme.errors import ExmeError
from exme.finetune import FinetuneConfig, finetune
from exme.io import Checkpoint
from exme.io.source import AdapterSource, open_source


def _data(path):
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lora_finetune_writes_adapter_checkpoints(tmp_path, run_cli):
    from exme.testing import make_tiny_model

    base = make_tiny_model(tmp_path / "base", seed=0)
    code, out, err = run_cli("finetune", base, _data(tmp_path / "d.jsonl"), "-o", tmp_path / "run", "--max-steps", "6",
                             "--save-steps", "3", "--lr", "1e-2", "--batch-size", "6", "--lora-r", "4",
                             "--lora-targets", "q_proj,v_proj,down_proj")
    assert code == 0, err
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6"]
    config = json.loads((checkpoints[-1] / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert not (checkpoints[-1] / "model.safetensors").exists()
    source = open_source(checkpoints[-1], Checkpoint.open(base))
    assert isinstance(source, AdapterSource) and len(source.factors) == 2 * 3  # 2 layers × 3 modules
    assert any(float(source.delta(n).abs().max()) > 0 for n in source.factors)  # it trained B away from 0
    # The adapter learned something: PEFT's own loading of it lowers the completion loss on the data.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from exme.finetune import completion_loss, load_examples
    from exme.testing import char_tokenizer

    tok = char_tokenizer()
    examples = load_examples(tmp_path / "d.jsonl", tok)
    before = completion_loss(AutoModelForCausalLM.from_pretrained(base).eval(), tok, examples)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(checkpoints[-1])).eval()
    assert completion_loss(tuned, tok, examples) < before


def test_lora_options_without_a_rank_are_refused(tmp_path):
    with pytest.raises(ExmeError, match="lora_alpha and lora_targets need lora_r"):
        FinetuneConfig.from_options(model=tmp_path, data=tmp_path / "d.jsonl", output=tmp_path / "o", lora_alpha=16)


def test_a_lora_target_the_model_lacks_is_named(tmp_path):
    from exme.testing import make_tiny_model

    base = make_tiny_model(tmp_path / "base", seed=0)
    config = FinetuneConfig.from_options(model=base, data=_data(tmp_path / "d.jsonl"), output=tmp_path / "o",
                                         max_steps=1, lora_r=2, lora_targets=["qkv_proj"])
    with pytest.raises(ExmeError, match="the model has no module named 'qkv_proj'; LoRA can target .*q_proj"):
        finetune(config)
    assert not (tmp_path / "o").exists()
