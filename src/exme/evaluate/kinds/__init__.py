"""The registry of task kinds: name → :class:`TaskKind`. Suites, prompts and the suite evaluator read it.

To add a kind: one file here with a :class:`TaskKind` subclass (records it needs, templates, stop
strings, how it prepares and scores items, each item's score), registered below. A kind can also be
registered at run time with :func:`register_kind` (a plug-in, a test), before the suite is loaded.
"""

from __future__ import annotations

from exme.errors import ExmeError
from exme.evaluate.kinds.base import GenerativeKind, ScoringContext, TaskKind
from exme.evaluate.kinds.generate import Generate
from exme.evaluate.kinds.gsm8k import GSM8K
from exme.evaluate.kinds.humaneval import HumanEval
from exme.evaluate.kinds.mbpp import MBPP
from exme.evaluate.kinds.multiple_choice import MultipleChoice
from exme.evaluate.kinds.perplexity import Perplexity

__all__ = ["REGISTRY", "GenerativeKind", "ScoringContext", "TaskKind", "get_kind", "kind_names", "register_kind",
           "unregister_kind"]

REGISTRY: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind | type[TaskKind]) -> TaskKind:
    """Add ``kind`` (an instance or a class with a no-argument constructor) under its ``name``."""
    obj = kind() if isinstance(kind, type) else kind
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"task kind {obj!r} has no name")
    if name in REGISTRY and type(REGISTRY[name]) is not type(obj):
        raise ValueError(f"task kind {name!r} is already registered ({type(REGISTRY[name]).__name__})")
    if not getattr(obj, "metrics", None):
        raise ValueError(f"task kind {name!r} declares no metrics")
    REGISTRY[name] = obj
    return obj


def unregister_kind(name: str) -> None:
    """Remove a kind registered at run time (tests and plug-ins clean up with it)."""
    REGISTRY.pop(name, None)


def kind_names() -> list[str]:
    return list(REGISTRY)


def get_kind(name: str) -> TaskKind:
    """The kind called ``name``; an unknown name is one line listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ExmeError(f"unknown kind {name!r}; use one of {kind_names()}") from None


for _kind in (GSM8K, Generate, HumanEval, MBPP, MultipleChoice, Perplexity):
    register_kind(_kind)
