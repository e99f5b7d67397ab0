"""The merge config: mergekit's YAML format for the methods exme implements, plus ExPO and ExMe.

Why mergekit's format: users already have these files. Why strict: a key exme does not understand
(a typo, or a mergekit feature such as ``modules``) changes what the user believes they merged, so
it is an error that names the key, never silently ignored.

Accepted keys::

    merge_method: linear | task_arithmetic | ties | dare_linear | dare_ties | slerp | extrapolate | exme
    base_model: PATH
    models:                            (or slices, below; exactly one of the two)
      - model: PATH
        parameters: {weight: W, density: D, alpha: A}
    slices:                            (layers kept in place: see _check_slices)
      - sources:
          - {model: PATH, layer_range: [0, N], parameters: {...}}
        parameters: {...}
    parameters: {normalize, lambda, t, beta, alpha, weight, density, majority_sign_method, rescale, int8_mask}
    dtype: float32 | float16 | bfloat16 | float64
    out_dtype: ...
    tokenizer_source: base | PATH
    output_format: model | peft        (exme only: peft writes one LoRA adapter, see docs/merge.md)

A model path may be a full model folder, a PEFT LoRA adapter folder (read over ``base_model``), or
mergekit's ``BASE+ADAPTER``. Every parameter may be a value, a per-layer gradient list or a list of
``{filter, value}`` entries, as in mergekit (:mod:`exme.merge.parameters` resolves them per tensor).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from exme.common import DTYPES, StrictModel, describe_validation_error, parse_dtype
from exme.errors import ExmeError
from exme.merge.parameters import ParameterTable, Setting, SliceParameters, TensorPoint
from exme.merge.registry import METHOD_NAMES, PARAMS, REGISTRY, get_method, methods_reading

#: The method names, from the registry (a pydantic Literal, so a typo lists the known methods).
MergeMethod = Literal[METHOD_NAMES]  # type: ignore[valid-type]
METHODS_WITH_BASE = tuple(n for n, m in REGISTRY.items() if m.needs_base)

#: mergekit keys that exist there but are not implemented here, with what they do (for the message).
UNSUPPORTED_MERGEKIT_KEYS = {
    "tokenizer": "tokenizer merging (`tokenizer:` block)",
    "chat_template": "chat template selection",
    "modules": "per-module merge definitions",
    "name": "multi-stage merges",
    "random_seed": "mergekit's global seed (use --seed)",
}


class _Strict(StrictModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelParameters(_Strict):
    """Per-model parameters (``models[i].parameters``, or a slice source's).

    Each parameter is kept as mergekit writes it (a value, a per-layer gradient, or ``{filter, value}``
    entries), so the config writes back as it was read; its shape is checked where its full key is
    known (``MergeConfig._build_table``) and it is resolved per tensor by :mod:`exme.merge.parameters`.
    """

    weight: Any = None
    density: Any = None
    alpha: Any = None


class ModelEntry(_Strict):
    """One input model (``models[i]``)."""

    model: str
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class GlobalParameters(_Strict):
    """Method-wide parameters (``parameters``, or a slice's); ``weight``/``density``/``alpha`` are per-model defaults."""

    normalize: Any = None
    lambda_: Any = Field(default=None, alias="lambda")
    t: Any = None
    beta: Any = None
    alpha: Any = None
    weight: Any = None
    density: Any = None
    majority_sign_method: Any = None
    rescale: Any = None
    int8_mask: Any = None  # accepted for mergekit configs; no effect (exme's masks are bool)

class SliceSource(_Strict):
    """One source of a slice: a model and the layers it gives (``slices[j].sources[i]``)."""

    model: str
    layer_range: tuple[int, int]
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class SliceEntry(_Strict):
    """One output slice (``slices[j]``). exme merges slices that keep every layer in place (see :class:`MergeConfig`)."""

    sources: list[SliceSource] = Field(min_length=1)
    parameters: GlobalParameters = Field(default_factory=GlobalParameters)
    base_model: str | None = None
    residual_weight: float | None = None


def _check_range(value: float | None, low: float, high: float, what: str, low_open: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        if high == math.inf:
            raise ValueError(f"{what} = {value} is out of range; it must be >= {low:g}")
        bracket = "(" if low_open else "["
        raise ValueError(f"{what} = {value} is out of range; it must be in {bracket}{low:g}, {high:g}]")


def _check_values(setting: Setting) -> None:
    """Every value written for a parameter is in its range (a gradient interpolates between them, so stays in)."""
    param = PARAMS[setting.key.rsplit(".", 1)[-1]]
    for where, value in setting.leaves():
        if param.key == "majority_sign_method" and value not in ("sum", "count"):
            raise ValueError(f"{where} must be sum or count, got {value!r}")
        if param.kind == "number" and param.low is not None:
            _check_range(float(value), param.low, param.high, where, param.low_open)


class MergeConfig(_Strict):
    """A validated merge: method, inputs and parameters (see the module docstring for the keys)."""

    merge_method: MergeMethod
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[SliceEntry] | None = None
    parameters: GlobalParameters = Field(default_factory=GlobalParameters)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    #: ``model``: a full HF model folder. ``peft``: one PEFT LoRA adapter that is exactly the merge
    #: (inputs: LoRA adapters of ``base_model``; a method linear in the task vectors).
    output_format: Literal["model", "peft"] = "model"

    _table: ParameterTable | None = PrivateAttr(default=None)
    _merged: list[int] | None = PrivateAttr(default=None)  # _merge_indices, resolved once

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        if v is not None and str(v).lower() not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use float32, float16, bfloat16 or float64")
        return v

    @model_validator(mode="after")
    def _method_rules(self) -> MergeConfig:
        method = self.merge_method
        if method in METHODS_WITH_BASE and not self.base_model:
            raise ValueError(f"merge_method {method} needs base_model")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source: union is not supported; use base or a model path")
        if (self.models is None) == (self.slices is None):
            raise ValueError("give either models or slices (exactly one of them)")
        if self.slices is not None:
            self._check_slices()
        if not self.models:
            raise ValueError("models: give at least one model")
        self._table = self._build_table()
        spec = REGISTRY[method]
        for setting in self._table.settings():
            _check_values(setting)
            param = PARAMS[setting.key.rsplit(".", 1)[-1]]
            if param.key not in spec.params and not (param.key == "rescale" and setting.entries[0].value is False
                                                      and not setting.varies):
                if "models[" in setting.key or "sources[" in setting.key:  # a model's own parameters
                    raise ValueError(f"{setting.key} has no meaning for merge_method {method}; remove it")
                raise ValueError(
                    f"{setting.key} has no meaning for merge_method {method} (it applies to "
                    f"{', '.join(methods_reading(param.key)) or 'no method'}); remove it"
                )
        spec.check(self)
        if not self._table.varies:  # one value per merge: its numeric rules are checked now, not per tensor
            spec.check_values(spec.resolve(self), self)
        return self

    def _check_slices(self) -> None:
        """Slices that keep every layer in place: each slice's sources share one range, slices follow each other.

        Why only these: they are the ``models:`` form with per-slice parameters. Different ranges per
        source, gaps, repeats or reordering build a different architecture (a frankenmerge), which
        exme does not write.
        """
        assert self.slices is not None
        first = [s.model for s in self.slices[0].sources]
        expected_start = 0
        for j, sl in enumerate(self.slices):
            if sl.residual_weight is not None:
                raise ValueError(f"slices[{j}].residual_weight is not supported by exme; remove it or use mergekit")
            if sl.base_model is not None and _norm(sl.base_model) != _norm(self.base_model or sl.base_model):
                raise ValueError(f"slices[{j}].base_model differs from base_model; exme merges over one base model")
            r0 = tuple(sl.sources[0].layer_range)
            for i, src in enumerate(sl.sources):
                if tuple(src.layer_range) != r0:
                    raise ValueError(
                        f"slices[{j}].sources[{i}].layer_range {list(src.layer_range)} differs from "
                        f"slices[{j}].sources[0]'s {list(r0)}; exme merges layers in place (every source of a slice "
                        "covers the same layers): use mergekit for layer stacking"
                    )
            if [s.model for s in sl.sources] != first:
                raise ValueError(f"slices[{j}].sources: list the same models as slices[0], in the same order")
            if r0[0] != expected_start or r0[1] <= r0[0]:
                raise ValueError(
                    f"slices[{j}].sources[0].layer_range {list(r0)}: exme accepts slices that cover the layers in "
                    f"order, each once (this one should start at layer {expected_start}); repeated, skipped or "
                    "reordered layers are a mergekit frankenmerge"
                )
            expected_start = r0[1]
        self.models = [ModelEntry(model=s.model, parameters=s.parameters) for s in self.slices[0].sources]

    def _build_table(self) -> ParameterTable:
        def of(params: BaseModel, prefix: str) -> dict[str, Setting]:
            out = {}
            for name in type(params).model_fields:
                raw = getattr(params, name)
                if raw is not None:
                    key = "lambda" if name == "lambda_" else name
                    out[key] = Setting.parse(raw, f"{prefix}.{key}", PARAMS[key].kind)  # type: ignore[arg-type]
            return out

        keep = self._merge_indices()
        if self.slices is None:
            assert self.models is not None
            slices = [SliceParameters(0, None, {}, [of(self.models[i].parameters, f"models[{i}].parameters") for i in keep])]
        else:
            slices = [
                SliceParameters(
                    sl.sources[0].layer_range[0], sl.sources[0].layer_range[1],
                    of(sl.parameters, f"slices[{j}].parameters"),
                    [of(sl.sources[i].parameters, f"slices[{j}].sources[{i}].parameters") for i in keep],
                )
                for j, sl in enumerate(self.slices)
            ]
        return ParameterTable(of(self.parameters, "parameters"), slices)

    def _merge_indices(self) -> list[int]:
        """Indices in ``models`` of the merged models (the base is not one of them for base-model methods)."""
        assert self.models is not None
        if self._merged is None:  # once: every per-tensor getter asks, and _norm resolves paths on disk
            if self.merge_method in METHODS_WITH_BASE and self.base_model:
                base = _norm(self.base_model)
                self._merged = [i for i, e in enumerate(self.models) if _norm(e.model) != base]
            else:
                self._merged = list(range(len(self.models)))
        return self._merged

    @property
    def table(self) -> ParameterTable:
        """Every parameter setting, for per-tensor resolution (:mod:`exme.merge.parameters`)."""
        if self._table is None:
            self._table = self._build_table()
        return self._table

    # ----------------------------------------------------------------------- derived values

    @property
    def merge_models(self) -> list[ModelEntry]:
        """The models whose tensors are combined; for base-model methods the base is not one of them.

        mergekit lets the base also appear in ``models`` (and in every slice) for task-vector methods;
        its task vector is zero and mergekit skips it, so exme does too.
        """
        assert self.models is not None
        return [self.models[i] for i in self._merge_indices()]

    # Every getter below takes ``at``: the tensor whose value is wanted (:class:`TensorPoint`), or
    # ``None`` for the one value of a merge whose parameters do not vary per tensor.

    def value(self, key: str, at: TensorPoint | None = None, model: int | None = None) -> Any:
        """Parameter ``key`` (of merged model ``model``, or shared) at tensor ``at``; ``None`` if unset."""
        try:
            return self.table.value(key, at, model)
        except ValueError as err:
            raise ExmeError(f"{err} (filters or gradients); this use needs one value per merge") from None

    def weights(self, at: TensorPoint | None = None) -> list[float | None]:
        inputs = self.merge_models
        if self.merge_method == "exme" and len(inputs) == 2:
            beta = self.value("beta", at)
            if beta is not None:
                return [beta, 1.0 - beta]
        return [self.value("weight", at, i) for i in range(len(inputs))]

    def densities(self, at: TensorPoint | None = None) -> list[float]:
        return [_or(self.value("density", at, i), 1.0) for i in range(len(self.merge_models))]

    def alphas(self, at: TensorPoint | None = None) -> list[float | None]:
        return [self.value("alpha", at, i) for i in range(len(self.merge_models))]

    def normalize(self, at: TensorPoint | None = None) -> bool:
        """mergekit's defaults: on for linear and ties, off for task arithmetic and DARE."""
        return _or(self.value("normalize", at), get_method(self.merge_method).normalize_default)

    def rescale(self, at: TensorPoint | None = None) -> bool:
        return _or(self.value("rescale", at), True)

    def lambda_(self, at: TensorPoint | None = None) -> float:
        return _or(self.value("lambda", at), 1.0)

    def majority_sign_method(self, at: TensorPoint | None = None) -> Literal["sum", "count"]:
        return _or(self.value("majority_sign_method", at), "sum")

    def t(self, at: TensorPoint | None = None) -> float | None:
        return self.value("t", at)

    def output_dtype(self, first_input: torch.dtype) -> torch.dtype:
        """``out_dtype``, else ``dtype``, else the first input's dtype (base, or first model)."""
        for name, what in ((self.out_dtype, "out_dtype"), (self.dtype, "dtype")):
            if name is not None:
                return parse_dtype(name, what)
        return first_input

    def compute_dtype(self) -> torch.dtype:
        """float32 arithmetic, float64 when the config asks for float64."""
        return torch.float64 if self.dtype is not None and parse_dtype(self.dtype) == torch.float64 else torch.float32

    def input_paths(self) -> list[Path]:
        """Every folder read (``BASE+ADAPTER`` names two), so an output is never placed inside one."""
        from exme.io.source import split_base_plus_adapter

        paths = [Path(self.base_model)] if self.base_model else []
        for e in self.models:
            base, adapter = split_base_plus_adapter(e.model)
            paths += ([base] if base else []) + [adapter]
        return list(dict.fromkeys(paths))

    def merge_parameters(self) -> dict[str, Any]:
        """Every parameter that shapes the result, resolved with defaults (for the model card).

        Parameters that vary per tensor are not one value: the card then points at its config section.
        """
        if self.table.varies:
            return {"merge_method": self.merge_method, "parameters": "vary per tensor (filters, gradients or slices; see Config)"}
        return {"merge_method": self.merge_method, **get_method(self.merge_method).resolve(self)}

    @property
    def method(self):
        """The registry object of ``merge_method`` (:mod:`exme.merge.registry`)."""
        return get_method(self.merge_method)

    # ----------------------------------------------------------------------- constructors

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> MergeConfig:
        """Validate a parsed config; every problem becomes one :class:`ExmeError` naming the key."""
        if not isinstance(data, dict):
            raise ExmeError(f"{source} must be a mapping of keys (merge_method, base_model, models, ...)")
        for key in data:
            if key in UNSUPPORTED_MERGEKIT_KEYS:
                raise ExmeError(
                    f"{source}: key '{key}' ({UNSUPPORTED_MERGEKIT_KEYS[key]}) is a mergekit feature exme does not "
                    "support; remove it or use mergekit for this merge"
                )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ExmeError(f"{source}: {describe_validation_error(err)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        path = Path(path)
        if not path.is_file():
            raise ExmeError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ExmeError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def extrapolation(cls, base: str | Path, model: str | Path, alpha: float, dtype: str | None = None) -> MergeConfig:
        """The config of ``exme extrapolate``: ExPO of one model away from its base."""
        return cls.from_dict(
            {
                "merge_method": "extrapolate",
                "base_model": str(base),
                "models": [{"model": str(model), "parameters": {"alpha": alpha}}],
                **({"out_dtype": dtype} if dtype else {}),
            },
            source="extrapolate",
        )

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.slices is not None:  # models were derived from the slices
            data.pop("models", None)
        if data.get("output_format") == "model":  # the default; mergekit configs do not have the key
            del data["output_format"]
        return yaml.safe_dump(data, sort_keys=False)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _norm(path: str) -> str:
    return str(Path(path).expanduser().resolve())
