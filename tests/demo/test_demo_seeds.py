"""benchmarks/demo_seeds.py: the per-seed table and its mean ± SE, on constructed results."""

from __future__ import annotations

import json
import math

import pytest

@pytest.fixture(scope="module")
def seeds(benchmark_script):
    return benchmark_script("demo_seeds")


def _results(exme: float, sft1: float, sft2: float, linear: float, ci: tuple[float, float] | None) -> dict:
    def row(name, kind, test, dev):
        return {"name": name, "kind": kind, "test": {"overall": test, "tasks": {}, "n_items": {"t": 160}},
                "dev": {"overall": dev, "tasks": {}}}

    final = [row("SFT-1", "sft", sft1, 0.5), row("SFT-2", "sft", sft2, 0.4), row("ExMe", "exme", exme, 0.6),
             row("linear", "baseline", linear, 0.55)]
    comps = []
    if ci is not None:
        comps.append({"a": "ExMe", "b": "SFT-1", "split": "test", "task": "overall", "n": 160, "diff": exme - sft1,
                      "se": 0.02, "ci_low": ci[0], "ci_high": ci[1], "p_value": 0.5, "verdict": "no detectable difference"})
    return json.loads(json.dumps({"final": final, "comparisons": comps, "recommended": {"name": "SFT-1", "path": None, "reason": ""}}))


def test_seed_rows_use_the_dev_chosen_sft_and_paired_cis(seeds):
    row = seeds.seed_row(_results(0.45, 0.40, 0.50, 0.47, (0.01, 0.09)))
    assert row["best_sft"] == "SFT-1"  # best on dev, although SFT-2 is better on test
    assert row["diffs"]["best SFT"]["diff"] == pytest.approx(0.05)
    assert row["diffs"]["best SFT"]["ci"] == (0.01, 0.09)
    assert row["diffs"]["linear"]["diff"] == pytest.approx(-0.02) and row["diffs"]["linear"]["ci"] is None
    assert row["recommended"] == "SFT-1" and row["n_test"] == 160


def test_table_mean_and_standard_error_over_seeds(seeds):
    diffs = [0.05, -0.01, 0.02]
    rows = {s: seeds.seed_row(_results(0.4 + d, 0.4, 0.3, 0.4, (d - 0.04, d + 0.04))) for s, d in enumerate(diffs)}
    text = seeds.table(rows)
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    last = text.splitlines()[-1]
    assert f"+{mean:.3f} ± {se:.3f}" in last
    assert "| 1 | 160 | −0.010 [−0.050, +0.030]" in text
    assert text.count("\n") == 2 + 3  # header, rule, three seeds, mean
