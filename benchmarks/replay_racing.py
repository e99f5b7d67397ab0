"""Replay search policies on recorded per-item scores: how many search items each would score, and
whether it would make the same choices, without running a model.

    python benchmarks/replay_racing.py --work /work/fewer_evals --label dedup --before before

Reads, per seed, ``<work>/seed<S>/<label>/study.db`` of a run that scored every point of every search
on every search item (``bench_fewer_evals.py run`` with racing and pruning off) and ``<work>/seed<S>/<before>.json``
(the search items of the version compared against). Each item's score depends on that item alone in
the demo's tasks, so a point scored on a chunk of the items would have got exactly the recorded scores
of those items: the replay of a policy is exact, not a simulation. Costs follow the pipeline's rules:
one evaluation per distinct model (the recorded model key), a chunk scores only the items the same
model does not hold yet, the base and the α searches (which stop on collapse, not by racing) are
scored in full.

Policies (each run on the same records; the choices compared with scoring everything):
- ``grid``: every point in full (reproduces the recorded run's own count: a check of the replay);
- ``race``: :func:`exme.search.racing.race` on the rank stage (top 2) and every β and baseline grid
  (best 1) at an error rate, with doubling chunks (the default) or equal ones;
- ``oracle``: a racer that knows the answer: every point but the chosen stops after its first chunk
  (the least any racing with that first chunk can score);
- ``separable``: the oracle, except that points the recorded scores cannot tell from the chosen one
  even on every search item (one-sided paired z-test at 0.05, no correction) are scored in full: the
  least a rule that keeps the choices without guessing among indistinguishable points can score.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from exme.search.racing import chunk_bounds, paired_upper_bound, race  # noqa: E402

Z_SEPARABLE = NormalDist().inv_cdf(0.95)


def _item_key(item: str) -> tuple[int, Any]:
    return (0, int(item)) if item.isdigit() else (1, item)


@dataclass
class Recorded:
    """The full-search records of one run: per stage, its points in evaluation order."""

    stages: dict[str, list[dict[str, Any]]]
    order: dict[str, list[str]]  # task -> search item ids in the pipeline's order
    scored: dict[str, int] = field(default_factory=dict)  # model key -> items per task held (a prefix)
    cost: int = 0

    @classmethod
    def load(cls, db: Path) -> "Recorded":
        con = sqlite3.connect(db)
        names = dict(con.execute("select study_id, study_name from studies"))
        rows = con.execute(
            "select t.study_id, a.value_json from trial_user_attributes a join trials t on a.trial_id = t.trial_id "
            "where a.key = 'exme' order by t.trial_id")
        stages: dict[str, list[dict[str, Any]]] = {}
        order: dict[str, list[str]] = {}
        for study, value in rows:
            rec = json.loads(value)
            rec = json.loads(rec) if isinstance(rec, str) else rec
            if rec["split"] != "dev" or rec["limit"] is not None or rec.get("chunk") is not None:
                continue
            for task, items in rec["per_item"].items():
                order.setdefault(task, sorted(items, key=_item_key))
            stages.setdefault(names[study].split("/", 1)[1], []).append(rec)
        con.close()
        return cls(stages, order)

    @property
    def n(self) -> int:
        return max(len(v) for v in self.order.values())

    def score(self, rec: dict[str, Any], stop: int) -> dict[str, dict[str, float]]:
        """The point's scores on the first ``stop`` search items of each task, paying for the new ones."""
        key = rec["model"]
        have = self.scored.get(key, 0)
        if stop > have:
            self.cost += sum(len(ids[have:stop]) for ids in self.order.values())
            self.scored[key] = stop
        return {t: {i: float(rec["per_item"][t][i]) for i in ids[:stop]} for t, ids in self.order.items()}

    def reset(self) -> None:
        self.scored, self.cost = {}, 0


def best(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pipeline's choice: the highest overall score, ties to the earliest point."""
    top = max(r["overall"] for r in recs)
    return next(r for r in recs if r["overall"] == top)


def _step(rec: dict[str, Any]) -> int:
    return int(str(rec["params"]["checkpoint"]).rsplit("-", 1)[-1])


def top2(recs: list[dict[str, Any]]) -> list[str]:
    """The rank stage's kept checkpoints: by overall score, ties to the later step."""
    return [r["params"]["checkpoint"] for r in sorted(recs, key=lambda r: (r["overall"], _step(r)), reverse=True)[:2]]


Survivors = Callable[[Recorded, list[dict[str, Any]], int], list[int]]


def replay(run: Recorded, survivors: Survivors, alpha: bool = False) -> tuple[int, list[str]]:
    """Search items a policy scores, and the searches whose choice it changes (``alpha``: the α
    searches race too, as they do with ``alpha.stop_on_collapse: false``; the recorded α points are
    those the collapse stop left, so this slightly understates what racing α would cost)."""
    run.reset()
    n, changed = run.n, []
    for stage in sorted(run.stages, key=lambda s: (s != "rank", not s.startswith("alpha"), not s.startswith("beta"), s)):
        recs = run.stages[stage]
        if stage == "rank":
            for r in recs:
                if "model" in r["params"]:  # the base: scored in full, never raced
                    run.score(r, n)
            checkpoints = [r for r in recs if "checkpoint" in r["params"]]
            kept = [checkpoints[i] for i in survivors(run, checkpoints, 2)]
            if top2(kept) != top2(checkpoints):
                changed.append("rank")
        elif stage.startswith("alpha") and not alpha:
            for r in recs:
                run.score(r, n)
        else:
            left = [recs[i] for i in survivors(run, recs, 1)]
            if best(left) is not best(recs):
                changed.append(stage.split("/")[-1] if stage.startswith("baseline") else stage.split("/")[0])
    return run.cost, changed


def grid(run: Recorded, recs: list[dict[str, Any]], k: int) -> list[int]:
    for r in recs:
        run.score(r, run.n)
    return list(range(len(recs)))


def racing(error_rate: float, chunk: int, doubling: bool) -> Survivors:
    def survivors(run: Recorded, recs: list[dict[str, Any]], k: int) -> list[int]:
        chunks = chunk_bounds(run.n, chunk, doubling)
        if len(recs) <= k or len(chunks) <= 1:
            return grid(run, recs, k)

        def score(alive: list[int], j: int) -> list[dict[str, dict[str, float]]]:
            return [run.score(recs[i], chunks[j][1]) for i in alive]

        result = race(len(recs), len(chunks), k, score, error_rate=error_rate)
        for i in result.survivors:
            run.score(recs[i], run.n)
        return result.survivors
    return survivors


def _chosen(recs: list[dict[str, Any]], k: int) -> list[int]:
    if k == 1:
        return [recs.index(best(recs))]
    keep = top2(recs)
    return [i for i, r in enumerate(recs) if r["params"]["checkpoint"] in keep]


def oracle(chunk: int, separable_only: bool) -> Survivors:
    def survivors(run: Recorded, recs: list[dict[str, Any]], k: int) -> list[int]:
        chosen = _chosen(recs, k)
        full = {i: run.score(recs[i], run.n) for i in chosen}
        for i, r in enumerate(recs):
            if i in chosen:
                continue
            mine = {t: {x: float(r["per_item"][t][x]) for x in ids} for t, ids in run.order.items()}
            apart = all((b := paired_upper_bound(mine, full[j], {}, Z_SEPARABLE)) is not None and b < 0 for j in chosen)
            run.score(r, chunk if apart or not separable_only else run.n)
        return chosen
    return survivors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--label", default="dedup")
    parser.add_argument("--before", default="before")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--chunk", type=int, default=8)
    args = parser.parse_args(argv)
    c = args.chunk
    policies: dict[str, tuple[Survivors, bool]] = {
        "grid (every point in full)": (grid, False),
        f"race 0.05, equal chunks of {c}": (racing(0.05, c, False), False),
        f"race 0.05, doubling from {c}": (racing(0.05, c, True), False),
        f"race 0.2, doubling from {c}": (racing(0.2, c, True), False),
        f"race 0.45, doubling from {c}": (racing(0.45, c, True), False),
        f"race 0.45, doubling from {max(1, c // 2)}": (racing(0.45, max(1, c // 2), True), False),
        f"race 0.05, doubling from {c}, α raced too": (racing(0.05, c, True), True),
        f"separable floor (chunk {c})": (oracle(c, True), False),
        f"separable floor (chunk {c}), α too": (oracle(c, True), True),
        f"oracle floor (chunk {c})": (oracle(c, False), False),
        f"oracle floor (chunk {c}), α too": (oracle(c, False), True),
    }
    runs = {s: Recorded.load(args.work / f"seed{s}" / args.label / "study.db") for s in args.seeds}
    before = {s: json.loads((args.work / f"seed{s}" / f"{args.before}.json").read_text())["items"]["search"]
              for s in args.seeds}
    print("| policy | " + " | ".join(f"seed {s}" for s in args.seeds) + " | same choices |")
    print("|---|" + "---:|" * len(args.seeds) + "---|")
    for name, (policy, alpha) in policies.items():
        cells, same = [], 0
        for s in args.seeds:
            cost, changed = replay(runs[s], policy, alpha)
            same += not changed
            cells.append(f"{cost} ({cost / before[s]:.0%})" + (f" ≠ {', '.join(changed)}" if changed else ""))
        print(f"| {name} | " + " | ".join(cells) + f" | {same} of {len(args.seeds)} |")


if __name__ == "__main__":
    main()
