"""Per-module ExMe (alpha.granularity): the search, the final-table row, merge.yaml, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from exme.evaluate import Scores
from exme.io import Checkpoint
from exme.pipeline import PipelineConfig, run_pipeline


def _config(tmp_path, sft_run, tiny_suite, name="out", **extra) -> PipelineConfig:
    raw = {"base": str(sft_run.base), "checkpoints": str(sft_run.run), "suite": str(tiny_suite),
           "output": str(tmp_path / name), "baselines": [], "alpha": {"grid": [0.0, 0.25, 0.5, 0.75, 1.0]},
           "beta": {"grid": [0.0, 0.5, 1.0]}, "top_k": 2}
    raw.update(extra)
    return PipelineConfig.from_dict(raw)


class GroupedObjective:
    """score(θ) = −Σ_t (x_t·Δ₁_t / ‖Δ₁_t‖² − p_t)² over tensors t (x = θ − θ_b): per tensor the coordinate of
    its change along checkpoint-10's, so attention, MLP and the rest each have their own optimum p."""

    def __init__(self, base, sft1, targets: dict[str, float]):
        b, m = Checkpoint.open(base), Checkpoint.open(sft1)
        self.names = sorted(b.names)
        self.base = {n: b.get(n).double() for n in self.names}
        self.delta = {n: m.get(n).double() - self.base[n] for n in self.names}
        self.targets = targets  # substring → p (first match), default key ""
        self.calls = 0

    def p(self, name: str) -> float:
        return next(v for k, v in self.targets.items() if k in name)

    def evaluate(self, model, tokenizer, split, limit=None) -> Scores:
        self.calls += 1
        params = dict(model.named_parameters())
        score = 0.0
        for n in self.names:
            if n not in params or not bool(self.delta[n].abs().sum() > 0):
                continue
            x = params[n].detach().double() - self.base[n]
            t = float((x * self.delta[n]).sum() / (self.delta[n] * self.delta[n]).sum())
            score -= (t - self.p(n)) ** 2
        return Scores.from_tasks({"distance": score}, split=split, n_items={"distance": 100})


def _resolve(entries, name: str) -> float:
    """mergekit's rule, written here on its own: the first entry whose filter is a substring of the name."""
    if not isinstance(entries, list):
        return float(entries)
    for e in entries:
        if "filter" not in e or e["filter"] in name:
            return float(e["value"])
    raise AssertionError(f"no entry for {name}")


def test_per_module_search_row_and_merge_yaml(tmp_path, sft_run, tiny_suite):
    objective = GroupedObjective(sft_run.base, sft_run.ckpts[0], {".self_attn.": 1.8, ".mlp.": 0.6, "": 1.2})
    cfg = _config(tmp_path, sft_run, tiny_suite, alpha={"grid": [0.0, 0.25, 0.5, 0.75, 1.0], "granularity": "module",
                                                        "n_trials": 12})
    res = run_pipeline(cfg, evaluator=objective, progress=False)
    rows = {r.name: r for r in res.final}
    glob, module = rows["ExMe"], rows["ExMe-module"]
    assert module.kind == "exme_module" and module.params["granularity"] == "module"
    search = res.module_search
    assert len(search.trials) == 12  # the trials are counted
    # the first trial is the global optimum: every group's α_i is the global α_i
    alphas = [float(glob.params["alpha_1"]), float(glob.params["alpha_2"])]
    beta = float(glob.params["beta"])
    searched = [i for i, w in ((1, beta), (2, 1 - beta)) if w != 0]  # a checkpoint of weight 0 keeps its α
    assert searched
    first = search.trials[0].params
    assert first == {f"alpha_{i}/{g}": alphas[i - 1] for g in ("attention", "mlp", "other") for i in searched}
    assert search.trials[0].dev.overall == pytest.approx(glob.dev.overall, abs=1e-12)
    assert search.best_dev >= glob.dev.overall
    assert search.best_dev == max(t.dev.overall for t in search.trials)

    # merge.yaml: task arithmetic whose weights, resolved by first-match substring per tensor, are the
    # coefficients β(1+α) of the chosen per-group α; the model folder holds θ_b + Σ cᵢΔᵢ with them.
    run = tmp_path / "out"
    spec = yaml.safe_load((run / "merge.yaml").read_text())
    assert spec["merge_method"] == "task_arithmetic" and spec["parameters"] == {"normalize": False, "lambda": 1.0}
    assert [m["model"] for m in spec["models"]] == [str(p) for p in sft_run.ckpts[:2]]
    weights = [beta, 1.0 - beta]
    base, m1, m2 = (Checkpoint.open(p) for p in (sft_run.base, *sft_run.ckpts[:2]))
    out = Checkpoint.open(run / "model")
    groups = {".self_attn.": "attention", ".mlp.": "mlp"}
    for name in base.names:
        group = next((g for f, g in groups.items() if f in name), "other")
        expected_c = [weights[i] * (1.0 + float(module.params[f"alpha_{i + 1}/{group}"])) for i in range(2)]
        got_c = [_resolve(m["parameters"]["weight"], name) for m in spec["models"]]
        assert got_c == pytest.approx(expected_c, rel=1e-12), name
        b = base.get(name).double()
        theta = b + got_c[0] * (m1.get(name).double() - b) + got_c[1] * (m2.get(name).double() - b)
        torch.testing.assert_close(out.get(name).double(), theta, rtol=0,
                                   atol=4 * torch.finfo(torch.float32).eps * theta.abs().max().item())
    assert json.loads((run / "model.spec.json").read_text()) == spec
    # `exme merge merge.yaml` (filter lists read by the merge engine) makes model/ bitwise, and model/ is
    # bitwise what the live model evaluated for the chosen per-group candidate.
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge
    from exme.merge.groups import GroupCoefficients, group_rule
    from exme.search.live import LiveModel

    again = Checkpoint.open(run_merge(MergeConfig.model_validate(spec), tmp_path / "from_yaml", progress=False))
    assert again.names == out.names and all(torch.equal(again.get(n), out.get(n)) for n in out.names)
    rule = group_rule("module", base.names)
    coeffs = GroupCoefficients.from_groups(rule, {
        g: [weights[i] * (1.0 + float(module.params[f"alpha_{i + 1}/{g}"])) for i in range(2)] for g in rule.groups})
    live = LiveModel.load(sft_run.base)
    live.set_models(sft_run.ckpts[:2])
    live.apply(coeffs)
    state = live.state_dict()
    assert all(torch.equal(state[n], out.get(n)) for n in out.names if n in state)
    assert res.final_model == str(run / "model")
    report = (run / "report.md").read_text()
    assert "Per-module ExMe" in report and (run / "plots" / "alpha_groups.png").is_file()


def test_granularity_global_makes_todays_choices(tmp_path, sft_run, tiny_suite, synthetic, run_cli):
    """An explicit `granularity: global` evaluates the same candidates and chooses the same as leaving it out;
    its merge.yaml (plain weights) written by `exme merge` is bitwise the run's model."""
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge

    default = run_pipeline(_config(tmp_path, sft_run, tiny_suite, "a"), evaluator=synthetic, progress=False)
    calls_default = list(synthetic.calls)
    synthetic.calls.clear()
    explicit = run_pipeline(_config(tmp_path, sft_run, tiny_suite, "b", alpha={"grid": [0.0, 0.25, 0.5, 0.75, 1.0],
                                                                             "granularity": "global"}),
                            evaluator=synthetic, progress=False)
    assert synthetic.calls == calls_default
    assert [r.model_dump() for r in explicit.final] == [r.model_dump() for r in default.final]
    assert explicit.module_search is None and "ExMe-module" not in [r.name for r in explicit.final]
    assert [s.model_dump() for s in explicit.alpha_search] == [s.model_dump() for s in default.alpha_search]
    assert explicit.beta_search.model_dump() == default.beta_search.model_dump()

    spec = yaml.safe_load((tmp_path / "b" / "merge.yaml").read_text())
    row = next(r for r in explicit.final if r.name == "ExMe")
    beta, a1, a2 = float(row.params["beta"]), float(row.params["alpha_1"]), float(row.params["alpha_2"])
    assert [m["parameters"]["weight"] for m in spec["models"]] == pytest.approx([beta * (1 + a1), (1 - beta) * (1 + a2)], rel=1e-15)
    written = run_merge(MergeConfig.model_validate(spec), tmp_path / "from_yaml", progress=False)
    a, b = Checkpoint.open(written), Checkpoint.open(tmp_path / "b" / "model")
    assert a.names == b.names
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names)


@pytest.mark.parametrize("alpha, words", [
    ({"granularity": "module", "module_range": [-0.5, 1.0]}, "'alpha.module_range': per-module α must be >= 0"),
    ({"granularity": "heads"}, "'alpha.granularity': granularity 'heads' is not one of global, module, layers:N"),
    ({"granularity": "layers:3"}, "alpha.granularity: layers:3 asks for more groups than the model's 2 decoder layers"),
    ({"n_trials": 5}, "alpha.n_trials only apply with granularity module or layers:N"),
    ({"sampler": "cmaes"}, "alpha.sampler only apply with granularity module or layers:N"),
    ({"granularity": "module", "sampler": "nelder-mead"}, "'alpha.sampler': sampler 'nelder-mead' is not one of tpe, cmaes"),
    ({"granularity": "module", "sampler": "cmaes", "module_range": [-0.2, 1.0]},
     "'alpha.module_range': per-module α must be >= 0"),
])
def test_bad_granularity_input_is_one_line_before_any_model_loads(tmp_path, sft_run, tiny_suite, run_cli, alpha, words,
                                                                   monkeypatch):
    import exme.common

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(exme.common, "load_model", refuse)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"base": str(sft_run.base), "checkpoints": str(sft_run.run),
                                      "suite": str(tiny_suite), "output": str(tmp_path / "out"), "alpha": alpha,
                                      "dev": {"confirm_fraction": 0}}))
    code, out, err = run_cli("run", config, "--quiet")
    assert code == 2
    assert err.startswith("exme: error: ") and err.count("\n") == 1 and words in err, err


@pytest.mark.slow
def test_per_module_search_by_cma_es(tmp_path, sft_run, tiny_suite):
    """alpha.sampler: cmaes runs alpha.n_trials trials, seeded, from the global optimum, in a study of its own
    (a TPE search of the same space in the same run folder is not continued by it)."""
    objective = GroupedObjective(sft_run.base, sft_run.ckpts[0], {".self_attn.": 1.8, ".mlp.": 0.6, "": 1.2})
    alpha = {"grid": [0.0, 0.25, 0.5, 0.75, 1.0], "granularity": "module", "n_trials": 7}
    tpe = run_pipeline(_config(tmp_path, sft_run, tiny_suite, alpha=alpha), evaluator=objective, progress=False,
                       write_model=False, report=False)
    runs = [run_pipeline(_config(tmp_path, sft_run, tiny_suite, alpha={**alpha, "sampler": "cmaes"}),
                         evaluator=objective, progress=False, write_model=False, report=False) for _ in range(2)]
    cma, again = runs[0].module_search, runs[1].module_search
    glob = next(r for r in runs[0].final if r.name == "ExMe")
    assert cma.space["mode"] == "cmaes" and len(cma.trials) == 7
    assert any("7 CMA-ES trials on the search split" in n for n in runs[0].notes)
    # 3 module groups x 2 checkpoints = 6 alpha: a generation of 4 + floor(3 ln 6) = 9 trials after the start point
    assert any("fewer than one CMA-ES generation (9 trials for 6 α" in n for n in runs[0].notes)
    assert not any("CMA-ES generation" in n for n in tpe.notes)
    assert cma.trials[0].params == tpe.module_search.trials[0].params  # both start at the global optimum
    assert cma.trials[0].dev.overall == pytest.approx(glob.dev.overall, abs=1e-12)
    assert [t.params for t in cma.trials[1:]] != [t.params for t in tpe.module_search.trials[1:]]
    assert [t.params for t in again.trials] == [t.params for t in cma.trials]  # read back: same seed, same study
    lo, hi = cma.space["alpha"]
    assert lo >= 0 and all(lo <= v <= hi for t in cma.trials for v in t.params.values())
    assert cma.best_dev == max(t.dev.overall for t in cma.trials) >= glob.dev.overall
