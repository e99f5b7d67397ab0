"""Check every input of a run before the first evaluation: open, align with the base, scan for NaN/Inf.

Why before: a truncated, mis-shaped or NaN checkpoint otherwise surfaces when it first enters the
live model or the final merge, after hours of evaluations. Here each input (the base, every model
or adapter folder) is opened and aligned against the base by the merge engine's rules
(:func:`exme.io.align.align_inputs`), then every floating tensor is streamed once through
``isfinite``. The first problem is one :class:`ExmeError` naming the checkpoint, the tensor and what
to do.

Scanning reads every byte, so results are cached by file identity (path, size, mtime) in
``<cache_dir>/preflight.json``: a resumed run re-aligns (headers only, milliseconds) but does not
rescan files that have not changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from exme.errors import ExmeError
from exme.io.align import InputModel, align_inputs
from exme.io.checkpoint import Checkpoint
from exme.io.writer import temp_file_name
from exme.io.source import ADAPTER_CONFIG, AdapterSource, open_source

CACHE_FILE = "preflight.json"
#: Elements per streamed read (16 M: 64 MB of float32 at most in memory at once).
SCAN_CHUNK = 1 << 24
_CACHE_VERSION = 1


@dataclass
class InputCheck:
    """One input: what it is and whether its values were scanned now or known from the cache."""

    path: Path
    kind: str  # the source's format: safetensors, sharded safetensors, pytorch .bin, peft lora adapter
    tensors: int
    nbytes: int
    cached: bool
    #: [resolved file, size, mtime_ns] of every file deciding this input's tensors, as checked.
    files: list[list] = field(default_factory=list)


@dataclass
class PreflightReport:
    """Every input checked (base first), in order; ``notes`` from alignment (tied heads, added vocabulary rows)."""

    inputs: list[InputCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def scanned_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs if not i.cached)

    @property
    def cached(self) -> int:
        return sum(i.cached for i in self.inputs)

    def verify_unchanged(self) -> None:
        """Raise one line when a file of an input changed or vanished since the check.

        Called before an input is read and after its evaluation is scored, so no score and no final
        model ever mixes the checked file with another one written under the same name.
        """
        for check in self.inputs:
            for name, size, mtime in check.files:
                try:
                    st = os.stat(name)
                except FileNotFoundError:
                    raise ExmeError(_changed(check.path, name, "disappeared")) from None
                if st.st_size != size:
                    raise ExmeError(_changed(check.path, name, f"changed size ({size} → {st.st_size} bytes)"))
                if st.st_mtime_ns != mtime:
                    raise ExmeError(_changed(check.path, name, "was modified (its mtime changed)"))


def _changed(input_path: Path, file: str, how: str) -> str:
    return (
        f"input {input_path}: {file} {how} since the preflight check of this run; a candidate would mix the checked file with "
        "another one: restore the file, or start over in a new output folder once it is complete"
    )


def _files(source: Any) -> list[Path]:
    """The files whose content decides this input's tensors (weights, and the adapter's config)."""
    if isinstance(source, AdapterSource):
        return [source.weights_file, source.path / ADAPTER_CONFIG]
    return sorted({source.file_of(n) for n in source.names})


def _identity(files: Sequence[Path]) -> list[list]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return out


def planned_model_bytes(base: str | os.PathLike, dtype: str | None = None) -> int:
    """Bytes of a model folder's tensors with the base's names and shapes, written in ``dtype``
    (``None``/``"auto"``: each tensor keeps its own): the size of a merged or extrapolated model."""
    ckpt = Checkpoint.open(base)
    try:
        target = None
        if dtype not in (None, "auto"):
            from exme.common import parse_dtype

            target = parse_dtype(dtype, "dtype")
        total = 0
        for name in ckpt.names:
            spec = ckpt.spec(name)
            size = target.itemsize if target is not None and spec.dtype.is_floating_point else spec.dtype.itemsize
            total += spec.numel * size
        return total
    finally:
        ckpt.close()


def _resume_change(path: Path, before: list[list], now: list[list], cache_file: Path | None) -> str:
    """The first file of an input that differs from what the run folder's earlier check saw."""
    old = {f: (size, mtime) for f, size, mtime in before}
    new = {f: (size, mtime) for f, size, mtime in now}
    for f, (size, mtime) in old.items():
        if f not in new:
            how = "is no longer part of it"
        elif new[f][0] != size:
            how = f"changed size ({size} → {new[f][0]} bytes)"
        elif new[f][1] != mtime:
            how = "was modified (its mtime changed)"
        else:
            continue
        break
    else:
        f = next(iter(set(new) - set(old)), str(path))
        how = "is new"
    return (
        f"input {path}: {f} {how} since this run folder's earlier check ({cache_file}), so the evaluations "
        "recorded there were made with the old file and would be mixed with the new one: restore the file, "
        "or run into a new output folder"
    )


def _scan_items(source: Any) -> list[tuple[str, Any, str]]:
    """(label of the tensor, reader, name) for every stored floating tensor of an input.

    For an adapter: its own tensors (A, B, saved modules); the base is scanned as the base.
    """
    if isinstance(source, AdapterSource):
        items = []
        for target, f in source.factors.items():
            items += [(f"{f.module}.lora_A", f.a, target), (f"{f.module}.lora_B", f.b, target)]
        items += [(name, t, name) for name, t in source.replaced.items()]
        return items
    return [(name, None, name) for name in source.names if source.spec(name).dtype.is_floating_point]


def _first_non_finite(source: Any, advance) -> tuple[str, int, int] | None:
    """(tensor, non-finite count, numel) of the first tensor holding NaN/Inf, streamed; None if all finite."""
    for label, tensor, name in _scan_items(source):
        if tensor is not None:  # adapter tensors are in memory already
            bad = int((~torch.isfinite(tensor)).sum()) if tensor.dtype.is_floating_point else 0
            advance(tensor.numel() * tensor.element_size())
            if bad:
                return label, bad, tensor.numel()
            continue
        spec = source.spec(name)
        bad = 0
        for start in range(0, spec.numel, SCAN_CHUNK):
            stop = min(spec.numel, start + SCAN_CHUNK)
            chunk = source.get_flat(name, start, stop)
            if not bool(torch.isfinite(chunk.float().sum())):
                bad += int((~torch.isfinite(chunk)).sum())
            advance((stop - start) * spec.dtype.itemsize)
        if bad:
            return label, bad, spec.numel
    return None


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled, transient=True,
    )


def _load_cache(file: Path | None) -> dict[str, Any]:
    if file is None or not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except ValueError:
        return {}  # a damaged cache only costs a rescan
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    return data.get("finite", {})


def check_inputs(
    base: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    refuse_changed: bool = False,
) -> PreflightReport:
    """Open and align ``base`` and every checkpoint (model or adapter folder), then scan all values.

    Raises one :class:`ExmeError` for the first problem: a missing or truncated file, a tensor
    missing or mis-shaped against the base, a dtype mismatch, a bad adapter, a NaN/Inf value.
    ``cache_dir`` (e.g. the run folder) keeps ``preflight.json`` so unchanged files are not rescanned;
    it is written (creating ``cache_dir``) only when every input is fine, so a failed check leaves nothing.
    With ``refuse_changed`` (a pipeline resuming in its run folder), an input whose files differ from
    the ones the cache recorded is refused: the folder's evaluations were made with the old files.
    Without it such an input is scanned again.
    """
    base_ckpt = Checkpoint.open(base)
    report = PreflightReport()
    sources: list[tuple[str, Any]] = [("base", base_ckpt)]
    for i, path in enumerate(checkpoints, start=1):
        source = open_source(path, base_ckpt)
        # The engine's rules, pairwise against the base: the error names this checkpoint.
        aligned = align_inputs([InputModel("base", base_ckpt), InputModel(f"checkpoint {Path(path).name}", source)],
                               base_ckpt.spec(base_ckpt.names[0]).dtype if base_ckpt.names else torch.float32, 0)
        report.notes += [n for n in aligned.notes if n not in report.notes]
        sources.append((str(path), source))

    cache_file = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    cache = _load_cache(cache_file)
    todo: list[tuple[str, Any, str, int]] = []
    for label, source in sources:
        key = json.dumps(_identity(_files(source)))
        items = _scan_items(source)
        nbytes = sum(t.numel() * t.element_size() if t is not None else source.spec(n).nbytes for _, t, n in items)
        previous = cache.get(str(Path(source.path).resolve()))
        hit = previous == key
        if previous is not None and not hit and refuse_changed:
            # This run folder checked (and evaluated) another version of the input: resuming would mix them.
            raise ExmeError(_resume_change(source.path, json.loads(previous), json.loads(key), cache_file))
        report.inputs.append(InputCheck(Path(source.path), source.format, len(items), nbytes, cached=hit,
                                        files=json.loads(key)))
        if not hit:
            todo.append((label, source, key, nbytes))

    with _progress(progress and bool(todo)) as bar:
        job = bar.add_task("checking inputs for NaN/Inf", total=sum(t[3] for t in todo))
        for label, source, key, _ in todo:
            found = _first_non_finite(source, lambda n: bar.update(job, advance=n))
            if found is not None:
                tensor, bad, numel = found
                what = "the base model" if label == "base" else f"checkpoint {source.path}"
                raise ExmeError(
                    f"{what}: tensor {tensor} holds {bad} NaN/Inf value(s) of {numel}; re-export or re-download it"
                    + (", or remove this checkpoint from the run" if label != "base" else "")
                )
            cache[str(Path(source.path).resolve())] = key
    if cache_file is not None and todo:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(temp_file_name(cache_file.name))
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "finite": cache}, indent=1))
        os.replace(tmp, cache_file)
    return report
