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
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exme.errors import ExmeError

MergeMethod = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "extrapolate", "exme"]
METHODS_WITH_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "extrapolate", "exme")

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


#: Which methods each parameter affects: setting it for another method is an error, not a no-op.
_PARAMETER_METHODS: dict[str, tuple[str, ...]] = {
    "normalize": ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"),
    "lambda_": ("task_arithmetic", "ties", "dare_linear", "dare_ties"),
    "t": ("slerp",),
    "beta": ("exme",),
    "alpha": ("extrapolate", "exme"),
    "weight": ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "exme"),
    "density": ("ties", "dare_linear", "dare_ties"),
    "majority_sign_method": ("ties", "dare_ties"),
    "rescale": ("dare_linear", "dare_ties"),
    "int8_mask": ("task_arithmetic", "ties", "dare_linear", "dare_ties"),
}


def parse_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``, with a message listing the accepted spellings."""
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise ExmeError(f"unknown {what} {name!r}; use one of float32, float16, bfloat16, float64")
    return DTYPES[key]


class _Strict(BaseModel):
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
        _check_range(p.density, 0.0, 1.0, "parameters.density", low_open=True)
        _check_range(p.alpha, 0.0, math.inf, "parameters.alpha")
        _check_range(p.beta, 0.0, 1.0, "parameters.beta")
        _check_range(p.t, 0.0, 1.0, "parameters.t")
        if p.lambda_ is not None and not math.isfinite(p.lambda_):
            raise ValueError("parameters.lambda must be a finite number")
        for key, allowed in _PARAMETER_METHODS.items():
            value = getattr(p, key)
            if value is not None and method not in allowed and not (key == "rescale" and value is False):
                name = "lambda" if key == "lambda_" else key
                raise ValueError(
                    f"parameters.{name} has no meaning for merge_method {method} (it applies to {', '.join(allowed)}); "
                    "remove it"
                )
        for i, entry in enumerate(self.models):
            for key in ("weight", "density", "alpha"):
                if getattr(entry.parameters, key) is not None and method not in _PARAMETER_METHODS[key]:
                    raise ValueError(
                        f"models[{i}].parameters.{key} has no meaning for merge_method {method}; remove it"
                    )
        inputs = self.merge_models
        if method == "slerp":
            if len(inputs) != 1:
                raise ValueError("slerp merges base_model with exactly one other model")
            if p.t is None:
                raise ValueError("slerp needs parameters.t")
        if method == "extrapolate":
            if len(inputs) != 1:
                raise ValueError("extrapolate takes base_model and exactly one model")
            if self.alphas()[0] is None:
                raise ValueError("extrapolate needs alpha (models[0].parameters.alpha or parameters.alpha)")
        if method == "exme":
            if any(a is None for a in self.alphas()):
                raise ValueError("exme needs an alpha for every model (models[i].parameters.alpha or parameters.alpha)")
            if p.beta is not None:
                if len(inputs) != 2:
                    raise ValueError("parameters.beta applies to exactly two models; give per-model weights instead")
                if any(e.parameters.weight is not None for e in inputs) or p.weight is not None:
                    raise ValueError("give either parameters.beta or per-model weights, not both")
            ws = self.weights()
            if any(w is None for w in ws):
                raise ValueError("exme needs parameters.beta (two models) or a weight for every model")
            if any(w < 0 for w in ws) or abs(sum(ws) - 1.0) > 1e-6:
                raise ValueError(f"exme weights must be >= 0 and sum to 1, got {ws}")
        if method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
            missing = [e.model for e, w in zip(inputs, self.weights()) if w is None]
            if missing:
                raise ValueError(f"{method} needs a weight for every model; {missing[0]} has none")
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
        return self.merge_method in ("linear", "ties")

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
        paths = [Path(self.base_model)] if self.base_model else []
        paths += [Path(e.model) for e in self.models]
        return list(dict.fromkeys(paths))

    def merge_parameters(self) -> dict[str, Any]:
        """Every parameter that shapes the result, resolved with defaults (for the model card)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        m = self.merge_method
        if m in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "exme"):
            out["weights"] = self.weights()
        if m in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
            out["normalize"] = self.normalize()
        if m in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
            out["lambda"] = self.lambda_()
        if m in ("ties", "dare_linear", "dare_ties"):
            out["densities"] = self.densities()
        if m in ("ties", "dare_ties"):
            out["majority_sign_method"] = self.majority_sign_method()
        if m in ("dare_linear", "dare_ties"):
            out["rescale"] = self.rescale()
        if m in ("extrapolate", "exme"):
            out["alphas"] = self.alphas()
        if m == "slerp":
            out["t"] = self.parameters.t
        return out

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
            raise ExmeError(f"{source}: {_describe(err)}") from None

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
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


def _norm(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _describe(err: ValidationError) -> str:
    """The first validation problem as 'key.path: what is wrong'; an unknown key is named first,
    since it often explains a missing one (``merge_mehtod`` → missing ``merge_method``)."""
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
