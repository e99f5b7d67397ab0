"""Sampled strategies (TPE, CMA-ES) on a study: the suggestions are the seeded rule's, resumed runs and
two workers make the same choices as one uninterrupted run, and nothing is evaluated twice."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import optuna
import pytest

from exme.search.cmaes import CmaEs
from exme.search.study import StudyStore
from exme.search.tpe import TPE

DISTS = {"a": optuna.distributions.FloatDistribution(0.0, 1.0), "b": optuna.distributions.FloatDistribution(0.0, 2.0)}
START = {"a": 0.5, "b": 0.5}


def score(params: dict) -> float:
    """A float64 bowl with its top at a = 0.3, b = 1.1."""
    return -((params["a"] - 0.3) ** 2) - 0.5 * (params["b"] - 1.1) ** 2


class Objective:
    def __init__(self, fail_at: int | None = None):
        self.calls: list[dict] = []
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def __call__(self, point):
        with self.lock:
            self.calls.append(dict(point.params))
            if self.fail_at is not None and len(self.calls) == self.fail_at:
                raise RuntimeError("worker killed")
        return {"overall": score(point.params), "tasks": {"t": score(point.params)}, "n_items": {"t": 1}}


def reference(sampler_of, n_trials: int, seed: int, start: dict | None) -> list[dict]:
    """The seeded rule written here on its own, on plain Optuna in memory: before each suggestion the
    sampler is made with seed sha256(f"{seed}:{finished trials}")'s first 4 bytes, little-endian."""
    study = optuna.create_study(direction="maximize")
    if start is not None:
        study.enqueue_trial(start)
    for n in range(n_trials):
        study.sampler = sampler_of(int.from_bytes(hashlib.sha256(f"{seed}:{n}".encode()).digest()[:4], "little"))
        trial = study.ask(dict(DISTS))
        study.tell(trial, score(trial.params))
    return [t.params for t in study.trials]


def _cma(seed: int) -> optuna.samplers.BaseSampler:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.samplers.CmaEsSampler(x0=START, seed=seed)


@pytest.mark.parametrize("strategy, sampler_of", [
    (TPE, lambda s: optuna.samplers.TPESampler(seed=s, multivariate=True)),
    (CmaEs, _cma),
])
def test_suggestions_follow_the_seeded_rule_and_scores_are_the_objectives(tmp_path, strategy, sampler_of):
    objective = Objective()
    with StudyStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        out = strategy(DISTS, 14, 7, start=START).run(store.trials("s", objective))
    assert len(out.records) == 14 and len(objective.calls) == 14
    assert [r.params for r in out.records] == reference(sampler_of, 14, 7, START)
    assert out.records[0].params == START
    assert all(r.overall == score(r.params) for r in out.records)
    assert out.best.overall == max(score(p) for p in objective.calls)


def test_seeds_give_their_own_searches(tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        with StudyStore(f"sqlite:///{tmp_path / name}.db") as store:
            runs[name] = [r.params for r in CmaEs(DISTS, 7, seed, start=START).run(store.trials("s", Objective())).records]
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    assert runs["a"][0] == runs["c"][0] == START  # the first trial is the start point whatever the seed


@pytest.mark.parametrize("strategy", [TPE, CmaEs])
def test_a_resumed_search_makes_the_uninterrupted_choices_and_repeats_nothing(tmp_path, strategy):
    with StudyStore(f"sqlite:///{tmp_path / 'ref.db'}") as store:
        whole = [r.params for r in strategy(DISTS, 12, 3, start=START).run(store.trials("s", Objective())).records]
    # Stopped after 5 trials, then run again to 12: 7 more evaluations, the same 12 points.
    first, second = Objective(), Objective()
    with StudyStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        strategy(DISTS, 5, 3, start=START).run(store.trials("s", first))
    with StudyStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        out = strategy(DISTS, 12, 3, start=START).run(store.trials("s", second))
    assert len(first.calls) == 5 and len(second.calls) == 7
    assert first.calls + second.calls == whole == [r.params for r in out.records]


def test_a_worker_killed_mid_trial_leaves_a_trial_that_is_drawn_again(tmp_path):
    """An evaluation that raised leaves its trial RUNNING; the next run marks it FAIL (TPE ignores it) and
    makes the uninterrupted run's choices, repeating only the evaluation in flight."""
    with StudyStore(f"sqlite:///{tmp_path / 'ref.db'}") as store:
        whole = [r.params for r in TPE(DISTS, 10, 5, start=START).run(store.trials("s", Objective())).records]
    killed = Objective(fail_at=4)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    with StudyStore(url) as store, pytest.raises(RuntimeError):
        TPE(DISTS, 10, 5, start=START).run(store.trials("s", killed))
    again = Objective()
    with StudyStore(url) as store:
        out = TPE(DISTS, 10, 5, start=START).run(store.trials("s", again))
        states = [t.state for t in store.study("s").get_trials(deepcopy=False)]
    assert [r.params for r in out.records] == whole
    assert again.calls[0] == killed.calls[-1] and killed.calls[:-1] + again.calls == whole
    assert states.count(optuna.trial.TrialState.FAIL) == 1


def test_two_workers_share_one_search_and_evaluate_each_point_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    objective = Objective()
    results, errors = {}, []

    def worker(name: str) -> None:
        try:
            with StudyStore(url, poll_s=0.05) as store:
                results[name] = TPE(DISTS, 12, 0, start=START).run(store.trials("s", objective)).records
        except Exception as err:  # pragma: no cover - shown by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    # Each asks while fewer than 12 trials are finished: at most one extra trial per worker.
    n = len(results["w1"])
    assert 12 <= n <= 13 and len(results["w2"]) >= 12
    # Every point evaluated once by one of the two: two workers asking at the same moment are given the
    # same point (the same history and seed), and the second reads the first's evaluation back.
    keys = [tuple(sorted(c.items())) for c in objective.calls]
    assert len(keys) == len(set(keys))
    assert set(keys) == {tuple(sorted(r.params.items())) for r in results["w1"]}
    reused = sum(r.extra["reused"] for r in results["w1"])
    assert len(keys) + reused == n


@pytest.mark.parametrize("d", [1, 2, 3, 6, 9, 20, 64])
def test_cma_es_generation_size_is_the_cmaes_package_population(d):
    """The few-trials note counts a generation as the cmaes package's own default population."""
    cmaes = pytest.importorskip("cmaes")
    from exme.search.cmaes import generation_note, generation_size

    population = cmaes.CMA(mean=np.zeros(d), sigma=1.0, seed=0).population_size
    assert generation_size(d) == population
    assert generation_note("cmaes", population, d) is not None  # the start point + population - 1: no full generation
    assert generation_note("cmaes", population + 1, d) is None
    assert generation_note("tpe", 1, d) is None


def test_a_worker_that_loses_the_schema_race_retries(tmp_path, monkeypatch):
    """Two workers creating a fresh PostgreSQL study schema at once: the loser gets DuplicateTable (a
    ProgrammingError "relation ... already exists") and must retry, as it does for IntegrityError."""
    import sqlalchemy as sa

    from exme.errors import ExmeError
    from exme.search import study as study_mod

    real, calls = optuna.storages.RDBStorage, []

    def flaky(url, **kw):
        calls.append(url)
        if len(calls) == 1:
            raise sa.exc.ProgrammingError("CREATE TABLE studies", {}, Exception('relation "studies" already exists'))
        return real(url, **kw)

    monkeypatch.setattr(study_mod.optuna.storages, "RDBStorage", flaky)
    store = StudyStore(f"sqlite:///{tmp_path / 'a.db'}")
    assert len(calls) == 2 and store.storage is not None

    def broken(url, **kw):
        raise sa.exc.ProgrammingError("SELECT", {}, Exception("permission denied for schema public"))

    monkeypatch.setattr(study_mod.optuna.storages, "RDBStorage", broken)
    with pytest.raises(ExmeError, match="permission denied"):
        StudyStore(f"sqlite:///{tmp_path / 'b.db'}")


def test_an_enqueued_trial_handed_to_two_workers_is_evaluated_once_and_read_back(tmp_path):
    """SQLite has no row locks: two workers asking at the same moment can both be handed the enqueued
    start trial. The one that finishes it answers for both: the other reads its scores back at tell,
    and a worker handed a trial that is finished already asks again."""
    from exme.search.study import Point

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    objective = Objective()
    sampler = optuna.samplers.RandomSampler(seed=0)
    with StudyStore(url) as a, StudyStore(url) as b:
        ta, tb = a.trials("s", objective), b.trials("s", objective)
        ta.start(START)
        trial = ta.ask(sampler, DISTS)
        assert trial.params == START
        same = optuna.trial.Trial(tb.study, trial._trial_id)  # b's handle on the very same trial
        first = ta.tell(trial, Point(dict(trial.params)))
        second = tb.tell(same, Point(dict(trial.params)))
        assert objective.calls == [START]  # evaluated once, by a
        assert second.overall == first.overall == score(START)
        # handed the finished trial again, b draws a new one instead
        ask = tb.study.ask
        handed = iter([optuna.trial.Trial(tb.study, trial._trial_id)])
        tb.study.ask = lambda *args, **kw: next(handed, None) or ask(*args, **kw)
        fresh = tb.ask(sampler, DISTS)
        assert fresh.number != trial.number
        states = [t.state for t in a.study("s").get_trials(deepcopy=False)]
        assert states[0] == optuna.trial.TrialState.COMPLETE
