"""The cost said up front: what is left after the first evaluation and after each stage, at the measured rate."""

from __future__ import annotations

from types import SimpleNamespace

from exme.search.cost import CostProjection, StagePlan, pipeline_plan


def test_projection_counts_what_is_left_at_the_measured_rate():
    said: list[str] = []
    plan = [StagePlan("rank", 4, 10), StagePlan("alpha", 6, 10), StagePlan("test", 3, 50)]
    cost = CostProjection(plan, said.append)
    cost.add({"n_items": {"a": 6, "b": 4}}, 2.0)  # 10 items in 2 s: 5 items/s
    # Left: 3 rank + 6 α candidates of 10 items, 3 test rows of 50: 240 items at 5 items/s = 48 s.
    assert said == ["cost after the first evaluation: at most 12 candidates and 240 item evaluations left, "
                    "about 0:48 at the measured 5.0 items/s"]
    for _ in range(3):
        cost.add({"n_items": {"a": 10}}, 1.0)
    cost.stage_done("rank")  # 40 items in 5 s: 8 items/s; 210 items left: 26.25 s
    assert said[-1] == ("cost after rank: at most 9 candidates and 210 item evaluations left, "
                        "about 0:26 at the measured 8.0 items/s")
    assert cost.remaining() == (9, 210)


def test_the_pipeline_plan_is_each_stage_at_most():
    config = SimpleNamespace(
        top_k=2, alpha=SimpleNamespace(grid=[0.0, 0.5, 1.0], refine=False), beta=SimpleNamespace(grid=[0.0, 0.5, 1.0]),
        search=SimpleNamespace(mode="grid", n_trials=40), baselines=["linear", "task_arithmetic"],
    )
    plan = pipeline_plan(config, 6, {"search": 84, "confirm": 36, "test": 480})
    by = {s.name: (s.candidates, s.items) for s in plan}
    # rank: base + 6; α: 2 × 3; β: 3; linear 3 + task arithmetic 4; rows: base, 2 SFT, 2 EXPO, ExMe, 2 baselines.
    assert by == {"rank": (7, 84), "extrapolate": (6, 84), "merge": (3, 84), "baselines": (7, 84),
                  "test": (8, 480), "confirm": (8, 36)}
