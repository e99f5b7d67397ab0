"""The demo's seeded world: a pretraining corpus, an SFT mix, and a three-task suite in public formats.

Everything is drawn from one ``random.Random(seed)``, so the same seed writes byte-identical files.
The world is small on purpose (numbers up to 20, a few dozen words) so a model of about a million
parameters can learn it on a CPU in minutes, but it has the shape of the real thing:

- the **pretraining corpus** states facts in plain prose ("Ann has 5 apples. She gets 3 more. Now
  Ann has 5 + 3 = 8 apples.", "A cat is an animal.", small Python functions with a comment), so
  the base model *knows* the world but has never seen a question/answer format;
- the **SFT mix** teaches the formats the suite asks in (prompt → completion), like instruction
  tuning does;
- the **suite** holds three tasks in the formats of public benchmarks: ``arith`` (GSM8K: a word
  problem, an answer ending in ``#### N``, exact match on the number), ``choice`` (ARC/MMLU-style
  multiple choice scored by log-likelihood) and ``code`` (MBPP: a ``text`` and a ``test_list`` of
  asserts, scored by running the generated function in the sandbox).

Suite items are drawn first and no SFT prompt repeats one of them, so dev and test measure
generalisation to new questions, not recall of training lines.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Prompt templates shared by the SFT mix and the suite, so training and evaluation see one format.
QA_PROMPT = "Question: {question}\nAnswer:"
CODE_PROMPT = "Task: {text}\nTests:\n{tests}\nCode:\n"

NAMES = ["Ann", "Ben", "Eva", "Max", "Mia", "Sam", "Zoe", "Leo", "Ida", "Tom", "Kim", "Rex"]
PRONOUN = {
    "Ann": "She", "Eva": "She", "Mia": "She", "Zoe": "She", "Ida": "She", "Kim": "She",
    "Ben": "He", "Max": "He", "Sam": "He", "Leo": "He", "Tom": "He", "Rex": "He",
}
OBJECTS = ["apples", "books", "coins", "cards", "pens", "shells", "stamps", "cups", "hats", "keys"]
CATEGORIES = {
    "animal": ["cat", "dog", "cow", "fox", "owl", "bee", "fish", "horse", "mouse", "duck"],
    "fruit": ["apple", "pear", "plum", "grape", "lemon", "peach", "mango", "melon", "kiwi", "lime"],
    "color": ["red", "blue", "green", "pink", "gray", "black", "white", "brown", "gold", "teal"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "axe", "chisel", "file", "ladder"],
}
ARTICLE = {c: ("an" if c[0] in "aeiou" else "a") for c in CATEGORIES}
FUNC_NAMES = ["f", "g", "h", "calc"]
VAR_NAMES = ["x", "n", "a"]
OPS = {"plus": "+", "minus": "-", "times": "*"}


@dataclass(frozen=True)
class DemoSizes:
    """How much of everything to write; ``quick`` sizes keep the smoke test to seconds."""

    pretrain_docs: int = 3000
    sft_per_task: int = 600
    # 200 items per task, split 40 dev / 160 test. Test: the paired SE of ExMe − best SFT is about
    # √(discordance / (3 · 160)) for three equally weighted tasks, ≤ 0.025 while the two models
    # disagree on at most 30% of the items (40 test items per task gave SEs near 0.05). Dev: 40 per
    # task leaves 12 confirm items per task at the default confirm fraction 0.3, and 28 to search on.
    eval_per_task: int = 200
    dev_fraction: float = 0.2

    @classmethod
    def quick(cls) -> "DemoSizes":
        return cls(pretrain_docs=120, sft_per_task=40, eval_per_task=10, dev_fraction=0.375)


@dataclass(frozen=True)
class DemoData:
    """Paths of what :func:`write_demo_data` wrote."""

    folder: Path
    corpus: Path
    sft: Path
    suite: Path
    tasks: dict[str, Path]


# -------------------------------------------------------------------------------- arithmetic


def _arith_problem(rng: random.Random) -> tuple[str, str, str, int]:
    """A one-step word problem: (question, story sentence, equation, result)."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    pron = PRONOUN[name]
    if rng.random() < 0.5:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        verb = rng.choice(["gets", "finds", "buys"])
        story = f"{name} has {a} {obj}. {pron} {verb} {b} more."
        equation, result = f"{a} + {b} = {a + b}", a + b
    else:
        a = rng.randint(2, 18)
        b = rng.randint(1, min(9, a - 1))
        verb = rng.choice(["gives away", "loses", "sells"])
        story = f"{name} has {a} {obj}. {pron} {verb} {b}."
        equation, result = f"{a} - {b} = {a - b}", a - b
    question = f"{story} How many {obj} does {name} have now?"
    return question, story, equation, result


def arith_item(rng: random.Random) -> dict[str, Any]:
    """A GSM8K-format record: ``question`` and an ``answer`` whose last line is ``#### N``."""
    question, _, equation, result = _arith_problem(rng)
    return {"question": question, "answer": f"{equation}\n#### {result}"}


def _arith_prose(rng: random.Random) -> str:
    _, story, equation, result = _arith_problem(rng)
    name = story.split()[0]
    obj = story.split()[3].rstrip(".")
    return f"{story} Now {name} has {equation} {obj}. That makes {result}."


# ---------------------------------------------------------------------------- multiple choice


def choice_item(rng: random.Random) -> dict[str, Any]:
    """An ARC/MMLU-style record: ``question``, four ``choices``, the ``label`` index of the right one."""
    if rng.random() < 0.5:
        category = rng.choice(sorted(CATEGORIES))
        right = rng.choice(CATEGORIES[category])
        others = [c for c in sorted(CATEGORIES) if c != category]
        wrong = [rng.choice(CATEGORIES[c]) for c in rng.sample(others, 3)]
        question_head = f"Which of these is {ARTICLE[category]} {category}"
    else:
        values = rng.sample(range(1, 20), 4)
        want_max = rng.random() < 0.5
        right_value = max(values) if want_max else min(values)
        right, wrong = str(right_value), [str(v) for v in values if v != right_value]
        question_head = f"Which number is the {'largest' if want_max else 'smallest'}"
    choices = [right, *wrong]
    rng.shuffle(choices)
    listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    return {"question": f"{question_head}: {listed}?", "choices": choices, "label": choices.index(right)}


def _choice_prose(rng: random.Random) -> str:
    if rng.random() < 0.6:
        category = rng.choice(sorted(CATEGORIES))
        words = rng.sample(CATEGORIES[category], 3)
        return " ".join(f"{'An' if w[0] in 'aeiou' else 'A'} {w} is {ARTICLE[category]} {category}." for w in words)
    a, b = rng.sample(range(1, 20), 2)
    big, small = max(a, b), min(a, b)
    return f"{big} is larger than {small}. {small} is smaller than {big}."


# ----------------------------------------------------------------------------------------- code


def _code_spec(rng: random.Random) -> tuple[str, str, str, list[tuple[str, str]]]:
    """(function name, variable, English description, [(word, k), ...]) of a small function."""
    func, var = rng.choice(FUNC_NAMES), rng.choice(VAR_NAMES)
    steps = [(rng.choice(sorted(OPS)), str(rng.randint(1, 9)))]
    if rng.random() < 0.25:
        steps.append((rng.choice(["plus", "minus"]), str(rng.randint(1, 9))))
    words = " ".join(f"{w} {k}" for w, k in steps)
    return func, var, f"{var} {words}", steps


def _code_body(func: str, var: str, steps: list[tuple[str, str]]) -> str:
    expr = var + "".join(f" {OPS[w]} {k}" for w, k in steps)
    return f"def {func}({var}):\n    return {expr}"


def code_item(rng: random.Random) -> dict[str, Any]:
    """An MBPP-format record: ``text``, ``test_list`` (asserts on three inputs) and the reference ``code``."""
    func, var, desc, steps = _code_spec(rng)
    code = _code_body(func, var, steps)
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # our own generated reference, to compute the expected values
    inputs = rng.sample(range(0, 10), 3)
    tests = [f"assert {func}({i}) == {namespace[func](i)}" for i in inputs]
    return {"text": f"Write a function {func}({var}) that returns {desc}.", "test_list": tests, "code": code}


def _code_prose(rng: random.Random) -> str:
    func, var, desc, steps = _code_spec(rng)
    return f"# {func} returns {desc}\n{_code_body(func, var, steps)}"


# ------------------------------------------------------------------------------------- writers


def pretrain_corpus(rng: random.Random, n_docs: int) -> list[str]:
    """Short documents of prose facts, arithmetic stories and tiny Python functions."""
    makers = [_arith_prose, _choice_prose, _code_prose]
    docs = []
    for _ in range(n_docs):
        parts = [rng.choice(makers)(rng) for _ in range(rng.randint(2, 4))]
        docs.append("\n".join(parts))
    return docs


def sft_record(task: str, item: dict[str, Any]) -> dict[str, str]:
    """The prompt/completion an item teaches, in the exact format the suite will ask it."""
    if task == "arith":
        return {"prompt": QA_PROMPT.format(question=item["question"]), "completion": " " + item["answer"]}
    if task == "choice":
        return {"prompt": QA_PROMPT.format(question=item["question"]), "completion": " " + item["choices"][item["label"]]}
    if task == "code":
        return {"prompt": CODE_PROMPT.format(text=item["text"], tests="\n".join(item["test_list"])), "completion": item["code"]}
    raise ValueError(f"unknown demo task {task!r}")


ITEM_MAKERS = {"arith": arith_item, "choice": choice_item, "code": code_item}
PROMPT_KEY = {"arith": "question", "choice": "question", "code": "text"}


def _draw(rng: random.Random, task: str, n: int, taken: set[str], *, distinct: bool) -> list[dict[str, Any]]:
    """``n`` items whose prompt text is not in ``taken``; with ``distinct`` they also differ from each other.

    Suite items are distinct (each counts once); SFT items only avoid the suite's, so the training
    mix keeps the world's natural frequencies. The loop is bounded so a tiny world cannot hang.
    """
    items: list[dict[str, Any]] = []
    tries = 0
    while len(items) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise RuntimeError(f"the demo world has too few distinct {task!r} items for {n} more")
        item = ITEM_MAKERS[task](rng)
        key = item[PROMPT_KEY[task]]
        if key in taken:
            continue
        if distinct:
            taken.add(key)
        items.append(item)
    return items


def suite_document(tasks: dict[str, str], *, split_seed: int, dev_fraction: float = 0.375, name: str = "exme-demo") -> dict[str, Any]:
    """The suite YAML as a dict: three tasks, their prompt formats, and the seeded dev/test rule."""
    return {
        "name": name,
        "split": {"seed": split_seed, "dev_fraction": dev_fraction},
        "tasks": [
            {
                "name": "arith",
                "kind": "gsm8k",
                "data": tasks["arith"],
                "prompt": QA_PROMPT,
                "max_new_tokens": 16,
                "stop": ["\n\n", "Question:"],
            },
            {"name": "choice", "kind": "multiple_choice", "data": tasks["choice"], "prompt": QA_PROMPT, "metric": "acc"},
            {
                "name": "code",
                "kind": "mbpp",
                "data": tasks["code"],
                "prompt": CODE_PROMPT,
                "max_new_tokens": 24,
                "stop": ["\n\n", "Task:"],
                "timeout": 5.0,
            },
        ],
    }


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")


def write_demo_data(folder: str | Path, *, seed: int = 0, sizes: DemoSizes = DemoSizes()) -> DemoData:
    """Write corpus.txt, sft.jsonl, tasks/*.jsonl and suite.yaml into ``folder``; same seed, same bytes."""
    folder = Path(folder)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    task_paths: dict[str, Path] = {}
    sft: list[dict[str, str]] = []
    for task in ITEM_MAKERS:
        taken: set[str] = set()
        eval_items = _draw(rng, task, sizes.eval_per_task, taken, distinct=True)
        train_items = _draw(rng, task, sizes.sft_per_task, taken, distinct=False)
        task_paths[task] = folder / "tasks" / f"{task}.jsonl"
        _write_jsonl(task_paths[task], eval_items)
        sft.extend(sft_record(task, item) for item in train_items)
    rng.shuffle(sft)
    sft_path = folder / "sft.jsonl"
    _write_jsonl(sft_path, sft)
    corpus_path = folder / "corpus.txt"
    corpus_path.write_text("\n\n".join(pretrain_corpus(rng, sizes.pretrain_docs)) + "\n", encoding="utf-8")
    suite_path = folder / "suite.yaml"
    relative = {task: f"tasks/{path.name}" for task, path in task_paths.items()}
    suite_path.write_text(
        yaml.safe_dump(suite_document(relative, split_seed=seed, dev_fraction=sizes.dev_fraction), sort_keys=False),
        encoding="utf-8",
    )
    return DemoData(folder=folder, corpus=corpus_path, sft=sft_path, suite=suite_path, tasks=task_paths)
