"""`exme run` at the edges: a run folder without room, a study on a disk that fills up, results, report and
final model writes failing, and input files that change or vanish under the run or between two invocations."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import yaml

from exme.errors import ExmeError


class Hooked:
    """The synthetic objective, calling ``hook(n)`` at the start of its n-th evaluation (1-based) and
    remembering what it scored: split, item limit and the weights' sum of squares identify a candidate."""

    def __init__(self, inner, hook=None):
        self.inner, self.hook, self.seen = inner, hook, []

    def evaluate(self, model, tokenizer, split, limit=None):
        weights = round(float(sum((p.detach().double() ** 2).sum() for p in model.parameters())), 9)
        self.seen.append((split, limit, weights))
        if self.hook is not None:
            self.hook(len(self.seen))
        return self.inner.evaluate(model, tokenizer, split, limit)


def _config(tmp_path: Path, checkpoints: Path, base: Path, output: Path):
    from exme.pipeline import PipelineConfig

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(base), "checkpoints": str(checkpoints), "suite": "unused:score", "output": str(output),
        "alpha": {"grid": [0.1, 0.5]}, "beta": {"grid": [0.3, 0.7]}, "baselines": ["linear"],
        "dev": {"confirm_fraction": 0},
    }))
    return PipelineConfig.from_yaml(path)


def _run(config, evaluator, **kw):
    from exme.pipeline import run_pipeline

    return run_pipeline(config, evaluator=evaluator, progress=False, report=kw.pop("report", False), **kw)


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its filesystem is full; the file to remove to free it again."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def test_a_run_folder_without_room_for_the_final_model_is_refused_before_any_evaluation(sft_run, synthetic, tmpfs, tmp_path):
    disk = tmpfs(256)  # the study fits, the final model (the base's tensors) does not
    ev = Hooked(synthetic)
    with pytest.raises(ExmeError) as err:
        _run(_config(tmp_path, sft_run.run, sft_run.base, disk / "run"), ev, write_model=True)
    assert f"run folder {disk / 'run'}: needs " in str(err.value) and " free on its filesystem" in str(err.value)
    assert ev.seen == [] and list(disk.iterdir()) == []


def test_a_study_on_a_disk_that_fills_up_keeps_every_evaluation_it_had(sft_run, synthetic, tmpfs, tmp_path):
    disk = tmpfs(8192)
    config = _config(tmp_path, sft_run.run, sft_run.base, disk / "run")
    filler: list[Path] = []
    first = Hooked(synthetic, lambda n: filler.append(_fill(disk)) if n == 5 else None)
    with pytest.raises(ExmeError) as err:
        _run(config, first, write_model=False)
    message = str(err.value)
    assert message.startswith(f"study sqlite:///{disk / 'run'}") and "the disk holding it is full" in message, message
    assert "\n" not in message and len(first.seen) == 5
    filler[0].unlink()
    second = Hooked(synthetic)
    _run(config, second, write_model=False)
    # The four recorded evaluations are read back, never repeated; the fifth (never recorded) is evaluated again.
    assert not set(first.seen[:4]) & set(second.seen) and first.seen[4] in second.seen


@pytest.mark.parametrize("what", ["results.json", "report.md", "model"])
def test_faults_writing_results_report_or_final_model_are_one_line_and_resumable(what, sft_run, synthetic, tmp_path, monkeypatch):
    from exme.io import writer
    from exme.pipeline import run as run_module

    output = tmp_path / "run"
    config = _config(tmp_path, sft_run.run, sft_run.base, output)
    fault = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as patch:
        if what == "results.json":
            patch.setattr(run_module, "save_results", lambda *a: (_ for _ in ()).throw(fault))
        elif what == "report.md":
            import exme.report

            patch.setattr(exme.report, "render", lambda *a: (_ for _ in ()).throw(fault))
        else:
            patch.setattr(writer.ShardedSafetensorsWriter, "append", lambda *a: (_ for _ in ()).throw(fault))
        with pytest.raises(ExmeError) as err:
            _run(config, Hooked(synthetic), write_model=True, report=True)
    assert str(output / what) in str(err.value) and "(ENOSPC)" in str(err.value), str(err.value)
    assert not [p for p in output.iterdir() if ".exme-tmp-" in p.name or p.name.endswith(".tmp")]
    if what == "model":
        assert not (output / "model").exists()
    again = Hooked(synthetic)
    _run(config, again, write_model=True, report=True)
    # Every evaluation was kept by the failed invocation (for results.json: those before its first write).
    assert again.seen == [] if what != "results.json" else len(again.seen) < 20
    assert (output / "model" / "model.safetensors").is_file() or list((output / "model").glob("*.safetensors"))


@pytest.mark.parametrize("change", ["modified", "grown", "removed"])
def test_a_checkpoint_changing_under_the_run_is_named_and_never_scored(change, sft_run, synthetic, tmp_path):
    run = shutil.copytree(sft_run.run, tmp_path / "sft")
    target = run / "checkpoint-20" / "model.safetensors"

    def alter(n: int) -> None:
        if n != 3:
            return
        if change == "modified":
            st = target.stat()
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        elif change == "grown":
            with open(target, "ab") as fh:
                fh.write(b" ")
        else:
            target.unlink()

    config = _config(tmp_path, run, sft_run.base, tmp_path / "out")
    ev = Hooked(synthetic, alter)
    with pytest.raises(ExmeError) as err:
        _run(config, ev, write_model=False)
    how = {"modified": "was modified", "grown": "changed size", "removed": "disappeared"}[change]
    assert f"{target.resolve()} {how}" in str(err.value) and "since the preflight check" in str(err.value), str(err.value)
    assert len(ev.seen) == 3  # the evaluation during which it changed was not recorded, and none followed
    from exme.search.study import StudyStore

    with StudyStore(config.storage_url) as store:
        recorded = sum(len(store.records(s)) for s in
                       [store.study(name) for name in _study_names(config.storage_url)])
    assert recorded == 2
    if change != "removed":
        # Resuming with the changed file: refused at preflight, naming it, before any evaluation.
        again = Hooked(synthetic)
        with pytest.raises(ExmeError) as err:
            _run(config, again, write_model=False)
        assert str(target.resolve()) in str(err.value) and "since this run folder's earlier check" in str(err.value)
        assert again.seen == []


def _study_names(url: str) -> list[str]:
    import optuna

    return [s.study_name for s in optuna.get_all_study_summaries(storage=url)]


def test_a_sqlite_study_on_a_read_only_disk_is_one_line_before_anything(tmpfs, run_cli):
    from exme.search.study import check_storage

    ro = tmpfs(256, readonly=True)
    with pytest.raises(ExmeError) as err:
        check_storage(f"sqlite:///{ro}/run/study.db")
    assert f"study folder {ro}/run: cannot create a file in {ro}" in str(err.value) and "(EROFS)" in str(err.value)
