"""The merge config: mergekit's YAML format for the methods exme implements, plus ExPO and ExMe.

Why mergekit's format: users already have these files. Why strict: a key exme does not understand
(a typo, or a mergekit feature such as ``slices``) changes what the user believes they merged, so
it is an error that names the key, never silently ignored.

Accepted keys::

    merge_method: linear | task_arithmetic | ties | dare_linear | dare_ties | slerp | extrapolate | exme
    base_model: PATH
    models:
      - model: PATH
        parameters: {weight: W, density: D, alpha: A}
    parameters: {normalize, lambda, t, beta, alpha, weight, density, majority_sign_method, rescale, int8_mask}
    dtype: float32 | float16 | bfloat16 | float64
    out_dtype: ...
    tokenizer_source: base | PATH
    output_format: model | peft        (exme only: peft writes one LoRA adapter, see docs/merge.md)

A model path may be a full model folder, a PEFT LoRA adapter folder (read over ``base_model``), or
mergekit's ``BASE+ADAPTER``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from exme.common import DTYPES, StrictModel, describe_validation_error, parse_dtype
from exme.errors import ExmeError
from exme.merge.registry import METHOD_NAMES, PARAMS, REGISTRY, get_method, methods_reading

#: The method names, from the registry (a pydantic Literal, so a typo lists the known methods).
MergeMethod = Literal[METHOD_NAMES]  # type: ignore[valid-type]
METHODS_WITH_BASE = tuple(n for n, m in REGISTRY.items() if m.needs_base)

#: mergekit keys that exist there but are not implemented here, with what they do (for the message).
UNSUPPORTED_MERGEKIT_KEYS = {
    "slices": "layer slicing/stacking (frankenmerges)",
    "tokenizer": "tokenizer merging (`tokenizer:` block)",
    "chat_template": "chat template selection",
    "modules": "per-module merge definitions",
    "name": "multi-stage merges",
    "random_seed": "mergekit's global seed (use --seed)",
    "filter": "per-tensor parameter filters",
    "layer_range": "layer ranges",
}


class _Strict(StrictModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _scalar(value: Any, key: str) -> Any:
    """Parameters are plain numbers here: mergekit's per-layer gradients and filters are refused."""
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(
            f"'{key}' must be a single number; per-layer gradients (lists) and filters are not supported by exme"
        )
    return value


class ModelParameters(_Strict):
    """Per-model parameters (``models[i].parameters``)."""

    weight: float | None = None
    density: float | None = None
    alpha: float | None = None

    @field_validator("weight", "density", "alpha", mode="before")
    @classmethod
    def _one_number(cls, v: Any, info: Any) -> Any:
        return _scalar(v, info.field_name)


class ModelEntry(_Strict):
    """One input model (``models[i]``)."""

    model: str
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class GlobalParameters(_Strict):
    """Method-wide parameters (``parameters``); ``weight``/``density``/``alpha`` are per-model defaults."""

    normalize: bool | None = None
    lambda_: float | None = Field(default=None, alias="lambda")
    t: float | None = None
    beta: float | None = None
    alpha: float | None = None
    weight: float | None = None
    density: float | None = None
    majority_sign_method: Literal["sum", "count"] | None = None
    rescale: bool | None = None
    int8_mask: bool | None = None  # accepted for mergekit configs; no effect (exme's masks are bool)

    @field_validator("lambda_", "t", "beta", "alpha", "weight", "density", mode="before")
    @classmethod
    def _one_number(cls, v: Any, info: Any) -> Any:
        return _scalar(v, "lambda" if info.field_name == "lambda_" else info.field_name)


def _check_range(value: float | None, low: float, high: float, what: str, low_open: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        if high == math.inf:
            raise ValueError(f"{what} = {value} is out of range; it must be >= {low:g}")
        bracket = "(" if low_open else "["
        raise ValueError(f"{what} = {value} is out of range; it must be in {bracket}{low:g}, {high:g}]")


class MergeConfig(_Strict):
    """A validated merge: method, inputs and parameters (see the module docstring for the keys)."""

    merge_method: MergeMethod
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: GlobalParameters = Field(default_factory=GlobalParameters)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    #: ``model``: a full HF model folder. ``peft``: one PEFT LoRA adapter that is exactly the merge
    #: (inputs: LoRA adapters of ``base_model``; a method linear in the task vectors).
    output_format: Literal["model", "peft"] = "model"

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        if v is not None and str(v).lower() not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; use float32, float16, bfloat16 or float64")
        return v

    @model_validator(mode="after")
    def _method_rules(self) -> MergeConfig:
        method, p = self.merge_method, self.parameters
        if method in METHODS_WITH_BASE and not self.base_model:
            raise ValueError(f"merge_method {method} needs base_model")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source: union is not supported; use base or a model path")
        for i, entry in enumerate(self.models):
            mp = entry.parameters
            _check_range(mp.density, 0.0, 1.0, f"models[{i}].parameters.density", low_open=True)
            _check_range(mp.alpha, 0.0, math.inf, f"models[{i}].parameters.alpha")
            if mp.weight is not None and not math.isfinite(mp.weight):
                raise ValueError(f"models[{i}].parameters.weight must be a finite number")
        for key in ("density", "alpha", "beta", "t"):
            param = PARAMS[key]
            _check_range(getattr(p, param.field), param.low, param.high, f"parameters.{key}", param.low_open)
        if p.lambda_ is not None and not math.isfinite(p.lambda_):
            raise ValueError("parameters.lambda must be a finite number")
        spec = REGISTRY[method]
        for param in PARAMS.values():
            value = getattr(p, param.field)
            if value is not None and param.key not in spec.params and not (param.key == "rescale" and value is False):
                raise ValueError(
                    f"parameters.{param.key} has no meaning for merge_method {method} (it applies to "
                    f"{', '.join(methods_reading(param.key))}); remove it"
                )
        for i, entry in enumerate(self.models):
            for key in ("weight", "density", "alpha"):
                if getattr(entry.parameters, key) is not None and key not in spec.params:
                    raise ValueError(
                        f"models[{i}].parameters.{key} has no meaning for merge_method {method}; remove it"
                    )
        spec.check(self)
        return self

    # ----------------------------------------------------------------------- derived values

    @property
    def merge_models(self) -> list[ModelEntry]:
        """The models whose tensors are combined; for base-model methods the base is not one of them.

        mergekit lets the base also appear in ``models`` for task-vector methods; its task vector
        is zero and mergekit skips it, so exme does too.
        """
        if self.merge_method in METHODS_WITH_BASE and self.base_model:
            base = _norm(self.base_model)
            return [e for e in self.models if _norm(e.model) != base]
        return list(self.models)

    def weights(self) -> list[float | None]:
        p = self.parameters
        inputs = self.merge_models
        if self.merge_method == "exme" and p.beta is not None and len(inputs) == 2:
            return [p.beta, 1.0 - p.beta]
        return [e.parameters.weight if e.parameters.weight is not None else p.weight for e in inputs]

    def densities(self) -> list[float]:
        p = self.parameters
        return [
            e.parameters.density if e.parameters.density is not None else (p.density if p.density is not None else 1.0)
            for e in self.merge_models
        ]

    def alphas(self) -> list[float | None]:
        p = self.parameters
        return [e.parameters.alpha if e.parameters.alpha is not None else p.alpha for e in self.merge_models]

    def normalize(self) -> bool:
        """mergekit's defaults: on for linear and ties, off for task arithmetic and DARE."""
        if self.parameters.normalize is not None:
            return self.parameters.normalize
        return get_method(self.merge_method).normalize_default

    def rescale(self) -> bool:
        return True if self.parameters.rescale is None else self.parameters.rescale

    def lambda_(self) -> float:
        return 1.0 if self.parameters.lambda_ is None else self.parameters.lambda_

    def majority_sign_method(self) -> Literal["sum", "count"]:
        return self.parameters.majority_sign_method or "sum"

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
        """Every parameter that shapes the result, resolved with defaults (for the model card)."""
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
        if data.get("output_format") == "model":  # the default; mergekit configs do not have the key
            del data["output_format"]
        return yaml.safe_dump(data, sort_keys=False)


def _norm(path: str) -> str:
    return str(Path(path).expanduser().resolve())
