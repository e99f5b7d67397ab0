"""Every merge method exme knows, one object each: parameters, validation, linearity, tensor math.

Why one registry: a method's knowledge (which parameters it reads and their defaults, whether it
needs a base model, how many models it takes, whether it can run as fused coefficients, how the
pipeline searches it as a baseline) used to be spread over string switches in the config parser,
the engine, the live model and the pipeline. Each of those now asks the method object here.

Adding a method: write its pure tensor function in :mod:`exme.merge.methods` (equation in the
docstring), subclass :class:`MergeMethod` below, add it to :data:`REGISTRY`, and test both.

Vocabulary used by the consumers:

* ``resolve(config, at=None) -> dict`` — every parameter that shapes the result for the tensor
  ``at`` (a :class:`~exme.merge.parameters.TensorPoint`; ``None``: the one value of a merge whose
  parameters do not vary per tensor), defaults filled in, keyed as the model card prints them.
  :func:`tensor_kwargs` is the per-tensor resolution the engine reads.
* ``check_values(resolved, config)`` — the numeric rules of one resolved setting (exme's weights
  sum to 1, ...): at parse time when nothing varies, else for every tensor before any is read.
* ``kwargs(resolved) -> dict`` — the keyword arguments of the pure function (``weights``,
  ``lambda_``, ``density``, ...). ``LiveModel.apply_method(name, seed=, **kwargs)`` takes the same.
* ``merge(base, models, **kwargs, generator=, selectors=, out_dtype=, compute_dtype=)`` — one
  tensor. ``base`` is ``None`` for methods without a base (``linear``).
* ``coefficients(kwargs) -> [c₁..c_K] | None`` — for methods linear in the task vectors,
  θ = θ_b + Σ cᵢΔᵢ; ``None`` where the method is not (TIES, DARE, SLERP, unnormalised linear
  whose weights do not sum to 1).
* ``baseline_space(k)`` / ``baseline_kwargs(params, k)`` — the pipeline's small dev search of this
  method as a baseline over ``k`` kept checkpoints, and the kwargs of one setting of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from exme.errors import ExmeError
from exme.merge import methods
from exme.merge.parameters import TensorPoint


@dataclass(frozen=True)
class Param:
    """One parameter key of the merge config, with its range (checked when a config is parsed)."""

    key: str  # as written in YAML (``lambda``)
    field: str  # attribute on the pydantic models (``lambda_``)
    per_model: bool = False  # may also appear under ``models[i].parameters``
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    doc: str = ""
    #: number (gradients allowed), flag (true/false) or choice (a name); see :mod:`exme.merge.parameters`
    kind: str = "number"


#: Every parameter key a merge config may hold. Which methods read it is declared by the methods.
PARAMS: dict[str, Param] = {
    p.key: p
    for p in (
        Param("normalize", "normalize", doc="divide by the sum of weights", kind="flag"),
        Param("lambda", "lambda_", doc="scale of the merged task vector"),
        Param("t", "t", low=0.0, high=1.0, doc="SLERP position between base (0) and model (1)"),
        Param("beta", "beta", low=0.0, high=1.0, doc="ExMe weight of the first of two models"),
        Param("alpha", "alpha", per_model=True, low=0.0, high=math.inf, doc="extrapolation strength"),
        Param("weight", "weight", per_model=True, doc="weight of a model"),
        Param("density", "density", per_model=True, low=0.0, high=1.0, low_open=True, doc="fraction of Δ kept"),
        Param("majority_sign_method", "majority_sign_method", doc="sign election: sum or count", kind="choice"),
        Param("rescale", "rescale", doc="DARE: divide kept entries by the density", kind="flag"),
        Param("int8_mask", "int8_mask", doc="accepted for mergekit configs; no effect", kind="flag"),
    )
}


class MergeMethod:
    """A merge method: subclass, set the class attributes, implement :meth:`resolve`, :meth:`kwargs`, :meth:`merge`."""

    name: ClassVar[str]
    #: the method combines task vectors θᵢ − θ_b and needs ``base_model``
    needs_base: ClassVar[bool] = True
    #: parameter keys (of :data:`PARAMS`) the method reads; any other key set in a config is an error
    params: ClassVar[tuple[str, ...]] = ()
    #: result at an element depends only on the inputs at that element (streamed in chunks)
    elementwise: ClassVar[bool] = False
    #: needs each task vector's global top-k threshold first: the engine streams a magnitude pass,
    #: then passes ``selectors=`` so chunks of one tensor share it, and the task vectors that pass
    #: kept (``deltas=True``) instead of the models (TIES)
    magnitude_pass: ClassVar[bool] = False
    #: draws random masks (DARE): takes a per-tensor ``generator``
    random: ClassVar[bool] = False
    #: takes ``workspace=`` (:class:`~exme.merge.methods.Workspace`): reuses tensor-sized buffers
    #: from one tensor to the next (the engine passes one per merge)
    workspace: ClassVar[bool] = False
    #: takes ``out_dtype=`` from the engine and rounds its result to it itself (TIES, DARE-TIES:
    #: their fused kernels write the output dtype, where a separate cast reads the float32 back)
    casts_output: ClassVar[bool] = False
    #: default of ``normalize`` when the config does not set it (mergekit's defaults)
    normalize_default: ClassVar[bool] = False

    def check(self, config: Any) -> None:
        """Method-specific rules on a parsed config's structure; raise ``ValueError`` (the parser names the key)."""

    def check_values(self, resolved: dict[str, Any], config: Any) -> None:
        """Rules on one resolved setting (the values for one tensor, or for the whole merge); ``ValueError``."""

    def resolve(self, config: Any, at: TensorPoint | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def kwargs(self, resolved: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def merge(self, base: torch.Tensor | None, models: Sequence[torch.Tensor], **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    @property
    def linear(self) -> bool:
        """Linear in the task vectors for some settings (see :meth:`coefficients`)."""
        return False

    def coefficients(self, kwargs: dict[str, Any]) -> list[float] | None:
        """cᵢ with θ = θ_b + Σ cᵢΔᵢ for this setting, or ``None`` when the method is not linear."""
        return None

    def baseline_space(self, k: int) -> dict[str, list[float]] | None:
        """The pipeline's dev grid for this method as a baseline over ``k`` checkpoints (None: not a baseline)."""
        return None

    def baseline_kwargs(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        raise ExmeError(f"{self.name} is not a pipeline baseline")

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"


class _Weighted(MergeMethod):
    """A method that needs a weight for every model: written somewhere for each model (its own, its slice's
    or the config's parameters), and matched for each tensor (filters can leave a model without one)."""

    def check(self, config: Any) -> None:
        for i, entry in enumerate(config.merge_models):
            if not config.table.present("weight", i):
                raise ValueError(f"{self.name} needs a weight for every model; {entry.model} has none")

    def check_values(self, resolved: dict[str, Any], config: Any) -> None:
        for entry, w in zip(config.merge_models, resolved["weights"]):
            if w is None:
                raise ValueError(f"{self.name} needs a weight for every model; no weight entry of {entry.model} "
                                 "matches this tensor")


class Linear(_Weighted):
    name = "linear"
    needs_base = False
    params = ("normalize", "weight")
    elementwise = True
    normalize_default = True

    def check_values(self, resolved: dict[str, Any], config: Any) -> None:
        super().check_values(resolved, config)
        if resolved["normalize"] and abs(sum(resolved["weights"])) < 1e-8:
            raise ValueError(f"linear weights sum to {sum(resolved['weights'])}; with normalize they must not sum to 0")

    def resolve(self, config: Any, at: TensorPoint | None = None) -> dict[str, Any]:
        return {"weights": config.weights(at), "normalize": config.normalize(at)}

    def kwargs(self, resolved: dict[str, Any]) -> dict[str, Any]:
        return {"weights": resolved["weights"], "normalize": resolved["normalize"]}

    def merge(self, base, models, *, weights, normalize=True, generator=None, selectors=None, **common):
        return methods.linear(models, weights, normalize, **common)

    @property
    def linear(self) -> bool:
        return True

    def coefficients(self, kwargs: dict[str, Any]) -> list[float] | None:
        # Σ wᵢθᵢ / Σ w = θ_b + Σ (wᵢ / Σ w) Δᵢ: affine in the models, so linear in Δ when the weights sum to 1.
        ws = [float(w) for w in kwargs["weights"]]
        total = sum(ws)
        if kwargs.get("normalize", True):
            return [w / total for w in ws] if abs(total) >= 1e-8 else None
        return ws if abs(total - 1.0) <= 1e-6 else None

    def baseline_space(self, k: int) -> dict[str, list[float]]:
        return {"weight_1": [0.3, 0.5, 0.7]} if k == 2 else {}

    def baseline_kwargs(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        w1 = float(params.get("weight_1", 1.0 / k))
        weights = [w1, 1.0 - w1] if k == 2 else [1.0 / k] * k
        return {"weights": weights, "normalize": True}


class TaskArithmetic(_Weighted):
    name = "task_arithmetic"
    params = ("normalize", "lambda", "weight", "int8_mask")
    elementwise = True

    def resolve(self, config: Any, at: TensorPoint | None = None) -> dict[str, Any]:
        return {"weights": config.weights(at), "normalize": config.normalize(at), "lambda": config.lambda_(at)}

    def kwargs(self, resolved: dict[str, Any]) -> dict[str, Any]:
        return {"weights": resolved["weights"], "lambda_": resolved["lambda"], "normalize": resolved["normalize"]}

    def merge(self, base, models, *, weights, lambda_=1.0, normalize=False, generator=None, selectors=None, **common):
        return methods.task_arithmetic(base, models, weights, lambda_, normalize=normalize, **common)

    @property
    def linear(self) -> bool:
        return True

    def coefficients(self, kwargs: dict[str, Any]) -> list[float] | None:
        ws = [float(w) for w in kwargs["weights"]]
        divisor = sum(ws) if kwargs.get("normalize", False) and abs(sum(ws)) >= 1e-8 else 1.0
        lam = float(kwargs.get("lambda_", 1.0))
        return [lam * w / divisor for w in ws]

    def baseline_space(self, k: int) -> dict[str, list[float]]:
        return {"lambda": [0.3, 0.5, 0.7, 1.0]}

    def baseline_kwargs(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        return {"weights": [1.0] * k, "lambda_": float(params["lambda"])}


class Ties(_Weighted):
    name = "ties"
    params = ("normalize", "lambda", "weight", "density", "majority_sign_method", "int8_mask")
    normalize_default = True
    magnitude_pass = True
    casts_output = True

    def resolve(self, config: Any, at: TensorPoint | None = None) -> dict[str, Any]:
        return {
            "weights": config.weights(at), "normalize": config.normalize(at), "lambda": config.lambda_(at),
            "densities": config.densities(at), "majority_sign_method": config.majority_sign_method(at),
        }

    def kwargs(self, resolved: dict[str, Any]) -> dict[str, Any]:
        return {
            "weights": resolved["weights"], "density": resolved["densities"],
            "majority_sign_method": resolved["majority_sign_method"], "normalize": resolved["normalize"],
            "lambda_": resolved["lambda"],
        }

    def merge(self, base, models, *, weights, density, majority_sign_method="sum", normalize=True, lambda_=1.0,
              generator=None, selectors=None, deltas=False, **common):
        return methods.ties(base, models, weights, density, majority_sign_method, normalize, lambda_,
                            selectors=selectors, deltas=deltas, **common)

    def baseline_space(self, k: int) -> dict[str, list[float]]:
        return {"density": [0.3, 0.5, 0.7]}

    def baseline_kwargs(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        return {"weights": [1.0] * k, "density": float(params["density"]), "normalize": True}


class DareLinear(_Weighted):
    name = "dare_linear"
    params = ("normalize", "lambda", "weight", "density", "rescale", "int8_mask")
    random = True

    def resolve(self, config: Any, at: TensorPoint | None = None) -> dict[str, Any]:
        return {
            "weights": config.weights(at), "normalize": config.normalize(at), "lambda": config.lambda_(at),
            "densities": config.densities(at), "rescale": config.rescale(at),
        }

    def kwargs(self, resolved: dict[str, Any]) -> dict[str, Any]:
        return {
            "weights": resolved["weights"], "density": resolved["densities"], "rescale": resolved["rescale"],
            "normalize": resolved["normalize"], "lambda_": resolved["lambda"],
        }

    def merge(self, base, models, *, weights, density, generator, rescale=True, normalize=False, lambda_=1.0,
              selectors=None, **common):
        return methods.dare_linear(base, models, weights, density, generator, rescale, normalize, lambda_, **common)

    def baseline_space(self, k: int) -> dict[str, list[float]]:
        return {"density": [0.3, 0.5, 0.7]}

    def baseline_kwargs(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        return {"weights": [1.0] * k, "density": float(params["density"]), "normalize": True}


class DareTies(DareLinear):
    name = "dare_ties"
    params = ("normalize", "lambda", "weight", "density", "majority_sign_method", "rescale", "int8_mask")

    def resolve(self, config: Any, at: TensorPoint | None = None) -> dict[str, Any]:
        return {
            "weights": config.weights(at), "normalize": config.normalize(at), "lambda": config.lambda_(at),
            "densities": config.densities(at), "majority_sign_method": config.majority_sign_method(at),
            "rescale": config.rescale(at),
        }

    def kwargs(self, resolved: dict[str, Any]) -> dict[str, Any]:
        return {**super().kwargs(resolved), "majority_sign_method": resolved["majority_sign_method"]}

    workspace = True
    casts_output = True

    def merge(self, base, models, *, weights, density, generator, rescale=True, majority_sign_method="sum",
              normalize=False, lambda_=1.0, selectors=None, workspace=None, **common):
        return methods.dare_ties(base, models, weights, density, generator, rescale, majority_sign_method, normalize,
                                 lambda_, workspace=workspace, **common)


class Slerp(MergeMethod):
    name = "slerp"
    params = ("t",)

    def check(self, config: Any) -> None:
        if len(config.merge_models) != 1:
            raise ValueError("slerp merges base_model with exactly one other model")
        if not config.table.present("t"):
            raise ValueError("slerp needs parameters.t")

    def check_values(self, resolved: dict[str, Any], config: Any) -> None:
        if resolved["t"] is None:
            raise ValueError("slerp needs parameters.t; no entry of t matches this tensor")

    def resolve(self, config: Any, at: TensorPoint | None = None) -> dict[str, Any]:
        return {"t": config.t(at)}

    def kwargs(self, resolved: dict[str, Any]) -> dict[str, Any]:
        return {"t": float(resolved["t"])}

    def merge(self, base, models, *, t, generator=None, selectors=None, **common):
        return methods.slerp(base, models[0], t, **common)


class Extrapolate(MergeMethod):
    name = "extrapolate"
    params = ("alpha",)
    elementwise = True

    def check(self, config: Any) -> None:
        if len(config.merge_models) != 1:
            raise ValueError("extrapolate takes base_model and exactly one model")
        if not config.table.present("alpha", 0):
            raise ValueError("extrapolate needs alpha (models[0].parameters.alpha or parameters.alpha)")

    def check_values(self, resolved: dict[str, Any], config: Any) -> None:
        if resolved["alphas"][0] is None:
            raise ValueError("extrapolate needs alpha; no entry of alpha matches this tensor")

    def resolve(self, config: Any, at: TensorPoint | None = None) -> dict[str, Any]:
        return {"alphas": config.alphas(at)}

    def kwargs(self, resolved: dict[str, Any]) -> dict[str, Any]:
        return {"alpha": float(resolved["alphas"][0])}

    def merge(self, base, models, *, alpha, generator=None, selectors=None, **common):
        return methods.extrapolate(models[0], base, alpha, **common)

    @property
    def linear(self) -> bool:
        return True

    def coefficients(self, kwargs: dict[str, Any]) -> list[float]:
        return methods.exme_coefficients([1.0], [kwargs["alpha"]])  # θ + α(θ − θ_b) = θ_b + (1 + α)Δ


class Exme(MergeMethod):
    name = "exme"
    params = ("beta", "alpha", "weight")
    elementwise = True

    def check(self, config: Any) -> None:
        table, inputs = config.table, config.merge_models
        if not all(table.present("alpha", i) for i in range(len(inputs))):
            raise ValueError("exme needs an alpha for every model (models[i].parameters.alpha or parameters.alpha)")
        beta = any(s.key.endswith(".beta") for s in table.settings())
        if beta:
            if len(inputs) != 2:
                raise ValueError("parameters.beta applies to exactly two models; give per-model weights instead")
            if any(s.key.endswith(".weight") for s in table.settings()):
                raise ValueError("give either parameters.beta or per-model weights, not both")
        elif not all(table.present("weight", i) for i in range(len(inputs))):
            raise ValueError("exme needs parameters.beta (two models) or a weight for every model")

    def check_values(self, resolved: dict[str, Any], config: Any) -> None:
        ws, alphas = resolved["weights"], resolved["alphas"]
        if any(w is None for w in ws) or any(a is None for a in alphas):
            raise ValueError("exme needs a weight (or beta) and an alpha for every model; no entry matches this tensor")
        if any(w < 0 for w in ws) or abs(sum(ws) - 1.0) > 1e-6:
            raise ValueError(f"exme weights must be >= 0 and sum to 1, got {ws}")

    def resolve(self, config: Any, at: TensorPoint | None = None) -> dict[str, Any]:
        return {"weights": config.weights(at), "alphas": config.alphas(at)}

    def kwargs(self, resolved: dict[str, Any]) -> dict[str, Any]:
        return {"weights": resolved["weights"], "alphas": [float(a) for a in resolved["alphas"]]}

    def merge(self, base, models, *, weights, alphas, generator=None, selectors=None, **common):
        return methods.exme(base, models, weights, alphas, **common)

    @property
    def linear(self) -> bool:
        return True

    def coefficients(self, kwargs: dict[str, Any]) -> list[float]:
        return methods.exme_coefficients(kwargs["weights"], kwargs["alphas"])


#: Every method, in the order messages list them.
REGISTRY: dict[str, MergeMethod] = {
    m.name: m for m in (Linear(), TaskArithmetic(), Ties(), DareLinear(), DareTies(), Slerp(), Extrapolate(), Exme())
}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)
#: Methods the pipeline can search as baselines (they declare a baseline space).
BASELINE_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.baseline_space(2) is not None)


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; an :class:`ExmeError` listing the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ExmeError(f"unknown merge method {name!r}; use one of {', '.join(REGISTRY)}") from None


def methods_reading(key: str) -> tuple[str, ...]:
    """The methods that read parameter ``key`` (for 'has no meaning for ...' messages)."""
    return tuple(n for n, m in REGISTRY.items() if key in m.params)


def baseline_space(method: str, k: int) -> dict[str, list[float]]:
    """The pipeline's dev grid of baseline ``method`` over ``k`` kept checkpoints."""
    space = get_method(method).baseline_space(k)
    if space is None:
        raise ExmeError(f"merge method {method!r} is not a pipeline baseline; use one of {', '.join(BASELINE_METHODS)}")
    return {key: list(v) for key, v in space.items()}


def baseline_kwargs(method: str, params: dict[str, Any], k: int) -> dict[str, Any]:
    """The pure-function kwargs of one baseline setting (``LiveModel.apply_method(method, **kwargs)``)."""
    return get_method(method).baseline_kwargs(params, k)


def tensor_kwargs(config: Any, at: TensorPoint | None) -> dict[str, Any]:
    """The pure-function kwargs of ``config``'s method for the tensor at ``at``: the per-tensor resolution.

    Checked with the method's :meth:`MergeMethod.check_values`; ``ValueError`` names the rule broken.
    The engine calls this once per output tensor before reading any (``at=None``: a merge whose
    parameters do not vary).
    """
    method = get_method(config.merge_method)
    resolved = method.resolve(config, at)
    method.check_values(resolved, config)
    return method.kwargs(resolved)
