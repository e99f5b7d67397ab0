"""What a first day with the CLI runs into: help text, aliases, early one-line refusals, interrupts."""

from __future__ import annotations

import json
import re

import pytest
import torch


NO_CUDA = not torch.cuda.is_available()



@pytest.fixture
def model_files_reader():
    """Every tensor of a model folder, read with the safetensors library (not exme.io)."""
    from safetensors import safe_open

    def read(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as fh:
                out.update({name: fh.get_tensor(name) for name in fh.keys()})
        return out

    return read


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("exme: error: "), err
    return lines[0]


@pytest.fixture
def pipeline_yaml(tiny_models, tmp_path):
    (tmp_path / "mc.jsonl").write_text(
        "".join(json.dumps({"question": f"{a} + 1 =", "choices": [str(a + 1), str(a + 2)], "label": 0}) + "\n" for a in range(8))
    )
    (tmp_path / "suite.yaml").write_text("tasks:\n  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n")
    path = tmp_path / "PIPELINE.yaml"
    path.write_text(
        f"base: {tiny_models.base}\ncheckpoints: [{tiny_models.sft1}, {tiny_models.sft2}]\n"
        f"suite: suite.yaml\noutput: run\n"
    )
    return path


# ---------------------------------------------------------------------------------------------- help


def test_version_prints_the_package_version(run_cli):
    from exme import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"exme {__version__}"


@pytest.mark.parametrize(
    "command, usage",
    [
        ("merge", "Usage: exme merge [OPTIONS] CONFIG OUT"),
        ("run", "Usage: exme run [OPTIONS] CONFIG"),
        ("rank", "Usage: exme rank [OPTIONS] CONFIG"),
        ("eval", "Usage: exme eval [OPTIONS] MODEL_DIR"),
        ("extrapolate", "Usage: exme extrapolate [OPTIONS] OUT"),
    ],
)
def test_help_usage_names_arguments_plainly_and_flags_take_no_value(run_cli, command, usage):
    code, out, _ = run_cli(command, "--help")
    assert code == 0
    assert usage in out
    assert "<bool>" not in out and "{" not in out.splitlines()[0]


def test_extrapolate_dtype_help_does_not_mention_a_config(run_cli):
    _, out, _ = run_cli("extrapolate", "--help")
    dtype_help = " ".join(out[out.index("--dtype"):out.index("--max-shard-size")].split())
    assert "config" not in dtype_help and "fine-tuned model" in dtype_help


def test_heavy_commands_offer_threads_and_verbose(run_cli):
    for command in ("merge", "extrapolate", "eval", "run", "rank", "finetune"):
        _, out, _ = run_cli(command, "--help")
        assert "--threads" in out and "--verbose" in out, command


# ---------------------------------------------------------------------------------------------- device


@pytest.mark.skipif(not NO_CUDA, reason="needs a torch without CUDA")
def test_eval_on_cuda_without_cuda_is_one_line_and_writes_nothing(run_cli, tiny_models, tmp_path):
    out = tmp_path / "new" / "scores.json"
    code, _, err = run_cli("eval", tiny_models.base, "--suite", tmp_path / "none.yaml", "--device", "cuda", "--json", out)
    assert code == 2
    assert "--device cuda: CUDA is not available" in one_error_line(err)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not NO_CUDA, reason="needs a torch without CUDA")
@pytest.mark.parametrize("command", ["run", "rank"])
def test_pipeline_on_cuda_without_cuda_creates_no_run_folder(run_cli, pipeline_yaml, command):
    code, _, err = run_cli(command, pipeline_yaml, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in one_error_line(err)
    assert not (pipeline_yaml.parent / "run").exists()


@pytest.mark.skipif(not NO_CUDA, reason="needs a torch without CUDA")
def test_merge_accepts_mergekit_cuda_flag(run_cli, tiny_models, tmp_path):
    (tmp_path / "m.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_models.sft1}\n    parameters: {{weight: 1}}\n")
    code, _, err = run_cli("merge", tmp_path / "m.yaml", tmp_path / "m", "--cuda")
    assert code == 2 and "--device cuda: CUDA is not available" in one_error_line(err)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- merge options


def test_shard_size_without_unit_is_refused(run_cli, tiny_models, tmp_path):
    code, _, err = run_cli("extrapolate", tmp_path / "out", "--base", tiny_models.base, "--model", tiny_models.sft1,
                           "--alpha", "0.1", "--max-shard-size", "5")
    assert code == 2 and "--max-shard-size 5: give a unit, e.g. 5GB" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_out_shard_size_is_an_alias_of_max_shard_size(run_cli, tiny_models, tmp_path, model_files_reader):
    args = ["extrapolate", "--base", tiny_models.base, "--model", tiny_models.sft1, "--alpha", "0.3", "-q"]
    assert run_cli(*args, tmp_path / "a", "--out-shard-size", "20KB")[0] == 0
    assert run_cli(*args, tmp_path / "b", "--max-shard-size", "20KB")[0] == 0
    shards_a = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert len(shards_a) > 1 and shards_a == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))


def test_extrapolate_creates_missing_parent_folders(run_cli, tiny_models, tmp_path, model_files_reader):
    out = tmp_path / "deep" / "er" / "out"
    code, _, err = run_cli("extrapolate", out, "--base", tiny_models.base, "--model", tiny_models.sft1, "--alpha", "0.5", "-q")
    assert code == 0, err
    got = model_files_reader(out)
    base, sft = model_files_reader(tiny_models.base), model_files_reader(tiny_models.sft1)
    name = "model.layers.0.mlp.up_proj.weight"
    expected = sft[name].double() + 0.5 * (sft[name].double() - base[name].double())
    assert torch.allclose(got[name].double(), expected, atol=1e-6)


def test_refused_extrapolation_removes_the_parent_folders_it_created(run_cli, tiny_models, tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    code, _, err = run_cli("extrapolate", out, "--base", tmp_path / "no_base", "--model", tiny_models.sft1, "--alpha", "0.5")
    assert code == 2, err
    assert not (tmp_path / "deep").exists()


def test_negative_alpha_names_the_option(run_cli, tiny_models, tmp_path):
    code, _, err = run_cli("extrapolate", tmp_path / "out", "--base", tiny_models.base, "--model", tiny_models.sft1, "--alpha", "-0.5")
    line = one_error_line(err)
    assert code == 2 and "--alpha -0.5" in line and "parameters" not in line


def test_misspelled_merge_key_is_named(run_cli, tiny_models, tmp_path):
    (tmp_path / "m.yaml").write_text(f"merge_mehtod: linear\nmodels:\n  - model: {tiny_models.sft1}\n")
    code, _, err = run_cli("merge", tmp_path / "m.yaml", tmp_path / "out")
    line = one_error_line(err)
    assert code == 2 and "unknown key 'merge_mehtod'" in line and "'merge_method'" in line


def test_eval_and_merge_share_one_dtype_table():
    from exme.cli.merge import dtype_option

    assert [dtype_option(n) for n in ("fp16", "float16", "half", "bf16", "bfloat16", "fp32", "auto", None)] == [
        "float16", "float16", "float16", "bfloat16", "bfloat16", "float32", "auto", None
    ]


# ---------------------------------------------------------------------------------------------- eval options


def test_limit_zero_is_refused_before_the_model_is_read(run_cli, tmp_path):
    # The model folder does not exist: the --limit message proves the check came first.
    code, _, err = run_cli("eval", tmp_path / "no_model", "--suite", tmp_path / "s.yaml", "--limit", "0")
    assert code == 2 and "--limit 0" in one_error_line(err)


def test_tasks_is_lm_evals_spelling_of_an_lm_eval_suite():
    from exme.cli.evaluate import _suite_spec
    from exme.errors import ExmeError

    assert _suite_spec(None, "arc_easy,hellaswag") == "lm-eval:arc_easy,hellaswag"
    assert _suite_spec("suite.yaml", None) == "suite.yaml"
    with pytest.raises(ExmeError, match="either --suite or --tasks"):
        _suite_spec("suite.yaml", "arc_easy")
    with pytest.raises(ExmeError, match="--suite"):
        _suite_spec(None, None)


# ---------------------------------------------------------------------------------------------- threads


def test_threads_option_sets_torch_threads_and_is_printed(run_cli, pipeline_yaml, monkeypatch):
    import exme.pipeline as pipeline

    seen = {}

    def fake_rank(cfg, progress=True):
        seen["threads"] = torch.get_num_threads()
        return []

    monkeypatch.setattr(pipeline, "rank_checkpoints", fake_rank)
    before = torch.get_num_threads()
    try:
        code, out, err = run_cli("rank", pipeline_yaml, "--threads", "3")
        assert code == 0, err
        assert seen["threads"] == 3 and "threads: 3" in out
        pipeline_yaml.write_text(pipeline_yaml.read_text() + "threads: 2\n")
        code, out, err = run_cli("rank", pipeline_yaml)
        assert code == 0 and seen["threads"] == 2 and "threads: 2" in out
    finally:
        torch.set_num_threads(before)


def test_threads_below_one_are_refused(run_cli, pipeline_yaml):
    code, _, err = run_cli("rank", pipeline_yaml, "--threads", "0")
    assert code == 2 and "--threads must be at least 1" in one_error_line(err)
    pipeline_yaml.write_text(pipeline_yaml.read_text() + "threads: 0\n")
    code, _, err = run_cli("rank", pipeline_yaml)
    assert code == 2 and "'threads'" in one_error_line(err)
    assert not (pipeline_yaml.parent / "run").exists()


# ---------------------------------------------------------------------------------------------- interrupts


def test_ctrl_c_in_run_says_what_was_saved_and_exits_130(run_cli, pipeline_yaml, monkeypatch):
    import exme.pipeline as pipeline

    def interrupted(cfg, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    code, _, err = run_cli("run", pipeline_yaml)
    assert code == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert re.search(r"exme: interrupted; finished evaluations are kept in .*run/study\.db; run the same command again to resume", lines[0])


def test_ctrl_c_in_eval_says_nothing_was_saved(run_cli, tiny_models, tmp_path, monkeypatch):
    import exme.evaluate.run as run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "evaluate_folder", interrupted)
    code, _, err = run_cli("eval", tiny_models.base, "--suite", tmp_path / "s.yaml")
    assert code == 130 and "exme: interrupted; nothing was saved" in err


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("verbose", [False, True])
def test_finetune_is_quiet_by_default_and_chatty_with_verbose(run_cli, tiny_models, tmp_path, verbose):
    from exme.runtime import set_verbose

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}:", "completion": str(i)}) + "\n" for i in range(6)))
    args = ["finetune", tiny_models.base, data, "--output", tmp_path / "run", "--max-steps", "2", "--save-steps", "2",
            "--batch-size", "3", "--lr", "1e-3"]
    try:
        code, out, err = run_cli(*args, *(["--verbose"] if verbose else []))
    finally:
        set_verbose(False)
    assert code == 0, err
    # The Trainer's raw log dicts ({'loss': ...} every logging step, {'train_runtime': ...} at the end).
    assert ("'train_runtime'" in out + err) == verbose
    assert "1 checkpoints in" in out


def test_quiet_mode_turns_off_transformers_loading_bars():
    from transformers.utils import logging as hf_logging

    from exme.runtime import set_verbose

    set_verbose(True)
    assert hf_logging.is_progress_bar_enabled()
    set_verbose(False)
    assert not hf_logging.is_progress_bar_enabled()


def test_tpe_with_few_trials_per_dimension_is_warned_about(pipeline_yaml):
    from exme.cli.pipeline import _few_trials_warning
    from exme.pipeline import PipelineConfig

    text = pipeline_yaml.read_text()
    pipeline_yaml.write_text(text + "search: {mode: tpe, n_trials: 12}\n")
    warning = _few_trials_warning(PipelineConfig.from_yaml(pipeline_yaml))
    assert warning is not None and "n_trials 12 for 4 searched parameters" in warning and "n_trials ≥ 40" in warning
    pipeline_yaml.write_text(text + "search: {mode: tpe, n_trials: 40}\n")
    assert _few_trials_warning(PipelineConfig.from_yaml(pipeline_yaml)) is None
    pipeline_yaml.write_text(text)
    assert _few_trials_warning(PipelineConfig.from_yaml(pipeline_yaml)) is None  # grid search


def test_a_bad_option_value_is_a_usage_error_not_a_traceback(run_cli, tmp_path):
    code, _, err = run_cli("eval", tmp_path, "--suite", "s.yaml", "--limit", "many")
    assert code == 2 and "Traceback" not in err and "Invalid value for '--limit'" in err
    code, _, err = run_cli("merge", "--no-such-option")
    assert code == 2 and "No such option" in err and "Traceback" not in err


def test_threads_auto_is_accepted(run_cli, pipeline_yaml, monkeypatch):
    import exme.pipeline as pipeline
    from exme.threads import available_cpus

    monkeypatch.setattr(pipeline, "rank_checkpoints", lambda cfg, progress=True: [])
    before = torch.get_num_threads()
    try:
        code, out, err = run_cli("rank", pipeline_yaml, "--threads", "auto")
        assert code == 0, err
        assert re.search(rf"threads: \d+ \(auto: {available_cpus()} CPUs, load", out)
        assert 1 <= torch.get_num_threads() <= available_cpus()
    finally:
        torch.set_num_threads(before)


def test_sigterm_during_a_command_prints_what_was_kept_and_exits_143(tmp_path):
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent(
        """
        import sys, time
        import exme.evaluate.run as run
        def slow(*args, **kwargs):
            print("started", file=sys.__stderr__, flush=True)
            time.sleep(60)
        run.evaluate_folder = slow
        from exme.cli import main
        sys.exit(main(["eval", sys.argv[1], "--suite", "s.yaml", "--threads", "1"]))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr.readline().strip() == b"started"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert err.decode().strip() == "exme: terminated; nothing was saved (scores are written when every split is done)"
