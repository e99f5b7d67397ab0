"""`exme finetune`'s loss log: its cadence, its first point (the untrained model), its summary line, and
library deprecation notices kept out of a quiet run."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

from exme.finetune import FinetuneConfig, completion_loss, finetune, load_examples, logging_steps, loss_summary
from exme.testing import make_tiny_model


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(tmp_path: Path, **options) -> FinetuneConfig:
    return FinetuneConfig(model=tmp_path, data=tmp_path / "d.jsonl", output=tmp_path / "o", **options)


@pytest.mark.parametrize("options,n_examples,expected", [
    ({"max_steps": 12}, 8, 1),  # short run: every step
    ({"max_steps": 100}, 8, 1),
    ({"max_steps": 101}, 8, 2),  # ceil(101 / 100)
    ({"max_steps": 250}, 8, 3),  # ceil(250 / 100)
    ({"epochs": 2, "batch_size": 8}, 37, 1),  # ceil(37 / 8) = 5 batches × 2 epochs = 10 steps
    ({"epochs": 1, "batch_size": 4}, 1000, 3),  # 250 steps
    ({"epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 2}, 1000, 3),  # 500 batches / 2 = 250 steps
    ({"max_steps": 500, "logging_steps": 7}, 8, 7),  # the user's choice wins
])
def test_logging_cadence(tmp_path, options, n_examples, expected):
    assert logging_steps(_config(tmp_path, **options), n_examples) == expected


def test_loss_summary_never_prints_one_step_as_first_and_last():
    assert loss_summary([]) is None
    assert loss_summary([(10, 1.2799)]) == "training loss 1.2799 (step 10; the only logged step)"
    assert loss_summary([(1, 2.5), (5, 1.75), (10, 1.2799)]) == (
        "training loss 2.5000 (step 1) -> 1.2799 (step 10), 3 logged steps")


def test_a_short_run_logs_every_step_from_the_untrained_model(tmp_path):
    base = make_tiny_model(tmp_path / "base", seed=0)
    records = [{"prompt": f"Q: {i}+1=", "completion": f"{i + 1}"} for i in range(8)]
    data = _write_jsonl(tmp_path / "train.jsonl", records)
    # One batch holds every example, so step 1's loss is the base model's mean completion loss on all of them.
    result = finetune(FinetuneConfig(model=base, data=data, output=tmp_path / "run", max_steps=6, save_steps=6,
                                     learning_rate=1e-2, batch_size=8, progress=False))
    assert [s for s, _ in result.loss_history] == [1, 2, 3, 4, 5, 6]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    expected = completion_loss(AutoModelForCausalLM.from_pretrained(base), tok, load_examples(data, tok), batch_size=8)
    assert result.loss_history[0][1] == pytest.approx(expected, rel=1e-4)
    assert result.loss_history[-1][1] < result.loss_history[0][1]
    saved = json.loads((tmp_path / "run" / "exme_finetune.json").read_text())["loss_history"]
    assert [tuple(x) for x in saved] == [(s, pytest.approx(v)) for s, v in result.loss_history]

    every = finetune(FinetuneConfig(model=base, data=data, output=tmp_path / "run5", max_steps=12, save_steps=12,
                                    learning_rate=1e-2, batch_size=8, logging_steps=5, progress=False))
    assert [s for s, _ in every.loss_history] == [1, 5, 10]
    assert all(math.isfinite(v) for _, v in every.loss_history)


def test_cli_prints_first_and_last_loss_of_different_steps(tmp_path, tiny_models, run_cli):
    data = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}:", "completion": str(i)} for i in range(6)])
    code, out, _ = run_cli("finetune", tiny_models.base, data, "--output", tmp_path / "run", "--max-steps", "4",
                           "--save-steps", "2", "--batch-size", "3", "--lr", "1e-3")
    assert code == 0
    history = json.loads((tmp_path / "run" / "exme_finetune.json").read_text())["loss_history"]
    (s0, l0), (s1, l1) = history[0], history[-1]
    assert (s0, s1, len(history)) == (1, 4, 4)
    assert f"training loss {l0:.4f} (step 1) -> {l1:.4f} (step 4), 4 logged steps" in out


def test_library_deprecations_are_hidden_unless_verbose():
    from exme.runtime import is_verbose, set_verbose

    before = is_verbose()

    def shown(module: str, category: type[Warning]) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            set_verbose(False)
            quiet = bool(_warn(module, category, caught))
            set_verbose(True)
            loud = bool(_warn(module, category, caught))
        return quiet, loud

    try:
        assert shown("transformers.modeling_utils", FutureWarning) == (False, True)
        assert shown("peft.tuners.lora", DeprecationWarning) == (False, True)
        assert shown("exme.finetune", FutureWarning) == (True, True)  # our own notices are never hidden
        assert shown("transformers.trainer", UserWarning) == (True, True)  # nor other kinds of warning
    finally:
        set_verbose(before)


def _warn(module: str, category: type[Warning], caught: list) -> list:
    caught.clear()
    warnings.warn_explicit("notice", category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module,
                           registry={})
    return list(caught)


def test_a_quiet_lora_run_shows_no_future_warning(tmp_path, tiny_models, run_cli):
    data = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}:", "completion": str(i)} for i in range(6)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli("finetune", tiny_models.base, data, "--output", tmp_path / "run", "--max-steps", "2",
                               "--save-steps", "2", "--batch-size", "3", "--lora-r", "2")
    assert code == 0
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    assert "FutureWarning" not in err
