"""StudyStore.run_records: every finished evaluation of a run, as the trials hold them, seen across workers."""

from __future__ import annotations

from exme.search.study import Point, StudyStore


def _objective(point: Point) -> dict:
    x = float(point.params["x"])
    return {"overall": x / 10, "tasks": {"t": x / 10}, "n_items": {"t": 4}, "per_item": {"t": {"0": x / 10}},
            "model": f"m{x}"}


def test_run_records_follow_the_trials_across_two_stores_and_studies(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with StudyStore(url) as a, StudyStore(url) as b:
        a.evaluate("run-1/alpha", [Point({"x": 1}), Point({"x": 2})], _objective)
        b.evaluate("run-2/alpha", [Point({"x": 9})], _objective)  # another run: never among run-1's
        first = a.run_records("run-1/")
        assert [(r.params["x"], r.overall, r.model) for r in first] == [(1, 0.1, "m1.0"), (2, 0.2, "m2.0")]
        # another worker finishes trials in a study a has read and in a new one: a sees them at once,
        # in study then trial order, and its earlier records are the same objects (read once)
        b.evaluate("run-1/alpha", [Point({"x": 3})], _objective)
        b.evaluate("run-1/beta", [Point({"x": 4})], _objective)
        again = a.run_records("run-1/")
        assert [r.params["x"] for r in again] == [1, 2, 3, 4]
        assert again[0] is first[0] and again[1] is first[1]
        assert a.find_model("run-1/", "m4.0").overall == 0.4 and a.find_model("run-1/", "m9.0") is None
        # what a fresh store reads from the database equals what the cached one returns
    with StudyStore(url) as c:
        assert [(r.params, r.overall, r.per_item, r.number) for r in c.run_records("run-1/")] == \
               [(r.params, r.overall, r.per_item, r.number) for r in again]
