"""A GGUF model turned into an ordinary Hugging Face model folder (float32 and bfloat16).

transformers reads GGUF (with the ``gguf`` package installed) and dequantizes it to float32, but
refuses to ``save_pretrained`` a model loaded that way. So a fresh model is built from the same
config without its ``quantization_config``, given the dequantized state dict, and saved as
safetensors: it reloads with the same logits, and every exme tool reads it like any checkpoint.
The weights went through 4-bit quantization: a real pretrained model, not bit-for-bit the published one.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

from exme.errors import ExmeError

#: GGUF ``general.architecture`` values this conversion has been checked on.
SUPPORTED_ARCHITECTURES = ("llama",)

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(fh: BinaryIO, fmt: str, where: Path):
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise ExmeError(f"{where}: the GGUF file ends inside its header; it is truncated (fetch it again)")
    return struct.unpack(fmt, data)[0]


def _read_value(fh: BinaryIO, vtype: int, where: Path):
    if vtype in _SCALAR:
        return _read(fh, _SCALAR[vtype], where)
    if vtype == _STRING:
        return fh.read(_read(fh, "<Q", where)).decode("utf-8", "replace")
    if vtype == _ARRAY:
        itype, count = _read(fh, "<I", where), _read(fh, "<Q", where)
        if itype in _SCALAR:  # skip without decoding: the tokenizer arrays are large
            fh.seek(struct.calcsize(_SCALAR[itype]) * count, 1)
            return None
        for _ in range(count):
            _read_value(fh, itype, where)
        return None
    raise ExmeError(f"{where}: GGUF metadata value of unknown type {vtype}; the file is damaged or of a newer GGUF version")


def gguf_metadata(path: str | Path, keys: tuple[str, ...] = ("general.architecture",)) -> dict[str, object]:
    """The scalar/string metadata ``keys`` of a GGUF file, read from its header alone (no ``gguf`` needed)."""
    path = Path(path)
    found: dict[str, object] = {}
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ExmeError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        version = _read(fh, "<I", path)
        if version < 2:
            raise ExmeError(f"{path}: GGUF version {version} is too old; convert it with a current llama.cpp")
        _read(fh, "<Q", path)  # tensor count
        for _ in range(_read(fh, "<Q", path)):
            key = fh.read(_read(fh, "<Q", path)).decode("utf-8", "replace")
            value = _read_value(fh, _read(fh, "<I", path), path)
            if key in keys:
                found[key] = value
                if len(found) == len(keys):
                    break
    return found


def check_architecture(path: str | Path) -> str:
    """The GGUF's architecture, or one :class:`ExmeError` naming it when this conversion does not handle it."""
    arch = gguf_metadata(path).get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExmeError(
            f"{path}: GGUF architecture {arch!r} is not one exme converts (it converts {list(SUPPORTED_ARCHITECTURES)}); "
            "use a model folder saved with save_pretrained instead"
        )
    return str(arch)


def convert_gguf(gguf_path: str | Path, outputs: dict[str, Path]) -> None:
    """Dequantize ``gguf_path`` and save one HF model folder (weights, config, tokenizer) per dtype.

    ``outputs`` maps a dtype name (``float32``, ``bfloat16``) to its folder; each is written into a
    temporary folder beside it and renamed into place, so a stopped conversion leaves nothing half-written.
    """
    gguf_path = Path(gguf_path)
    check_architecture(gguf_path)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ExmeError(
            f"converting {gguf_path.name} needs the gguf package: pip install 'exme[assets]' (or pip install gguf)"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    from exme.common import parse_dtype
    from exme.runtime import is_verbose

    if not is_verbose():  # the one line per step of python -m exme.assets is enough
        hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ExmeError(f"{gguf_path}: the dequantized weights do not fit the model built from its config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    for dtype_name, out in outputs.items():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            model.to(parse_dtype(dtype_name)).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float32)
