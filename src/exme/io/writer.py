"""Writing a merged model: an atomic output folder and a streaming sharded safetensors writer.

Atomic: everything is written into a temporary folder *beside* the target (same filesystem, so
the final ``rename`` is atomic), every file is fsynced, then the folder is renamed into place. A
failure at any point removes the temporary folder: there is either a complete output or none.

Streaming: all output names, shapes and dtypes are known before any arithmetic, so each shard's
safetensors header (with every tensor's byte offsets) is written first and each tensor's bytes go
straight to their place as soon as the tensor is computed. Memory holds the tensor being written,
never a whole shard.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch

from exme.errors import ExmeError
from exme.io.checkpoint import SAFE_INDEX, SAFE_SINGLE, TORCH_TO_SAFETENSORS, TensorSpec

#: Files copied from the tokenizer source next to the merged weights when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"

#: Bytes written between two ``fdatasync`` calls of the shard being written.
SYNC_EVERY_BYTES = 64 * 2**20

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """``"5GB"`` → 5·10⁹ bytes (decimal like transformers; ``GiB`` for binary), ints pass through."""
    if isinstance(size, int):
        if size <= 0:
            raise ExmeError(f"max shard size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ExmeError(f"cannot read size {size!r}; write it like 5GB, 500MB or 2GiB")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ExmeError(f"max shard size must be positive, got {size!r}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------- write faults

#: What a failed write means to the user, by errno. These are faults of the place written to (a
#: full or read-only disk, a dying device, a folder removed under the run), never of exme: each
#: becomes one :class:`ExmeError` line naming the path.
WRITE_FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is larger than this filesystem or the file size limit allows",
    errno.EROFS: "the filesystem is read-only",
    errno.EIO: "an I/O error on the device",
    errno.ENOENT: "the folder does not exist (it was removed, or cannot hold files)",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted there",
    errno.ESTALE: "the network filesystem handle went stale",
}

#: Added to the planned bytes of a model folder: safetensors headers, config.json, the model card.
SIDE_FILES_SLACK = 2**20


def human_bytes(n: float) -> str:
    """``1536000`` → ``"1.5 MB"`` (decimal units, as ``df -H`` and the shard sizes are written)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_fault_of(err: BaseException | None) -> OSError | None:
    """The disk fault behind ``err``, if any: an ``OSError`` of :data:`WRITE_FAULTS`, or a library error
    that reports one only in its text (safetensors' Rust writer says ``... (os error 28)``)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in WRITE_FAULTS:
            return err
        match = re.search(r"\(os error (\d+)\)", str(err)) if not isinstance(err, OSError) else None
        if match and int(match.group(1)) in WRITE_FAULTS:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def is_write_fault(err: BaseException | None) -> bool:
    return write_fault_of(err) is not None


def _fault_parts(err: OSError) -> tuple[str, str]:
    """(cause with its errno name, what to do) of a write fault."""
    cause = WRITE_FAULTS.get(err.errno, err.strerror or str(err))
    name = errno.errorcode.get(err.errno, str(err.errno)) if err.errno else type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        todo = "free space there or choose another output folder, then run the command again"
    elif err.errno == errno.EIO:
        todo = "check the device (dmesg) or choose another output folder"
    else:
        todo = "choose an output folder you can write to"
    return f"{cause} ({name})", todo


def write_fault_message(err: OSError, path: str | os.PathLike | None, what: str = "writing", *, exact: bool = False) -> str:
    """One line: the path (the file the system named, else ``path``; always ``path`` when ``exact``:
    a temporary file's name means nothing to the user), the cause, and what to do."""
    where = err.filename if err.filename and not exact else path
    cause, todo = _fault_parts(err)
    return f"{what} {where} failed: {cause}; {todo}"


@contextlib.contextmanager
def write_faults(path: str | os.PathLike, what: str = "writing") -> Iterator[None]:
    """Turn a fault of the place written to (:data:`WRITE_FAULTS`) into one :class:`ExmeError` line."""
    try:
        yield
    except OSError as err:
        if not is_write_fault(err):
            raise
        raise ExmeError(write_fault_message(err, path, what)) from None


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``folder``."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_location(folder: str | os.PathLike, needed: int | None = None, *, what: str = "output") -> int:
    """Before any long work: ``folder`` (or the folder that will hold it) accepts a file, and has room.

    Writability is probed by creating and removing a file there (``os.access`` says yes on a
    read-only filesystem to root, and knows nothing of ``/proc``). ``needed`` is the planned size in
    bytes, when the plan knows it. Returns the free bytes; raises one line saying what is needed and
    what is free.
    """
    folder = Path(folder).expanduser().absolute()
    where = _existing_ancestor(folder)
    if not where.is_dir():
        raise ExmeError(f"{what} {folder}: {where} is a file, not a folder; choose another {what} path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".exme-probe-", dir=where)
        try:
            os.close(fd)
        finally:
            os.unlink(probe)
    except OSError as err:
        if not is_write_fault(err):
            raise
        cause, todo = _fault_parts(err)
        raise ExmeError(f"{what} {folder}: cannot create a file in {where}: {cause}; {todo}") from None
    free = free_bytes(where)
    if needed is not None and needed > free:
        raise ExmeError(
            f"{what} {folder}: needs {human_bytes(needed)}, {human_bytes(free)} free on its filesystem; "
            f"free space there or choose another {what} folder"
        )
    return free


# ------------------------------------------------------------------------------------- atomic folder


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's metadata and data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_target(target: Path, inputs: Iterable[Path], force: bool) -> Path:
    """Refuse an output that would overwrite data we must not touch; return the resolved target.

    Always refused: the output is an input, lies inside one, or contains one (``--force`` would
    delete it). Refused unless ``force``: an existing non-empty folder, or an existing file.
    """
    target = Path(target).expanduser().resolve()
    for inp in inputs:
        inp = Path(inp).expanduser().resolve()
        if target == inp or inp in target.parents:
            raise ExmeError(f"output {target} is inside input model {inp}; choose an output folder outside every input")
        if target in inp.parents:
            raise ExmeError(f"output {target} contains input model {inp}; choose an output folder that holds no input")
    if target.exists():
        if not target.is_dir():
            raise ExmeError(f"output {target} exists and is a file; choose another output path")
        if any(target.iterdir()) and not force:
            raise ExmeError(f"output folder {target} exists and is not empty; pass --force to replace it")
    if not target.parent.exists():
        raise ExmeError(f"the parent folder of output {target} does not exist; create it first")
    return target


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_STALE = re.compile(r"^\.(?P<target>.+)\.exme-(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[^@/]+)@[^@/]*$")


def _owner_tag() -> str:
    """``pid@host@``: lets a later run tell whether the writer of a temporary folder is still alive."""
    return f"{os.getpid()}@{socket.gethostname()}@"


_STALE_FILE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)@(?P<host>[^@/]+)\.tmp$")


def temp_file_name(name: str) -> str:
    """``.NAME.PID@HOST.tmp``: the temporary name a file is written under before its atomic rename,
    tagged so that :func:`remove_stale_temp_folders` can tell a killed writer's leftover."""
    return f".{name}.{os.getpid()}@{socket.gethostname()}.tmp"


def _dead_here(pid: str, host: str) -> bool:
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temp_folders(folder: str | Path, say=print) -> list[Path]:
    """Remove the temporary folders an :class:`AtomicOutputFolder` in ``folder`` left when its process was killed.

    A folder counts as stale by the rule used for dead workers' claims: written on this host by a
    process that no longer exists (one from another host, or a live process, is left alone). An
    ``.exme-old-`` folder still holding the previous output is put back when its target is missing,
    since the kill came between the two renames. Each action is reported through ``say``.
    """
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        file_match = _STALE_FILE.match(entry.name)
        if file_match and entry.is_file() and _dead_here(file_match["pid"], file_match["host"]):
            entry.unlink(missing_ok=True)
            say(f"removed {entry}, a half-written file left by a killed process (pid {file_match['pid']})")
            removed.append(entry)
            continue
        match = _STALE.match(entry.name)
        if not match or not entry.is_dir() or match["host"] != socket.gethostname():
            continue
        try:
            os.kill(int(match["pid"]), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, owned by someone else
        target, previous = folder / match["target"], entry / "previous"
        if match["kind"] == "old" and previous.is_dir() and not target.exists():
            os.rename(previous, target)
            say(f"restored {target} from {entry.name}, left by a process that was killed while replacing it")
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        shutil.rmtree(entry, ignore_errors=True)
        say(f"removed {entry} ({size / 1e6:.1f} MB), a temporary folder left by a killed process (pid {match['pid']})")
        removed.append(entry)
    return removed


class AtomicOutputFolder:
    """A temporary folder beside ``target`` that becomes ``target`` only when everything succeeded.

    Use as a context manager: write files into :attr:`tmp`; on a clean exit every file is fsynced
    and the folder renamed to ``target`` (an existing target is replaced only when ``force``); on
    an exception the temporary folder is removed and ``target`` is left exactly as it was.

    ``needed_bytes`` (the planned size) is checked against the free space on entering, before any
    work; a fault of the disk while writing (:data:`WRITE_FAULTS`) becomes one :class:`ExmeError`
    line naming the output, after the temporary folder is gone.
    """

    def __init__(self, target: Path, force: bool = False, needed_bytes: int | None = None) -> None:
        self.target = Path(target)
        self.force = force
        self.needed_bytes = needed_bytes
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        needed = None if self.needed_bytes is None else self.needed_bytes + SIDE_FILES_SLACK
        check_output_location(self.target, needed, what="output")
        with write_faults(self.target, "creating a temporary folder beside"):
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.exme-tmp-{_owner_tag()}", dir=self.target.parent))
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            self._abandon(exc)
            return
        try:
            self._commit()
        except BaseException as err:
            self._abandon(err)
            raise

    def _abandon(self, err: BaseException | None) -> None:
        """Remove the unfinished output; a disk fault becomes one line (the caller re-raises anything else)."""
        assert self.tmp is not None
        shutil.rmtree(self.tmp, ignore_errors=True)
        if err is not None and is_write_fault(err):
            raise ExmeError(write_fault_message(write_fault_of(err), self.target, "writing", exact=True)
                            + " (nothing was written: the output appears only once complete)") from None

    def _commit(self) -> None:
        assert self.tmp is not None
        for file in self.tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        # mkdtemp makes the folder private (0700); the finished model gets the permissions a plain
        # mkdir would give it, so the people and jobs that can read the inputs can read the output.
        os.chmod(self.tmp, 0o777 & ~_current_umask())
        fsync_path(self.tmp)
        old: Path | None = None
        if self.target.exists():
            if any(self.target.iterdir()) and not self.force:
                raise ExmeError(f"output folder {self.target} appeared while merging; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.exme-old-{_owner_tag()}", dir=self.target.parent))
            os.rename(self.target, old / "previous")
        try:
            os.rename(self.tmp, self.target)
        except BaseException:
            if old is not None:  # put the previous output back
                os.rename(old / "previous", self.target)
                shutil.rmtree(old, ignore_errors=True)
            raise
        fsync_path(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- shards


@dataclass
class ShardPlan:
    """Which tensors go into which file, in write order."""

    files: list[str]
    tensors: list[list[tuple[str, TensorSpec]]]

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: file for file, group in zip(self.files, self.tensors) for name, _ in group}

    @property
    def total_size(self) -> int:
        return sum(spec.nbytes for group in self.tensors for _, spec in group)


def plan_shards(specs: Sequence[tuple[str, TensorSpec]], max_shard_size: int) -> ShardPlan:
    """Greedy split in the given order: start a new shard when the next tensor would overflow.

    A tensor larger than ``max_shard_size`` gets a shard of its own (as transformers does).
    One shard is named ``model.safetensors``; several ``model-0000i-of-0000n.safetensors``.
    """
    groups: list[list[tuple[str, TensorSpec]]] = [[]]
    size = 0
    for name, spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, spec))
        size += spec.nbytes
    n = len(groups)
    files = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return ShardPlan(files, groups)


def _header_bytes(group: Sequence[tuple[str, TensorSpec]], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of one shard (padded to 8 bytes) and each tensor's data offset."""
    header: dict[str, object] = {"__metadata__": metadata}
    offsets: dict[str, int] = {}
    pos = 0
    for name, spec in group:
        if spec.dtype not in TORCH_TO_SAFETENSORS:
            raise ExmeError(f"tensor {name!r} has dtype {spec.dtype}, which safetensors cannot store")
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[spec.dtype], "shape": list(spec.shape), "data_offsets": [pos, pos + spec.nbytes]}
        offsets[name] = pos
        pos += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


@dataclass
class ShardedSafetensorsWriter:
    """Writes the tensors of a :class:`ShardPlan` into ``folder``, header first, data streamed.

    Tensors must arrive in plan order (the engine's order); each is checked against its planned
    shape and dtype. :meth:`close` verifies that every planned tensor was written and writes the
    index (for more than one shard).
    """

    folder: Path
    plan: ShardPlan
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})

    def __post_init__(self) -> None:
        self._order = [(i, name, spec) for i, group in enumerate(self.plan.tensors) for name, spec in group]
        self._next = 0
        self._file_index = -1
        self._fh = None
        self._pending = 0
        self._unsynced = 0

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        header, _ = _header_bytes(self.plan.tensors[index], self.metadata)
        self._fh = open(self.folder / self.plan.files[index], "wb")
        self._fh.write(header)
        self._file_index = index

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Stream one whole tensor into place (the next one in plan order)."""
        spec = self.begin(name)
        if tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"tensor {name!r} has shape {tuple(tensor.shape)}, planned {spec.shape}")
        self.append(tensor)
        self.end()

    def begin(self, name: str) -> TensorSpec:
        """Start the next planned tensor; its bytes follow with :meth:`append`, then :meth:`end`."""
        if self._next >= len(self._order):
            raise RuntimeError(f"tensor {name!r} written after the plan was complete")
        shard, planned, spec = self._order[self._next]
        if name != planned:
            raise RuntimeError(f"expected tensor {planned!r} next, got {name!r}")
        if shard != self._file_index:
            self._open_shard(shard)
        self._pending = spec.nbytes
        return spec

    def append(self, chunk: torch.Tensor) -> None:
        """The next elements (flat order) of the tensor begun last, in its planned dtype."""
        spec = self._order[self._next][2]
        if chunk.dtype != spec.dtype:
            raise RuntimeError(f"chunk of {self._order[self._next][1]!r} is {chunk.dtype}, planned {spec.dtype}")
        data = chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel() > self._pending:
            raise RuntimeError(f"more bytes than planned for tensor {self._order[self._next][1]!r}")
        if data.numel():
            self._fh.write(memoryview(data.numpy()))
        self._pending -= data.numel()
        self._unsynced += data.numel()
        if self._unsynced >= SYNC_EVERY_BYTES:
            # Push written data to disk as we go, so the closing fsync does not wait for the
            # whole shard at once: disk writeback overlaps the merge instead of following it.
            self._fh.flush()
            os.fdatasync(self._fh.fileno())
            self._unsynced = 0

    def end(self) -> None:
        """Finish the current tensor; all of its planned bytes must have been appended."""
        if self._pending:
            raise RuntimeError(f"tensor {self._order[self._next][1]!r} is missing {self._pending} bytes")
        self._next += 1

    def close(self) -> None:
        """Finish the last shard and write ``model.safetensors.index.json`` when sharded."""
        if self._next != len(self._order):
            missing = self._order[self._next][1]
            raise RuntimeError(f"output incomplete: tensor {missing!r} was never written")
        if self._file_index == -1 and self.plan.files:  # a model with no tensors still gets a valid file
            self._open_shard(0)
        self._close_shard()
        if len(self.plan.files) > 1:
            index = {"metadata": {"total_size": self.plan.total_size}, "weight_map": self.plan.weight_map}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close the open file without checks (the folder is about to be removed)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ------------------------------------------------------------------------------------- side files


def write_config(config: dict, folder: Path, dtype: torch.dtype, updates: dict | None = None) -> None:
    """``config.json`` of the output: the source config with the output dtype (and ``updates``)."""
    out = dict(config)
    out.update(updates or {})
    out["dtype"] = dtype_name(dtype)  # transformers 5 spelling
    if "torch_dtype" in out:  # transformers 4.x spelling, kept consistent when the source had it
        out["torch_dtype"] = dtype_name(dtype)
    (folder / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


def side_files_bytes(*sources: Path | None) -> int:
    """Bytes :func:`copy_side_files` copies from these folders (planned with the weights)."""
    total = 0
    for source in {Path(s) for s in sources if s is not None}:
        for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
            if (source / name).is_file():
                total += (source / name).stat().st_size
    return total


def copy_side_files(tokenizer_source: Path, generation_source: Path, folder: Path) -> list[str]:
    """Copy tokenizer files and ``generation_config.json``; return the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy2(tokenizer_source / name, folder / name)
            copied.append(name)
    if (generation_source / GENERATION_CONFIG).is_file():
        shutil.copy2(generation_source / GENERATION_CONFIG, folder / GENERATION_CONFIG)
        copied.append(GENERATION_CONFIG)
    return copied
