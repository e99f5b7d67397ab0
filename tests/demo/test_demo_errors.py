"""`exme demo` refuses, before any work, to delete or overwrite what it did not write."""

from __future__ import annotations

import pytest

from exme.cli import main
from exme.demo.run import run_demo
from exme.errors import ExmeError


def test_fresh_never_deletes_a_folder_holding_other_files(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("precious")
    with pytest.raises(ExmeError, match="thesis.tex"):
        run_demo(workdir=work, output=tmp_path / "run", fresh=True, quick=True, progress=False, threads=None)
    assert (work / "thesis.tex").read_text() == "precious"


def test_output_must_be_a_run_folder_or_new_and_outside_the_workdir(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ExmeError, match="not an exme run folder"):
        run_demo(workdir=tmp_path / "work", output=other, quick=True, progress=False, threads=None)
    with pytest.raises(ExmeError, match="must not be inside --workdir"):
        run_demo(workdir=tmp_path / "work", output=tmp_path / "work" / "run", quick=True, progress=False, threads=None)
    assert (other / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "work").exists()


def test_cli_demo_error_is_one_line_with_exit_2(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.me").write_text("x")
    code = main(["demo", "--workdir", str(work), "--output", str(tmp_path / "run"), "--fresh", "--quick"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("exme: error: --workdir") and err.strip().count("\n") == 0
