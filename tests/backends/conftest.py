"""Fixtures for the backend tests: tiny models vLLM's CPU kernels accept (head size 32), a suite of
every built-in task kind, and the switch that runs or skips the vLLM tests.

The vLLM tests run in the second virtual environment that ``make test`` builds (``.venv-vllm``,
``EXME_REQUIRE_VLLM=1``), where a missing vLLM is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("EXME_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("EXME_REQUIRE_VLLM=1 but vllm is not importable in this environment")
    skip = pytest.mark.skip(reason="vllm is not installed here; `make test` runs these in .venv-vllm")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_models(tmp_path_factory):
    """Base A and a fine-tune-like B = A + noise, float32, head size 32 (64 hidden, 2 heads)."""
    from exme.testing import make_finetuned, make_tiny_model

    root = tmp_path_factory.mktemp("vllm_models")
    shape = dict(hidden_size=64, num_heads=2, intermediate_size=128, initializer_range=0.1)
    a = make_tiny_model(root / "A", seed=11, **shape)
    b = make_finetuned(a, root / "B", seed=12, scale=0.05)
    c = make_finetuned(a, root / "C", seed=13, scale=0.05)
    return SimpleNamespace(root=root, a=a, b=b, c=c)


MBPP = [
    {"text": "Write a function to square a number.", "test_list": ["assert square(3) == 9"]},
    {"text": "Write a function to add two numbers.", "test_list": ["assert add(1, 2) == 3"]},
    {"text": "Write a function to negate x.", "test_list": ["assert neg(1) == -1"]},
    {"text": "Write a function to double x.", "test_list": ["assert double(2) == 4"]},
]


@pytest.fixture(scope="session")
def all_kinds_suite(tmp_path_factory) -> Path:
    """Generation (GSM8K and regex), multiple choice, perplexity and MBPP, with long shared prefixes."""
    root = tmp_path_factory.mktemp("kinds")
    preamble = "Solve each problem carefully and give the final number after four hash marks. " * 3
    gsm = [{"question": f"{preamble}What is {a} plus {b}?", "answer": f"#### {a + b}"} for a in range(1, 7) for b in range(1, 3)]
    gen = [{"prompt": f"Name the colour number {i}:", "target": ["red", "blue"]} for i in range(8)]
    mc = [{"question": f"{preamble}{a} + {b} =", "choices": [str(a + b), str(a + b + 1), f"{a}{b}"], "label": 0}
          for a in range(1, 6) for b in range(1, 3)]
    ppl = [{"text": f"the number {i} comes after {i - 1} and before {i + 1}."} for i in range(1, 9)]
    files = {"gsm.jsonl": gsm, "gen.jsonl": gen, "mc.jsonl": mc, "ppl.jsonl": ppl, "mbpp.jsonl": MBPP}
    for name, rows in files.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = root / "suite.yaml"
    suite.write_text(
        "name: kinds\nsplit: {seed: 0, dev_fraction: 0.5}\ntasks:\n"
        "  - {name: gsm, kind: gsm8k, data: gsm.jsonl, max_new_tokens: 24}\n"
        "  - {name: gen, kind: generate, data: gen.jsonl, max_new_tokens: 12, stop: [\"\\n\"]}\n"
        "  - {name: mc, kind: multiple_choice, data: mc.jsonl}\n"
        "  - {name: ppl, kind: perplexity, data: ppl.jsonl}\n"
        "  - {name: mbpp, kind: mbpp, data: mbpp.jsonl, max_new_tokens: 24}\n"
    )
    return suite


# ---------------------------------------------------------------- lm-eval tasks over local data
LM_EVAL_TASKS = ("exme_lm_mc", "exme_lm_gen", "exme_lm_ll", "exme_lm_ppl")
LM_WORDS = ["one", "two", "red", "cat", "sun", "map", "dog", "ice", "owl", "pen", "sea", "tea"]


@pytest.fixture(scope="session")
def lm_eval_tasks(tmp_path_factory) -> Path:
    """A folder of lm-eval task YAMLs over local JSONL, one per output type (multiple choice,
    greedy generation, loglikelihood, rolling loglikelihood), with a shared long preamble so
    prompts share prefixes as real few-shot prompts do."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    pre = "Read the question and answer it with one short word. "
    mc = [{"question": f"{pre}What follows {w}?", "choices": [w[::-1], w + "s", "the end", w.upper() + "!"], "label": i % 4}
          for i, w in enumerate(LM_WORDS)]
    gen = [{"question": f"{pre}Spell {w} backwards.", "answer": w[::-1]} for w in LM_WORDS]
    ppl = [{"text": f"The {w} is {'big' if i % 2 else 'small'}, and the {LM_WORDS[i - 1]} is next to it."} for i, w in enumerate(LM_WORDS)]
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "exme_lm_mc.yaml").write_text(
        f"task: exme_lm_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    (root / "exme_lm_gen.yaml").write_text(
        f"task: exme_lm_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "Q:"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    (root / "exme_lm_ll.yaml").write_text(
        f"task: exme_lm_ll\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: " {{answer}}"\n'
        "metric_list:\n  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    (root / "exme_lm_ppl.yaml").write_text(
        f"task: exme_lm_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - {metric: word_perplexity}\n  - {metric: byte_perplexity}\n  - {metric: bits_per_byte}\n"
    )
    return root


def lm_eval_responses(lm, folder: Path, tasks=LM_EVAL_TASKS) -> dict[str, dict[int, list]]:
    """``{task: {doc_id: [response per request]}}`` from lm-eval's logged samples for ``lm`` (an lm-eval model)."""
    import logging

    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=True,
                                  bootstrap_iters=0, verbosity="ERROR")
    return {t: {s["doc_id"]: [r[0] for r in s["resps"]] for s in out["samples"][t]} for t in tasks}


def count_changed(ours: dict, theirs: dict, *, atol: float = 1e-4) -> dict[str, int]:
    """Per task, how many documents' responses differ: log-likelihoods beyond ``atol`` (or a
    different greedy flag) and generated texts that are not identical. Every log-likelihood is
    also checked to ``10 * atol``: only a near-tie may flip a flag."""
    changed = {}
    for task, docs in theirs.items():
        assert set(ours[task]) == set(docs), task
        n = 0
        for doc, resps in docs.items():
            differs = False
            for a, b in zip(ours[task][doc], resps, strict=True):
                if isinstance(b, str):
                    differs |= a != b
                    continue
                b_ll, b_greedy = (b, None) if isinstance(b, float) else b
                a_ll, a_greedy = (a, None) if isinstance(a, float) else a
                assert abs(a_ll - b_ll) <= 10 * atol * max(1.0, abs(b_ll)), (task, doc, a, b)
                differs |= abs(a_ll - b_ll) > atol * max(1.0, abs(b_ll)) or a_greedy != b_greedy
            n += differs
        changed[task] = n
    return changed
