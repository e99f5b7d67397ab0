"""Temporary folders left by a killed writer are removed by the next run; a live writer's are kept."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from exme.io.writer import AtomicOutputFolder, remove_stale_temp_folders


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_folder_is_removed_and_said(tmp_path):
    """A real AtomicOutputFolder, SIGKILLed mid-write, leaves a folder the cleanup recognises."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from exme.io.writer import AtomicOutputFolder\n"
        "with AtomicOutputFolder(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")])
    assert run.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".model.exme-tmp-")]
    assert len(left) == 1
    said: list[str] = []
    assert remove_stale_temp_folders(tmp_path, say=said.append) == left
    assert not left[0].exists() and not (tmp_path / "model").exists()
    assert len(said) == 1 and str(left[0]) in said[0] and "killed" in said[0]


def test_live_writer_other_host_and_foreign_folders_are_kept(tmp_path):
    host = socket.gethostname()
    live = tmp_path / f".model.exme-tmp-{os.getpid()}@{host}@abc123"
    other_host = tmp_path / f".model.exme-tmp-{_dead_pid()}@not-{host}@abc123"
    unrelated = tmp_path / ".model.something-else"
    for folder in (live, other_host, unrelated):
        folder.mkdir()
    assert remove_stale_temp_folders(tmp_path, say=lambda _: None) == []
    assert live.exists() and other_host.exists() and unrelated.exists()
    with AtomicOutputFolder(tmp_path / "model") as tmp:  # this process's own writer is alive
        assert remove_stale_temp_folders(tmp_path, say=lambda _: None) == [] and tmp.exists()


def test_previous_output_moved_aside_is_put_back(tmp_path):
    """Killed between its two renames, a replacing write leaves the previous model in .exme-old-: restore it."""
    old = tmp_path / f".model.exme-old-{_dead_pid()}@{socket.gethostname()}@xyz"
    (old / "previous").mkdir(parents=True)
    (old / "previous" / "config.json").write_text("{}")
    said: list[str] = []
    remove_stale_temp_folders(tmp_path, say=said.append)
    assert (tmp_path / "model" / "config.json").read_text() == "{}" and not old.exists()
    assert any("restored" in line for line in said)


def test_a_killed_writers_half_written_file_is_removed_a_live_or_foreign_one_kept(tmp_path, monkeypatch):
    """results.json, report.md and preflight.json are written as .NAME.PID@HOST.tmp then renamed."""
    from exme.io.writer import temp_file_name
    from exme.report.render import _write_atomic

    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from exme.io.writer import temp_file_name\n"
        "tmp = Path(sys.argv[1]) / temp_file_name('results.json')\n"
        "tmp.write_text('{\"half\": ')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path)]).returncode == -signal.SIGKILL
    dead = [p for p in tmp_path.iterdir() if p.name.startswith(".results.json.")]
    live = tmp_path / temp_file_name("report.md")
    live.write_text("being written")
    foreign = tmp_path / f".results.json.{_dead_pid()}@not-{socket.gethostname()}.tmp"
    foreign.write_text("another host's")
    said: list[str] = []
    assert remove_stale_temp_folders(tmp_path, say=said.append) == dead and len(dead) == 1
    assert live.exists() and foreign.exists() and "killed" in said[0]
    # The report writer's temporary name is one the cleanup knows.
    renamed: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(src).name) or real_replace(src, dst))
    _write_atomic(tmp_path / "results.json", "{}")
    assert renamed == [temp_file_name("results.json")] and (tmp_path / "results.json").read_text() == "{}"
