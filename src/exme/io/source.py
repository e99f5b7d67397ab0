"""One interface for "a model's tensors relative to a base": full model folders and PEFT LoRA adapters.

Every consumer (the merge engine, the live model, the preflight scan) opens its inputs with
:func:`open_source` and reads them through the same methods as :class:`~exme.io.Checkpoint`
(``names``, ``has``, ``spec``, ``get``, ``get_flat``, ``file_of``, ``config``, ``close``):

* a full model folder (single or sharded safetensors, ``.bin``) is a :class:`Checkpoint`;
* a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``,
  as transformers' Trainer and TRL save them) is an :class:`AdapterSource` over the base: it reads as
  the full model ``merge_and_unload()`` would produce, tensor by tensor, without ever holding it.

For an adapter, per target module: Δ = s · B @ A with s = lora_alpha / r (rsLoRA: lora_alpha / √r;
``rank_pattern`` / ``alpha_pattern`` override r and alpha per module), computed in float32 on
demand (embedding adapters: Δ = s · (B @ A)ᵀ). θ = θ_b + Δ, added in float32 and cast once to the
base's dtype — what PEFT's merge writes. Modules not targeted have Δ = 0 (θ = θ_b);
``modules_to_save`` (and embedding ``base_layer`` weights PEFT saves when vocabulary was resized)
replace the base tensor.

mergekit's ``BASE+ADAPTER`` spelling names an adapter together with the base it applies to.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from exme.errors import ExmeError
from exme.io.checkpoint import Checkpoint, TensorSpec, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
#: The prefix PEFT puts before the base model's module names in saved adapters.
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(\.[^.]+)?\.weight$")
_LORA_EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(\.[^.]+)?$")


def is_adapter(path: str | os.PathLike) -> bool:
    """A PEFT adapter folder (``adapter_config.json`` at its top level)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def split_base_plus_adapter(spec: str | os.PathLike) -> tuple[Path | None, Path]:
    """mergekit's ``BASE+ADAPTER``: ``(base, adapter)``; a plain path gives ``(None, path)``."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists() or "+" not in text:
        return None, path
    base, _, adapter = text.rpartition("+")
    return Path(base).expanduser(), Path(adapter).expanduser()


def open_source(path: str | os.PathLike, base: Checkpoint | None = None, *, label: str | None = None) -> Checkpoint | AdapterSource:
    """Open a model folder or an adapter folder (an adapter reads relative to ``base``).

    ``BASE+ADAPTER`` opens the adapter over that base (which must be ``base`` when one is given).
    """
    base_path, path = split_base_plus_adapter(path)
    if base_path is not None:
        if base is None or base_path.resolve() != Path(base.path).expanduser().resolve():
            if base is not None:
                raise ExmeError(
                    f"{base_path}+{path}: the adapter is applied to {base_path}, but the merge's base model is "
                    f"{base.path}; use one base for every input"
                )
            base = Checkpoint.open(base_path)
        if not is_adapter(path):
            raise ExmeError(f"{base_path}+{path}: {path} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    if is_adapter(path):
        if base is None:
            raise ExmeError(
                f"{path} is a LoRA adapter; it needs the model it was trained on: set base_model, or write "
                "BASE+ADAPTER"
            )
        return AdapterSource.open(path, base)
    return Checkpoint.open(path)


def _match_pattern(patterns: dict, module: str):
    """PEFT's rank_pattern/alpha_pattern lookup: a key equal to the module name, a dotted suffix of it, or a regex."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
        try:
            if re.fullmatch(rf"(.*\.)?(?:{key})", module):
                return value
        except re.error:
            continue  # not a regex: only the plain comparisons above apply
    return None


@dataclass(frozen=True)
class LoraFactors:
    """One target module's low-rank update: Δ = scale · B @ A (transposed for embeddings / fan_in_fan_out)."""

    module: str
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    transpose: bool  # embedding adapters and fan_in_fan_out: Δ = scale · (B @ A)ᵀ

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """Δ in float32 (the order PEFT's ``get_delta_weight`` uses: product, transpose, then scale)."""
        prod = self.b.to(device, torch.float32) @ self.a.to(device, torch.float32)
        if self.transpose:
            prod = prod.T
        return prod * self.scale


class AdapterSource:
    """A PEFT LoRA adapter read as the full model it makes with its base (see the module docstring).

    Holds only the adapter's tensors (A, B factors and saved modules); base tensors are read
    from the base checkpoint when asked for, and θ = θ_b + Δ is built one tensor at a time.
    """

    format = "peft lora adapter"

    def __init__(self, path: Path, base: Checkpoint, adapter_config: dict, factors: dict[str, LoraFactors],
                 replaced: dict[str, torch.Tensor], weights_file: Path) -> None:
        self.path = path
        self.base = base
        self.adapter_config = adapter_config
        self.factors = factors  # base tensor name → factors
        self.replaced = replaced  # base tensor name → saved tensor (modules_to_save, resized base layers)
        self.weights_file = weights_file
        self.config = base.config
        self.names = sorted(set(base.names) | set(replaced))
        self._lock = threading.Lock()
        self._cache: tuple[str, torch.Tensor] | None = None  # the last full tensor, for chunked reads

    def __repr__(self) -> str:
        return f"AdapterSource({str(self.path)!r}, {len(self.factors)} LoRA modules over {self.base.path})"

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str | os.PathLike, base: Checkpoint) -> AdapterSource:
        path = Path(path).expanduser()
        cfg_file = path / ADAPTER_CONFIG
        try:
            cfg = json.loads(cfg_file.read_text())
            if not isinstance(cfg, dict):
                raise ValueError
        except (OSError, ValueError):
            raise ExmeError(f"{cfg_file} is not valid JSON; re-save the adapter") from None
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise ExmeError(f"{cfg_file}: peft_type {peft_type} is not supported; exme reads LoRA adapters only")
        if cfg.get("use_dora"):
            raise ExmeError(f"{cfg_file}: DoRA adapters (use_dora: true) are not supported; merge_and_unload() it first")
        if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
            raise ExmeError(f"{cfg_file}: adapters with trained biases (bias: {cfg.get('bias')}) are not supported; "
                            "merge_and_unload() it first")
        _check_base_architecture(cfg_file, cfg, base)
        weights_file, tensors = _read_adapter_weights(path)
        r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rslora, fan_in_fan_out = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))

        pairs: dict[str, dict[str, torch.Tensor]] = {}
        embedding: set[str] = set()
        replaced: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if "lora_magnitude_vector" in key:
                raise ExmeError(f"{weights_file}: {key} is a DoRA magnitude; DoRA adapters are not supported")
            name = key.removeprefix(PEFT_PREFIX)
            m = _LORA_KEY.match(name) or _LORA_EMBED_KEY.match(name)
            if m:
                kind = m["kind"]
                if kind.startswith("lora_embedding"):
                    embedding.add(m["module"])
                pairs.setdefault(m["module"], {})[kind[-1]] = tensor
                continue
            target = name.replace(".base_layer.", ".") if ".base_layer." in name else name
            target = target.replace(".modules_to_save.", ".")
            if not base.has(target):
                raise ExmeError(f"{weights_file}: saved module tensor {key!r} has no tensor {target!r} in the base "
                                f"{base.path}; the adapter was trained on another model")
            replaced[target] = tensor
        factors: dict[str, LoraFactors] = {}
        for module, ab in sorted(pairs.items()):
            target = f"{module}.weight"
            if set(ab) != {"A", "B"}:
                raise ExmeError(f"{weights_file}: module {module!r} has lora_{''.join(ab)} but not its pair; the adapter is incomplete")
            if not base.has(target):
                raise ExmeError(
                    f"{weights_file}: target module {module!r} is not in the base {base.path} (no tensor {target!r}); "
                    "the adapter was trained on another model"
                )
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ExmeError(
                    f"{weights_file}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, whose "
                    "ranks do not match; the adapter is corrupt"
                )
            r = a.shape[0]
            short = module.split(".")[-1]
            declared_r = _match_pattern(rank_pattern, module) or r_default
            alpha = _match_pattern(alpha_pattern, module) or alpha_default
            if int(declared_r) != r:
                raise ExmeError(f"{weights_file}: module {module!r} has rank {r} but {ADAPTER_CONFIG} says r = {declared_r}")
            scale = float(alpha) / (math.sqrt(r) if rslora else r)
            transpose = module in embedding or (fan_in_fan_out and short not in ("embed_tokens",))
            shape = (b.shape[0], a.shape[1])
            out_shape = tuple(reversed(shape)) if transpose else shape
            base_shape = tuple(replaced[target].shape) if target in replaced else tuple(base.spec(target).shape)
            if out_shape != base_shape:
                raise ExmeError(
                    f"{weights_file}: module {module!r} makes a {out_shape} update but the base tensor {target!r} is "
                    f"{base_shape}; the adapter was trained on another model"
                )
            factors[target] = LoraFactors(module, a, b, scale, transpose)
        return cls(path, base, cfg, factors, replaced, weights_file)

    # ------------------------------------------------------------------ the Checkpoint interface
    def has(self, name: str) -> bool:
        return name in self.replaced or self.base.has(name)

    def spec(self, name: str) -> TensorSpec:
        """The base's dtype (θ = θ_b + Δ is cast to it); a replaced tensor's own shape."""
        base_spec = self.base.spec(name)
        if name in self.replaced:
            t = self.replaced[name]
            return TensorSpec(tuple(t.shape), base_spec.dtype if t.dtype.is_floating_point else t.dtype)
        return base_spec

    def file_of(self, name: str) -> Path:
        return self.base.file_of(name)

    def delta(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor | None:
        """Δ of one base tensor in float32, or ``None`` where the adapter leaves it as the base has it."""
        f = self.factors.get(name)
        return None if f is None else f.delta(device)

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """θ of one tensor: the base's (or the saved replacement) plus Δ in float32, cast once to the base dtype."""
        spec = self.spec(name)
        theta = self.replaced[name].to(device) if name in self.replaced else self.base.get(name, device)
        f = self.factors.get(name)
        if f is None:
            return theta.to(spec.dtype)
        out = theta.to(torch.float32, copy=True)
        out.add_(f.delta(device))
        return out.to(spec.dtype)

    def get_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` in flat order; the full tensor of the last name asked is kept for the next chunk."""
        with self._lock:
            if self._cache is None or self._cache[0] != name:
                self._cache = (name, self.get(name).reshape(-1))
            flat = self._cache[1]
        return flat[start:stop].clone()

    def close(self) -> None:
        with self._lock:
            self._cache = None

    @property
    def nbytes(self) -> int:
        return sum(self.spec(n).nbytes for n in self.names)

    @property
    def adapter_nbytes(self) -> int:
        """Bytes of the adapter's own tensors (what a live model holds for it)."""
        held = [t for f in self.factors.values() for t in (f.a, f.b)] + list(self.replaced.values())
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def tied_embeddings(self) -> bool:
        return self.base.tied_embeddings


def _read_adapter_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    safe, binf = path / ADAPTER_SAFE, path / ADAPTER_BIN
    if safe.is_file():
        read_safetensors_header(safe)  # a truncated or corrupt file is an error naming it
        from safetensors.torch import load_file

        return safe, load_file(str(safe))
    if binf.is_file():
        try:
            state = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means an unreadable file
            raise ExmeError(f"cannot read {binf} with torch.load(weights_only=True): {err}".splitlines()[0]) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ExmeError(f"{binf} is not a state dict of tensors")
        return binf, state
    raise ExmeError(f"adapter folder {path} has {ADAPTER_CONFIG} but no {ADAPTER_SAFE} or {ADAPTER_BIN}")


#: Config keys that must agree between an adapter's recorded base and the base it is applied to.
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")


def _check_base_architecture(cfg_file: Path, cfg: dict, base: Checkpoint) -> None:
    """When the adapter's ``base_model_name_or_path`` is a local folder, it must be the same architecture.

    A hub name cannot be checked without a download; the per-module shape checks catch the rest.
    """
    recorded = cfg.get("base_model_name_or_path")
    if not recorded:
        return
    folder = Path(str(recorded)).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        return
    try:
        theirs = json.loads(config_file.read_text())
    except ValueError:
        return
    for key in _ARCH_KEYS:
        if key in theirs and key in base.config and theirs[key] != base.config[key]:
            raise ExmeError(
                f"{cfg_file}: the adapter was trained on {recorded} ({key} = {theirs[key]}), but the base given is "
                f"{base.path} ({key} = {base.config[key]}); use the base the adapter was trained on"
            )
