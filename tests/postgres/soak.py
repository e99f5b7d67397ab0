"""Workers killed again and again: three `exme run` processes share one PostgreSQL study and one run folder,
each SIGKILLed at random moments and started again, until the run is complete. Then the outcome is
compared with one uninterrupted single-worker run. Used by tests/postgres/test_soak.py (bounded) and
benchmarks/soak_workers.py (long); no pytest here.

Each process incarnation logs, through ``pg_objective``, one line per evaluation *before* scoring it,
into a log file of its own. So every evaluation that happened is known, and which process did it:
a candidate evaluated more than once is explained only if every extra evaluation is the last line of an
incarnation that was killed (it died before its result was recorded, and another worker redid it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
PIPELINE_TESTS = HERE.parent / "pipeline"


def write_config(path: Path, base: Path, run: Path, output: Path, alphas: list[float], betas: list[float]) -> Path:
    raw = {
        "base": str(base), "checkpoints": str(run), "suite": "pg_objective:score", "output": str(output),
        "alpha": {"grid": alphas}, "beta": {"grid": betas}, "baselines": ["linear"],
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def start_worker(config: Path, storage: str | None, log: Path, base: Path, ckpts: list[Path], sleep: float) -> subprocess.Popen:
    env = {
        **os.environ, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(PIPELINE_TESTS), str(SRC), os.environ.get("PYTHONPATH", "")]),
        "EXME_PG_LOG": str(log), "EXME_PG_SLEEP": str(sleep), "EXME_PG_KILL_AT": "",
        "EXME_PG_BASE": str(base), "EXME_PG_SFT1": str(ckpts[0]), "EXME_PG_SFT2": str(ckpts[1]),
    }
    cmd = [sys.executable, "-c", "from exme.cli import _entry; _entry()", "run", str(config), "--quiet", "--threads", "1"]
    if storage:
        cmd += ["--storage", storage]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@dataclass
class SoakResult:
    kills: int
    kills_mid_evaluation: int  # aimed at a worker within its evaluation (its log line just written)
    incarnations: int
    seconds: float
    evaluations: int
    reference_evaluations: int
    extra: dict[str, int] = field(default_factory=dict)  # candidate line -> extra evaluations
    unexplained: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def soak(config: Path, storage: str, logs: Path, base: Path, ckpts: list[Path], reference_log: Path, *,
         kills: int, seed: int, sleep: float, kill_after: tuple[float, float], timeout_s: float) -> SoakResult:
    """Run three workers until all exit 0, killing one ``kills`` times; return what was evaluated.

    Half of the kills (by the seeded coin) wait for a worker that has just logged an evaluation and kill
    it inside that evaluation; the others hit a random live worker at a random moment (start-up, the
    study, between evaluations, the final model and report writes)."""
    rng = random.Random(seed)
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs: dict[int, subprocess.Popen] = {}
    born: dict[int, float] = {}
    incarnation: dict[int, int] = {}
    killed_logs: list[Path] = []
    done: set[int] = set()
    n_kills = mid = 0
    aim = rng.random() < 0.5

    def log_of(slot: int) -> Path:
        return logs / f"worker{slot}-{incarnation[slot]:03d}.log"

    def launch(slot: int) -> None:
        incarnation[slot] = incarnation.get(slot, -1) + 1
        procs[slot] = start_worker(config, storage, log_of(slot), base, ckpts, sleep)
        born[slot] = time.monotonic()

    for slot in range(3):
        launch(slot)
    next_kill = time.monotonic() + rng.uniform(*kill_after)
    while len(done) < 3:
        if time.monotonic() - started > timeout_s:
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise TimeoutError(f"soak not finished after {timeout_s} s ({n_kills} kills)")
        for slot, p in procs.items():
            if slot in done or p.poll() is None:
                continue
            if p.returncode != 0:
                raise AssertionError(f"worker {slot} exited {p.returncode}:\n{p.stderr.read()[-3000:]}")
            done.add(slot)
        alive = [s for s, p in procs.items() if s not in done and p.poll() is None]
        now = time.monotonic()
        if n_kills < kills and alive and now >= next_kill:
            if aim:  # a worker whose log line is under 0.1 s old is inside that evaluation (it sleeps after logging)
                busy = [s for s in alive if log_of(s).exists() and time.time() - log_of(s).stat().st_mtime < 0.1]
                slot = rng.choice(busy) if busy else None
                if slot is None and now - next_kill > 20:
                    slot = rng.choice(alive)  # nobody evaluating for a long time: a plain kill
            else:
                slot = rng.choice(alive)
            if slot is not None:
                os.killpg(procs[slot].pid, signal.SIGKILL)
                procs[slot].wait()
                killed_logs.append(log_of(slot))
                n_kills += 1
                mid += int(aim and slot is not None and time.time() - log_of(slot).stat().st_mtime < 0.25
                           if log_of(slot).exists() else 0)
                launch(slot)
                next_kill = time.monotonic() + rng.uniform(*kill_after)
                aim = rng.random() < 0.5
        time.sleep(0.01)
    seconds = time.monotonic() - started

    every = [line for log in sorted(logs.glob("worker*.log")) for line in lines(log)]
    reference = Counter(lines(reference_log))
    counts = Counter(every)
    extra = {c: counts[c] - reference[c] for c in counts if counts[c] > reference[c]}
    missing = sorted(c for c in reference if counts[c] < reference[c])
    # An extra evaluation is explained by a kill: it is the last line an incarnation logged before it was killed.
    last_of_killed = Counter(lines(log)[-1] for log in killed_logs if lines(log))
    unexplained = sorted(c for c, n in extra.items() if n > last_of_killed[c])
    return SoakResult(n_kills, mid, sum(incarnation.values()) + 3, seconds, len(every), sum(reference.values()),
                      extra, unexplained, missing)


def run_reference(config: Path, log: Path, base: Path, ckpts: list[Path], sleep: float) -> None:
    proc = start_worker(config, None, log, base, ckpts, sleep)
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"reference run exited {proc.returncode}:\n{err[-3000:]}")


def comparable_results(output: Path) -> dict:
    """results.json without what differs between two correct runs: the run folder's path, the storage URL,
    creation time, wall times and seconds per evaluation, the threads, the evaluation counts, and the
    per-invocation notes (and the cost projection's measured rate)."""
    text = (output / "results.json").read_text().replace(str(output), "<run folder>")
    data = json.loads(text)
    # "evaluations" counts what this run did, kills included (the soak checks those counts itself); the
    # cost projection note holds a measured rate.
    for key in ("created", "timings", "threads", "evaluations"):
        data.pop(key, None)
    data["config"].pop("storage", None)
    data["notes"] = [n for n in data["notes"] if not n.startswith("this invocation evaluated")
                     and "is written by another worker" not in n and "items/s" not in n]

    def drop_seconds(node):
        if isinstance(node, dict):
            return {k: drop_seconds(v) for k, v in node.items() if k not in ("seconds", "reused", "number")}
        if isinstance(node, list):
            return [drop_seconds(v) for v in node]
        return node

    return drop_seconds(data)


def model_bytes(output: Path) -> dict[str, bytes]:
    """The final model's weights and config, byte for byte (the model card carries a date)."""
    folder = output / "model"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")}


def leftovers(output: Path) -> list[str]:
    """Temporary folders and half-written files of killed writers anywhere in the run folder."""
    return sorted(str(p.relative_to(output)) for p in output.rglob("*")
                  if ".exme-tmp-" in p.name or ".exme-old-" in p.name or p.name.endswith(".tmp"))


def worker_rows(storage: str) -> tuple[int, int]:
    """(claims, heartbeat rows) left in the study's database."""
    import sqlalchemy as sa

    engine = sa.create_engine(storage, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            claims = conn.execute(sa.text("SELECT count(*) FROM exme_claims")).scalar_one()
            workers = conn.execute(sa.text("SELECT count(*) FROM exme_workers")).scalar_one()
    finally:
        engine.dispose()
    return int(claims), int(workers)
