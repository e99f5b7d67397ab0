"""The rank stage races checkpoints: a far worse one stops after the first chunk and ranks last; the
finishers are scored on every search item; bad racing keys are one line before any model loads."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from exme.cli import main
from exme.pipeline import stages
from exme.search.study import Record

N_ITEMS = 24


class FakeEvaluations:
    """Per-item scores from a table (candidate → 0/1 per item of one task); every point scored is logged."""

    def __init__(self, tables: dict[str, list[float]]):
        self.tables = tables
        self.log: list[tuple[str, tuple[int, int] | None]] = []

    def points(self, stage, label, points, candidate):
        out = []
        for p in points:
            name = p.params.get("checkpoint", "base")
            self.log.append((name, p.chunk))
            ids = range(*p.chunk) if p.chunk else range(N_ITEMS)
            items = {str(i): self.tables[name][i] for i in ids}
            mean = sum(items.values()) / len(items)
            out.append(Record(params=dict(p.params), split="dev", limit=None, overall=mean, tasks={"t": mean},
                              n_items={"t": len(items)}, seconds=0.0, number=-1, per_item={"t": items}))
        return out

    def search(self, stage, label, params, candidate, strategy):
        return strategy.run(params, lambda pts: self.points(stage, label, pts, candidate))

    def race_chunks(self, chunk):
        from exme.search.racing import chunk_bounds

        return chunk_bounds(N_ITEMS, chunk)

    def task_weights(self):
        return {"t": 1.0}


def test_a_far_worse_checkpoint_stops_after_the_first_chunk_and_ranks_last(tmp_path):
    rng = random.Random(0)
    names = ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    tables = {n: [float(rng.random() < 0.75) for _ in range(N_ITEMS)] for n in names[1:]}
    tables["checkpoint-1"] = [0.0] * N_ITEMS
    tables["base"] = [0.0] * N_ITEMS
    paths = [tmp_path / n for n in names]
    ev = FakeEvaluations(tables)
    search = SimpleNamespace(race=True, race_chunk=8, race_error_rate=0.05)
    ranked = stages.rank(ev, paths, names, 2, search)
    chunked = [(n, c) for n, c in ev.log if c is not None]
    assert ("checkpoint-1", (0, 8)) in chunked and not any(n == "checkpoint-1" and c != (0, 8) for n, c in chunked)
    full = [n for n, c in ev.log if c is None]
    assert "checkpoint-1" not in full and set(full) == {"base", *names[1:]}  # finishers: every search item
    row = next(r for r in ranked.ranking if r.name == "checkpoint-1")
    assert row.stopped_early and not row.kept and row.dev.n_items == {"t": 8}
    # The finishers' dev scores are the full-item means, computed here.
    for r in ranked.ranking:
        if not r.stopped_early:
            assert r.dev.overall == pytest.approx(sum(tables[r.name]) / N_ITEMS)
    assert "stopped early" in ranked.notes[0] and "z-test" in ranked.notes[0]


def _write(tmp_path: Path, sft_run, tiny_suite, search) -> Path:
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(tmp_path / "out"), "search": search}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("search, key", [
    ({"race": True, "race_error_rate": 0.5}, "search.race_error_rate"),
    ({"race": True, "race_error_rate": 0.0}, "search.race_error_rate"),
    ({"race": True, "race_chunk": 0}, "search.race_chunk"),
    ({"race": False, "race_grids": False, "race_chunk": 4}, "search.race_chunk"),
    ({"race_grids": True, "prune": True}, "search.race_grids"),
])
def test_bad_racing_keys_are_one_line_and_exit_2(tmp_path, sft_run, tiny_suite, capsys, search, key):
    assert main(["run", str(_write(tmp_path, sft_run, tiny_suite, search))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("exme: error:") and key in err[0]
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_raced_pipeline_on_a_real_suite_scores_chunks_then_finishers_in_full(tmp_path, sft_run, tiny_suite):
    """The runner's side of racing on the tiny suite: chunk points score their slice of each task's items."""
    from exme.evaluate import load_evaluator
    from exme.pipeline import PipelineConfig, run_pipeline
    from exme.search.study import StudyStore

    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(tmp_path / "run"), "alpha": {"grid": [0.0, 0.5]}, "beta": {"grid": [0.5]}, "baselines": [],
           "dev": {"confirm_fraction": 0}, "search": {"race": True, "race_chunk": 2, "race_error_rate": 0.4}}
    config = PipelineConfig.from_dict(raw)
    evaluator = load_evaluator(str(tiny_suite))
    res = run_pipeline(config, evaluator=evaluator, progress=False, write_model=False, report=False)
    dev = evaluator.counts()["dev"]
    store = StudyStore(config.storage_url)
    try:
        recs = store.run_records("exme-")
    finally:
        store.close()
    chunked = [r for r in recs if '"chunk"' in (r.model or "")]
    assert chunked and all(n <= 2 for r in chunked for n in r.n_items.values())
    for row in res.ranking:
        assert row.dev.n_items == dev or row.stopped_early  # finishers: every dev item of every task
    assert sum(r.kept for r in res.ranking) == 2
