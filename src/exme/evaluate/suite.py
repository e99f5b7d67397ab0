"""A suite: tasks read from a YAML file, their JSONL records, and the seeded dev/test split.

Everything a user can get wrong in a suite (an unknown kind or key, a record without a required
field, an empty file, a regex that does not compile) is found here, when the suite is loaded,
and reported as one :class:`ExmeError` naming the file and line, before any model runs.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exme.errors import ExmeError
from exme.io.jsonl import iter_jsonl

Kind = Literal["gsm8k", "generate", "humaneval", "mbpp", "multiple_choice", "perplexity"]
SPLITS = ("dev", "test")

# Per kind: the fields every record must have, the metrics it can report (first = default).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question", "answer"),
    "generate": ("prompt", "target"),
    "humaneval": ("task_id", "prompt", "test", "entry_point"),
    "mbpp": ("text", "test_list"),
    "multiple_choice": ("question", "choices", "label"),
    "perplexity": ("text",),
}
METRICS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("exact_match",),
    "generate": ("exact_match", "contains"),
    "humaneval": ("pass@1",),
    "mbpp": ("pass@1",),
    "multiple_choice": ("acc", "acc_norm"),
    "perplexity": ("neg_log_perplexity",),
}
GENERATIVE = ("gsm8k", "generate", "humaneval", "mbpp")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitRule(_Strict):
    """How each task's items are divided into dev and test: a seeded permutation, cut at ``dev_fraction``.

    Stored with results so anyone can rebuild the exact same split from the same files.
    """

    seed: int = 0
    dev_fraction: float = Field(0.5, gt=0.0, lt=1.0)


class TaskSpec(_Strict):
    """One task of a suite, as written in YAML."""

    name: str
    kind: Kind
    data: str | None = None  # one file, split by the suite's rule
    dev: str | None = None  # or explicit files per split
    test: str | None = None
    metric: str | None = None
    weight: float = Field(1.0, ge=0.0)
    limit: int | None = Field(None, gt=0)  # keep the first N records of the file(s)
    prompt: str | None = None  # str.format template over the record's fields
    target: str | None = None  # few-shot answer template
    fewshot: list[dict[str, Any]] | str | None = None  # records inline, or a JSONL path
    num_fewshot: int | None = Field(None, ge=0)
    fewshot_separator: str = "\n\n"
    chat_template: bool = False
    system_prompt: str | None = None
    max_new_tokens: int = Field(256, gt=0)
    stop: list[str] | None = None
    regex: str | None = None  # generate: the answer is this regex's first group (or whole match)
    timeout: float = Field(5.0, gt=0.0)  # code tasks: seconds per program
    text_field: str = "text"  # perplexity
    answer_filter: Literal["exme", "strict-match", "flexible-extract"] = "exme"  # gsm8k: see extract.py

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"regex {value!r} does not compile: {err}") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        has_data = self.data is not None
        has_split_files = self.dev is not None or self.test is not None
        if has_data == has_split_files:
            raise ValueError("give either 'data' (split by the suite's rule) or both 'dev' and 'test' files")
        if has_split_files and (self.dev is None or self.test is None):
            raise ValueError("explicit split files need both 'dev' and 'test'")
        allowed = METRICS[self.kind]
        if self.metric is None:
            self.metric = allowed[0]
        elif self.metric not in allowed:
            raise ValueError(f"metric {self.metric!r} is not one of {list(allowed)} for kind {self.kind!r}")
        if self.kind != "gsm8k" and "answer_filter" in self.model_fields_set:
            raise ValueError(f"answer_filter applies to gsm8k tasks only, not kind {self.kind!r}")
        if self.kind == "perplexity" and self.fewshot:
            raise ValueError("perplexity tasks take no few-shot examples")
        return self


class SuiteSpec(_Strict):
    """The YAML document: a name, the split rule, and the tasks."""

    name: str = "suite"
    split: SplitRule = Field(default_factory=SplitRule)
    tasks: list[TaskSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "SuiteSpec":
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {dupes}")
        return self


class Task:
    """A loaded task: its spec, its records per split, and its few-shot examples."""

    def __init__(self, spec: TaskSpec, splits: dict[str, list[dict[str, Any]]], fewshot: list[dict[str, Any]]):
        self.spec = spec
        self.splits = splits
        self.fewshot = fewshot

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def records(self, split: str) -> list[dict[str, Any]]:
        """The records of ``split`` (``"dev"`` or ``"test"``), in split order; ``"all"``: dev then test."""
        if split == "all":
            return self.splits["dev"] + self.splits["test"]
        if split not in SPLITS:
            raise ExmeError(f"split {split!r} is not one of {list(SPLITS)}")
        return self.splits[split]


class Suite:
    """A validated suite: tasks with their dev and test records, and the rule that split them."""

    def __init__(self, spec: SuiteSpec, tasks: list[Task], path: Path | None = None):
        self.spec = spec
        self.tasks = tasks
        self.path = path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def split_rule(self) -> dict[str, Any]:
        """The rule as stored in results: method, seed, dev fraction (or the explicit files)."""
        rule: dict[str, Any] = {"method": "seeded_permutation", **self.spec.split.model_dump()}
        explicit = {t.name: {"dev": t.spec.dev, "test": t.spec.test} for t in self.tasks if t.spec.data is None}
        if explicit:
            rule["explicit_files"] = explicit
        return rule

    def counts(self) -> dict[str, dict[str, int]]:
        """Items per split per task: ``{"dev": {task: n}, "test": {task: n}}``."""
        return {split: {t.name: len(t.records(split)) for t in self.tasks} for split in SPLITS}

    def describe(self) -> dict[str, Any]:
        """What a run records about its suite: names, kinds, weights, split rule, item counts."""
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "tasks": {t.name: {"kind": t.kind, "metric": t.spec.metric, "weight": t.spec.weight} for t in self.tasks},
            "split": self.split_rule,
            "n_items": self.counts(),
        }

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Suite":
        """Read, validate and split a suite file; data paths are relative to the YAML's folder."""
        path = Path(path)
        if not path.is_file():
            raise ExmeError(f"suite file {path} does not exist; pass the path of a suite YAML")
        text = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text)
            lines = _yaml_lines(text)
        except yaml.YAMLError as err:
            raise ExmeError(f"suite file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ExmeError(f"suite file {path} must be a mapping with a 'tasks' list")
        return cls.from_dict(raw, base_dir=path.parent, source=path, lines=lines)

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        *,
        base_dir: str | Path = ".",
        source: Path | None = None,
        lines: dict[tuple, int] | None = None,
    ) -> "Suite":
        """Validate a suite given as a dict (the parsed YAML) and load its records."""
        where = str(source) if source else "suite"
        try:
            spec = SuiteSpec.model_validate(raw)
        except ValidationError as err:
            loc = tuple(err.errors()[0]["loc"])
            line = _nearest_line(lines or {}, loc)
            raise ExmeError(f"{where}{f':{line}' if line else ''}: {_explain(err, raw)}") from None
        base_dir = Path(base_dir)
        tasks = [_load_task(t, spec.split, base_dir) for t in spec.tasks]
        return cls(spec, tasks, source)


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Line number (1-based) of every key and list item of a YAML document, by its path."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, path + (key.value,))
                lines[path + (key.value,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, path + (index,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of ``loc`` or of its closest ancestor that has one."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _explain(err: ValidationError, raw: dict[str, Any]) -> str:
    first = err.errors()[0]
    loc = list(first["loc"])
    label = ".".join(str(p) for p in loc)
    if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
        try:
            label = f"task {raw['tasks'][loc[1]].get('name', loc[1])!r}" + (
                f" key {'.'.join(str(p) for p in loc[2:])!r}" if loc[2:] else ""
            )
        except (KeyError, IndexError, AttributeError, TypeError):
            pass
    if first["type"] == "extra_forbidden":
        return f"{label}: unknown key; remove it or fix its spelling"
    if first["type"] == "literal_error" and loc and loc[-1] == "kind":
        return f"{label}: unknown kind {first.get('input')!r}; use one of {list(REQUIRED_FIELDS)}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{label}: {msg}"


def read_records(path: Path, kind: str, *, text_field: str = "text", limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL file (or, for perplexity, a plain text file: one document per blank-line block).

    Each record is checked for the fields its kind needs; a bad record is reported with file and line.
    """
    if not path.is_file():
        raise ExmeError(f"data file {path} does not exist; paths in a suite are relative to the suite file")
    if kind == "perplexity" and path.suffix.lower() not in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        docs = [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]
        if not docs:
            raise ExmeError(f"data file {path} is empty; it needs at least one paragraph of text")
        return [{text_field: d} for d in docs[:limit]]
    required = REQUIRED_FIELDS[kind]
    if kind == "perplexity":
        required = (text_field,)
    records: list[dict[str, Any]] = []
    for lineno, record in iter_jsonl(path):
        missing = [f for f in required if f not in record]
        if missing:
            raise ExmeError(f"{path}:{lineno}: record lacks field(s) {missing} that a {kind!r} task needs")
        _check_record(record, kind, f"{path}:{lineno}")
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ExmeError(f"data file {path} is empty; it needs at least one JSON record")
    return records


def _check_record(record: dict[str, Any], kind: str, where: str) -> None:
    """Kind-specific checks of one record (``where`` names it in messages); ARC-style fields are normalised."""
    if kind == "multiple_choice":
        choices, label = record["choices"], record["label"]
        if isinstance(choices, dict) and "text" in choices:  # ARC's {"text": [...], "label": [...]}
            letters = list(choices.get("label", []))
            record["choices"] = choices = list(choices["text"])
            if isinstance(label, str) and label in letters:
                record["label"] = label = letters.index(label)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ExmeError(f"{where}: 'choices' must be a list of at least two strings")
        if isinstance(label, str) and len(label) == 1 and label.isalpha():
            record["label"] = label = ord(label.upper()) - ord("A")
        elif isinstance(label, str) and label.strip().isdigit():  # HellaSwag's "3": an index written as text
            record["label"] = label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise ExmeError(f"{where}: 'label' must be an index into 'choices' (0..{len(choices) - 1}), got {label!r}")
    elif kind == "gsm8k":
        from exme.evaluate.extract import gsm8k_target

        if gsm8k_target(str(record["answer"])) is None:
            raise ExmeError(f"{where}: 'answer' must hold exactly one '#### <number>' (GSM8K format)")
    elif kind == "mbpp":
        if not isinstance(record["test_list"], list) or not record["test_list"]:
            raise ExmeError(f"{where}: 'test_list' must be a non-empty list of assert statements")


def split_indices(n: int, rule: SplitRule, task_name: str) -> tuple[list[int], list[int]]:
    """Dev and test indices of ``n`` records: a permutation seeded by (seed, task name), cut at dev_fraction.

    Seeding with the task name too means two tasks of the same size are not split alike; using a
    permutation (not the file order) makes the first ``limit`` dev items a random sample.
    """
    if n < 2:
        raise ExmeError(f"task {task_name!r} has {n} record(s); a dev/test split needs at least 2")
    seq = np.random.SeedSequence([rule.seed, zlib.crc32(task_name.encode("utf-8"))])
    perm = np.random.default_rng(seq).permutation(n).tolist()
    n_dev = min(n - 1, max(1, round(n * rule.dev_fraction)))
    return perm[:n_dev], perm[n_dev:]


def _load_task(spec: TaskSpec, rule: SplitRule, base_dir: Path) -> Task:
    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base_dir / q

    read = lambda p: read_records(resolve(p), spec.kind, text_field=spec.text_field, limit=spec.limit)  # noqa: E731
    if spec.data is not None:
        records = read(spec.data)
        dev_idx, test_idx = split_indices(len(records), rule, spec.name)
        splits = {"dev": [records[i] for i in dev_idx], "test": [records[i] for i in test_idx]}
    else:
        splits = {"dev": read(spec.dev), "test": read(spec.test)}
    fewshot: list[dict[str, Any]] = []
    if isinstance(spec.fewshot, str):
        fewshot = read_records(resolve(spec.fewshot), spec.kind, text_field=spec.text_field)
    elif spec.fewshot:
        for i, record in enumerate(spec.fewshot):
            missing = [f for f in REQUIRED_FIELDS[spec.kind] if f not in record]
            if missing:
                raise ExmeError(f"task {spec.name!r}: few-shot example {i} lacks field(s) {missing}")
        fewshot = [dict(r) for r in spec.fewshot]
        for i, record in enumerate(fewshot):
            _check_record(record, spec.kind, f"task {spec.name!r} few-shot example {i}")
    if spec.num_fewshot is not None:
        if spec.num_fewshot > len(fewshot):
            raise ExmeError(
                f"task {spec.name!r}: num_fewshot={spec.num_fewshot} but only {len(fewshot)} few-shot "
                "examples are given; add examples under 'fewshot' or lower num_fewshot"
            )
        fewshot = fewshot[: spec.num_fewshot]
    return Task(spec, splits, fewshot)
