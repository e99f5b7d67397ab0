"""A per-module α search (a sampled strategy) killed mid-way resumes with the uninterrupted run's choices,
repeating only the evaluation in flight."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from test_resume import _finish, _worker


def _config(path: Path, sft_run, tiny_suite, output: Path) -> Path:
    raw = {
        "base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite), "output": str(output),
        "alpha": {"grid": [0.0, 0.5, 1.0], "granularity": "module", "n_trials": 8},
        "beta": {"grid": [0.0, 0.5, 1.0]}, "baselines": [], "dev": {"confirm_fraction": 0},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def _choices(output: Path) -> dict:
    res = json.loads((output / "results.json").read_text())
    return {"module": [t["params"] for t in res["module_search"]["trials"]],
            "best": res["module_search"]["best_params"], "beta": res["beta_search"]["best_params"]}


@pytest.mark.slow
def test_a_killed_per_module_search_resumes_with_the_same_choices(tmp_path, sft_run, tiny_suite):
    # The uninterrupted run, in a worker process too (same threads, same float sums as the others).
    ref = _config(tmp_path / "ref.yaml", sft_run, tiny_suite, tmp_path / "ref")
    assert _finish(_worker(ref, tmp_path / "ref.log", sft_run)) == 0
    lines = (tmp_path / "ref.log").read_text().splitlines()
    last_dev = max(i for i, line in enumerate(lines) if line.startswith("dev "))  # the module search's last
    kill_at = last_dev - 2  # 1-based: three evaluations before the search's end, inside it
    config = _config(tmp_path / "p.yaml", sft_run, tiny_suite, tmp_path / "out")
    assert _finish(_worker(config, tmp_path / "log1", sft_run, "--kill-at", str(kill_at))) == -9
    assert _finish(_worker(config, tmp_path / "log2", sft_run)) == 0
    first = (tmp_path / "log1").read_text().splitlines()
    second = (tmp_path / "log2").read_text().splitlines()
    assert len(first) == kill_at and second[0] == first[-1]
    assert Counter(first[:-1] + second) == Counter(lines)  # each evaluation once, the one in flight again
    choices = _choices(tmp_path / "ref")
    assert len(choices["module"]) == 8 and _choices(tmp_path / "out") == choices
