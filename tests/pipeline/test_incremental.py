"""Incremental scoring: halving rungs and race chunks score only items not scored before, and the
joined full record is what one full evaluation of the model records (per item, per task, overall)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from exme.pipeline import stages


class Counting:
    """The suite evaluator, logging what each call was asked for and what it scored."""

    def __init__(self, inner):
        self.inner = inner
        self.suite = inner.suite
        self.capabilities = inner.capabilities
        self.calls: list[tuple[str, dict[str, list[int]] | None, dict[str, int]]] = []

    def counts(self):
        return self.inner.counts()

    def describe(self):
        return self.inner.describe()

    def evaluate(self, model, tokenizer, split, limit=None, items=None, **kwargs):
        scores = self.inner.evaluate(model, tokenizer, split, limit=limit, items=items, **kwargs)
        self.calls.append((split, items, dict(scores.n_items)))
        return scores


@pytest.mark.slow
def test_pruned_and_raced_searches_join_into_full_evaluations(tmp_path, sft_run, tiny_suite):
    from exme.evaluate import load_evaluator
    from exme.pipeline import PipelineConfig, run_pipeline
    from exme.pipeline.run import Runner

    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(tmp_path / "run"), "alpha": {"grid": [0.5, 1.0, 1.5], "stop_on_collapse": False},
           "beta": {"grid": [0.5]}, "baselines": [], "dev": {"confirm_fraction": 0},
           "search": {"race": True, "race_chunk": 1, "race_error_rate": 0.45,
                      "prune": True, "prune_min_items": 1, "prune_eta": 2}}
    config = PipelineConfig.from_dict(raw)
    evaluator = Counting(load_evaluator(str(tiny_suite)))
    run_pipeline(config, evaluator=evaluator, progress=False, write_model=False, report=False)

    # A call given an empty item list for a task scores nothing of it (the task is absent from the scores).
    for split, items, n_items in evaluator.calls:
        if items is not None:
            assert set(n_items) == {t for t, ids in items.items() if ids}

    runner = Runner(config, progress=False, evaluator=evaluator.inner)
    try:
        search = runner.search_item_ids
        per_window = sum(len(v) for v in search.values())
        records = runner.store.run_records(runner.study_name(""))
        dev = [r for r in records if r.split == "dev" and not r.shared]
        # No model is run on a joinable item twice: its fresh items over every record are at most the
        # window's items plus the perplexity task's (re-scored whole on each of its evaluations).
        by_model: dict[str, list] = {}
        for r in dev:
            by_model.setdefault(json.dumps(json.loads(r.model)["model"], sort_keys=True), []).append(r)
        for recs in by_model.values():
            ppl = sum(r.n_items.get("ppl", 0) for r in recs)
            assert sum(r.fresh_items for r in recs) <= per_window - len(search["ppl"]) + ppl
        joined = [r for r in dev if r.scored is not None and r.limit is None and '"chunk"' not in r.model]
        rank_joined = [r for r in joined if "path" in r.params]
        assert rank_joined, "the race's finishers were not joined from their chunks"
        assert any("alpha" in r.params for r in joined), "no halving rung was joined"
        # Racing never costs more items than scoring every checkpoint on every search item.
        rank = runner.store.records(runner.store.study(runner.study_name("rank"))).values()
        assert sum(r.fresh_items for r in rank if not r.shared) <= (1 + len(sft_run.ckpts)) * per_window

        # Each joined full record against one full evaluation of the same model, here.
        kept = [Path(p) for p in sorted({r.params["path"] for r in rank_joined})]
        for rec in joined:
            if "path" in rec.params:
                cand: stages.Candidate = stages.CheckpointWeights(Path(rec.params["path"]))
            else:
                continue
            runner.write(cand)
            full = runner.evaluator.evaluate(runner.target(), runner.tokenizer, "dev", items=search)
            _same(rec, full)
        # An α record: the kept checkpoints in rank order, coefficient 1 + α on the searched one.
        ranked = json.loads((tmp_path / "run" / "results.json").read_text())["ranking"]
        models = tuple(Path(r["path"]) for r in sorted((r for r in ranked if r["kept"]),
                                                      key=lambda r: -r["dev"]["overall"]))
        assert kept
        alpha_joined = 0
        for i in range(len(models)):
            name = next(r["name"] for r in ranked if Path(r["path"]) == models[i])
            study = runner.store.study(runner.study_name(f"alpha/{name}"))
            for rec in runner.store.records(study).values():
                if rec.scored is None or rec.limit is not None or rec.shared:
                    continue
                coeffs = [0.0] * len(models)
                coeffs[i] = 1.0 + float(rec.params["alpha"])
                runner.write(stages.Combination(models, tuple(coeffs)))
                _same(rec, runner.evaluator.evaluate(runner.target(), runner.tokenizer, "dev", items=search))
                alpha_joined += 1
        assert alpha_joined
    finally:
        runner.close()


def _same(rec, full) -> None:
    """A joined record equals a full evaluation: items, per-item scores, task scores, overall, generation."""
    assert rec.n_items == full.n_items
    for t, items in full.per_item.items():
        assert set(rec.per_item[t]) == set(items)
        for i, v in items.items():
            assert rec.per_item[t][i] == pytest.approx(v, rel=1e-9, abs=1e-12)
        # Every task's score is its items' mean (perplexity's shares included), computed here in float64.
        assert rec.tasks[t] == pytest.approx(math.fsum(items.values()) / len(items), rel=1e-12, abs=1e-12)
    assert rec.tasks.keys() == full.tasks.keys()
    assert rec.overall == pytest.approx(full.overall, rel=1e-12, abs=1e-12)
    assert rec.generation == {t: pytest.approx(g) for t, g in full.generation().items()}


@pytest.mark.slow
def test_raced_grids_never_score_more_items_than_the_grid(tmp_path, sft_run, tiny_suite):
    from exme.evaluate import load_evaluator
    from exme.pipeline import PipelineConfig, run_pipeline
    from exme.pipeline.run import Runner

    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(tmp_path / "run"), "alpha": {"grid": [0.0]}, "beta": {"grid": grid},
           "baselines": ["linear"], "dev": {"confirm_fraction": 0},
           "search": {"race": False, "race_grids": True, "race_chunk": 1, "race_error_rate": 0.45}}
    config = PipelineConfig.from_dict(raw)
    res = run_pipeline(config, evaluator=load_evaluator(str(tiny_suite)), progress=False, write_model=False,
                       report=False)
    runner = Runner(config, progress=False, evaluator=load_evaluator(str(tiny_suite)))
    try:
        per_window = sum(len(v) for v in runner.search_item_ids.values())
        ppl = len(runner.search_item_ids["ppl"])
        study = next(s for s in runner.store.storage.get_all_studies() if "/beta/" in s.study_name)
        recs = list(runner.store.records(runner.store.study(study.study_name)).values())
        assert sum(r.fresh_items for r in recs if not r.shared) <= len(grid) * per_window
        # β = 1 and β = 0 are the two SFT checkpoints (α = 0), scored in full by the rank stage: their
        # chunks are cut from those records, and only the perplexity task (which does not join) is run.
        ends = [r for r in recs if r.params["beta"] in (0.0, 1.0) and '"chunk"' in (r.model or "")]
        assert ends and all(r.fresh_items == r.n_items.get("ppl", 0) <= ppl for r in ends)
        chosen = res.beta_search.best_params["beta"]
        full = next(r for r in recs if r.params["beta"] == chosen and '"chunk"' not in (r.model or ""))
        assert full.n_items == {t: len(v) for t, v in runner.search_item_ids.items()}
    finally:
        runner.close()


def test_a_chunk_that_earlier_evaluations_hold_costs_no_write(tmp_path, sft_run, tiny_suite, monkeypatch):
    """β = 0 and 1 (α = 0) are the two SFT checkpoints, scored in full by the rank stage: the β race's
    chunks of them are cut from those records without writing the model or scoring an item."""
    from exme.evaluate import load_evaluator
    from exme.pipeline import PipelineConfig, run_pipeline
    from exme.pipeline.run import Runner

    suite = tmp_path / "suite.yaml"  # the tiny suite without its perplexity task (which does not join)
    suite.write_text("\n".join(line.replace("data: ", f"data: {tiny_suite.parent}/")
                               for line in tiny_suite.read_text().splitlines() if "perplexity" not in line) + "\n")
    writes: list[tuple[str, object]] = []  # (the split of the point being evaluated, the candidate written)
    write, evaluate = Runner.write, Runner._evaluate
    current: list[str] = []

    def counting_write(self, candidate):
        writes.append((current[-1], candidate))
        return write(self, candidate)

    def tracking_evaluate(self, point, candidate, key=""):
        current.append(point.split)
        return evaluate(self, point, candidate, key)

    monkeypatch.setattr(Runner, "write", counting_write)
    monkeypatch.setattr(Runner, "_evaluate", tracking_evaluate)
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(suite),
           "output": str(tmp_path / "run"), "alpha": {"grid": [0.0]}, "beta": {"grid": [0.0, 0.5, 1.0]},
           "baselines": [], "dev": {"confirm_fraction": 0},
           "search": {"race": False, "race_grids": True, "race_chunk": 1, "race_error_rate": 0.45}}
    evaluator = Counting(load_evaluator(str(suite)))
    res = run_pipeline(PipelineConfig.from_dict(raw), evaluator=evaluator, progress=False, write_model=False,
                       report=False)
    dev = [w for split, w in writes if split == "dev" and isinstance(w, stages.Combination)]
    assert [w for w in dev if sorted(w.coeffs) == [0.0, 1.0]] == []
    assert [w.coeffs for w in dev] and all(w.coeffs == (0.5, 0.5) for w in dev)  # only the unscored point
    # every dev call scored items (none was made for a chunk that earlier records held)
    assert all(sum(n.values()) > 0 for split, _, n in evaluator.calls if split == "dev")
    # the β search still holds a full search record of both endpoints, joined from the rank stage's
    beta = {t.params["beta"]: t for t in res.beta_search.trials if not t.pruned}
    assert {0.0, 1.0} <= set(beta)
    assert all(sum(beta[b].dev.n_items.values()) == sum(res.ranking[0].dev.n_items.values()) for b in (0.0, 1.0))
