"""Config plumbing every module shares: the strict pydantic base, the validation-error message, the
dtype table, and the one way exme loads a model and its tokenizer.

Why one place: each config parser used to carry its own strict base, error formatter and list of
dtype spellings, and they drifted (one accepted ``bf16``, another did not). A module that parses
user input imports these instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from exme.errors import ExmeError


class StrictModel(BaseModel):
    """Base of every user-facing config: an unknown key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


def describe_validation_error(err: ValidationError) -> str:
    """The first validation problem as 'key.path: what is wrong' (one line for ``ExmeError``); an
    unknown key is named first, since it often explains a missing one (``merge_mehtod``)."""
    first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        missing = [".".join(str(p) for p in e["loc"]) for e in err.errors() if e["type"] == "missing"]
        hint = f" (is it a misspelling of the missing key '{missing[0]}'?)" if missing else ""
        return f"unknown key '{loc}'{hint}; check its spelling (exme refuses keys it does not understand)"
    if kind == "missing":
        return f"missing key '{loc}'"
    if kind == "literal_error":
        return f"'{loc}': {first['msg']} (got {first.get('input')!r})"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


#: Every dtype spelling exme accepts, to the torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``, with a message listing the accepted spellings."""
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise ExmeError(f"unknown {what} {name!r}; use one of float32, float16, bfloat16, float64")
    return DTYPES[key]


def model_dtype(name: str) -> Any:
    """``from_pretrained``'s ``dtype`` argument: ``"auto"`` (the stored dtype) or a torch dtype."""
    return "auto" if name == "auto" else parse_dtype(name)


def load_model(path: str | Path, *, dtype: str = "auto", device: str = "cpu") -> torch.nn.Module:
    """A causal LM from a model folder, in eval mode on ``device``; a load failure is one ``ExmeError``."""
    from transformers import AutoModelForCausalLM

    try:
        torch.device(device)
    except RuntimeError:
        raise ExmeError(f"device {device!r} is not a valid torch device (e.g. cpu, cuda, cuda:1)") from None
    torch_dtype = model_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except Exception as err:  # noqa: BLE001 - any failure here is a model folder transformers cannot read
        raise ExmeError(f"{path}: transformers cannot load this model ({err})".splitlines()[0]) from None
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside a model; a missing or broken one is one ``ExmeError``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ExmeError(f"{path}: cannot load its tokenizer ({err}); save one beside the weights".splitlines()[0]) from None


def host_memory_available() -> int | None:
    """Bytes of memory the kernel could still give this process (``MemAvailable``), or ``None`` if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
