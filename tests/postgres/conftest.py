"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl on a free port, stopped at the end.

Server binaries come from PATH (or Debian's /usr/lib/postgresql/*/bin) when installed, otherwise from
the ``pgserver`` wheel, a test dependency that bundles them, so a fresh machine has a server too.
``initdb`` refuses to run as root: as root (CI containers) the cluster runs as ``nobody``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PIPELINE_TESTS = HERE.parent / "pipeline"

# The pipeline tests' fixtures (a tiny SFT run, a tiny suite), shared without copying them.
_spec = importlib.util.spec_from_file_location("exme_pipeline_test_fixtures", PIPELINE_TESTS / "conftest.py")
_pipeline = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _pipeline
_spec.loader.exec_module(_pipeline)
sft_run = _pipeline.sft_run
tiny_suite = _pipeline.tiny_suite
_one_torch_thread = _pipeline._one_torch_thread  # in-process runs sum as the --threads 1 workers do

USER, PASSWORD, DATABASE = "exme", "exme-test-pw", "exme_test"


@dataclass
class Cluster:
    host: str
    port: int
    root: Path

    def url(self, user: str = USER, password: str = PASSWORD, database: str = DATABASE) -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{database}"


def _readable_by_others(path: Path) -> bool:
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def server_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: $EXME_TEST_PG_BIN, PATH, Debian's layout, or the pgserver wheel."""
    if os.environ.get("EXME_TEST_PG_BIN"):
        return Path(os.environ["EXME_TEST_PG_BIN"])
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if debian:
        return debian[-1].parent
    try:
        import pgserver
    except ImportError:
        return None
    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin"
    return bundled if (bundled / "pg_ctl").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_cluster():
    """A running cluster with database ``exme_test`` owned by password user ``exme``; removed afterwards."""
    bindir = server_bin()
    if bindir is None:
        message = "no PostgreSQL server binaries: install postgresql or `pip install pgserver` (a test dependency)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with throwaway_cluster(bindir) as cluster:
        yield cluster


@contextlib.contextmanager
def throwaway_cluster(bindir: Path):
    """Start a cluster from the server binaries in ``bindir`` (also used by benchmarks/soak_workers.py)."""
    root = Path(tempfile.mkdtemp(prefix="exme-pg-"))
    started = False
    try:
        run_as: dict = {}
        if os.getuid() == 0:  # initdb refuses root: the cluster belongs to an unprivileged user
            nobody = pwd.getpwnam("nobody")
            run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            if not _readable_by_others(bindir / "initdb"):  # e.g. the wheel inside /root: copy it where the user can run it
                # keep the wheel's layout: its binaries find their libraries at $ORIGIN/../../../pgserver.libs
                copy = root / "pg" / bindir.parents[1].name / bindir.parent.name
                shutil.copytree(bindir.parent, copy, symlinks=True)
                libs = bindir.parents[2] / f"{bindir.parents[1].name}.libs"
                if libs.is_dir():
                    shutil.copytree(libs, root / "pg" / libs.name, symlinks=True)
                bindir = copy / "bin"
                for path in [root / "pg", *(root / "pg").rglob("*")]:
                    path.chmod(path.stat().st_mode | 0o005 if path.is_dir() or os.access(path, os.X_OK) else path.stat().st_mode | 0o004)
            os.chown(root, nobody.pw_uid, nobody.pw_gid)
        root.chmod(0o755)
        data, sockets, log = root / "data", root / "sock", root / "server.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "HOME": str(root)}

        def run(*cmd: str) -> None:
            done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=120, **run_as)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

        pwfile = root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if run_as:
            os.chown(pwfile, run_as["user"], run_as["group"])
        run(str(bindir / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(pwfile), "--auth=scram-sha-256",
            "--locale=C", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        if run_as:
            os.chown(root, 0, 0)
            root.chmod(0o755)
            sockets.mkdir()
            os.chown(sockets, run_as["user"], run_as["group"])
            log.touch()
            os.chown(log, run_as["user"], run_as["group"])
        else:
            sockets.mkdir()
        port = _free_port()
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=50"
        started = True  # from here on the server is stopped whatever happens
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        yield Cluster("127.0.0.1", port, root)
    finally:
        if started:
            stopped = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                                     env=env, cwd="/", capture_output=True, timeout=60, **run_as)
            pidfile = data / "postmaster.pid"
            if stopped.returncode != 0 and pidfile.exists():  # pg_ctl could not stop it: kill the postmaster
                try:
                    os.kill(int(pidfile.read_text().split()[0]), 9)
                except (OSError, ValueError):
                    pass
                time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)


def create_database(cluster: Cluster, name: str) -> str:
    """A fresh, empty database on ``cluster`` (a test that counts rows must not share one); its URL."""
    import psycopg

    with psycopg.connect(host=cluster.host, port=cluster.port, user=USER, password=PASSWORD, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return cluster.url(database=name)


@pytest.fixture
def pg_database(pg_cluster):
    """``make(name)``: a fresh database on the session's cluster, its URL."""
    return lambda name: create_database(pg_cluster, name)
