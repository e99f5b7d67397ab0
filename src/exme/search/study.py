"""Evaluations as Optuna trials: resumable, shareable between worker processes, deterministic.

Every evaluation of a candidate (a point of a grid, a TPE suggestion, a checkpoint of the rank stage,
a row of the final test table) becomes one COMPLETE trial of an Optuna study, with the scores, the parameters and the
point's canonical key in its user attribute ``exme``. Before evaluating a point, a worker
looks for a finished trial with the same key and reuses it, so a killed run that starts again repeats
nothing it had finished.

Several workers (processes, GPUs, machines) can share one study through any Optuna RDB storage URL.
Grid points are *claimed* before they are evaluated: a claim is a row of the ``exme_claims`` table
whose primary key is (study, point), so the database itself guarantees that exactly one worker
wins a point, on SQLite as on PostgreSQL. A worker that dies leaves its claim behind; the claim is
taken over once its owner is seen to be dead (same host: the process is gone; another host: no
heartbeat for ``grace_s`` seconds).

Points suggested one at a time (TPE, CMA-ES: :mod:`exme.search.sampled`) are drawn through
:class:`StudyTrials`, with a sampler seeded by the number of finished trials, so the sequence of
suggestions depends only on the history, and a resumed search makes the same choices as one that was
never interrupted. This module coordinates; which sampler draws the points is the strategy's.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import optuna
import sqlalchemy as sa

from exme.errors import ExmeError

RESULT_ATTR = "exme"  # one user attribute per trial: key, parameters, split, limit, scores, seconds
OWNER_ATTR = "exme_owner"

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class Point:
    """One candidate to evaluate: its parameters (numbers or names) and the item limit per task.

    ``limit`` is ``None`` for a full evaluation; a number for a cheap look on a dev subset (pruning).
    """

    params: dict[str, Any]
    split: str = "dev"
    limit: int | None = None
    # (start, stop): positions within each task's search items, for a race's chunk; None: every item.
    chunk: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """Canonical text of the point: equal points have equal keys, across processes and runs."""
        params = {k: _canonical(v) for k, v in sorted(self.params.items())}
        doc: dict[str, Any] = {"params": params, "split": self.split, "limit": self.limit}
        if self.chunk is not None:  # absent otherwise, so studies recorded before chunks keep their keys
            doc["chunk"] = list(self.chunk)
        return json.dumps(doc, sort_keys=True)


@dataclass
class Record:
    """A finished evaluation as stored in the study."""

    params: dict[str, Any]
    split: str
    limit: int | None
    overall: float
    tasks: dict[str, float]
    n_items: dict[str, int]
    seconds: float
    number: int  # the Optuna trial number (-1 for an evaluation just added by this worker)
    extra: dict[str, Any] = field(default_factory=dict)
    # Each item's score by task and item id (empty when the evaluator cannot give them).
    per_item: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per generative task: generation statistics (mean tokens, share hitting the limit, ...).
    generation: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: str | None = None  # why the candidate could not be scored; never chosen
    model: str | None = None  # the evaluation key of the model scored (see ``Runner.evaluation_key``)
    shared: bool = False  # the scores were read from an earlier evaluation of the same model
    # Items this evaluation scored itself, when it joined earlier partial evaluations of the same model
    # (:mod:`exme.search.partial`); ``None``: it scored all of its ``n_items``.
    scored: int | None = None

    @property
    def total_items(self) -> int:
        return int(sum(self.n_items.values()))

    @property
    def fresh_items(self) -> int:
        """Items the model was run on for this record (its cost), not counting those joined from earlier ones."""
        return self.total_items if self.scored is None else int(self.scored)


def _canonical(value: Any) -> Any:
    if isinstance(value, float):
        return float(repr(round(value, 12)))
    return value


#: The value recorded for a candidate that could not be scored (e.g. NaN/Inf weights): finite, so
#: Optuna and TPE accept it, and far below any real score; :func:`best` never picks such a record.
FAILED_SCORE = -1e300


def failed_scores(reason: str) -> dict[str, Any]:
    """What an objective returns for a candidate that could not be scored."""
    return {"overall": FAILED_SCORE, "tasks": {}, "n_items": {}, "failed": reason}


def scores_dict(scores: Any) -> dict[str, Any]:
    """``overall``, ``tasks``, ``n_items``, ``per_item`` and ``generation`` of an evaluator's scores
    (an object or a mapping): what a trial stores."""
    get = scores.get if isinstance(scores, dict) else lambda k, d=None: getattr(scores, k, d)
    # Which model was scored and whether the scores were read back from its earlier evaluation.
    origin = {k: scores[k] for k in ("model", "shared", "scored") if isinstance(scores, dict) and k in scores}
    if isinstance(scores, dict) and scores.get("failed"):
        return {"overall": FAILED_SCORE, "tasks": {}, "n_items": {}, "per_item": {}, "generation": {},
                "failed": str(scores["failed"]), **origin}
    overall = float(get("overall"))
    tasks = {str(k): float(v) for k, v in (get("tasks") or {}).items()}
    n_items = {str(k): int(v) for k, v in (get("n_items") or {}).items()}
    if not math.isfinite(overall):
        raise ExmeError(f"the evaluator returned a non-finite overall score ({overall}); check the suite")
    per_item = {str(t): {str(i): float(v) for i, v in items.items()} for t, items in (get("per_item") or {}).items()}
    details = get("details") or {}
    generation = {
        str(t): {str(k): float(v) for k, v in d["generation"].items()}
        for t, d in details.items() if isinstance(d, dict) and isinstance(d.get("generation"), dict)
    }
    if not generation and isinstance(scores, dict) and isinstance(scores.get("generation"), dict):
        generation = {str(t): {str(k): float(v) for k, v in g.items()} for t, g in scores["generation"].items()}
    return {"overall": overall, "tasks": tasks, "n_items": n_items, "per_item": per_item, "generation": generation,
            **origin}


def check_storage(url: str, *, timeout_s: int = 5) -> None:
    """Open the study storage once, before anything is created; one :class:`ExmeError` if it cannot be used.

    A server that is down, a wrong password or database, and a missing driver are each one line
    naming host and database (the password is never shown), instead of a long SQLAlchemy traceback
    after the output folder was made. SQLite URLs are left to the run (the file is created there).
    """
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise ExmeError(f"storage {url!r} is not a database URL; use e.g. sqlite:///run/study.db or postgresql://user@host/db") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        # A local file: nothing to reach, but its folder (made later, for the default one) must take files.
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            from exme.io.writer import check_output_location

            check_output_location(Path(parsed.database).parent, what="study folder")
        return
    try:
        dialect = parsed.get_dialect()
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()
    except Exception as err:
        if parsed.drivername == "postgresql+psycopg2":
            hint = "pip install psycopg2-binary, or write postgresql:// and pip install 'exme[postgres]'"
        elif backend == "postgresql":
            hint = (
                "pip install 'exme[postgres]' (psycopg 3, the driver SQLAlchemy 2 uses for postgresql:// URLs; "
                "with only psycopg2 installed, write postgresql+psycopg2:// instead)"
            )
        else:
            hint = f"install the Python driver for {backend}"
        raise ExmeError(f"storage {shown}: no database driver ({type(err).__name__}: {err}); {hint}") from None
    where = f"database {parsed.database!r} on {parsed.host or 'localhost'}" + (f":{parsed.port}" if parsed.port else "")
    connect_args = {"connect_timeout": timeout_s} if backend == "postgresql" else {}
    try:
        engine = sa.create_engine(parsed, poolclass=sa.pool.NullPool, connect_args=connect_args)
    except Exception as err:
        raise ExmeError(f"storage {shown}: {err}") from None
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as err:
        reason = " ".join(str(getattr(err, "orig", err) or err).split())[:300]
        raise ExmeError(
            f"cannot open the study storage: {where} ({reason}); check the --storage URL, that the server is "
            "running and reachable, and the user, password and database name"
        ) from None
    finally:
        engine.dispose()


#: SQLite's words for a fault of the disk under the study file, and what each means.
_SQLITE_FAULTS = {
    "database or disk is full": "the disk holding it is full",
    "disk i/o error": "an I/O error on the disk holding it",
    "attempt to write a readonly database": "it is on a read-only filesystem or not writable",
    "unable to open database file": "its folder cannot be written (removed, read-only or not permitted)",
}


def _storage_faults(method: Callable) -> Callable:
    """A disk fault under the study becomes one line; SQLite keeps every transaction committed
    before it (one evaluation is one commit), so the run resumes with every finished evaluation."""
    import functools

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sa.exc.OperationalError, optuna.exceptions.StorageInternalError) as err:
            found = err  # Optuna wraps SQLAlchemy's error in its own: look down the chain
            while found is not None and not isinstance(found, sa.exc.OperationalError):
                found = found.__cause__
            text = str(getattr(found, "orig", found)).lower() if found is not None else ""
            cause = next((v for k, v in _SQLITE_FAULTS.items() if k in text), None)
            if cause is None:
                raise
            url = getattr(self, "url", None) or (args[0] if args else "")
            raise ExmeError(
                f"study {url}: {cause} ({text}); every evaluation finished before this one is kept in it: "
                "free space (or make the folder writable) and run the same command again to resume"
            ) from None

    return wrapper


class StudyStore:
    """Optuna storage for one run plus the claims that make shared grids exactly-once.

    ``url`` is any SQLAlchemy URL Optuna accepts (``sqlite:///run/study.db``, ``postgresql://...``).
    """

    @_storage_faults
    def __init__(self, url: str, *, grace_s: float = 60.0, heartbeat_s: float = 5.0, poll_s: float = 0.5):
        check_storage(url)  # one line for an unreachable server or a missing driver, not a traceback
        self.url = url
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        engine_kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # Several processes write the same file: wait for the lock instead of failing at once.
            engine_kwargs["connect_args"] = {"timeout": 120}
        # Workers starting together race to create the schema; the loser retries and finds it made.
        for attempt in range(5):
            try:
                self.storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
                break
            except (sa.exc.IntegrityError, sa.exc.OperationalError, sa.exc.ProgrammingError) as err:
                # PostgreSQL reports the lost race as a ProgrammingError (DuplicateTable: "relation ... already
                # exists"); any other ProgrammingError is a real fault, said at once.
                if isinstance(err, sa.exc.ProgrammingError) and "already exists" not in str(err):
                    raise ExmeError(f"cannot open study storage {url!r}: {err}") from None
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
            except Exception as err:  # bad URL, missing driver, unreachable server
                raise ExmeError(f"cannot open study storage {url!r}: {err}") from None
        if url.startswith("sqlite"):
            _fast_sqlite(self.storage.engine)
        self._finished: dict[int, Record] = {}  # trial id -> record: a finished trial never changes
        self._meta = sa.MetaData()
        self._claims = sa.Table(
            "exme_claims",
            self._meta,
            sa.Column("study", sa.String(512), primary_key=True),
            sa.Column("point", sa.String(64), primary_key=True),
            sa.Column("attempt", sa.Integer, nullable=False),
            sa.Column("owner", sa.String(128), nullable=False),
        )
        self._workers = sa.Table(
            "exme_workers",
            self._meta,
            sa.Column("owner", sa.String(128), primary_key=True),
            sa.Column("host", sa.String(255), nullable=False),
            sa.Column("pid", sa.Integer, nullable=False),
            sa.Column("heartbeat", sa.Float, nullable=False),
        )
        for attempt in range(5):
            try:
                self._meta.create_all(self.storage.engine, checkfirst=True)
                break
            except (sa.exc.IntegrityError, sa.exc.OperationalError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        with self.storage.engine.begin() as conn:
            conn.execute(
                self._workers.insert().values(
                    owner=self.owner, host=socket.gethostname(), pid=os.getpid(), heartbeat=time.time()
                )
            )
        self.prune_dead()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat_loop, args=(heartbeat_s,), daemon=True)
        self._beat.start()

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the heartbeat and remove this worker (its unfinished claims become free at once)."""
        self._stop.set()
        self._beat.join(timeout=5)
        try:
            with self.storage.engine.begin() as conn:
                conn.execute(self._workers.delete().where(self._workers.c.owner == self.owner))
                # A closing worker evaluates nothing: its claims (per-model claims stay held after their
                # record is written, so equal candidates wait for it) are all released with it.
                conn.execute(self._claims.delete().where(self._claims.c.owner == self.owner))
            self.prune_dead()
        except sa.exc.SQLAlchemyError:  # a full disk or a lost server: the row is pruned by the next worker
            pass
        self.storage.engine.dispose()

    def __enter__(self) -> "StudyStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _heartbeat_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                with self.storage.engine.begin() as conn:
                    conn.execute(
                        self._workers.update()
                        .where(self._workers.c.owner == self.owner)
                        .values(heartbeat=time.time())
                    )
            except Exception:  # a transient lock must not kill the worker; the next beat retries
                pass

    # ---------------------------------------------------------------- studies
    def study(self, name: str, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
        """Create or load the study ``name`` (maximising the overall dev score)."""
        return optuna.create_study(
            storage=self.storage, study_name=name, direction="maximize", load_if_exists=True, sampler=sampler
        )

    def records(self, study: optuna.Study) -> dict[str, Record]:
        """Finished evaluations of a study, by point key."""
        out: dict[str, Record] = {}
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            key = t.user_attrs.get(RESULT_ATTR, {}).get("key")
            if key is None or key in out:
                continue
            out[key] = _record(t)
        return out

    def run_records(self, prefix: str) -> list[Record]:
        """Every finished evaluation of every study whose name starts with ``prefix`` (one run's stages),
        study by study in creation order, each in trial order.

        Why one query of ids and a cache: the pipeline asks this before every evaluation (is this model
        scored already, by any stage or worker?), and reading every trial of the run each time cost
        ~0.3 s per call at 195 trials on SQLite (quadratic over a run). A COMPLETE trial's attributes
        never change, so each is read once; the ids of the finished trials are asked every time, so
        other workers' new trials are seen and a deleted study's trials are not.
        """
        done = optuna.trial.TrialState.COMPLETE.name
        with self.storage.engine.connect() as conn:
            rows = [r for r in conn.execute(sa.text(
                "SELECT t.trial_id, t.study_id, s.study_name FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "WHERE t.state = :done ORDER BY t.study_id, t.number"), {"done": done}).all() if r[2].startswith(prefix)]
        for study_id in {study_id for trial_id, study_id, _ in rows if trial_id not in self._finished}:
            for t in self.storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
                if RESULT_ATTR in t.user_attrs and t._trial_id not in self._finished:
                    self._finished[t._trial_id] = _record(t)
        return [self._finished[trial_id] for trial_id, _, _ in rows if trial_id in self._finished]

    def find_model(self, prefix: str, model: str) -> Record | None:
        """A finished evaluation of the model ``model`` in any study of the run ``prefix``, or ``None``."""
        return next((r for r in self.run_records(prefix) if r.model == model), None)

    # ---------------------------------------------------------------- claims
    def _alive(self, owner: str) -> bool:
        with self.storage.engine.connect() as conn:
            row = conn.execute(sa.select(self._workers).where(self._workers.c.owner == owner)).first()
        if row is None:
            return False
        if row.host == socket.gethostname():
            try:
                os.kill(row.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        return time.time() - row.heartbeat <= self.grace_s

    @_storage_faults
    def claim(self, study_name: str, key: str) -> bool:
        """Take the point ``key`` for this worker; ``True`` when this worker must evaluate it."""
        point = hashlib.sha1(key.encode()).hexdigest()
        c = self._claims.c
        try:
            with self.storage.engine.begin() as conn:
                conn.execute(self._claims.insert().values(study=study_name, point=point, attempt=0, owner=self.owner))
            return True
        except sa.exc.IntegrityError:
            pass
        with self.storage.engine.connect() as conn:
            row = conn.execute(sa.select(self._claims).where(c.study == study_name, c.point == point)).first()
        if row is not None and row.owner == self.owner:
            # Claimed by this worker before, but not finished (its evaluation raised): take it again.
            return True
        if row is None or self._alive(row.owner):
            return False
        # The owner died: take the claim over, atomically (only one worker's UPDATE matches).
        with self.storage.engine.begin() as conn:
            res = conn.execute(
                self._claims.update()
                .where(c.study == study_name, c.point == point, c.attempt == row.attempt)
                .values(owner=self.owner, attempt=row.attempt + 1)
            )
        return res.rowcount == 1

    def release(self, study_name: str, key: str) -> None:
        """Drop this worker's claim on a point once its result is recorded (the trial now answers for it)."""
        point = hashlib.sha1(key.encode()).hexdigest()
        c = self._claims.c
        with self.storage.engine.begin() as conn:
            conn.execute(self._claims.delete().where(c.study == study_name, c.point == point, c.owner == self.owner))

    def prune_dead(self) -> None:
        """Remove the heartbeat rows of dead workers and the claims they left, so a run whose workers were
        killed ends with no row of theirs. Dead is :meth:`_alive`'s rule, the one claims are taken over by;
        each claim is deleted only as it was read (same owner and attempt), so a concurrent take-over wins."""
        with self.storage.engine.connect() as conn:
            # Claims first: a claim's owner registered before claiming, so it is in the later list unless gone.
            claims = conn.execute(sa.select(self._claims)).all()
            workers = conn.execute(sa.select(self._workers.c.owner)).scalars().all()
        dead = {w for w in workers if w != self.owner and not self._alive(w)}
        known = set(workers)
        c = self._claims.c
        with self.storage.engine.begin() as conn:
            if dead:
                conn.execute(self._workers.delete().where(self._workers.c.owner.in_(sorted(dead))))
            for row in claims:
                if row.owner != self.owner and (row.owner in dead or row.owner not in known):
                    conn.execute(self._claims.delete().where(
                        c.study == row.study, c.point == row.point, c.owner == row.owner, c.attempt == row.attempt))

    # ---------------------------------------------------------------- evaluation
    @_storage_faults
    def evaluate(
        self,
        study_name: str,
        points: Sequence[Point],
        objective: Callable[[Point], Any],
        *,
        on_result: Callable[[Point, Record, bool], None] | None = None,
    ) -> list[Record]:
        """Evaluate every point exactly once across all workers of the study; results in ``points`` order.

        ``objective(point)`` returns the evaluator's scores. A point already finished (by this run
        before an interruption, or by another worker) is read back, never evaluated again. While
        other workers hold the remaining points this waits for them. ``on_result(point, record,
        reused)`` is called once per point (for progress bars).
        """
        study = self.study(study_name)
        by_key = {p.key: p for p in points}
        results: dict[str, Record] = {}
        reported: set[str] = set()
        while True:
            for key, rec in self.records(study).items():
                if key in by_key and key not in results:
                    results[key] = rec
            for key in [k for k in results if k not in reported]:
                reported.add(key)
                if on_result:
                    on_result(by_key[key], results[key], True)
            todo = [p for p in points if p.key not in results]
            if not todo:
                break
            progressed = False
            for p in todo:
                if not self.claim(study_name, p.key):
                    continue
                done = self.records(study)  # a dead owner may have finished it just before dying
                if p.key in done:
                    results[p.key] = done[p.key]
                    self.release(study_name, p.key)
                    continue
                rec = self._run(study, p, objective)
                self.release(study_name, p.key)
                results[p.key] = rec
                reported.add(p.key)
                if on_result:
                    on_result(p, rec, False)
                progressed = True
            if not progressed and any(p.key not in results for p in points):
                time.sleep(self.poll_s)
        return [results[p.key] for p in points]

    def _run(self, study: optuna.Study, point: Point, objective: Callable[[Point], Any]) -> Record:
        t0 = time.perf_counter()
        scores = scores_dict(objective(point))
        seconds = time.perf_counter() - t0
        floats = {k: float(v) for k, v in point.params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        trial = optuna.trial.create_trial(
            params=floats,
            distributions={k: optuna.distributions.FloatDistribution(v, v) for k, v in floats.items()},
            value=scores["overall"],
            user_attrs={RESULT_ATTR: {
                "key": point.key, "owner": self.owner, "params": point.params, "split": point.split,
                "limit": point.limit, "chunk": list(point.chunk) if point.chunk else None, "seconds": seconds, **scores,
            }},
        )
        study.add_trial(trial)
        return Record(
            params=dict(point.params), split=point.split, limit=point.limit, overall=scores["overall"],
            tasks=scores["tasks"], n_items=scores["n_items"], seconds=seconds, number=-1,
            per_item=scores["per_item"], generation=scores["generation"], failed=scores.get("failed"),
            model=scores.get("model"), shared=bool(scores.get("shared", False)), scored=scores.get("scored"),
        )

    # ---------------------------------------------------------------- suggested points
    def trials(
        self,
        study_name: str,
        objective: Callable[[Point], Any],
        *,
        on_result: Callable[[Point, Record, bool], None] | None = None,
    ) -> "StudyTrials":
        """This worker's handle on a study whose points a strategy suggests one at a time (ask and tell)."""
        return StudyTrials(self, study_name, objective, on_result)


class StudyTrials:
    """The coordination a suggesting strategy (:mod:`exme.search.sampled`) needs, and nothing of sampling.

    A strategy that suggests points one at a time from the history (TPE, CMA-ES) needs the history
    in the study, so that every worker and a resumed run see the same one. This object offers it the
    primitives: :meth:`start` (a first point, enqueued in a new study), :meth:`sync` (finished trials
    read back and reported, trials left RUNNING by dead workers marked FAIL, the counts),
    :meth:`seed` (the rule that makes a search a pure function of its history), :meth:`ask` (a
    trial drawn by the strategy's sampler, owned by this worker), :meth:`tell` (the point scored,
    or read back when the same point was scored before, and recorded) and :meth:`records`. Which
    sampler draws the points, and when to stop, is the strategy's.
    """

    def __init__(self, store: StudyStore, study_name: str, objective: Callable[[Point], Any],
                 on_result: Callable[[Point, Record, bool], None] | None) -> None:
        self.store = store
        self.url = store.url  # named in a disk fault's message
        self.study = store.study(study_name)
        self.objective = objective
        self.on_result = on_result
        self.study_name = study_name
        self.finished = 0  # finished trials at the last sync
        self.running = 0  # trials other live workers were running at the last sync
        self.reported: set[int] = set()

    @_storage_faults
    def start(self, params: dict[str, float]) -> None:
        """Enqueue ``params`` as the first trial of a study that has none yet (e.g. a known good point)."""
        if not self.study.get_trials(deepcopy=False):
            self.study.enqueue_trial(params)

    @_storage_faults
    def sync(self) -> tuple[int, int]:
        """(finished trials, trials other live workers are running now).

        Finished trials not reported yet are passed to ``on_result`` as read back; a RUNNING trial
        whose owner is dead (or is this worker, from an evaluation that raised) is marked FAIL, so
        samplers ignore it and its place is drawn again.
        """
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        for t in complete:
            if t.number not in self.reported:
                self.reported.add(t.number)
                if self.on_result:
                    rec = _record(t)
                    self.on_result(Point(rec.params, rec.split, rec.limit), rec, True)
        alive = 0
        now = datetime.datetime.now()  # Optuna stamps trials with naive local time
        for t in (t for t in trials if t.state == optuna.trial.TrialState.RUNNING):
            owner = t.system_attrs.get(OWNER_ATTR)
            if owner is None:
                # Asked a moment ago by a worker that has not written its name yet (ask, then the owner,
                # are two writes): left to it unless it is older than a dead worker's grace.
                started = t.datetime_start
                if started is not None and (now - started).total_seconds() <= self.store.grace_s:
                    alive += 1
                    continue
            elif owner != self.store.owner and self.store._alive(owner):
                alive += 1
                continue
            try:
                self.store.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
        self.finished, self.running = len(complete), alive
        return self.finished, alive

    def seed(self, seed: int) -> int:
        """The seed of the next suggestion: ``seed`` mixed with the finished trials counted at the last
        :meth:`sync`, so the suggestions depend only on the history; resumed or not, the same inputs
        give the same suggestions. The trials other workers are running count too (when there are
        any): samplers ignore a running trial, so without them a worker asking while another
        evaluates would be given the very point the other is evaluating."""
        return _mix(seed, self.finished, self.running)

    def wait(self) -> None:
        """Let other workers finish the trials they hold."""
        time.sleep(self.store.poll_s)

    @_storage_faults
    def ask(self, sampler: optuna.samplers.BaseSampler,
            distributions: dict[str, optuna.distributions.BaseDistribution]) -> optuna.trial.Trial:
        """A new trial drawn by ``sampler`` (an enqueued point first), marked as this worker's."""
        self.study.sampler = sampler
        while True:
            trial = self.study.ask(distributions)
            try:
                self.store.storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, self.store.owner)
                return trial
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # the enqueued trial was handed to another worker too, which finished it (see tell)

    @_storage_faults
    def tell(self, trial: optuna.trial.Trial, point: Point) -> Record:
        """Score ``point`` (the trial's parameters as the candidate reads them) and finish the trial with it.

        A point recorded before in this study is read back, never evaluated again; a point another
        worker is evaluating now (two workers asked at once, or both took the start point) is claimed
        by it, and this worker waits for its record."""
        claimed = False
        while True:
            earlier = self.store.records(self.study).get(point.key)
            if earlier is not None:
                break
            if self.store.claim(self.study_name, point.key):
                claimed = True
                earlier = self.store.records(self.study).get(point.key)  # its last owner may have just finished it
                break
            self.wait()
        t0 = time.perf_counter()
        try:
            if earlier is not None:
                scores = {"overall": earlier.overall, "tasks": earlier.tasks, "n_items": earlier.n_items,
                          "per_item": earlier.per_item, "generation": earlier.generation, "failed": earlier.failed}
            else:
                scores = scores_dict(self.objective(point))
            seconds = time.perf_counter() - t0
            try:
                trial.set_user_attr(RESULT_ATTR, {
                    "key": point.key, "owner": self.store.owner, "params": point.params, "split": point.split,
                    "limit": None, "seconds": seconds, "reused": earlier is not None, **scores,
                })
                self.study.tell(trial, scores["overall"])
            except optuna.exceptions.UpdateFinishedTrialError:
                # SQLite has no row locks, so two workers asking at the same moment can both be handed
                # the one enqueued trial (the start point); the worker that finished it answers for both.
                done = _record(self.store.storage.get_trial(trial._trial_id))
                scores = {"overall": done.overall, "tasks": done.tasks, "n_items": done.n_items,
                          "per_item": done.per_item, "generation": done.generation, "failed": done.failed}
                earlier = done
        finally:
            if claimed:  # the finished trial answers for the point now (or, after an error, no one holds it)
                self.store.release(self.study_name, point.key)
        rec = Record(point.params, "dev", None, scores["overall"], scores["tasks"], scores["n_items"], seconds,
                     trial.number, per_item=scores["per_item"], generation=scores["generation"],
                     failed=scores.get("failed"), model=scores.get("model"), shared=bool(scores.get("shared", False)),
                     scored=scores.get("scored"))
        self.reported.add(trial.number)
        if self.on_result:
            self.on_result(point, rec, earlier is not None)
        return rec

    @_storage_faults
    def records(self) -> list[Record]:
        """Every finished trial of the study, in trial order."""
        return [_record(t) for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]


def _fast_sqlite(engine: sa.engine.Engine) -> None:
    """WAL journal and ``synchronous=NORMAL``: a commit no longer waits for an fsync.

    Every evaluation is a few commits; with SQLite's defaults each one fsyncs, which costs more
    than evaluating a small model. In WAL mode a process that dies loses nothing it committed
    (only an OS crash can lose the last commits), and readers never block the writer, which is
    what several workers on one file need.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    engine.dispose()  # connections opened before the listener get the pragmas on reconnect


def _mix(seed: int, n: int, running: int = 0) -> int:
    text = f"{seed}:{n}" + (f":{running}" if running else "")  # one worker: the seeds studies always had
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _record(t: optuna.trial.FrozenTrial) -> Record:
    ua = t.user_attrs.get(RESULT_ATTR, {})
    return Record(
        params=dict(ua.get("params", t.params)),
        split=ua.get("split", "dev"),
        limit=ua.get("limit"),
        overall=float(ua.get("overall", t.value)),
        tasks=dict(ua.get("tasks", {})),
        n_items={k: int(v) for k, v in ua.get("n_items", {}).items()},
        seconds=float(ua.get("seconds", 0.0)),
        number=t.number,
        extra={"reused": bool(ua.get("reused", False))},
        per_item={t: {i: float(v) for i, v in items.items()} for t, items in ua.get("per_item", {}).items()},
        generation={t: dict(g) for t, g in ua.get("generation", {}).items()},
        failed=ua.get("failed"),
        model=ua.get("model"),
        shared=bool(ua.get("shared", False)),
        scored=ua.get("scored"),
    )


def successive_halving(
    store: StudyStore,
    study_name: str,
    params: Sequence[dict[str, Any]],
    objective: Callable[[Point], Any],
    *,
    min_items: int,
    eta: int,
    on_result: Callable[[Point, Record, bool], None] | None = None,
) -> tuple[list[Record], list[Record]]:
    """:class:`exme.search.strategy.Halving` on one study: (full evaluations of the survivors, last
    partial evaluation of each dropped point)."""
    from exme.search.strategy import Halving

    out = Halving(min_items, eta).run(params, lambda pts: store.evaluate(study_name, pts, objective, on_result=on_result))
    return out.records, out.dropped


def best(records: Iterable[Record]) -> Record:
    """The highest overall score; ties go to the earliest record (deterministic)."""
    records = list(records)
    if not records:
        raise ExmeError("no evaluations to choose from")
    scored = [r for r in records if r.failed is None]
    if not scored:
        raise ExmeError(f"every candidate failed ({records[0].failed}); check the inputs and the dtype")
    records = scored
    top = max(r.overall for r in records)
    return next(r for r in records if r.overall == top)
