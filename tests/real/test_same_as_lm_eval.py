"""``exme eval`` gives lm-eval's numbers on a real model: SmolLM2-135M-Instruct, real ARC-Easy, MMLU, GSM8K.

exme's suite evaluator (hf backend) scores items; lm-eval's ``HFLM``, handed the same loaded model and
tokenizer, is then given the very request strings exme built (its own tokenization, context/continuation
split, batching and stop handling). Per item: the choices' log-likelihoods agree within float tolerance
and the predictions are identical; GSM8K's greedy completions are identical strings and lm-eval's own
``flexible-extract`` filter reads the same answer exme recorded. Without the chat template the prompts
are also rendered from lm-eval's shipped task YAMLs (arc_easy, mmlu continuation), so exme's prompt is
checked to be lm-eval's, not only fed to it. No hub access: the model and records are the cached assets.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval", reason="optional extra exme[lm-eval] is not installed")

from exme.evaluate import Suite, SuiteEvaluator  # noqa: E402

pytestmark = pytest.mark.slow

# Sized for the test suite on 2 CPU cores (12 + 12 items and 3 x 24 tokens took 418 s of wall time at load 4-7).
N_ARC = 8
MMLU_IDS = list(range(0, 14042, 1756))[:8]  # spread over the subjects (the file is sorted by subject)
N_GSM8K = 2
GSM8K_TOKENS = 16


@pytest.fixture(scope="module")
def loaded(real_model_dir):
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, torch_dtype=torch.float32).eval()
    hflm = HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=8, max_length=2048)
    return model, tok, hflm


def _suite(real, task: str, chat: bool, **overrides) -> Suite:
    path = Path(real.suite(task, chat=chat))
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for spec in raw["tasks"]:
        spec.update(overrides)
    return Suite.from_dict(raw, base_dir=path.parent, source=path)


def _lm_eval_requests(kind: str, pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(pairs)]


def _lm_eval_prompt(task_yaml: str, record: dict, description: str = "") -> str:
    """lm-eval's own prompt for ``record``: the shipped task YAML's ``doc_to_text``, rendered by lm-eval."""
    import lm_eval
    from lm_eval.utils import apply_template

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / task_yaml).read_text())
    return description + apply_template(config["doc_to_text"], record)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_multiple_choice_loglikelihoods_equal_hflm(real, loaded, chat):
    model, tok, hflm = loaded
    tasks = {"arc_easy": list(range(N_ARC)), "mmlu": MMLU_IDS}
    all_logliks: list[float] = []
    agree_label = 0
    for task, ids in tasks.items():
        suite = _suite(real, task, chat)
        name = suite.tasks[0].name
        records = [suite.tasks[0].records("test")[i] for i in ids]
        raw_records = [json.loads(line) for line in Path(real.data(task, "test")).open(encoding="utf-8")]
        scores = SuiteEvaluator(suite, mc_batch_size=8).evaluate(model, tok, "test", items={name: ids}, keep_items=True)
        items = scores.details[name]["items"]
        assert len(items) == len(ids)

        delimiter = "" if chat else " "  # lm-eval: no target delimiter under a chat template (no gen_prefix)
        pairs, spans = [], []
        for item, record in zip(items, records):
            start = len(pairs)
            pairs += [(item["prompt"], delimiter + choice) for choice in record["choices"]]
            spans.append((start, len(pairs)))
        theirs = hflm.loglikelihood(_lm_eval_requests("loglikelihood", pairs), disable_tqdm=True)

        for pos, (item, record, (start, stop)) in enumerate(zip(items, records, spans)):
            ref = [lp for lp, _ in theirs[start:stop]]
            where = f"{name} test item {ids[pos]}"
            assert item["loglik"] == pytest.approx(ref, rel=1e-4, abs=2e-3), where
            assert item["prediction"] == max(range(len(ref)), key=ref.__getitem__), where
            normed = [lp / len(c) for lp, c in zip(ref, record["choices"])]
            assert item["prediction_norm"] == max(range(len(normed)), key=normed.__getitem__), where
            assert item["label"] == record["label"]
            all_logliks += ref
            agree_label += item["prediction"] == record["label"]
            if not chat:  # exme's prompt is the one lm-eval's shipped task renders
                source = raw_records[ids[pos]]
                if task == "arc_easy":
                    expected = _lm_eval_prompt("arc/arc_easy.yaml", source)
                else:
                    subject = source["subject"].replace("_", " ")
                    expected = _lm_eval_prompt(
                        "mmlu/continuation/_continuation_template_yaml", source,
                        f"The following are questions (with answers) about {subject}.\n\n")
                assert item["prompt"] == expected, where
        acc = scores.details[name]["metrics"]["acc"]
        assert acc == pytest.approx(statistics.mean(float(it["prediction"] == it["label"]) for it in items))
    # The comparison can fail: the numbers vary across items and are real log-probabilities.
    assert len(set(round(x, 4) for x in all_logliks)) > len(all_logliks) // 2
    assert all(x < 0 and math.isfinite(x) for x in all_logliks)
    assert 0 < agree_label < len(tasks["arc_easy"]) + len(MMLU_IDS)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_gsm8k_greedy_completions_equal_hflm(real, loaded, chat):
    from lm_eval.filters.extraction import RegexFilter

    model, tok, hflm = loaded
    suite = _suite(real, "gsm8k", chat, max_new_tokens=GSM8K_TOKENS, answer_filter="flexible-extract")
    name = suite.tasks[0].name
    evaluator = SuiteEvaluator(suite, batch_size=1)
    scores = evaluator.evaluate(model, tok, "test", limit=N_GSM8K, keep_items=True)
    items = scores.details[name]["items"]
    from exme.evaluate.prompts import stop_strings

    stops = stop_strings(suite.tasks[0])
    assert "Question:" in stops  # lm-eval's gsm8k stops, chat template or not

    requests = _lm_eval_requests("generate_until", [
        (item["prompt"], {"until": stops, "max_gen_toks": GSM8K_TOKENS, "do_sample": False}) for item in items])
    hflm.batch_size_per_gpu = 1  # one row at a time on both sides: no padding in either greedy decode
    try:
        theirs = hflm.generate_until(requests, disable_tqdm=True)
    finally:
        hflm.batch_size_per_gpu = 8
    # lm-eval's gsm8k flexible-extract: the last number-like match.
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    extracted = [resp[0] for resp in flexible.apply([[t] for t in theirs], [{}] * len(theirs))]
    for i, (item, completion, answer) in enumerate(zip(items, theirs, extracted)):
        assert item["completion"] == completion, f"{name} item {i}"
        assert item["prediction"] == answer, f"{name} item {i}"
    assert len(set(theirs)) == len(theirs) and all(t.strip() for t in theirs)  # distinct, non-empty answers
