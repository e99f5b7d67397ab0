"""One evaluation per distinct model: candidates that are the same weights (SFT-i is EXPO-i at α = 0,
EXPO is ExMe at β ∈ {0, 1}, linear 0.5 is task arithmetic at λ = 0.5) are scored once, in one run,
a resumed run and two workers sharing a study."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from exme.pipeline.stages import BaseWeights, CheckpointWeights, Combination, MethodMerge, candidate_key


def test_candidate_key_joins_equal_models_and_keeps_others_apart(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    models = (a, b)
    sft_a = candidate_key(CheckpointWeights(a))
    # θ_b + 1·Δ_a written three ways: a checkpoint, EXPO at α = 0, ExMe at β = 1.
    assert candidate_key(Combination(models, (1.0 * (1 + 0.0), 0.0))) == sft_a
    assert candidate_key(Combination(models, (1.0 * (1 + 0.2), 0.0 * (1 + 0.3)))) != sft_a
    # Linear w = (0.7, 0.3) normalised vs ExMe β = 0.7, α = 0: 1 − 0.7 is 0.30000000000000004.
    linear = MethodMerge(models, "linear", (("normalize", True), ("weights", (0.7, 0.3))), 0)
    assert candidate_key(linear) == candidate_key(Combination(models, (0.7, 1.0 - 0.7)))
    ta = MethodMerge(models, "task_arithmetic", (("lambda_", 0.5), ("weights", (1.0, 1.0))), 0)
    assert candidate_key(ta) == candidate_key(Combination(models, (0.5 * (1 + 0.0), 0.5)))
    assert candidate_key(BaseWeights()) == candidate_key(Combination(models, (0.0, -0.0)))
    # Non-linear methods: their recipe and seed, so another seed or density is another model.
    ties = MethodMerge(models, "ties", (("density", 0.5), ("normalize", True), ("weights", (1.0, 1.0))), 0)
    assert candidate_key(ties) == candidate_key(MethodMerge(models, "ties", ties.kwargs, 0))
    assert candidate_key(ties) != candidate_key(MethodMerge(models, "ties", ties.kwargs, 1))
    dare = MethodMerge(models, "dare_linear", (("density", 0.5), ("normalize", True), ("weights", (1.0, 1.0))), 0)
    assert candidate_key(dare) != candidate_key(ties)


def _vectors(res) -> tuple[list, list]:
    """Each dev and test candidate of a run as coefficients over (checkpoint-10, -20, -100), computed here."""
    order = ["checkpoint-10", "checkpoint-20", "checkpoint-100"]

    def vec(pairs: dict[str, float]) -> tuple:
        return tuple(round(pairs.get(n, 0.0), 9) + 0.0 for n in order)

    kept = [c.name for c in res.ranking if c.kept]
    dev = [vec({})] + [vec({c.name: 1.0}) for c in res.ranking]
    for s in res.alpha_search:
        dev += [vec({s.checkpoint: 1 + t.params["alpha"]}) for t in s.trials]
    a1, a2 = (s.best_params["alpha"] for s in res.alpha_search)
    dev += [vec({kept[0]: t.params["beta"] * (1 + a1), kept[1]: (1 - t.params["beta"]) * (1 + a2)})
            for t in res.beta_search.trials]
    for s in res.baseline_search:
        for t in s.trials:
            if s.name == "linear":
                dev.append(vec({kept[0]: t.params["weight_1"], kept[1]: 1 - t.params["weight_1"]}))
            else:
                dev.append(vec({kept[0]: t.params["lambda"], kept[1]: t.params["lambda"]}))
    test = []
    for r in res.final:
        p = r.params
        if r.kind == "base":
            test.append(vec({}))
        elif r.kind == "sft":
            test.append(vec({p["checkpoint"]: 1.0}))
        elif r.kind == "expo":
            test.append(vec({p["checkpoint"]: 1 + p["alpha"]}))
        elif r.kind == "exme":
            test.append(vec({kept[0]: p["beta"] * (1 + p["alpha_1"]), kept[1]: (1 - p["beta"]) * (1 + p["alpha_2"])}))
        elif r.name == "linear":
            test.append(vec({kept[0]: p["weight_1"], kept[1]: 1 - p["weight_1"]}))
        else:
            test.append(vec({kept[0]: p["lambda"], kept[1]: p["lambda"]}))
    return dev, test


DUPLICATES = {"alpha": {"grid": [0.0, 0.5]}, "beta": {"grid": [0.0, 0.5, 1.0]},
              "baselines": ["linear", "task_arithmetic"]}


def test_equal_candidates_are_evaluated_once_per_split(tmp_path, sft_run, tiny_suite, synthetic):
    from exme.pipeline import PipelineConfig, run_pipeline

    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(tmp_path / "out"), **DUPLICATES}
    res = run_pipeline(PipelineConfig.from_dict(raw), evaluator=synthetic, progress=False, write_model=False)
    dev, test = _vectors(res)
    calls = Counter(split for split, _ in synthetic.calls)
    assert len(dev) == 4 + 2 * 2 + 3 + 3 + 4  # every candidate of the grids is still a trial of its search
    assert calls["dev"] == len(set(dev)) < len(dev)
    assert calls["test"] == len(set(test))
    assert res.evaluations["evaluations"] == len(set(dev)) + len(set(test))
    assert res.evaluations["shared"] == len(dev) + len(test) - len(set(dev)) - len(set(test))
    assert res.evaluations["items"]["search"] == 100 * len(set(dev))  # the synthetic task has 100 items
    # Shared trials carry the same score as the evaluation they read.
    sft = {c.name: c.dev.overall for c in res.ranking}
    for s in res.alpha_search:
        zero = next(t for t in s.trials if t.params["alpha"] == 0.0)
        assert zero.dev.overall == sft[s.checkpoint]


HERE = Path(__file__).parent


def _dup_config(path: Path, sft_run, tiny_suite, output: Path, storage: str | None = None) -> Path:
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(output), **DUPLICATES}
    if storage:
        raw["storage"] = storage
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def dup_reference(sft_run, tiny_suite, tmp_path_factory):
    from conftest import P1, P2, W1, W2
    from pipeline_worker import LoggingEvaluator

    from exme.pipeline import PipelineConfig, run_pipeline

    root = tmp_path_factory.mktemp("dup_reference")
    config = _dup_config(root / "p.yaml", sft_run, tiny_suite, root / "out")
    ev = LoggingEvaluator(root / "log", None, 0.0, sft_run.base, sft_run.ckpts[0], sft_run.ckpts[1], P1, P2, W1, W2)
    res = run_pipeline(PipelineConfig.from_yaml(config), evaluator=ev, progress=False, write_model=False, report=False)
    dev, test = _vectors(res)
    return {"lines": (root / "log").read_text().splitlines(), "distinct": len(set(dev)) + len(set(test))}


@pytest.mark.slow
def test_resumed_and_two_worker_runs_share_equal_models_too(tmp_path, sft_run, tiny_suite, dup_reference):
    from test_resume import _finish, _worker

    assert len(dup_reference["lines"]) == dup_reference["distinct"]
    # Killed during the α search of the second kept checkpoint, then resumed.
    config = _dup_config(tmp_path / "p.yaml", sft_run, tiny_suite, tmp_path / "out")
    assert _finish(_worker(config, tmp_path / "log1", sft_run, "--kill-at", "6")) == -9
    assert _finish(_worker(config, tmp_path / "log2", sft_run)) == 0
    first = (tmp_path / "log1").read_text().splitlines()
    second = (tmp_path / "log2").read_text().splitlines()
    assert Counter(first[:-1] + second) == Counter(dup_reference["lines"])
    # Two workers on one study: each distinct model once between them.
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    configs = [_dup_config(tmp_path / f"q{i}.yaml", sft_run, tiny_suite, tmp_path / f"w{i}", storage) for i in (1, 2)]
    procs = [_worker(configs[i], tmp_path / f"wlog{i}", sft_run, "--sleep", "0.1") for i in (0, 1)]
    for p in procs:
        assert _finish(p) == 0
    logs = [(tmp_path / f"wlog{i}").read_text().splitlines() for i in (0, 1)]
    assert Counter(logs[0] + logs[1]) == Counter(dup_reference["lines"])
