"""Search strategies on a fake evaluate: which points each scores, on how many items."""

from __future__ import annotations

from exme.search.strategy import Grid, Halving, Sequential
from exme.search.study import Record


def _evaluate(log, n_items=21):
    def evaluate(points):
        out = []
        for p in points:
            log.append((p.params["x"], p.limit))
            n = n_items if p.limit is None else min(p.limit, n_items)
            out.append(Record(params=dict(p.params), split="dev", limit=p.limit, overall=-abs(p.params["x"] - 3),
                              tasks={}, n_items={"t": n}, seconds=0.0, number=-1))
        return out
    return evaluate


def test_halving_makes_a_rung_that_covers_every_item_the_full_evaluation():
    log = []
    out = Halving(8, 3, max_items=21).run([{"x": x} for x in range(7)], _evaluate(log))
    # Rung 1: seven points on 8 items; the best ceil(7/3) = 3 (x = 2, 3, 4) go on; 24 ≥ 21 items: full.
    assert log == [(x, 8) for x in range(7)] + [(2, None), (3, None), (4, None)]
    assert out.best.params == {"x": 3} and len(out.dropped) == 4
    # Without knowing the item count it scores a 24-item rung first, then the last survivor in full.
    log2 = []
    Halving(8, 3).run([{"x": x} for x in range(7)], _evaluate(log2))
    assert log2[7:] == [(2, 24), (3, 24), (4, 24), (3, None)]


def test_grid_and_sequential():
    log = []
    assert Grid().run([{"x": 1}, {"x": 5}], _evaluate(log)).best.params == {"x": 1} and len(log) == 2
    log = []
    out = Sequential(lambda recs: recs[-1].params["x"] >= 2).run([{"x": x} for x in range(5)], _evaluate(log))
    assert [x for x, _ in log] == [0, 1, 2] and len(out.records) == 3
