"""The study storage is opened before anything is created: bad URLs, servers, passwords, drivers are one line."""

from __future__ import annotations

import sys

import pytest
import yaml

from exme.cli import main


@pytest.fixture
def pipeline_file(tmp_path, sft_run, tiny_suite):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
        "output": str(tmp_path / "run"), "alpha": {"grid": [0.1]}, "beta": {"grid": [0.5]}, "baselines": [],
    }))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("exme: error: ")
    return err


@pytest.mark.parametrize("command", ["run", "rank"])
def test_unreachable_server_is_one_line_and_leaves_no_output_folder(pipeline_file, tmp_path, capsys, command):
    code = main([command, str(pipeline_file), "--storage", "postgresql://nobody@127.0.0.1:1/x"])
    err = _one_line_error(capsys)
    assert code == 2
    assert "database 'x' on 127.0.0.1:1" in err and "Connection refused" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "user, password, database, reason",
    [("exme", "wrong-password", "exme_test", "password authentication failed"),
     ("nobody_here", "x", "exme_test", "password authentication failed"),
     ("exme", "exme-test-pw", "no_such_db", 'database "no_such_db" does not exist')],
)
def test_unauthorised_or_missing_database_is_one_line(pg_cluster, pipeline_file, tmp_path, capsys, user, password, database, reason):
    code = main(["run", str(pipeline_file), "--storage", pg_cluster.url(user, password, database)])
    err = _one_line_error(capsys)
    assert code == 2 and reason in err and f"database {database!r} on 127.0.0.1:{pg_cluster.port}" in err
    assert password not in err or password == "x"  # the password is never shown
    assert not (tmp_path / "run").exists()


def test_the_right_credentials_open_the_storage(pg_cluster):
    from exme.search.study import check_storage

    check_storage(pg_cluster.url())  # no error


@pytest.mark.parametrize(
    "url, blocked, hint",
    [("postgresql://u@127.0.0.1:1/x", "psycopg", "pip install 'exme[postgres]'"),
     ("postgresql+psycopg2://u:secret@127.0.0.1:1/x", "psycopg2", "psycopg2-binary")],
)
def test_missing_driver_names_the_extra(pipeline_file, tmp_path, capsys, monkeypatch, url, blocked, hint):
    monkeypatch.setitem(sys.modules, blocked, None)  # as if not installed: import raises ImportError
    code = main(["run", str(pipeline_file), "--storage", url])
    err = _one_line_error(capsys)
    assert code == 2 and hint in err and "secret" not in err
    assert not (tmp_path / "run").exists()
