"""Scores against independent computations: float64 log-likelihoods from the model's logits, a plain
greedy loop without cache or padding, and hand-worked generation cases on a scripted model."""

import math

import pytest
import torch

from exme.evaluate import Scores, Suite, SuiteEvaluator
from exme.evaluate.lm import greedy_generate

from .conftest import ScriptedLM, write_jsonl, write_suite

MC_RECORDS = [
    {"question": "Which is a fruit?", "choices": ["apple", "stone", "a cloud of dust"], "label": 0},
    {"question": "2+2?", "choices": ["4", "22", "four hundred"], "label": 2},
    {"question": "Sky colour?", "choices": ["blue", "green"], "label": 1},
    {"question": "Pick z", "choices": ["x", "yy", "zzz", "w"], "label": 3},
    {"question": "Pick a", "choices": ["aaaa", "b"], "label": 0},
    {"question": "Last", "choices": ["one", "two", "three"], "label": 1},
]


def _direct_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens | context) from one unpadded forward pass, in float64."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _mc_suite(tmp_path, extra=""):
    write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    return Suite.from_yaml(
        write_suite(tmp_path / "s.yaml", f"split: {{seed: 1, dev_fraction: 0.5}}\ntasks:\n  - {{name: mc, kind: multiple_choice, data: mc.jsonl{extra}}}\n")
    )


def test_mc_loglik_acc_and_acc_norm_match_float64_computation(tiny_lm, tmp_path):
    model, tok, _ = tiny_lm
    suite = _mc_suite(tmp_path)
    evaluator = SuiteEvaluator(suite, mc_batch_size=5, keep_items=True)  # batches cut across items
    for split in ("dev", "test"):
        scores = evaluator.evaluate(model, tok, split)
        records = suite.tasks[0].records(split)
        items = scores.details["mc"]["items"]
        acc = acc_norm = 0
        for record, item in zip(records, items):
            context = f"Question: {record['question']}\nAnswer:"
            direct = [_direct_loglik(model, tok, context, " " + c) for c in record["choices"]]
            assert item["loglik"] == pytest.approx(direct, abs=2e-4)
            acc += max(range(len(direct)), key=direct.__getitem__) == record["label"]
            normed = [lp / len(c) for lp, c in zip(direct, record["choices"])]  # lm-eval: characters of the choice
            acc_norm += max(range(len(normed)), key=normed.__getitem__) == record["label"]
        assert scores.tasks["mc"] == pytest.approx(acc / len(records))
        assert scores.details["mc"]["metrics"]["acc_norm"] == pytest.approx(acc_norm / len(records))
        assert scores.n_items == {"mc": len(records)}


def test_mc_with_fewshot_and_custom_template(tiny_lm, tmp_path):
    model, tok, _ = tiny_lm
    extra = ', prompt: "Q: {question}\\nA:", fewshot: [{question: shot, choices: [\"yes\", \"no\"], label: 1}]'
    suite = _mc_suite(tmp_path, extra)
    scores = SuiteEvaluator(suite, keep_items=True).evaluate(model, tok, "dev")
    record = suite.tasks[0].records("dev")[0]
    context = "Q: shot\nA: no\n\nQ: " + record["question"] + "\nA:"
    direct = [_direct_loglik(model, tok, context, " " + c) for c in record["choices"]]
    assert scores.details["mc"]["items"][0]["loglik"] == pytest.approx(direct, abs=2e-4)


def test_perplexity_matches_direct_computation_with_windows(tiny_lm, tmp_path):
    model, tok, _ = tiny_lm
    docs = ["The quick brown fox jumps over the lazy dog. " * 2, "Short text.", "Another document, of middling length!"]
    write_jsonl(tmp_path / "ppl.jsonl", [{"body": d} for d in docs])
    suite = Suite.from_yaml(
        write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: ppl, kind: perplexity, dev: ppl.jsonl, test: ppl.jsonl, text_field: body}\n")
    )
    window = 16
    old = model.config.max_position_embeddings
    model.config.max_position_embeddings = window  # forces the long document into windows
    try:
        scores = SuiteEvaluator(suite).evaluate(model, tok, "dev")
    finally:
        model.config.max_position_embeddings = old
    total_nll, total_tokens = 0.0, 0
    for doc in docs:
        ids = tok(doc)["input_ids"]
        start = 0
        while start < len(ids) - 1:  # window k predicts its tokens 1.. given the ones before, within the window
            piece = ids[start : start + window]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([piece])).logits[0].double(), -1)
            total_nll -= float(sum(logp[i - 1, piece[i]] for i in range(1, len(piece))))
            total_tokens += len(piece) - 1
            start += window - 1
    assert total_tokens == sum(len(tok(d)["input_ids"]) - 1 for d in docs)
    metrics = scores.details["ppl"]["metrics"]
    assert metrics["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-4)
    assert scores.tasks["ppl"] == pytest.approx(-total_nll / total_tokens, rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / sum(len(d.encode()) for d in docs), rel=1e-4)


def _plain_greedy(model, ids, max_new_tokens, eos_id):
    """Greedy decoding with no cache, no padding, no batching: the reference for the batched path."""
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos_id:
                break
            ids.append(nxt)
            new.append(nxt)
    return new


def test_batched_generation_equals_plain_greedy_loop(tiny_lm):
    model, tok, _ = tiny_lm
    prompts = ["Question: what is 2+2?\nAnswer:", "Hi", "A much longer prompt that needs lots of left padding, surely.", "x = 1\n"]
    ids = [tok(p)["input_ids"] for p in prompts]
    batched = greedy_generate(model, tok, ids, max_new_tokens=12, batch_size=3)
    expected = [tok.decode(_plain_greedy(model, i, 12, tok.eos_token_id), skip_special_tokens=True) for i in ids]
    assert batched == expected


def test_stop_string_cuts_completion(tiny_lm):
    model, tok, _ = tiny_lm
    ids = [tok("Hello there")["input_ids"]]
    full = greedy_generate(model, tok, ids, max_new_tokens=20)[0]
    assert len(full) >= 6
    stop = full[3:5]
    expected = full[: full.find(stop)]
    assert greedy_generate(model, tok, ids, max_new_tokens=20, stop=[stop]) == [expected]


GSM = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
    {"question": "A debt of 1,000 grows by 250. How big?", "answer": "#### 1,250"},
    {"question": "Temperature -3 falls 2. Now?", "answer": "#### -5"},
    {"question": "Half of 5?", "answer": "#### 2.5"},
]


def test_gsm8k_scoring_on_scripted_answers(tmp_path):
    from exme.testing import char_tokenizer

    tok = char_tokenizer()
    write_jsonl(tmp_path / "g.jsonl", GSM)
    suite = Suite.from_yaml(write_suite(tmp_path / "s.yaml", "tasks:\n  - {name: gsm, kind: gsm8k, dev: g.jsonl, test: g.jsonl}\n"))
    answers = {
        "How many?\nAnswer:": " 3 + 4 = 7 apples.\n\nQuestion: more text 99",  # stop string hides the 99
        "How big?\nAnswer:": " It is $1,250.",
        "Now?\nAnswer:": " It is -1 then -5",
        "Half of 5?\nAnswer:": " no idea",
    }
    model = ScriptedLM(tok, answers)
    scores = SuiteEvaluator(suite, keep_items=True, batch_size=3).evaluate(model, tok, "dev")
    preds = [item["prediction"] for item in scores.details["gsm"]["items"]]
    assert preds == [7.0, 1250.0, -5.0, None]
    assert scores.tasks["gsm"] == pytest.approx(0.75) and scores.overall == pytest.approx(0.75)
    assert model.calls == 2  # 4 prompts in batches of 3
    limited = SuiteEvaluator(suite).evaluate(model, tok, "dev", limit=2)
    assert limited.n_items == {"gsm": 2} and limited.tasks["gsm"] == 1.0


def test_generate_kind_with_regex_and_weights(tmp_path):
    from exme.testing import char_tokenizer

    tok = char_tokenizer()
    write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Capital of France?", "target": "Paris"}, {"prompt": "Colour of snow?", "target": ["white", "White"]}])
    write_jsonl(tmp_path / "gen2.jsonl", [{"prompt": "Say hi", "target": "hi"}, {"prompt": "Say yo", "target": "yo"}])
    suite = Suite.from_yaml(
        write_suite(
            tmp_path / "s.yaml",
            "tasks:\n"
            "  - {name: cap, kind: generate, dev: gen.jsonl, test: gen.jsonl, regex: 'Answer: (\\w+)', weight: 3}\n"
            "  - {name: say, kind: generate, dev: gen2.jsonl, test: gen2.jsonl, metric: contains}\n",
        )
    )
    model = ScriptedLM(tok, {"France?": "Answer: Paris.", "snow?": "It is white", "Say hi": "well hi there", "Say yo": "nope"})
    scores = SuiteEvaluator(suite).evaluate(model, tok, "test")
    assert scores.tasks == {"cap": 0.5, "say": 0.5}
    assert scores.details["cap"]["metrics"]["contains"] == 1.0
    assert scores.overall == pytest.approx((3 * 0.5 + 1 * 0.5) / 4)


def test_scores_follow_weights_changed_in_place(tiny_lm, tmp_path):
    model, tok, _ = tiny_lm
    evaluator = SuiteEvaluator(_mc_suite(tmp_path), keep_items=True)
    first = evaluator.evaluate(model, tok, "dev")
    assert evaluator.evaluate(model, tok, "dev") == first  # deterministic
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.lm_head.weight.mul_(3.0)
        changed = evaluator.evaluate(model, tok, "dev")
        assert changed.details["mc"]["items"][0]["loglik"] != first.details["mc"]["items"][0]["loglik"]
    finally:
        model.load_state_dict(saved)
    assert evaluator.evaluate(model, tok, "dev") == first


def test_scores_weighted_mean():
    scores = Scores.from_tasks({"a": 1.0, "b": 0.0}, split="dev", weights={"a": 3.0})
    assert scores.overall == 0.75
    assert scores.summary() == {"overall": 0.75, "tasks": {"a": 1.0, "b": 0.0}, "n_items": {}}


def test_logits_budget_splits_batches_without_changing_results(tiny_lm):
    from exme.evaluate.lm import Continuation, continuation_logprobs

    model, tok, _ = tiny_lm
    requests = [
        Continuation(tuple(tok(f"Context number {i} " * (i % 3 + 1))["input_ids"]), tuple(tok(" choice" * (i % 2 + 1), add_special_tokens=False)["input_ids"]))
        for i in range(7)
    ]
    calls = []
    handle = model.register_forward_hook(lambda module, args, kwargs_out=None: calls.append(1))
    try:
        wide = continuation_logprobs(model, requests, batch_size=32)
        n_wide = len(calls)
        narrow = continuation_logprobs(model, requests, batch_size=32, logits_budget=len(tok) * 16)
    finally:
        handle.remove()
    assert n_wide == 1 and len(calls) - n_wide > 1  # the budget forced several smaller batches
    assert [lp for lp, _ in narrow] == pytest.approx([lp for lp, _ in wide], abs=1e-4)
    for req, (lp, _) in zip(requests, wide):
        context = tok.decode(list(req.context), skip_special_tokens=True)
        assert lp == pytest.approx(_direct_loglik(model, tok, context, tok.decode(list(req.continuation))), abs=2e-4)
