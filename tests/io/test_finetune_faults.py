"""`exme finetune` on a disk without room: refused before training, or, when the disk fills up during
the run, one line, the checkpoint being written removed, the complete ones kept and listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exme.errors import ExmeError
from exme.finetune import FinetuneConfig, finetune, list_checkpoints
from exme.testing import make_tiny_model


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q: {i}+1=", "completion": f"{i + 1}"}) + "\n" for i in range(8)))
    return path


def _config(base, data, output, **kw) -> FinetuneConfig:
    options = {"max_steps": 3, "save_steps": 1, "batch_size": 8, "progress": False, **kw}
    return FinetuneConfig(model=base, data=data, output=output, **options)


def _kb_used(folder: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4 for p in folder.rglob("*") if p.is_file())


def test_finetune_checks_room_for_its_checkpoints_then_removes_one_cut_short(tmp_path, tmpfs, monkeypatch):
    base = make_tiny_model(tmp_path / "base", seed=0)
    data = _data(tmp_path)
    probe = finetune(_config(base, data, tmp_path / "probe", max_steps=1))  # the size of one checkpoint here
    one = _kb_used(probe.checkpoints[0])
    disk = tmpfs(one * 3 // 2 + 8)  # one checkpoint and a half
    checked = []
    with pytest.raises(ExmeError) as err:
        finetune(_config(base, data, disk / "run"))
    assert f"finetune output {disk / 'run'}: needs " in str(err.value) and "free on its filesystem" in str(err.value)
    assert list(disk.iterdir()) == []

    # The check passed (the disk filled up later): the second save meets a real ENOSPC.
    from exme.io import writer

    monkeypatch.setattr(writer, "check_output_location", lambda *a, **k: checked.append(1) or 0)
    with pytest.raises(ExmeError) as err:
        finetune(_config(base, data, disk / "run"))
    message = str(err.value)
    assert "(ENOSPC)" in message and "removed the incomplete checkpoint-2" in message and "\n" not in message, message
    assert [c.name for c in list_checkpoints(disk / "run")] == ["checkpoint-1"]
    assert (disk / "run" / "checkpoint-1" / "trainer_state.json").is_file()
    assert checked == [1]
