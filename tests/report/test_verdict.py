"""The recommendation and the console verdict, on constructed final tables."""

from __future__ import annotations

import pytest

from exme.report.schema import FinalRow, SplitScores
from exme.report.verdict import collapse_flags, compare, recommend

N = 40


def _split(correct: list[int], generation: dict | None = None) -> SplitScores:
    s = sum(correct) / len(correct)
    return SplitScores(overall=s, tasks={"t": s}, n_items={"t": len(correct)},
                       per_item={"t": {str(i): float(c) for i, c in enumerate(correct)}}, generation=generation or {})


def _rows(exme_confirm: list[int], sft_confirm: list[int], expo_confirm: list[int] | None = None) -> list[FinalRow]:
    same = [1] * 20 + [0] * 20
    rows = [
        FinalRow(name="base", kind="base", dev=_split([0] * 40), test=_split([0] * 40), confirm=_split([0] * 40)),
        FinalRow(name="SFT-1", kind="sft", dev=_split([1] * 25 + [0] * 15), test=_split(same), confirm=_split(sft_confirm)),
        FinalRow(name="SFT-2", kind="sft", dev=_split([1] * 22 + [0] * 18), test=_split(same), confirm=_split([1] * 10 + [0] * 30)),
        FinalRow(name="EXPO-1", kind="expo", dev=_split([1] * 26 + [0] * 14), test=_split(same),
                 confirm=_split(expo_confirm or [1] * 5 + [0] * 35)),
        FinalRow(name="ExMe", kind="exme", dev=_split([1] * 30 + [0] * 10), test=_split(same), confirm=_split(exme_confirm)),
    ]
    return rows


PATHS = {"ExMe": "/run/model", "SFT-1": "/sft/checkpoint-1", "SFT-2": "/sft/checkpoint-2", "base": "/base"}


def _recommend(rows):
    comps = compare(rows, {"t": 1.0}, split="confirm", n_resamples=200, seed=0)
    return recommend(rows, comps, PATHS)


def test_exme_better_on_confirm_is_recommended_with_its_path():
    rec = _recommend(_rows(exme_confirm=[1] * 30 + [0] * 10, sft_confirm=[1] * 20 + [0] * 20))
    assert rec.name == "ExMe" and rec.path == "/run/model"
    assert "best confirm score (0.7500 over 40 confirm items)" in rec.reason and "ExMe − SFT-1 on confirm +0.2500" in rec.reason


def test_exme_worse_on_confirm_gives_the_best_confirm_model():
    rec = _recommend(_rows(exme_confirm=[1] * 15 + [0] * 25, sft_confirm=[1] * 20 + [0] * 20))
    assert rec.name == "SFT-1" and rec.path == "/sft/checkpoint-1"
    assert "ExMe − SFT-1 on confirm -0.1250 (95% CI" in rec.reason  # what choosing ExMe would have given up


def test_exme_tied_with_the_best_sft_is_not_recommended():
    # Same confirm score as SFT-1, on other items: the paired difference is 0, not positive.
    rec = _recommend(_rows(exme_confirm=[0] * 10 + [1] * 20 + [0] * 10, sft_confirm=[1] * 20 + [0] * 20))
    assert rec.name == "SFT-1"


def test_an_evaluation_without_paths_says_it_was_not_written():
    rec = _recommend(_rows(exme_confirm=[1] * 5 + [0] * 35, sft_confirm=[1] * 5 + [0] * 35, expo_confirm=[1] * 39 + [0]))
    assert rec.name == "EXPO-1" and rec.path is None


def test_collapse_flags_compare_hit_limit_share_with_the_best_sft():
    gen = lambda share: {"g": {"mean_new_tokens": 10.0, "hit_limit": share, "no_stop": share, "n": 40}}  # noqa: E731
    rows = _rows([1] * 40, [1] * 40)
    rows[1] = rows[1].model_copy(update={"test": _split([1] * 20 + [0] * 20, gen(0.05))})
    rows[3] = rows[3].model_copy(update={"test": _split([1] * 20 + [0] * 20, gen(0.30))})
    rows[4] = rows[4].model_copy(update={"test": _split([1] * 20 + [0] * 20, gen(0.20))})
    assert collapse_flags(rows, margin=0.2) == {"EXPO-1": ["g"]}
    assert collapse_flags(rows, margin=0.1) == {"EXPO-1": ["g"], "ExMe": ["g"]}


@pytest.mark.parametrize("split", ["test", "confirm"])
def test_compare_covers_every_reference_overall_and_per_task(split):
    rows = _rows([1] * 30 + [0] * 10, [1] * 20 + [0] * 20)
    comps = compare(rows, {"t": 1.0}, split=split, n_resamples=200, seed=0)
    assert {(c.b, c.task) for c in comps} == {("SFT-1", "overall"), ("SFT-1", "t"), ("EXPO-1", "overall"), ("EXPO-1", "t")}
    assert all(c.a == "ExMe" and c.split == split and c.n == N for c in comps)


def test_report_states_paired_verdicts_search_vs_confirm_and_the_recommendation(tmp_path, make):
    import re

    from exme.report import render
    from exme.report.stats import task_weights

    results = make()
    # per-item 0/1 test and confirm scores matching each row's accuracies (200 test, 30 confirm items per task)
    for row in results.final:
        row.test = row.test.model_copy(update={"per_item": {
            t: {str(i): float(i < round(v * 200)) for i in range(200)} for t, v in row.test.tasks.items()}})
        conf = {t: round(min(1.0, v + (0.1 if row.kind == "exme" else 0.0)) * 30) / 30 for t, v in row.dev.tasks.items()}
        row.confirm = _split_tasks(conf, 30)
    w = task_weights(results.suite, list(results.final[0].test.tasks))
    comps = compare(results.final, w, split="test", n_resamples=300, seed=0)
    comps += compare(results.final, w, split="confirm", n_resamples=300, seed=0)
    paths = {"ExMe": "/runs/x/model"}
    results = results.model_copy(update={
        "comparisons": comps, "recommended": recommend(results.final, comps, paths), "final_model": "/runs/x/model",
        "dev_split": {"seed": 0, "confirm_fraction": 0.3, "search": {"a": list(range(70))}, "confirm": {"a": list(range(30))}},
    })
    text = render(results, tmp_path).read_text()
    outcome = re.search(r"## Outcome\n(.*?)\n## ", text, re.S).group(1)
    head = next(c for c in comps if c.b == "SFT-1" and c.split == "test" and c.task == "overall")
    assert f"paired 95% CI {head.ci_low:+.4f} to {head.ci_high:+.4f}".replace("-", "−") in outcome
    assert f"**{head.verdict}**" in outcome
    assert "Per task, ExMe vs SFT-1 on test" in outcome
    assert "| Model | Search (dev) overall | Confirm overall | Search − confirm |" in outcome
    assert "**Recommended: ExMe**" in outcome and "`/runs/x/model`" in outcome
    assert "70 search items" in outcome and "30 confirm items" in outcome
    assert "**Confirm** (held-out part of dev" in text


def _split_tasks(tasks: dict[str, float], n: int) -> SplitScores:
    w = {"arith": 0.25, "choice": 0.25, "code": 0.5}
    return SplitScores(overall=sum(w[t] * v for t, v in tasks.items()), tasks=tasks, n_items={t: n for t in tasks},
                       per_item={t: {str(i): float(i < round(v * n)) for i in range(n)} for t, v in tasks.items()})
