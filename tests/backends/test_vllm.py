"""The vLLM backend against the transformers backend, item by item, on every built-in task kind;
candidates swapped into a running engine against a fresh engine; a pipeline run on each backend.

Two engines sum in different orders, so a greedy near-tie may flip a token: where that can change
an item, the tests count the changed items and bound them (``MAX_CHANGED``) instead of hiding them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from exme.evaluate import Suite, SuiteEvaluator

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_CHANGED = 1  # items per task and split whose outcome may differ between engines
# Second engines (fresh ones, lm-eval's own) stay alive until the module ends: tearing an in-process
# vLLM engine down resets vLLM's process-wide parallel state, which breaks the shared ``engine``.
_ALIVE: list = []
GENERATIVE = ("gsm", "gen", "mbpp")


@pytest.fixture(scope="module")
def engine(vllm_models):
    from exme.evaluate.backends.vllm import VLLMBackend

    return VLLMBackend(vllm_models.a, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(vllm_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vllm_models.a)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _changed_items(hf, vl) -> dict[str, int]:
    """Per task, how many items differ between two Scores (generation: text, finish, token count;
    multiple choice: the pick, unless the two best choices are within 1e-4 nats; perplexity: the
    NLL beyond 1e-5 relative). Log-likelihoods are also checked to 1e-4 on every choice."""
    changed = {}
    for task, detail in hf.details.items():
        a, b = detail["items"], vl.details[task]["items"]
        assert len(a) == len(b)
        n = 0
        for x, y in zip(a, b):
            if task in GENERATIVE:
                n += (x["completion"], x["finish"], x["new_tokens"]) != (y["completion"], y["finish"], y["new_tokens"])
            elif task == "mc":
                assert y["loglik"] == pytest.approx(x["loglik"], abs=1e-4)
                top = sorted(x["loglik"], reverse=True)
                n += x["prediction"] != y["prediction"] and top[0] - top[1] > 1e-4
            else:
                n += not math.isclose(x["nll"], y["nll"], rel_tol=1e-5)
        changed[task] = n
    return changed


def _assert_same_scores(hf, vl):
    changed = _changed_items(hf, vl)
    assert all(n <= MAX_CHANGED for n in changed.values()), changed
    for task, n in changed.items():
        if n == 0:
            assert vl.tasks[task] == pytest.approx(hf.tasks[task], rel=1e-5, abs=1e-6)
            if task in GENERATIVE:
                assert vl.details[task]["generation"] == hf.details[task]["generation"]
    return changed


def test_vllm_gives_the_hf_per_item_scores_for_the_base_and_a_live_candidate(engine, tokenizer, vllm_models, all_kinds_suite):
    """Base A as the engine loaded it; then a candidate θ_b + 1.3Δ_B − 0.2Δ_C written by the live
    model into its module and swapped into the same engine (the pipeline's loop)."""
    from exme.evaluate.backends import LiveTarget
    from exme.search.live import LiveModel

    evaluator = SuiteEvaluator(Suite.from_yaml(all_kinds_suite), keep_items=True, batch_size=4)
    live = LiveModel.load(vllm_models.a, dtype="float32")
    live.set_models([vllm_models.b, vllm_models.c])
    target = LiveTarget("vllm", lambda: live, model_path=vllm_models.a, dtype="float32", engine=engine)
    total = {}
    for apply in (live.apply_base, lambda: live.apply([1.3, -0.2])):
        apply()
        served = target()
        assert served is engine
        for split in ("dev", "test"):
            hf = evaluator.evaluate(live.model, tokenizer, split)
            vl = evaluator.evaluate(served, tokenizer, split)
            for task, n in _assert_same_scores(hf, vl).items():
                total[task] = total.get(task, 0) + n
    gens = [hf.details[t]["generation"] for t in GENERATIVE]
    assert any(g["mean_new_tokens"] > 1 for g in gens)  # the fixture's outputs are not all empty
    print("items changed between engines:", total)


def _serve(engine, tokenizer, prompts, continuation):
    from exme.evaluate.lm import Continuation

    rows = engine.generate(prompts, max_new_tokens=16, stop=["\n\n"])
    reqs = [Continuation(tuple(p), continuation) for p in prompts]
    return rows, engine.loglikelihood(reqs)


def test_swapped_in_candidate_equals_a_fresh_engine_started_on_it(engine, tokenizer, vllm_models):
    """Stale prefix cache: the engine serves A on long shared-prefix prompts, B is swapped in, and
    the same prompts must give exactly what an engine started on B's folder gives."""
    from exme.evaluate.backends.vllm import VLLMBackend

    prefix = "Answer each question with one short word and nothing else at all. " * 6
    prompts = [tokenizer(f"{prefix}Question {i}: which colour?\nAnswer:")["input_ids"] for i in range(6)]
    cont = tuple(tokenizer(" red", add_special_tokens=False)["input_ids"])
    b_weights = list(_hf(vllm_models.b).state_dict().items())

    engine.load_weights(list(_hf(vllm_models.a).state_dict().items()))
    served_a = _serve(engine, tokenizer, prompts, cont)
    engine.load_weights(b_weights)
    swapped = _serve(engine, tokenizer, prompts, cont)

    fresh = VLLMBackend(vllm_models.b, dtype="float32")
    expected = _serve(fresh, tokenizer, prompts, cont)
    assert swapped[0] == expected[0]
    assert swapped[1] == expected[1]
    assert served_a[0] != expected[0]  # A and B really answer differently on these prompts
    _ALIVE.append(fresh)


def test_shared_contexts_read_the_prefix_cache_and_score_as_without_it(engine, tokenizer, vllm_models):
    """Multiple choice with long shared contexts: each context is prefilled once and the choices
    read its cached blocks; the log-likelihoods equal those computed without the cache."""
    from exme.evaluate.lm import Continuation, continuation_logprobs

    engine.load_weights(list(_hf(vllm_models.a).state_dict().items()))
    preamble = "Choose the word that best completes the sentence, and think about it carefully first. " * 4
    reqs = []
    for i in range(6):
        ctx = tuple(tokenizer(f"{preamble}Sentence {i}: the sky is")["input_ids"])
        assert len(ctx) > 2 * engine.block_size
        for choice in (" blue", " green", " blue today", " bl"):  # " blue" and " blue today" share a prefix
            reqs.append(Continuation(ctx, tuple(tokenizer(choice, add_special_tokens=False)["input_ids"])))
    engine.prefix_reuse = False
    plain = engine.loglikelihood(reqs)
    engine.prefix_reuse = True
    engine.reset_cache()
    reused = engine.loglikelihood(reqs)
    assert [g for _, g in reused] == [g for _, g in plain]
    assert max(abs(a - b) for (a, _), (b, _) in zip(reused, plain)) < 1e-4
    hf = [lp for lp, _ in continuation_logprobs(_hf(vllm_models.a), reqs)]
    assert max(abs(a - b) for (a, _), b in zip(reused, hf)) < 1e-4


def test_engine_only_live_model_serves_what_the_merge_engine_writes(engine, tokenizer, vllm_models, tmp_path):
    """No transformers module: the candidate is streamed tensor by tensor into the running engine,
    which then answers exactly as a fresh engine started on the merge engine's output folder."""
    import shutil

    from exme.evaluate.backends.vllm import VLLMBackend
    from exme.merge.config import MergeConfig
    from exme.merge.engine import run_merge
    from exme.pipeline import exme_coefficients
    from exme.search.live import LiveModel

    weights, alphas = [0.6, 0.4], [0.5, 0.3]
    live = LiveModel.load(vllm_models.a, shell=True)
    live.sink = engine.load_weights
    live.set_models([vllm_models.b, vllm_models.c])
    live.apply(exme_coefficients(weights, alphas))
    prefix = "Answer each question with one short word and nothing else at all. " * 6
    prompts = [tokenizer(f"{prefix}Question {i}: which colour?\nAnswer:")["input_ids"] for i in range(6)]
    cont = tuple(tokenizer(" red", add_special_tokens=False)["input_ids"])
    served = _serve(engine, tokenizer, prompts, cont)

    config = MergeConfig.model_validate({
        "merge_method": "exme", "base_model": str(vllm_models.a), "dtype": "float32", "out_dtype": "float32",
        "models": [{"model": str(vllm_models.b), "parameters": {"weight": weights[0], "alpha": alphas[0]}},
                   {"model": str(vllm_models.c), "parameters": {"weight": weights[1], "alpha": alphas[1]}}],
    })
    merged = run_merge(config, tmp_path / "merged", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (vllm_models.a / name).exists() and not (merged / name).exists():
            shutil.copy(vllm_models.a / name, merged / name)
    fresh = VLLMBackend(merged, dtype="float32")
    assert served == _serve(fresh, tokenizer, prompts, cont)
    live.apply_base()
    assert _serve(engine, tokenizer, prompts, cont) != served  # the swap really changed the answers
    _ALIVE.append(fresh)


def test_lm_eval_tasks_on_the_engine_give_lm_eval_vllm_and_hflm_responses(engine, tokenizer, vllm_models, lm_eval_tasks):
    """Every output type (multiple choice, generation, loglikelihood, rolling) through exme's
    engine, document by document, against lm-eval's own VLLM model on a fresh engine and HFLM."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from exme.evaluate.lm_eval_adapter import backend_lm

    from .conftest import count_changed, lm_eval_responses

    engine.load_weights(list(_hf(vllm_models.a).state_dict().items()))
    ours = lm_eval_responses(backend_lm(engine, tokenizer), lm_eval_tasks)
    hflm = lm_eval_responses(HFLM(pretrained=_hf(vllm_models.a), tokenizer=tokenizer, batch_size=4), lm_eval_tasks)
    peer = _lm_eval_vllm_class()(pretrained=str(vllm_models.a), dtype="float32", batch_size="auto",
                                 enable_prefix_caching=True, seed=0)
    theirs = lm_eval_responses(peer, lm_eval_tasks)
    _ALIVE.append(peer)
    # lm-eval's two models decode differently: VLLM keeps special tokens in the text, HFLM drops them.
    specials = [t for t in tokenizer.all_special_tokens if t]
    plain = {t: {d: [_drop(r, specials) for r in rs] for d, rs in docs.items()} for t, docs in ours.items()}
    against_vllm, against_hf = count_changed(ours, theirs), count_changed(plain, hflm)
    print("documents changed: vs lm-eval VLLM", against_vllm, "vs HFLM", against_hf)
    assert all(n <= MAX_CHANGED for n in against_vllm.values()), against_vllm
    assert all(n <= MAX_CHANGED for n in against_hf.values()), against_hf
    assert any(r[0] for r in theirs["exme_lm_gen"].values())  # the generations are not all empty


def test_cli_eval_backend_vllm_matches_backend_hf(vllm_models, all_kinds_suite, tmp_path):
    docs = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "exme", "eval", str(vllm_models.a), "--suite", str(all_kinds_suite),
             "--dtype", "float32", "--backend", backend, "--json", str(out)],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        docs[backend] = json.loads(out.read_text())
    from exme.evaluate.scores import Scores

    assert docs["vllm"]["backend"] == "vllm"
    for split in ("dev", "test"):
        hf = Scores.model_validate(docs["hf"]["scores"][split])
        vl = Scores.model_validate(docs["vllm"]["scores"][split])
        _assert_same_scores(hf, vl)


def test_cli_eval_lm_eval_tasks_on_vllm_gives_the_hf_backend_per_item_scores(vllm_models, lm_eval_tasks, tmp_path):
    """``exme eval --backend vllm --tasks ...`` over local lm-eval task YAMLs, against ``--backend hf``
    (lm-eval's own HFLM) on the same items: the same per-item scores, and the metrics that sum
    per-token log-likelihoods (perplexity, bits per byte) to 1e-4 relative."""
    pytest.importorskip("lm_eval")
    from exme.evaluate.scores import Scores

    from .conftest import LM_EVAL_TASKS

    scores = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "exme", "eval", str(vllm_models.a), "--tasks", ",".join(LM_EVAL_TASKS),
             "--include-path", str(lm_eval_tasks), "--dtype", "float32", "--backend", backend, "--json", str(out)],
            capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        doc = json.loads(out.read_text())
        assert doc["backend"] == backend
        scores[backend] = {s: Scores.model_validate(doc["scores"][s]) for s in ("dev", "test")}
    continuous = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
    for split in ("dev", "test"):
        hf, vl = scores["hf"][split], scores["vllm"][split]
        assert set(hf.tasks) == set(vl.tasks) == set(LM_EVAL_TASKS)
        for task, items in hf.per_item.items():
            assert items and set(vl.per_item[task]) == set(items), task
            changed = sum(vl.per_item[task][i] != v for i, v in items.items())
            assert changed <= MAX_CHANGED, (split, task, changed)
        for task in LM_EVAL_TASKS:
            ours, theirs = vl.details[task]["metrics"], hf.details[task]["metrics"]
            for metric in continuous & set(theirs):
                assert ours[metric] == pytest.approx(theirs[metric], rel=1e-4), (split, task, metric)
        assert any(continuous & set(hf.details[t]["metrics"]) for t in LM_EVAL_TASKS)


def test_cli_eval_refuses_an_lm_eval_task_vllm_cannot_serve_before_the_engine_starts(vllm_models, lm_eval_tasks,
                                                                                      tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from exme.cli import main
    from exme.evaluate.backends import vllm as vllm_backend

    def refuse(*args, **kwargs):
        raise AssertionError("the engine started before the task was checked")

    monkeypatch.setattr(vllm_backend.VLLMBackend, "__init__", refuse)
    _sampled_task(lm_eval_tasks, tmp_path)
    code = main(["eval", str(vllm_models.a), "--tasks", "exme_lm_mc,exme_lm_sampled", "--include-path", str(tmp_path),
                 "--include-path", str(lm_eval_tasks), "--backend", "vllm"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("exme: error: ") and err.count("\n") == 1
    assert "'exme_lm_sampled'" in err and "backend vllm" in err


def _sampled_task(lm_eval_tasks, folder):
    """``exme_lm_sampled`` in ``folder``: the generation task asking for sampling, which exme's engines do not do."""
    text = (lm_eval_tasks / "exme_lm_gen.yaml").read_text()
    (folder / "exme_lm_sampled.yaml").write_text(
        text.replace("task: exme_lm_gen", "task: exme_lm_sampled").replace("do_sample: false", "do_sample: true\n  temperature: 0.7")
    )


def test_pipeline_refuses_an_lm_eval_task_vllm_cannot_serve_before_loading(vllm_models, lm_eval_tasks, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from exme.errors import ExmeError
    from exme.evaluate.backends import vllm as vllm_backend
    from exme.pipeline.config import PipelineConfig
    from exme.pipeline.run import run_pipeline
    from exme.search.live import LiveModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the task was checked")

    monkeypatch.setattr(vllm_backend.VLLMBackend, "__init__", refuse)
    monkeypatch.setattr(LiveModel, "__init__", refuse)
    _sampled_task(lm_eval_tasks, tmp_path)
    config = PipelineConfig.from_dict({
        "base": str(vllm_models.a), "checkpoints": [str(vllm_models.b), str(vllm_models.c)],
        "suite": "lm-eval:exme_lm_mc,exme_lm_sampled", "lm_eval_include_path": [str(tmp_path), str(lm_eval_tasks)],
        "backend": "vllm", "output": str(tmp_path / "out"),
    })
    with pytest.raises(ExmeError) as err:
        run_pipeline(config, progress=False, write_model=False, report=False)
    message = str(err.value)
    assert "'exme_lm_sampled'" in message and "backend vllm" in message and "\n" not in message


def test_pipeline_with_backend_vllm_makes_the_choices_of_backend_hf(vllm_models, all_kinds_suite, tmp_path):
    from exme.pipeline.config import PipelineConfig
    from exme.pipeline.run import run_pipeline

    suite = tmp_path / "suite.yaml"
    text = all_kinds_suite.read_text().replace("data: ", f"data: {all_kinds_suite.parent}/")
    suite.write_text("\n".join(line for line in text.splitlines() if "mbpp" not in line and "ppl" not in line) + "\n")
    results = {}
    for backend in ("hf", "vllm"):
        config = PipelineConfig.from_dict(
            {
                "base": str(vllm_models.a), "checkpoints": [str(vllm_models.b), str(vllm_models.c)],
                "suite": str(suite), "top_k": 2, "alpha": {"grid": [0.0, 0.5, 1.0]}, "beta": {"grid": [0.3, 0.7]},
                "baselines": ["task_arithmetic"], "dtype": "float32", "backend": backend, "dev": {"confirm_fraction": 0},
                "output": str(tmp_path / backend),
            }
        )
        results[backend] = run_pipeline(config, progress=False, write_model=False, report=False)
    hf, vl = results["hf"], results["vllm"]
    assert [(r.name, r.kept) for r in hf.ranking] == [(r.name, r.kept) for r in vl.ranking]
    searches = list(zip(hf.alpha_search + [hf.beta_search] + hf.baseline_search, vl.alpha_search + [vl.beta_search] + vl.baseline_search))
    assert len(searches) == 4
    for a, b in searches:
        assert (a.name, a.best_params) == (b.name, b.best_params)
    for a, b in zip(hf.final, vl.final):
        assert a.name == b.name
        for split in ("dev", "test"):
            sa, sb = getattr(a, split, None), getattr(b, split, None)
            if sa is not None:
                assert sb.overall == pytest.approx(sa.overall, abs=0.1)


def test_an_architecture_vllm_cannot_serve_is_named(tmp_path, vllm_models):
    import shutil

    from exme.errors import ExmeError
    from exme.evaluate.backends.vllm import VLLMBackend

    odd = tmp_path / "odd"
    shutil.copytree(vllm_models.a, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["NotARealModelForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExmeError, match="NotARealModelForCausalLM") as err:
        VLLMBackend(odd)
    assert "\n" not in str(err.value)


def _lm_eval_vllm_class():
    from exme.testing import lm_eval_vllm_module

    return lm_eval_vllm_module().VLLM


def _drop(response, specials):
    if not isinstance(response, str):
        return response
    for token in specials:
        response = response.replace(token, "")
    return response


def test_pipeline_with_lm_eval_tasks_on_vllm_makes_the_choices_of_hf(vllm_models, lm_eval_tasks, tmp_path):
    pytest.importorskip("lm_eval")
    from exme.pipeline.config import PipelineConfig
    from exme.pipeline.run import run_pipeline

    results = {}
    for backend in ("hf", "vllm"):
        config = PipelineConfig.from_dict({
            "base": str(vllm_models.a), "checkpoints": [str(vllm_models.b), str(vllm_models.c)],
            "suite": "lm-eval:exme_lm_mc,exme_lm_ll", "lm_eval_include_path": [str(lm_eval_tasks)],
            "top_k": 2, "alpha": {"grid": [0.0, 1.0]}, "beta": {"grid": [0.3, 0.7]}, "baselines": [],
            "dtype": "float32", "backend": backend, "dev": {"confirm_fraction": 0}, "output": str(tmp_path / backend),
        })
        results[backend] = run_pipeline(config, progress=False, write_model=False, report=False)
    hf, vl = results["hf"], results["vllm"]
    assert [(r.name, r.kept) for r in hf.ranking] == [(r.name, r.kept) for r in vl.ranking]
    for a, b in zip(hf.alpha_search + [hf.beta_search], vl.alpha_search + [vl.beta_search]):
        assert (a.name, a.best_params) == (b.name, b.best_params)
    for a, b in zip(hf.final, vl.final):
        assert a.name == b.name and a.test.per_item == b.test.per_item
    assert vl.rescore is not None and vl.rescore["backend"] == "vllm"


def test_lm_eval_vllm_module_imports_beside_the_cpu_wheel_and_restores_the_version_lookup():
    import importlib.metadata as metadata

    from exme.testing import lm_eval_vllm_module

    real = metadata.version
    module = lm_eval_vllm_module()
    assert metadata.version is real  # only the import saw the answered lookup
    assert module.VLLM.__module__ == "lm_eval.models.vllm_causallms"


def test_batch_invariant_kernels_on_a_cpu_are_refused_in_one_line_before_the_engine_starts(vllm_models, monkeypatch):
    import os

    from exme.errors import ExmeError
    from exme.evaluate.backends.vllm import VLLMBackend

    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    with pytest.raises(ExmeError) as err:
        VLLMBackend(vllm_models.a, device="cpu", batch_invariant=True)
    message = str(err.value)
    assert "batch_invariant" in message and "CUDA" in message and "\n" not in message
    assert "VLLM_BATCH_INVARIANT" not in os.environ  # nothing switched on for a later engine
