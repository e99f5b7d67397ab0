"""A realistic run, written by hand: six checkpoints, two kept, α and β grids, baselines, a final table.

Task accuracies are multiples of 1/n (n items per task), as real accuracies are, and every overall
score is the weighted mean of its tasks with the suite's weights (1, 1, 2), so the report's own
arithmetic can be checked against formulas written out in the tests.
"""

from __future__ import annotations

import pytest

from exme.report.schema import FinalRow, RankedCheckpoint, RunResults, SearchResult, SplitScores, Trial

TASKS = ("arith", "choice", "code")
WEIGHTS = {"arith": 1.0, "choice": 1.0, "code": 2.0}
N_DEV = 100
N_TEST = 200


def overall(tasks: dict[str, float]) -> float:
    return sum(WEIGHTS[t] * s for t, s in tasks.items()) / sum(WEIGHTS.values())


def scores(arith: float, choice: float, code: float, n: int) -> SplitScores:
    tasks = {"arith": arith, "choice": choice, "code": code}
    return SplitScores(overall=overall(tasks), tasks=tasks, n_items={t: n for t in TASKS})


def _curve(param: str, peak: float, top: dict[str, float], values: list[float]) -> list[Trial]:
    """A smooth bump in each task around ``peak``; scores rounded to whole items of the dev split."""
    trials = []
    for x in values:
        drop = 0.25 * (x - peak) ** 2
        s = {t: round((top[t] - drop * (1 + i)) * N_DEV) / N_DEV for i, t in enumerate(TASKS)}
        trials.append(Trial(params={param: x}, dev=scores(**s, n=N_DEV)))
    return trials


def make_results(exme_test: tuple[float, float, float] = (0.43, 0.655, 0.385), joint: bool = False) -> RunResults:
    """The hand-made run; ``exme_test`` sets ExMe's test accuracies (arith, choice, code)."""
    dev = {
        100: (0.20, 0.50, 0.15), 200: (0.28, 0.55, 0.22), 300: (0.33, 0.58, 0.27),
        400: (0.36, 0.61, 0.31), 500: (0.37, 0.62, 0.33), 600: (0.35, 0.60, 0.34),
    }
    kept = {500, 400}
    ranking = [
        RankedCheckpoint(name=f"checkpoint-{s}", path=f"/runs/sft/checkpoint-{s}", step=s,
                         dev=scores(*v, n=N_DEV), kept=s in kept)
        for s, v in dev.items()
    ]
    grid = [round(0.1 * i, 1) for i in range(11)]
    alpha1 = _curve("alpha", 0.4, {"arith": 0.40, "choice": 0.64, "code": 0.36}, grid)
    alpha2 = _curve("alpha", 0.3, {"arith": 0.38, "choice": 0.63, "code": 0.33}, grid)
    beta = _curve("beta", 0.6, {"arith": 0.42, "choice": 0.66, "code": 0.38}, grid)

    def search(name: str, trials: list[Trial], param: str, checkpoint: str | None = None) -> SearchResult:
        best = max(trials, key=lambda t: t.dev.overall)
        return SearchResult(name=name, checkpoint=checkpoint, space={param: {"grid": grid}}, trials=trials,
                            best_params=dict(best.params), best_dev=best.dev.overall)

    joint_search = None
    if joint:
        trials = [
            Trial(params={"alpha_1": a1, "alpha_2": a2, "beta": b},
                  dev=scores(round(0.42 - 0.2 * (a1 - 0.4) ** 2 - 0.1 * (b - 0.6) ** 2, 2), 0.65,
                             round(0.38 - 0.2 * (a2 - 0.3) ** 2, 2), n=N_DEV))
            for a1 in (0.0, 0.2, 0.4, 0.6) for a2 in (0.0, 0.3, 0.6) for b in (0.2, 0.6, 1.0)
        ]
        best = max(trials, key=lambda t: t.dev.overall)
        joint_search = SearchResult(name="joint-tpe", space={}, trials=trials,
                                    best_params=dict(best.params), best_dev=best.dev.overall)

    def dev_test(d: tuple[float, float, float], t: tuple[float, float, float]) -> dict:
        return {"dev": scores(*d, n=N_DEV), "test": scores(*t, n=N_TEST)}

    final = [
        FinalRow(name="base", kind="base", **dev_test((0.05, 0.30, 0.02), (0.045, 0.31, 0.025))),
        FinalRow(name="SFT-1", kind="sft", params={"checkpoint": "checkpoint-500"},
                 **dev_test((0.37, 0.62, 0.33), (0.40, 0.64, 0.36))),
        FinalRow(name="SFT-2", kind="sft", params={"checkpoint": "checkpoint-400"},
                 **dev_test((0.36, 0.61, 0.31), (0.42, 0.65, 0.37))),
        FinalRow(name="EXPO-1", kind="expo", method="extrapolate", params={"alpha": 0.4},
                 **dev_test((0.40, 0.64, 0.36), (0.41, 0.645, 0.37))),
        FinalRow(name="EXPO-2", kind="expo", method="extrapolate", params={"alpha": 0.3},
                 **dev_test((0.38, 0.63, 0.33), (0.415, 0.64, 0.36))),
        FinalRow(name="ExMe", kind="exme", method="exme", params={"alpha_1": 0.4, "alpha_2": 0.3, "beta": 0.6},
                 **dev_test((0.42, 0.66, 0.38), exme_test)),
        FinalRow(name="linear", kind="baseline", method="linear", params={"weight_1": 0.5},
                 **dev_test((0.38, 0.62, 0.33), (0.41, 0.645, 0.36))),
        FinalRow(name="ties", kind="baseline", method="ties", params={"density": 0.5},
                 **dev_test((0.39, 0.63, 0.35), (0.425, 0.66, 0.38))),
        FinalRow(name="dare_ties", kind="baseline", method="dare_ties", params={"density": 0.7},
                 **dev_test((0.385, 0.625, 0.34), (0.40, 0.63, 0.355))),
    ]
    baselines = [
        search("linear", _curve("weight_1", 0.5, {"arith": 0.38, "choice": 0.62, "code": 0.33}, grid), "weight_1"),
        search("ties", _curve("density", 0.5, {"arith": 0.39, "choice": 0.63, "code": 0.35}, grid), "density"),
        search("dare_ties", _curve("density", 0.7, {"arith": 0.385, "choice": 0.625, "code": 0.34}, grid), "density"),
    ]
    return RunResults(
        exme_version="0.1.0",
        created="2026-11-22T15:00:00+00:00",
        config={"base": "/models/base", "checkpoints": "/runs/sft/checkpoint-*", "suite": "suite.yaml",
                "top_k": 2, "alpha_grid": grid, "beta_grid": grid, "search": "grid",
                "baselines": ["linear", "ties", "dare_ties"], "output": "/runs/exme-out"},
        suite={"name": "demo-suite", "path": "suite.yaml",
               "tasks": {t: {"weight": WEIGHTS[t]} for t in TASKS},
               "split_rule": "seeded shuffle of each task's items, first 100 dev, next 200 test", "seed": 0},
        ranking=ranking,
        alpha_search=[search("alpha/checkpoint-500", alpha1, "alpha", "checkpoint-500"),
                      search("alpha/checkpoint-400", alpha2, "alpha")],
        beta_search=search("beta", beta, "beta"),
        joint_search=joint_search,
        baseline_search=baselines,
        final=final,
        final_model="/runs/exme-out/model",
        timings={"rank": 41.2, "extrapolate": 88.0, "merge": 45.5, "baselines": 120.3, "test": 60.9, "write": 7.1},
        notes=["Toy suite: differences of a point or two are within noise."],
    )


@pytest.fixture
def results() -> RunResults:
    return make_results()


@pytest.fixture
def make():
    """The run builder itself, for tests that need a variant (ExMe losing, a joint search, …)."""
    return make_results
