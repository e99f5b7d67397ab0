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
from exme.evaluate.kinds import REGISTRY as KINDS
from exme.evaluate.kinds import TaskKind, get_kind, kind_names
from exme.io.jsonl import iter_jsonl

SPLITS = ("dev", "test")


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
    kind: str  # a name in exme.evaluate.kinds.REGISTRY
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

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in KINDS:
            raise ValueError(f"unknown kind {value!r}; use one of {kind_names()}")
        return value

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
        kind = KINDS[self.kind]
        allowed = kind.metrics
        if self.metric is None:
            self.metric = allowed[0]
        elif self.metric not in allowed:
            raise ValueError(f"metric {self.metric!r} is not one of {list(allowed)} for kind {self.kind!r}")
        for key in sorted(self.model_fields_set - set(kind.own_keys)):
            owners = [name for name, other in KINDS.items() if key in other.own_keys]
            if owners:
                raise ValueError(f"{key} applies to {' and '.join(owners)} tasks only, not kind {self.kind!r}")
        if not kind.fewshot and self.fewshot:
            raise ValueError(f"{self.kind} tasks take no few-shot examples")
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

    @property
    def kind_def(self) -> TaskKind:
        """The registered :class:`~exme.evaluate.kinds.TaskKind` that reads, prompts and scores this task."""
        return get_kind(self.spec.kind)

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
    msg = first["msg"].removeprefix("Value error, ")
    return f"{label}: {msg}"


def read_records(path: Path, spec: TaskSpec, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL file (or what the kind reads from another file, e.g. perplexity's plain text).

    Each record is checked for the fields its kind needs; a bad record is reported with file and line.
    """
    if not path.is_file():
        raise ExmeError(f"data file {path} does not exist; paths in a suite are relative to the suite file")
    kind = get_kind(spec.kind)
    records = kind.read_text(path, spec, limit)
    if records is not None:
        return records
    required = kind.required_fields(spec)
    records = []
    for lineno, record in iter_jsonl(path):
        missing = [f for f in required if f not in record]
        if missing:
            raise ExmeError(f"{path}:{lineno}: record lacks field(s) {missing} that a {spec.kind!r} task needs")
        kind.check_record(record, f"{path}:{lineno}")
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ExmeError(f"data file {path} is empty; it needs at least one JSON record")
    return records


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

    kind = get_kind(spec.kind)
    read = lambda p: read_records(resolve(p), spec, limit=spec.limit)  # noqa: E731
    if spec.data is not None:
        records = read(spec.data)
        dev_idx, test_idx = split_indices(len(records), rule, spec.name)
        splits = {"dev": [records[i] for i in dev_idx], "test": [records[i] for i in test_idx]}
    else:
        splits = {"dev": read(spec.dev), "test": read(spec.test)}
    fewshot: list[dict[str, Any]] = []
    if isinstance(spec.fewshot, str):
        fewshot = read_records(resolve(spec.fewshot), spec)
    elif spec.fewshot:
        for i, record in enumerate(spec.fewshot):
            missing = [f for f in kind.required_fields(spec) if f not in record]
            if missing:
                raise ExmeError(f"task {spec.name!r}: few-shot example {i} lacks field(s) {missing}")
        fewshot = [dict(r) for r in spec.fewshot]
        for i, record in enumerate(fewshot):
            kind.check_record(record, f"task {spec.name!r} few-shot example {i}")
    if spec.num_fewshot is not None:
        if spec.num_fewshot > len(fewshot):
            raise ExmeError(
                f"task {spec.name!r}: num_fewshot={spec.num_fewshot} but only {len(fewshot)} few-shot "
                "examples are given; add examples under 'fewshot' or lower num_fewshot"
            )
        fewshot = fewshot[: spec.num_fewshot]
    return Task(spec, splits, fewshot)
