"""Per-item scores, the search/confirm division of dev, and the recommendation, on a real small suite."""

from __future__ import annotations

import json

import pytest

from exme.errors import ExmeError
from exme.evaluate import SuiteEvaluator
from exme.pipeline import PipelineConfig, run_pipeline
from exme.pipeline.stages import dev_split


@pytest.fixture(scope="module")
def wide_suite(tmp_path_factory):
    """Two tasks of 80 records: 40 dev items each, so a 0.3 confirm share holds 12 per task."""
    root = tmp_path_factory.mktemp("wide_suite")
    mc = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "label": (a + b) % 3}
          for a in range(1, 11) for b in range(1, 9)]
    ppl = [{"text": f"the number {i} comes after {i - 1} and before {i + 1}."} for i in range(1, 81)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (root / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ppl))
    suite = root / "suite.yaml"
    suite.write_text(
        "name: wide\nsplit: {seed: 0, dev_fraction: 0.5}\ntasks:\n"
        "  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n"
        "  - {name: ppl, kind: perplexity, data: ppl.jsonl}\n"
    )
    return suite


def _config(tmp_path, sft_run, suite, name="out", **extra) -> PipelineConfig:
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(suite),
           "output": str(tmp_path / name), "alpha": {"grid": [0.0, 0.5, 1.0]}, "beta": {"grid": [0.0, 0.5, 1.0]},
           "baselines": ["linear"], "stats": {"bootstrap": 200}}
    raw.update(extra)
    return PipelineConfig.from_dict(raw)


def _coefficients(row, kept: list[str]) -> tuple[float, ...]:
    """θ = θ_b + Σ cᵢΔᵢ of a final-table row (base, SFT, EXPO, ExMe, linear) over the kept checkpoints."""
    p, c = row.params, [0.0] * len(kept)
    if row.kind in ("sft", "expo"):
        c[kept.index(p["checkpoint"])] = 1.0 + p.get("alpha", 0.0)
    elif row.kind == "exme":
        c = [p["beta"] * (1 + p["alpha_1"]), (1 - p["beta"]) * (1 + p["alpha_2"])]
    elif row.name == "linear":
        c = [p["weight_1"], 1 - p["weight_1"]]
    return tuple(round(x, 9) + 0.0 for x in c)


class Recording:
    """The suite evaluator, recording which items each call scored; ``confirm_offset`` is added to
    every score of a call that scores confirm items (to show that no choice reads them)."""

    capabilities = SuiteEvaluator.capabilities  # it forwards items= (and keep_items=) to the suite evaluator

    def __init__(self, suite, confirm_ids=None, confirm_offset=0.0, fail_after=None):
        from exme.evaluate import load_evaluator

        self.inner = load_evaluator(str(suite))
        self.calls: list[tuple[str, dict | None]] = []
        self.confirm_ids = confirm_ids
        self.confirm_offset = confirm_offset
        self.fail_after = fail_after

    def describe(self):
        return self.inner.describe()

    def counts(self):
        return self.inner.counts()

    def evaluate(self, model, tokenizer, split, limit=None, items=None, keep_items=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((split, items))
        scores = self.inner.evaluate(model, tokenizer, split, limit=limit, items=items, keep_items=keep_items)
        if items is not None and self.confirm_ids is not None and items == self.confirm_ids:
            shift = self.confirm_offset
            scores = scores.model_copy(update={
                "overall": scores.overall + shift, "tasks": {t: v + shift for t, v in scores.tasks.items()},
                "per_item": {t: {i: v + shift for i, v in s.items()} for t, s in scores.per_item.items()},
            })
        return scores


def _choices(res) -> dict:
    return {
        "ranking": [(c.name, c.dev.overall) for c in res.ranking],
        "alpha": [s.best_params for s in res.alpha_search],
        "beta": res.beta_search.best_params,
        "baselines": [s.best_params for s in res.baseline_search],
        "trials": [[t.dev.overall for t in s.trials] for s in [*res.alpha_search, res.beta_search, *res.baseline_search]],
        "test": [r.test.overall for r in res.final],
    }


def test_dev_split_is_disjoint_complete_seeded_and_sized():
    split = dev_split({"a": 40, "b": 33}, 0.3, seed=5)
    for task, n in {"a": 40, "b": 33}.items():
        assert not set(split.search[task]) & set(split.confirm[task])
        assert sorted(split.search[task] + split.confirm[task]) == list(range(n))
        assert len(split.confirm[task]) == round(n * 0.3)
    assert dev_split({"a": 40, "b": 33}, 0.3, seed=5) == split
    assert dev_split({"a": 40, "b": 33}, 0.3, seed=6).confirm != split.confirm
    # a task's division does not depend on the other tasks
    assert dev_split({"a": 40}, 0.3, seed=5).confirm["a"] == split.confirm["a"]


def test_selection_never_reads_confirm_and_confirm_scores_are_kept(tmp_path, sft_run, wide_suite):
    cfg = _config(tmp_path, sft_run, wide_suite, name="plain")
    plain_ev = Recording(wide_suite)
    plain = run_pipeline(cfg, evaluator=plain_ev, progress=False, write_model=False, report=False)
    split = plain.dev_split
    confirm_ids = {t: list(v) for t, v in split["confirm"].items()}
    search_ids = {t: list(v) for t, v in split["search"].items()}
    assert all(len(v) == 12 for v in confirm_ids.values()) and all(len(v) == 28 for v in search_ids.values())
    # every dev call scored search items only (all of them, or a race's chunk of them) or exactly the
    # confirm items, never a mix
    dev_calls = [items for s, items in plain_ev.calls if s == "dev"]

    def within_search(items: dict) -> bool:
        return set(items) <= set(search_ids) and all(set(v) <= set(search_ids[t]) for t, v in items.items())

    assert dev_calls and all(items == confirm_ids or within_search(items) for items in dev_calls)
    assert search_ids in dev_calls  # the finishers are scored on every search item
    n_confirm_calls = sum(items == confirm_ids for items in dev_calls)
    # each distinct model once: rows that are the same weights (EXPO-i at α = 0 is SFT-i, ExMe at β = 1
    # is EXPO-1 ...) share one evaluation; coefficients over the kept checkpoints computed here
    kept = [c.name for c in plain.ranking if c.kept]
    assert n_confirm_calls == len({_coefficients(r, kept) for r in plain.final})
    for row in plain.final:
        assert set(row.confirm.per_item["mc"]) == {str(i) for i in confirm_ids["mc"]}
        assert set(row.dev.per_item["mc"]) == {str(i) for i in search_ids["mc"]}
    # the same run with every confirm score moved: identical choices and search/test scores
    cfg2 = _config(tmp_path, sft_run, wide_suite, name="altered")
    altered = run_pipeline(cfg2, evaluator=Recording(wide_suite, confirm_ids, confirm_offset=-0.25),
                           progress=False, write_model=False, report=False)
    assert _choices(altered) == _choices(plain)
    assert [r.confirm.overall for r in altered.final] == pytest.approx([r.confirm.overall - 0.25 for r in plain.final])
    # comparisons on test and confirm, overall and per task, with the documented keys
    kinds = {(c.split, c.task) for c in plain.comparisons}
    assert {("test", "overall"), ("test", "mc"), ("confirm", "overall"), ("confirm", "ppl")} <= kinds
    exme = next(r for r in plain.final if r.kind == "exme")
    sft = next(r for r in plain.final if r.name == "SFT-1")
    c = next(c for c in plain.comparisons if c.b == "SFT-1" and c.split == "test" and c.task == "overall")
    assert c.diff == pytest.approx(exme.test.overall - sft.test.overall, abs=1e-12)
    assert c.n == 80 and c.ci_low <= c.diff <= c.ci_high
    assert plain.recommended is not None and plain.recommended.name in {r.name for r in plain.final}


def test_per_item_scores_survive_an_interrupted_run_bit_for_bit(tmp_path, sft_run, wide_suite):
    ref_ev = Recording(wide_suite)
    reference = run_pipeline(_config(tmp_path, sft_run, wide_suite, name="ref"), evaluator=ref_ev,
                             progress=False, write_model=False, report=False)
    cfg = _config(tmp_path, sft_run, wide_suite, name="resumed")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, evaluator=Recording(wide_suite, fail_after=9), progress=False, write_model=False, report=False)
    again = Recording(wide_suite)
    resumed = run_pipeline(cfg, evaluator=again, progress=False, write_model=False, report=False)
    assert len(again.calls) == len(ref_ev.calls) - 9  # the 9 finished before the interruption are read back
    assert any(n.startswith("this invocation evaluated") and "read back" in n for n in resumed.notes)
    for a, b in zip(reference.final, resumed.final):
        assert a.test.per_item == b.test.per_item and a.confirm.per_item == b.confirm.per_item
    for a, b in zip(reference.ranking, resumed.ranking):
        assert a.dev.per_item == b.dev.per_item  # read back from the study: exact floats
    on_disk = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert on_disk["final"][0]["test"]["per_item"] == json.loads(reference.final[0].test.model_dump_json())["per_item"]


@pytest.mark.parametrize("fraction", [0.95, -0.1])
def test_confirm_fraction_outside_its_range_names_the_key(tmp_path, sft_run, wide_suite, fraction):
    with pytest.raises(ExmeError, match=r"dev\.confirm_fraction"):
        _config(tmp_path, sft_run, wide_suite, dev={"confirm_fraction": fraction})


def test_bootstrap_below_100_names_the_key(tmp_path, sft_run, wide_suite):
    with pytest.raises(ExmeError, match=r"stats\.bootstrap"):
        _config(tmp_path, sft_run, wide_suite, stats={"bootstrap": 50})


def test_a_confirm_part_under_10_items_is_refused_before_any_model_loads(tmp_path, sft_run, tiny_suite):
    cfg = _config(tmp_path, sft_run, tiny_suite)
    with pytest.raises(ExmeError, match=r"dev\.confirm_fraction .* task '\w+' \d confirm item"):
        run_pipeline(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_confirm_fraction_zero_turns_the_split_off_and_says_so(tmp_path, sft_run, tiny_suite):
    cfg = _config(tmp_path, sft_run, tiny_suite, dev={"confirm_fraction": 0}, baselines=[])
    res = run_pipeline(cfg, progress=False, write_model=False, report=False)
    assert res.dev_split == {"confirm_fraction": 0.0}
    assert all(r.confirm is None for r in res.final)
    assert any("no confirm split" in n for n in res.notes)
    assert res.recommended is not None and "no confirm split" in res.recommended.reason


def test_cli_bad_confirm_fraction_is_one_line_and_exit_2(tmp_path, sft_run, wide_suite, capsys):
    import yaml

    from exme.cli import main

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(wide_suite),
                                    "output": str(tmp_path / "o"), "dev": {"confirm_fraction": 1.5}}))
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dev.confirm_fraction" in err[0]
    assert not (tmp_path / "o").exists()


class Collapsing:
    """The synthetic objective plus a generative task whose generations all hit the token limit once
    the model is pushed past ``t = threshold`` along Δ₁ or Δ₂ (as an over-extrapolated model rambles)."""

    def __init__(self, synthetic, threshold: float):
        self.synthetic = synthetic
        self.threshold = threshold
        self.calls = 0

    def evaluate(self, model, tokenizer, split, limit=None):
        import torch

        from exme.evaluate import Scores

        self.calls += 1
        s = self.synthetic
        params = dict(model.named_parameters())
        theta = torch.cat([params[n].detach().double().reshape(-1) if n in params else model.state_dict()[n].double().reshape(-1)
                           for n in s.names])
        t = s.gram_inv @ (s.basis.T @ (theta - s.base))
        hit = 1.0 if float(t.max()) >= self.threshold - 1e-9 else 0.0
        gen = {"mean_new_tokens": 64.0 if hit else 8.0, "hit_limit": hit, "no_stop": hit, "n": 100}
        return Scores.from_tasks({"distance": s.score_vector(theta)}, split=split, n_items={"distance": 100},
                                 details={"distance": {"generation": gen}})


def test_alpha_stop_on_collapse_saves_evaluations_and_keeps_the_choice(tmp_path, sft_run, tiny_suite, synthetic):
    """Optima at α = 0.3 and 0.5; generations collapse from t = 1 + α ≥ 1.6. Each α search stops after
    α = 0.6 (collapsed and below the best so far): 0.7 … 1.0 are never evaluated, 4 per checkpoint."""
    base = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite), "baselines": []}
    stopped_ev, full_ev = Collapsing(synthetic, 1.6), Collapsing(synthetic, 1.6)
    stopped = run_pipeline(PipelineConfig.from_dict({**base, "output": str(tmp_path / "a")}), evaluator=stopped_ev,
                           progress=False, write_model=False, report=False)
    full = run_pipeline(PipelineConfig.from_dict({**base, "output": str(tmp_path / "b"), "alpha": {"stop_on_collapse": False}}),
                        evaluator=full_ev, progress=False, write_model=False, report=False)
    assert [[t.params["alpha"] for t in s.trials] for s in stopped.alpha_search] == [[round(0.1 * i, 1) for i in range(7)]] * 2
    assert stopped.collapse["evaluations_saved"] == 8 and full.collapse["evaluations_saved"] == 0
    assert full_ev.calls - stopped_ev.calls == 8
    assert [s.best_params for s in stopped.alpha_search] == [s.best_params for s in full.alpha_search]
    assert stopped.beta_search.best_params == full.beta_search.best_params
    assert sum("larger α not evaluated" in n for n in stopped.notes) == 2


def test_no_stop_when_the_collapsed_point_is_still_the_best(tmp_path, sft_run, tiny_suite, synthetic):
    """Collapse from t ≥ 1.3 (checkpoint 1's own optimum): α = 0.3 is collapsed but the best so far, so
    the search goes on; α = 0.4 is collapsed and worse: stop there."""
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite), "baselines": [],
           "output": str(tmp_path / "c")}
    res = run_pipeline(PipelineConfig.from_dict(raw), evaluator=Collapsing(synthetic, 1.3), progress=False,
                       write_model=False, report=False)
    assert [t.params["alpha"] for t in res.alpha_search[0].trials] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert res.alpha_search[0].best_params["alpha"] == pytest.approx(0.3)


def test_a_non_finite_candidate_is_scored_as_failed_never_chosen(tmp_path, sft_run, tiny_suite, monkeypatch):
    """Writing α = 1 for checkpoint 2 overflows (simulated): that point is recorded as failed and
    flagged, the search goes on and chooses among the others (the optimum α = 0.5 is on the grid)."""
    from synthetic import SyntheticEvaluator

    from conftest import P1
    from exme.pipeline import stages
    from exme.pipeline.run import Runner
    from exme.search.live import NonFiniteCandidate

    original = Runner.write

    def write(self, candidate):
        if isinstance(candidate, stages.Combination) and candidate.coeffs == (0.0, 2.0):
            raise NonFiniteCandidate("checkpoint-20 at α = 1: weights hold Inf")
        return original(self, candidate)

    monkeypatch.setattr(Runner, "write", write)
    ev = SyntheticEvaluator(sft_run.base, sft_run.ckpts[0], sft_run.ckpts[1], P1, 2.2)  # true optimum α₂ = 1.2
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite), "baselines": [],
           "output": str(tmp_path / "o"), "alpha": {"grid": [0.0, 0.5, 1.0]}, "beta": {"grid": [0.5]}}
    res = run_pipeline(PipelineConfig.from_dict(raw), evaluator=ev, progress=False, write_model=False, report=False)
    assert res.alpha_search[1].best_params["alpha"] == 0.5  # 1.0 would score best, but it failed
    assert any("could not be scored" in n and "Inf" in n for n in res.notes)


def test_a_pruned_evaluation_keeps_the_items_it_scored(tmp_path, sft_run, wide_suite):
    """Successive halving scores most α on a subset first: those partial evaluations keep their items
    (the first ``prune_min_items`` search items of each task), stored and written to results.json."""
    cfg = _config(tmp_path, sft_run, wide_suite, alpha={"grid": [0.0, 0.25, 0.5, 0.75, 1.0]}, baselines=[],
                  search={"prune": True, "prune_min_items": 6, "prune_eta": 3})
    res = run_pipeline(cfg, evaluator=Recording(wide_suite), progress=False, write_model=False, report=False)
    search_ids = res.dev_split["search"]
    pruned = [t for s in res.alpha_search for t in s.trials if t.pruned]
    assert pruned
    for trial in pruned:
        for task, items in trial.dev.per_item.items():
            n = trial.dev.n_items[task]
            assert n in (6, 18) and n < len(search_ids[task])  # a rung of 6 or 6·3 items, not all 28
            assert list(items) == [str(i) for i in search_ids[task][:n]]
            assert sum(items.values()) / n == pytest.approx(trial.dev.tasks[task], abs=1e-12)
