"""PIPELINE.yaml validation: every mistake is one ExmeError naming the key or path, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from exme.cli import main
from exme.errors import ExmeError
from exme.pipeline import PipelineConfig


def _write(tmp_path: Path, sft_run, tiny_suite, **changes) -> Path:
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(tmp_path / "out")}
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_valid_config_orders_checkpoints_by_step_number(tmp_path, sft_run, tiny_suite):
    cfg = PipelineConfig.from_yaml(_write(tmp_path, sft_run, tiny_suite))
    assert [p.name for p in cfg.checkpoint_paths()] == ["checkpoint-10", "checkpoint-20", "checkpoint-100"]
    assert cfg.top_k == 2 and cfg.alpha.grid[-1] == 1.0 and cfg.search.mode == "grid"
    assert cfg.storage_url == f"sqlite:///{(tmp_path / 'out' / 'study.db').resolve()}"


def test_relative_paths_are_relative_to_the_file(tmp_path, sft_run, tiny_suite):
    import shutil

    shutil.copytree(sft_run.base, tmp_path / "models" / "base")
    for c in sft_run.ckpts[:2]:
        shutil.copytree(c, tmp_path / "models" / "sft" / c.name)
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "p.yaml"
    path.write_text(
        "base: ../models/base\ncheckpoints: ../models/sft/checkpoint-*\n"
        f"suite: {tiny_suite}\noutput: ../runs/r\n"
    )
    cfg = PipelineConfig.from_yaml(path)
    assert cfg.base.resolve() == (tmp_path / "models" / "base").resolve()
    assert [p.name for p in cfg.checkpoint_paths()] == ["checkpoint-10", "checkpoint-20"]
    assert cfg.output.resolve() == (tmp_path / "runs" / "r").resolve()


def test_checkpoint_list_keeps_its_order(tmp_path, sft_run, tiny_suite):
    listed = [str(sft_run.ckpts[2]), str(sft_run.ckpts[0])]
    cfg = PipelineConfig.from_yaml(_write(tmp_path, sft_run, tiny_suite, checkpoints=listed))
    assert [p.name for p in cfg.checkpoint_paths()] == ["checkpoint-100", "checkpoint-10"]


def test_overrides_from_the_command_line_replace_file_keys(tmp_path, sft_run, tiny_suite):
    cfg = PipelineConfig.from_yaml(_write(tmp_path, sft_run, tiny_suite), storage="sqlite:///x.db", device=None)
    assert cfg.storage_url == "sqlite:///x.db" and cfg.device == "cpu"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"alpha": {"grid": [0.0, 0.5], "refin": True}}, "unknown key 'alpha.refin'"),
        ({"top_kk": 2}, "unknown key 'top_kk'"),
        ({"alpha": {"grid": [-0.1, 0.5]}}, "alpha must be >= 0"),
        ({"alpha": {"grid": []}}, "alpha grid is empty"),
        ({"alpha": {"grid": [0.1, 0.1]}}, "repeats a value"),
        ({"beta": {"grid": [0.5, 1.2]}}, "beta values must lie in [0, 1]"),
        ({"top_k": 0}, "'top_k'"),
        ({"top_k": 3}, "set search.mode: tpe"),
        ({"top_k": 4, "search": {"mode": "tpe"}}, "only 3 checkpoint(s) were found"),
        ({"search": {"mode": "random"}}, "'search.mode'"),
        ({"search": {"n_trials": 0}}, "'search.n_trials'"),
        ({"search": {"mode": "grid", "n_trials": 30}}, "search.n_trials counts TPE trials"),
        ({"search": {"prune_eta": 4}}, "only apply with search.prune: true"),
        ({"search": {"mode": "tpe"}, "beta": {"grid": [0.5]}}, "beta.grid is not used with search.mode: tpe"),
        ({"baselines": ["ties", "mergekit_magic"]}, "'baselines.1'"),
        ({"baselines": ["ties", "ties"]}, "repeat a method"),
        ({"device": "gpu"}, "device 'gpu'"),
        ({"dtype": "float8"}, "'dtype'"),
        ({"storage": "study.db"}, "not a database URL"),
        ({"base": None}, "missing key 'base'"),
    ],
)
def test_bad_values_are_one_clear_error(tmp_path, sft_run, tiny_suite, changes, expected):
    path = _write(tmp_path, sft_run, tiny_suite, **changes)
    with pytest.raises(ExmeError) as err:
        PipelineConfig.from_yaml(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_paths_are_named(tmp_path, sft_run, tiny_suite):
    cases = [
        ({"base": str(tmp_path / "nope")}, f"base folder {tmp_path / 'nope'} not found"),
        ({"checkpoints": str(tmp_path / "nope")}, "checkpoints folder"),
        ({"checkpoints": str(tmp_path / "x-*")}, "matches nothing"),
        ({"checkpoints": str(sft_run.base.parent)}, "holds no checkpoint-* folders"),
        ({"checkpoints": [str(sft_run.ckpts[0]), str(sft_run.ckpts[0])]}, "same folder twice"),
        ({"checkpoints": [str(tmp_path)]}, "has no config.json"),
        ({"suite": str(tmp_path / "missing.yaml")}, "suite file"),
        ({"output": str(sft_run.ckpts[0] / "out")}, "lies inside the checkpoint folder"),
        ({"output": str(sft_run.base)}, "lies inside the base folder"),
    ]
    for changes, expected in cases:
        with pytest.raises(ExmeError, match=".") as err:
            PipelineConfig.from_yaml(_write(tmp_path, sft_run, tiny_suite, **changes))
        assert expected in str(err.value), (changes, str(err.value))


def test_a_foreign_non_empty_output_folder_is_refused(tmp_path, sft_run, tiny_suite):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(ExmeError, match="not an exme run folder"):
        PipelineConfig.from_yaml(_write(tmp_path, sft_run, tiny_suite))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    (tmp_path / "b.yaml").write_text("base: [unclosed\n")
    with pytest.raises(ExmeError, match="expected a mapping"):
        PipelineConfig.from_yaml(tmp_path / "a.yaml")
    with pytest.raises(ExmeError, match="not valid YAML"):
        PipelineConfig.from_yaml(tmp_path / "b.yaml")
    with pytest.raises(ExmeError, match="pipeline file not found"):
        PipelineConfig.from_yaml(tmp_path / "c.yaml")


def test_cli_prints_one_line_and_exits_2(tmp_path, sft_run, tiny_suite, capsys):
    path = _write(tmp_path, sft_run, tiny_suite, beta={"grid": [2.0]})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("exme: error:") and "beta values" in err[0]
    assert main(["rank", str(tmp_path / "missing.yaml")]) == 2


def test_lm_eval_include_path_resolves_from_the_file_and_paths_are_normalised(tmp_path, sft_run, tiny_suite):
    (tmp_path / "conf" / "tasks").mkdir(parents=True)
    path = tmp_path / "conf" / "p.yaml"
    path.write_text(
        f"base: {sft_run.base}\ncheckpoints: {sft_run.run}\nsuite: 'lm-eval:exme_tiny'\n"
        "lm_eval_include_path: tasks\noutput: ../conf/../runs/r\n"
    )
    cfg = PipelineConfig.from_yaml(path)
    assert cfg.lm_eval_include_path == [str(tmp_path / "conf" / "tasks")]
    assert str(cfg.output) == str(tmp_path / "runs" / "r")  # no '..' left for the report to show


def test_the_backend_is_part_of_what_recorded_evaluations_are_keyed_by(tmp_path, sft_run, tiny_suite):
    """A run moved to vLLM must not read back transformers' scores (the engines round differently),
    while an hf run keeps the key it had before backends existed."""
    import hashlib
    import json

    from exme.pipeline.run import _fingerprint

    cfg = PipelineConfig.from_yaml(_write(tmp_path, sft_run, tiny_suite))
    suite_sha = hashlib.sha256(Path(cfg.suite).read_bytes()).hexdigest()
    legacy = json.dumps({"base": str(Path(cfg.base).resolve()), "suite": cfg.suite, "suite_sha": suite_sha,
                         "dtype": cfg.dtype, "seed": cfg.seed}, sort_keys=True)
    assert _fingerprint(cfg) == hashlib.sha256(legacy.encode()).hexdigest()[:12]
    vllm = cfg.model_copy(update={"backend": "vllm"})  # no engine needed to compute a key
    assert _fingerprint(vllm) != _fingerprint(cfg)
    assert _fingerprint(vllm) == _fingerprint(cfg.model_copy(update={"backend": "vllm"}))
