"""The demo's seeded data and its locally built base model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from exme.demo.base import BaseModelSpec, build_base, read_stamp, train_tokenizer
from exme.demo.data import CATEGORIES, DemoSizes, write_demo_data

SMALL = DemoSizes(pretrain_docs=60, sft_per_task=30, eval_per_task=12)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path):
    write_demo_data(tmp_path / "a", seed=7, sizes=SMALL)
    write_demo_data(tmp_path / "b", seed=7, sizes=SMALL)
    write_demo_data(tmp_path / "c", seed=8, sizes=SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert set(a) == {"corpus.txt", "sft.jsonl", "suite.yaml", "tasks/arith.jsonl", "tasks/choice.jsonl", "tasks/code.jsonl"}
    assert a == b
    assert a["tasks/arith.jsonl"] != c["tasks/arith.jsonl"] and a["sft.jsonl"] != c["sft.jsonl"]


def test_items_are_correct_by_independent_checks(tmp_path):
    data = write_demo_data(tmp_path, seed=1, sizes=SMALL)
    for item in _jsonl(data.tasks["arith"]):
        # "Ann has 5 apples. She gets 3 more." -> 8; "... gives away 3." -> 2
        have, change = (int(n) for n in re.findall(r"\d+", item["question"])[:2])
        gains = any(v in item["question"] for v in ("gets", "finds", "buys"))
        expected = have + change if gains else have - change
        assert item["answer"].endswith(f"#### {expected}")
    for item in _jsonl(data.tasks["choice"]):
        picked = item["choices"][item["label"]]
        if "largest" in item["question"]:
            assert int(picked) == max(int(c) for c in item["choices"])
        elif "smallest" in item["question"]:
            assert int(picked) == min(int(c) for c in item["choices"])
        else:
            category = re.search(r"is an? (\w+):", item["question"]).group(1)
            assert picked in CATEGORIES[category]
            assert [c for c in item["choices"] if c in CATEGORIES[category]] == [picked]
    for item in _jsonl(data.tasks["code"]):
        namespace: dict = {}
        exec(item["code"], namespace)
        for test in item["test_list"]:
            exec(test, namespace)  # raises AssertionError if the reference is wrong
        wrong = item["code"].replace("return ", "return 1000 + ")
        with pytest.raises(AssertionError):
            ns: dict = {}
            exec(wrong, ns)
            for test in item["test_list"]:
                exec(test, ns)


def test_sft_prompts_never_repeat_a_suite_item_and_the_suite_loads(tmp_path):
    from exme.evaluate import Suite

    data = write_demo_data(tmp_path, seed=2, sizes=SMALL)
    sft_prompts = "\n".join(r["prompt"] for r in _jsonl(data.sft))
    for task, key in (("arith", "question"), ("choice", "question"), ("code", "text")):
        for item in _jsonl(data.tasks[task]):
            assert item[key] not in sft_prompts
    suite = Suite.from_yaml(data.suite)
    counts = suite.counts()
    assert {t: counts["dev"][t] + counts["test"][t] for t in counts["dev"]} == {"arith": 12, "choice": 12, "code": 12}
    assert len(_jsonl(data.sft)) == 3 * SMALL.sft_per_task


def test_tokenizer_round_trips_code_and_keeps_digits_apart():
    tok = train_tokenizer(["def f(x):\n    return x + 12\n", "Ann has 15 apples. 7 + 8 = 15"] * 20, vocab_size=300)
    text = "def g(n):\n    return n * 3 - 14\n\n#### 42"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    pieces = tok.convert_ids_to_tokens(ids)
    assert all(len(p.lstrip("Ġ")) == 1 for p in pieces if any(ch.isdigit() for ch in p))


@pytest.mark.slow
def test_base_is_trained_saved_loadable_and_cached(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_demo_data(tmp_path / "data", seed=0, sizes=SMALL)
    spec = BaseModelSpec.quick().model_copy(update={"steps": 25})
    folder, built = build_base(tmp_path / "base", data.corpus, spec, progress=False)
    assert built
    stamp = read_stamp(folder)
    assert stamp["loss_last"] < stamp["loss_first"] - 1.0
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == stamp["n_parameters"]
    # The saved model reproduces a loss at the level the stamp recorded (not a random model's ~log V).
    text = data.corpus.read_text().split("\n\n")[0]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss < stamp["loss_first"] - 1.0
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again, built_again = build_base(tmp_path / "base", data.corpus, spec, progress=False)
    assert (again, built_again) == (folder, False)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    _, rebuilt = build_base(tmp_path / "base", data.corpus, spec.model_copy(update={"steps": 3}), progress=False)
    assert rebuilt
