"""One evaluator-spec parser: `exme eval` (load_evaluator) and PIPELINE.yaml classify every spec alike,
and the pipeline config reads the backend registry."""

from __future__ import annotations

import pytest

from exme.errors import ExmeError
from exme.evaluate import parse_evaluator_spec

from .conftest import write_jsonl

SPECS = [
    ("suite.yaml", "suite"),  # exists
    ("suite.json", "suite"),  # exists: a JSON document is YAML
    ("missing.json", "suite"),  # the pipeline used to call this a suite file and exme eval an error
    ("missing.yml", "suite"),
    ("suite_without_suffix", "suite"),  # an existing file
    ("exme.testing:char_tokenizer", "custom"),
    ("lm-eval:arc_easy", "lm-eval"),
    ("nonsense", None),  # neither: the same one-line error from both
]


@pytest.fixture
def specs_root(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "target": "t"}, {"prompt": "q", "target": "u"}])
    text = "tasks:\n  - {name: t, kind: generate, data: d.jsonl}\n"
    (tmp_path / "suite.yaml").write_text(text)
    (tmp_path / "suite_without_suffix").write_text(text)
    (tmp_path / "suite.json").write_text('{"tasks": [{"name": "t", "kind": "generate", "data": "d.jsonl"}]}')
    return tmp_path


def _config(tiny_models, root, **extra):
    from exme.pipeline.config import PipelineConfig

    raw = {"base": str(tiny_models.base), "checkpoints": [str(tiny_models.sft1), str(tiny_models.sft2)],
           "output": str(root / "out"), **extra}
    return PipelineConfig.from_dict(raw, root=root, source="p.yaml")


@pytest.mark.parametrize("text, kind", SPECS)
def test_exme_eval_and_the_pipeline_read_a_spec_alike(tiny_models, specs_root, text, kind):
    if kind is None:
        with pytest.raises(ExmeError) as by_eval:
            parse_evaluator_spec(text, root=specs_root)
        with pytest.raises(ExmeError) as by_pipeline:
            _config(tiny_models, specs_root, suite=text)
        assert str(by_eval.value) in str(by_pipeline.value) and "neither a suite YAML file" in str(by_eval.value)
        return
    parsed = parse_evaluator_spec(text, root=specs_root)
    assert parsed.kind == kind
    if kind == "suite" and not parsed.path.is_file():
        with pytest.raises(ExmeError, match=f"suite file {specs_root / text} not found"):
            _config(tiny_models, specs_root, suite=text)
        return
    config = _config(tiny_models, specs_root, suite=text)
    from_config = config.evaluator_spec()
    assert from_config.kind == kind
    if kind == "suite":
        assert from_config.path == parsed.path == specs_root / text


def test_a_json_suite_loads_in_exme_eval_and_the_pipeline(tiny_models, specs_root):
    from exme.evaluate import load_evaluator
    from exme.pipeline.run import Runner

    direct = load_evaluator(specs_root / "suite.json")
    runner = Runner(_config(tiny_models, specs_root, suite="suite.json", dev={"confirm_fraction": 0}), progress=False)
    assert direct.counts() == runner.evaluator.counts() == {"dev": {"t": 1}, "test": {"t": 1}}


def test_the_pipeline_reads_backends_from_the_registry(tiny_models, specs_root):
    from pydantic import Field

    from exme.common import StrictModel
    from exme.evaluate.backends import BackendEntry, register_backend, unregister_backend

    class Options(StrictModel):
        width: int = Field(1, ge=1)

    register_backend(BackendEntry("other", "a test engine", factory=lambda *a, **k: None, options=Options,
                                  serves=frozenset({"suite"})))
    try:
        config = _config(tiny_models, specs_root, suite="suite.yaml", backend="other")
        assert config.backend == "other" and config.engine_options() == {"width": 1}
        config = _config(tiny_models, specs_root, suite="suite.yaml", backend="other", backend_options={"width": 3})
        assert config.engine_options() == {"width": 3}
        with pytest.raises(ExmeError, match=r"p.yaml: .*backend_options key 'width': Input should be greater"):
            _config(tiny_models, specs_root, suite="suite.yaml", backend="other", backend_options={"width": 0})
        with pytest.raises(ExmeError, match="backend_options key 'depth': backend other has no such option"):
            _config(tiny_models, specs_root, suite="suite.yaml", backend="other", backend_options={"depth": 2})
        with pytest.raises(ExmeError, match=r"p.yaml: 'backend': backend 'onnx' is not one of \['hf', 'vllm', 'other'\]"):
            _config(tiny_models, specs_root, suite="suite.yaml", backend="onnx")
        with pytest.raises(ExmeError, match="backend other scores suite YAML tasks only, not 'exme.testing:char_tokenizer'"):
            _config(tiny_models, specs_root, suite="exme.testing:char_tokenizer", backend="other")
    finally:
        unregister_backend("other")
    assert _config(tiny_models, specs_root, suite="suite.yaml").engine_options() == {}
