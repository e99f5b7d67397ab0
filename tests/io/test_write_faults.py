"""Faults of the place written to: every writing command checks its output first (writable, room for
the planned bytes) and turns a fault while writing (ENOSPC, EROFS, EIO, the folder removed) into one
line naming the path, exit 2, with no temporary folder left and the inputs untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from exme.io import writer


def tree(folder: Path) -> list[str]:
    """Every entry under ``folder`` (hidden ones too): what a failed write must not leave."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("exme: error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def merge_yaml(tiny_models, tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        f"merge_method: task_arithmetic\nbase_model: {tiny_models.base}\n"
        f"models:\n  - model: {tiny_models.sft1}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tiny_models.sft2}\n    parameters: {{weight: 0.5}}\n"
    )
    return path


COMMANDS = {
    "merge": lambda m, y, out: ["merge", y, out, "-q"],
    "extrapolate": lambda m, y, out: ["extrapolate", out, "--base", m.base, "--model", m.sft1, "--alpha", "0.3", "-q"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_disk_too_small_is_refused_before_any_tensor_with_needed_and_free(command, tiny_models, merge_yaml, tmpfs, run_cli):
    before = snapshot(tiny_models.root)
    disk = tmpfs(64)  # the planned model is ~4x larger
    code, _, err = run_cli(*COMMANDS[command](tiny_models, merge_yaml, disk / "out"))
    line = one_line(code, err)
    needed = writer.human_bytes(model_bytes(tiny_models.base) // 1)  # the weights alone already exceed the disk
    assert f"output {disk / 'out'}: needs " in line and " free on its filesystem" in line, line
    shown_needed, shown_free = re.search(r"needs ([\d.]+ \w+), ([\d.]+ \w+) free", line).groups()
    assert float(shown_needed.split()[0]) * 1000 ** ["B", "kB", "MB"].index(shown_needed.split()[1]) >= model_bytes(tiny_models.base) * 0.99, needed
    assert float(shown_free.split()[0]) * 1000 ** ["B", "kB", "MB"].index(shown_free.split()[1]) <= 64 * 1024 * 1.01
    assert tree(disk) == [] and snapshot(tiny_models.root) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_disk_and_a_proc_path_are_one_line(command, tiny_models, merge_yaml, tmpfs, run_cli):
    before = snapshot(tiny_models.root)
    ro = tmpfs(1024, readonly=True)
    code, _, err = run_cli(*COMMANDS[command](tiny_models, merge_yaml, ro / "out"))
    assert "the filesystem is read-only (EROFS)" in one_line(code, err) and str(ro / "out") in err
    code, _, err = run_cli(*COMMANDS[command](tiny_models, merge_yaml, "/proc/exme-out"))
    assert "/proc/exme-out" in one_line(code, err) and "cannot create a file in /proc" in err
    code, _, err = run_cli(*COMMANDS[command](tiny_models, merge_yaml, "/proc/exme/a/out"))  # parents to create
    assert "/proc/exme" in one_line(code, err)
    assert not Path("/proc/exme").exists() and snapshot(tiny_models.root) == before


def test_the_disk_filling_up_while_writing_is_one_line_and_leaves_nothing(tiny_models, merge_yaml, tmpfs, run_cli, monkeypatch):
    """The space check passed (another job filled the disk afterwards): a real ENOSPC mid-stream."""
    before = snapshot(tiny_models.root)
    disk = tmpfs(max(64, model_bytes(tiny_models.base) // 2048))  # half the weights fit
    monkeypatch.setattr(writer, "check_output_location", lambda *a, **k: 0)
    code, _, err = run_cli("merge", merge_yaml, disk / "out", "-q")
    line = one_line(code, err)
    assert str(disk / "out") in line and "no space left on the device (ENOSPC)" in line and "nothing was written" in line
    assert tree(disk) == [] and snapshot(tiny_models.root) == before


@pytest.mark.parametrize("fault", ["EIO", "EROFS", "removed"])
def test_faults_while_writing_shards_are_one_line(fault, tiny_models, merge_yaml, tmp_path, run_cli, monkeypatch):
    before = snapshot(tiny_models.root)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    real_open, real_append = writer.ShardedSafetensorsWriter._open_shard, writer.ShardedSafetensorsWriter.append
    calls = {"n": 0}

    def open_shard(self, index):
        if fault == "removed" and index == 1:  # the temporary folder vanishes under the run (a cleaner, a user)
            shutil.rmtree(self.folder)
        return real_open(self, index)

    def append(self, chunk):
        calls["n"] += 1
        if fault != "removed" and calls["n"] == 5:
            raise OSError(getattr(errno, fault), os.strerror(getattr(errno, fault)))
        return real_append(self, chunk)

    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "_open_shard", open_shard)
    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "append", append)
    code, _, err = run_cli("merge", merge_yaml, out_parent / "out", "-q", "--max-shard-size", "20KB")
    line = one_line(code, err)
    cause = {"EIO": "(EIO)", "EROFS": "(EROFS)", "removed": "(ENOENT)"}[fault]
    assert cause in line and str(out_parent / "out") in line, line
    assert tree(out_parent) == [] and snapshot(tiny_models.root) == before


def test_the_same_folder_as_base_and_model_says_so(tiny_models, tmp_path, run_cli):
    code, _, err = run_cli("extrapolate", tmp_path / "out", "--base", tiny_models.base, "--model",
                           f"{tiny_models.base}/.", "--alpha", "0.3")
    line = one_line(code, err)
    assert f"--base and --model are the same folder ({tiny_models.base.resolve()})" in line
    assert not (tmp_path / "out").exists()


def test_eval_log_samples_folder_is_checked_before_the_evaluation(tiny_models, tmpfs, run_cli, tmp_path, monkeypatch):
    from exme.evaluate import run as eval_run

    ro = tmpfs(256, readonly=True)
    suite = tmp_path / "suite.yaml"
    (tmp_path / "ppl.jsonl").write_text("".join(json.dumps({"text": f"the number {i}."}) + "\n" for i in range(4)))
    suite.write_text("name: t\nsplit: {seed: 0, dev_fraction: 0.5}\ntasks:\n  - {name: ppl, kind: perplexity, data: ppl.jsonl}\n")
    loaded = []
    real = eval_run.load_model
    monkeypatch.setattr(eval_run, "load_model", lambda *a, **k: loaded.append(1) or real(*a, **k))
    code, _, err = run_cli("eval", tiny_models.base, "--suite", suite, "--output_path", ro / "out", "--log-samples")
    assert "--log-samples folder" in one_line(code, err) and "(EROFS)" in err and loaded == []
