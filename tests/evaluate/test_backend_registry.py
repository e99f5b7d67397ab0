"""The backend registry: a backend registered by name is built through its factory by `exme eval` and by
the pipeline's live target, its options validated by its own model; bad names and options are one line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from pydantic import Field

from exme.common import StrictModel
from exme.errors import ExmeError
from exme.evaluate.backends import BackendEntry, LiveTarget, get_backend, register_backend, unregister_backend

from .conftest import write_jsonl, write_suite


class CountingOptions(StrictModel):
    batch_size: int = Field(2, ge=1)


class CountingEngine:
    """An engine of its own: the transformers backend over a module it loads (or the live one), counting calls."""

    name = "counting"

    def __init__(self, model_path, *, device, dtype, tokenizer_path=None, seed=0, live=None, batch_size=2):
        from exme.common import load_model, load_tokenizer
        from exme.evaluate.backends.hf import HFBackend

        module = live.model if live is not None else load_model(model_path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(tokenizer_path or model_path)
        self.inner = HFBackend(module, tokenizer, batch_size=batch_size, mc_batch_size=batch_size)
        self.batch_size = batch_size
        self.calls = 0
        self.swaps: list = []

    def generate(self, prompts, **kwargs):
        self.calls += 1
        return self.inner.generate(prompts, **kwargs)

    def loglikelihood(self, requests, **kwargs):
        self.calls += 1
        return self.inner.loglikelihood(requests, **kwargs)

    def token_nll(self, documents, **kwargs):
        self.calls += 1
        return self.inner.token_nll(documents, **kwargs)

    def load_weights(self, weights):
        self.inner.load_weights(weights)

    def load_from(self, live):
        self.swaps.append(live.current)


@pytest.fixture
def counting():
    engines: list[CountingEngine] = []

    def factory(model_path, **kwargs):
        engines.append(CountingEngine(model_path, **kwargs))
        return engines[-1]

    register_backend(BackendEntry("counting", "a test engine", factory=factory, options=CountingOptions))
    yield engines
    unregister_backend("counting")


@pytest.fixture
def suite_file(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", [{"question": f"{a} plus {a}?", "choices": [str(2 * a), str(a), "no"], "label": 0}
                                        for a in range(6)])
    write_jsonl(tmp_path / "ppl.jsonl", [{"text": f"the {w} sat on the mat."} for w in ("cat", "dog", "cow", "owl")])
    write_jsonl(tmp_path / "gen.jsonl", [{"prompt": f"say {w}", "target": w} for w in ("a", "b", "c", "d")])
    return write_suite(
        tmp_path / "suite.yaml",
        "tasks:\n  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n  - {name: ppl, kind: perplexity, data: ppl.jsonl}\n"
        "  - {name: gen, kind: generate, data: gen.jsonl, max_new_tokens: 4}\n",
    )


def test_exme_eval_builds_a_registered_backend_through_its_factory(tiny_lm, suite_file, counting, tmp_path, run_cli):
    from exme.evaluate.run import evaluate_folder

    _, _, model_dir = tiny_lm
    on_engine = evaluate_folder(model_dir, suite_file, split="dev", backend="counting", engine_options={"batch_size": 3})
    on_hf = evaluate_folder(model_dir, suite_file, split="dev", backend="hf")
    (engine,) = counting
    assert engine.batch_size == 3 and engine.calls == 3  # one call per task, with the option given
    for task in ("mc", "ppl", "gen"):
        assert on_engine["dev"].per_item[task] == pytest.approx(on_hf["dev"].per_item[task], rel=1e-5, abs=1e-6)
    # The CLI passes --backend-option through to the same factory, and records the backend.
    out = tmp_path / "scores.json"
    code, _, err = run_cli("eval", model_dir, "--suite", suite_file, "--split", "dev", "--backend", "counting",
                           "--backend-option", "batch_size=5", "--json", out)
    assert code == 0, err
    assert counting[-1].batch_size == 5 and json.loads(out.read_text())["backend"] == "counting"


def test_the_live_target_starts_a_registered_engine_once_and_swaps_on_change(tiny_lm, counting):
    model, _, model_dir = tiny_lm
    live = SimpleNamespace(model=model, current=("a",), dtype=torch.float32)
    target = LiveTarget("counting", lambda: live, model_path=model_dir, batch_size=4)
    engine = target()
    assert counting == [engine] and engine.batch_size == 4 and engine.swaps == [("a",)]
    assert target() is engine and engine.swaps == [("a",)]  # same candidate: no reload
    live.current = ("b",)
    assert target() is engine and engine.swaps == [("a",), ("b",)]
    with pytest.raises(ExmeError, match="backend option 'batch_size': Input should be greater than or equal to 1"):
        LiveTarget("counting", lambda: live, model_path=model_dir, batch_size=0)
    # hf has no factory: the live module itself is scored.
    assert LiveTarget("hf", lambda: live, model_path=model_dir)() is model


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "onnx"], "backend 'onnx' is not one of ['hf', 'vllm', 'counting']"),
        (["--backend", "counting", "--backend-option", "batch_size=0"],
         "--backend-option 'batch_size': Input should be greater than or equal to 1 (got 0)"),
        (["--backend", "counting", "--backend-option", "batch_sise=4"],
         "--backend-option 'batch_sise': backend counting has no such option; its options are ['batch_size']"),
        (["--backend", "counting", "--backend-option", "batch_size"], "--backend-option 'batch_size': write KEY=VALUE"),
        (["--backend-option", "max_model_len=64"], "--backend-option 'max_model_len': backend hf takes no options"),
    ],
)
def test_bad_backend_or_option_is_one_line_naming_it_before_any_model_loads(tmp_path, suite_file, counting, run_cli,
                                                                            args, message):
    code, _, err = run_cli("eval", tmp_path / "no_model_here", "--suite", suite_file, *args)
    assert code == 2 and err.startswith("exme: error: ") and err.count("\n") == 1
    assert message in err
    assert counting == []


def test_the_registry_answers_what_a_backend_cannot_serve():
    vllm = get_backend("vllm")
    assert vllm.refusal("suite", "s.yaml") is None
    assert vllm.refusal("lm-eval", "lm-eval:arc_easy") is None  # lm-eval's model interface over the engine
    assert vllm.refusal("custom", "m:f").startswith("backend vllm scores suite YAML tasks and lm-eval tasks only, not 'm:f'")
    assert get_backend("hf").refusal("custom", "m:f") is None
