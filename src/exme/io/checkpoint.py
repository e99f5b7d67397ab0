"""Reading Hugging Face model folders lazily: headers at open, one tensor at a time on request.

Why headers first: every merge can then check names, shapes and dtypes of all inputs (and
refuse a truncated file) before any arithmetic, and memory never holds more than the tensors
being merged. Safetensors headers are parsed directly (8-byte length + JSON), which also lets
us verify that every tensor's byte range lies inside the file, so a truncated download is an
error at open time rather than a crash half-way through a merge.

``pytorch_model.bin`` files are read only with ``torch.load(weights_only=True)`` (no arbitrary
unpickling), memory-mapped when the file format allows.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from exme.errors import ExmeError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

#: safetensors dtype codes ↔ torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

#: A safetensors header larger than this is not a real header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor is without its data: enough to plan a merge and write an output header."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class _SafeEntry:
    """Where one tensor's bytes live in a safetensors file."""

    file: Path
    start: int  # absolute byte offset in the file
    end: int
    spec: TensorSpec


def read_safetensors_header(file: Path) -> tuple[dict[str, _SafeEntry], dict[str, str]]:
    """Parse and validate one safetensors file's header: tensor entries and ``__metadata__``.

    Raises :class:`ExmeError` naming the file for a missing, truncated or corrupt file.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ExmeError(f"{file} is truncated (shorter than a safetensors header); re-download or re-save it")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise ExmeError(f"{file} is not a valid safetensors file (bad header length); re-download or re-save it")
            raw = fh.read(header_len)
    except FileNotFoundError:
        raise ExmeError(f"{file} does not exist; check the model folder") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError):
        raise ExmeError(f"{file} has a corrupt safetensors header; re-download or re-save it") from None
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, _SafeEntry] = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ExmeError(f"{file} has a corrupt header entry for tensor {name!r}; re-download or re-save it") from None
        spec = TensorSpec(shape, dtype)
        if end - begin != spec.nbytes or begin < 0:
            raise ExmeError(f"{file}: tensor {name!r} has inconsistent byte offsets; the file is corrupt")
        if data_start + end > size:
            raise ExmeError(
                f"{file} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes; "
                "re-download or re-save it"
            )
        entries[name] = _SafeEntry(file, data_start + begin, data_start + end, spec)
    return entries, metadata


class Checkpoint:
    """A Hugging Face model folder opened for lazy, tensor-by-tensor reading.

    Use :meth:`open`; then ``names``, :meth:`spec`, :meth:`get`, :meth:`has`, ``config``.
    Reading is thread-safe (a read-ahead thread and the main thread may both call :meth:`get`).
    """

    def __init__(
        self,
        path: Path,
        config: dict,
        safe_entries: dict[str, _SafeEntry],
        bin_files: dict[str, Path],
        bin_specs: dict[str, TensorSpec],
        format: str,
    ) -> None:
        self.path = path
        self.config = config
        self.format = format
        self._safe = safe_entries
        self._bin_files = bin_files
        self._bin_specs = bin_specs
        self._bin_loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self.names: list[str] = sorted([*safe_entries, *bin_files])

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.names)} tensors, {self.format})"

    # ---------------------------------------------------------------------------------- open

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """Validate a model folder and read its headers (never its tensors).

        Accepts ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
        ``pytorch_model.bin``, or sharded ``.bin`` with ``pytorch_model.bin.index.json``.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise ExmeError(f"model folder {path} does not exist; check the path")
        if not path.is_dir():
            raise ExmeError(f"{path} is a file; give the model folder that contains it")
        config_file = path / "config.json"
        config: dict = {}
        if config_file.exists():
            try:
                config = json.loads(config_file.read_text())
            except ValueError:
                raise ExmeError(f"{config_file} is not valid JSON; fix or re-save the model") from None
        if (path / SAFE_INDEX).exists():
            files = cls._index_files(path, path / SAFE_INDEX)
            return cls._open_safetensors(path, config, files, "sharded safetensors")
        if (path / SAFE_SINGLE).exists():
            return cls._open_safetensors(path, config, {None: path / SAFE_SINGLE}, "safetensors")
        if (path / BIN_INDEX).exists():
            weight_map = cls._index_files(path, path / BIN_INDEX)
            return cls._open_bin(path, config, weight_map, "sharded pytorch .bin")
        if (path / BIN_SINGLE).exists():
            return cls._open_bin(path, config, {None: path / BIN_SINGLE}, "pytorch .bin")
        raise ExmeError(
            f"no weights in {path}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
        )

    @staticmethod
    def _index_files(folder: Path, index_file: Path) -> dict[str | None, Path]:
        """Weight map of an index file: tensor name → shard path (shards checked to exist)."""
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ExmeError(f"{index_file} is not a valid index (no 'weight_map'); re-save the model") from None
        out: dict[str | None, Path] = {}
        for name, shard in weight_map.items():
            shard_path = folder / shard
            if not shard_path.exists():
                raise ExmeError(f"{index_file} lists tensor {name!r} in {shard}, but {shard_path} is missing")
            out[name] = shard_path
        return out

    @classmethod
    def _open_safetensors(cls, path: Path, config: dict, files: dict[str | None, Path], fmt: str) -> Checkpoint:
        entries: dict[str, _SafeEntry] = {}
        for file in dict.fromkeys(files.values()):
            file_entries, _ = read_safetensors_header(file)
            entries.update(file_entries)
        if None not in files:  # sharded: the index is authoritative
            for name, file in files.items():
                if name not in entries or entries[name].file != file:
                    raise ExmeError(f"{path / SAFE_INDEX} maps {name!r} to {file.name}, which does not contain it")
            entries = {n: e for n, e in entries.items() if n in files}
        return cls(path, config, entries, {}, {}, fmt)

    @classmethod
    def _open_bin(cls, path: Path, config: dict, files: dict[str | None, Path], fmt: str) -> Checkpoint:
        ckpt = cls(path, config, {}, {}, {}, fmt)
        bin_files: dict[str, Path] = {}
        for file in dict.fromkeys(files.values()):
            state = ckpt._load_bin(file)
            for name, tensor in state.items():
                if None in files or files.get(name) == file:
                    bin_files[name] = file
                    ckpt._bin_specs[name] = TensorSpec(tuple(tensor.shape), tensor.dtype)
        missing = [n for n in files if n is not None and n not in bin_files]
        if missing:
            raise ExmeError(f"{path / BIN_INDEX} lists {missing[0]!r}, which is in none of the .bin shards")
        ckpt._bin_files = bin_files
        ckpt.names = sorted(bin_files)
        return ckpt

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        """``torch.load`` with ``weights_only=True`` (memory-mapped when the format allows), cached."""
        with self._lock:
            if file in self._bin_loaded:
                return self._bin_loaded[file]
            try:
                try:
                    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                    state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any failure here means an unreadable file
                raise ExmeError(f"cannot read {file} with torch.load(weights_only=True): {err}".splitlines()[0]) from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ExmeError(f"{file} is not a state dict of tensors")
            self._bin_loaded[file] = state
            return state

    # ---------------------------------------------------------------------------------- access

    def has(self, name: str) -> bool:
        return name in self._safe or name in self._bin_files

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of one tensor, from the header."""
        if name in self._safe:
            return self._safe[name].spec
        if name in self._bin_specs:
            return self._bin_specs[name]
        raise ExmeError(f"tensor {name!r} is not in {self.path}")

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        if name in self._safe:
            return self._safe[name].file
        if name in self._bin_files:
            return self._bin_files[name]
        raise ExmeError(f"tensor {name!r} is not in {self.path}")

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor into a fresh tensor on ``device`` (its stored dtype, never cast)."""
        spec = self.spec(name)
        return self.get_flat(name, 0, spec.numel).reshape(spec.shape).to(device)

    def get_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of a tensor in flat (row-major) order, as a new CPU tensor.

        Why: the merge engine streams large tensors in chunks; reading only the chunk keeps
        memory small and avoids allocating a tensor-sized buffer for every input.
        """
        spec = self.spec(name)
        if not 0 <= start <= stop <= spec.numel:
            raise ValueError(f"range [{start}, {stop}) outside tensor {name!r} of {spec.numel} elements")
        if name in self._safe:
            entry = self._safe[name]
            size = spec.dtype.itemsize
            out = torch.empty((stop - start) * size, dtype=torch.uint8)
            if stop > start:
                view = memoryview(out.numpy())
                fd = self._fd(entry.file)
                offset = entry.start + start * size
                got = 0
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], offset + got)
                    if not n:
                        raise ExmeError(f"{entry.file} ended while reading tensor {name!r}; the file is truncated")
                    got += n
            return out.view(spec.dtype)
        tensor = self._load_bin(self._bin_files[name])[name]
        return tensor.reshape(-1)[start:stop].clone()

    def _fd(self, file: Path) -> int:
        """One read-only descriptor per shard, opened on first use (positional reads share it)."""
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def close(self) -> None:
        """Close the open shard descriptors (reading again reopens them)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def nbytes(self) -> int:
        """Total bytes of all tensors (what a merge has to read from this model)."""
        return sum(self.spec(n).nbytes for n in self.names)

    @property
    def tied_embeddings(self) -> bool:
        """True when the config ties ``lm_head`` to the input embeddings.

        transformers defaults ``tie_word_embeddings`` to True when the config omits it.
        """
        return bool(self.config.get("tie_word_embeddings", True))
