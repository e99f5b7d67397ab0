"""A per-tensor parameter: mergekit's filters and layer gradients, resolved for one tensor, in one place.

Why one place: a merge parameter is no longer one number per merge. mergekit lets every parameter be

* a plain value: ``0.5``, ``true``, ``sum``;
* a gradient: ``[0, 0.5, 1]``, a number per position over the layers, interpolated linearly;
* conditional entries: ``[{filter: self_attn, value: ...}, {value: ...}]``; the first entry whose
  ``filter`` is a substring of the tensor's name (or that has no filter, or ``filter: "*"``) gives
  the value, itself plain or a gradient. A single entry may be written without the list.

The engine, the registry's per-tensor checks and the model card all ask this module, so a value
means the same everywhere. The rules are mergekit 0.1.5's (``mergekit/config.py``,
``parameter_resolver.py`` and ``plan.py`` there), re-derived here:

* Precedence: the model's own parameters (its source in the slice), then the slice's
  ``parameters``, then the config's ``parameters``; the first that yields a value wins, else the
  method's default. An entry list in which no filter matches yields nothing, so the search goes on.
* Gradient position ``t``: layer ``i`` of a slice of ``n`` layers sits at ``t = i/(n-1)`` (``t = 1``
  when ``n = 1``); a gradient of ``m`` values is read at ``t·(m-1)``, interpolated between its two
  neighbours. Numbers in a list therefore never need to match the number of layers.
* Tensors outside the layers (embeddings, final norm, ``lm_head``) sit at ``t = 0``: they take the
  first value of a gradient. Embeddings read the first slice's parameters, the others the last's.
* A layer is found from the tensor name through the architecture's layer prefix
  (``model.layers.7.mlp.up_proj.weight`` is layer 7 of prefix ``model.layers``): the numbered
  blocks whose indices are exactly ``0..num_hidden_layers-1``.

exme's own restriction: flags and choices (``normalize``, ``rescale``, ``int8_mask``,
``majority_sign_method``) take filter entries but no gradient list (a list of booleans has no
interpolation; mergekit steps through it, which no published config relies on).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

Scalar = Union[bool, int, float, str]
#: What a parameter holds: a number (gradients allowed), a flag, or a choice among names.
Kind = Literal["number", "flag", "choice"]


@dataclass(frozen=True)
class Entry:
    """One conditional entry: ``filter`` (``None``: any tensor) and its value, plain or a gradient (a tuple)."""

    filter: str | None
    value: Scalar | tuple[float, ...]


@dataclass(frozen=True)
class Setting:
    """One parameter as written in the config, parsed; ``key`` names it in messages (``models[1].parameters.weight``)."""

    key: str
    entries: tuple[Entry, ...]
    conditional: bool  # written as filter entries (a plain value is one entry without filter)

    @classmethod
    def parse(cls, raw: Any, key: str, kind: Kind = "number") -> Setting:
        """Check a value as written; ``ValueError`` names what is wrong (the config parser adds the key)."""
        if isinstance(raw, Mapping):
            return cls(key, (_entry(raw, key, kind, None),), True)
        if isinstance(raw, (list, tuple)) and raw and all(isinstance(e, Mapping) for e in raw):
            return cls(key, tuple(_entry(e, key, kind, i) for i, e in enumerate(raw)), True)
        return cls(key, (Entry(None, _value(raw, key, kind)),), False)

    @property
    def varies(self) -> bool:
        """True when the value can differ from tensor to tensor."""
        return self.conditional or self.gradient

    @property
    def gradient(self) -> bool:
        return any(isinstance(e.value, tuple) for e in self.entries)

    @property
    def filters(self) -> tuple[str, ...]:
        """The filters that select tensors (``*`` selects every tensor and is left out)."""
        return tuple(e.filter for e in self.entries if e.filter is not None and e.filter != "*")

    def leaves(self) -> Iterator[tuple[str, Scalar]]:
        """Every plain value written, with the key path that names it (for range checks)."""
        for i, e in enumerate(self.entries):
            where = f"{self.key}[{i}].value" if self.conditional else self.key
            if isinstance(e.value, tuple):
                yield from ((f"{where}[{j}]", v) for j, v in enumerate(e.value))
            else:
                yield where, e.value

    def evaluate(self, name: str, t: float) -> Scalar | None:
        """The value for tensor ``name`` at gradient position ``t``; ``None`` when no entry matches."""
        for e in self.entries:
            if e.filter is None or e.filter == "*" or (name and e.filter in name):
                return interpolate(e.value, t) if isinstance(e.value, tuple) else e.value
        return None


def interpolate(values: Sequence[float], t: float) -> float:
    """A gradient at position ``t`` in [0, 1]: linear between the two values around ``t·(m−1)``."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _entry(raw: Mapping, key: str, kind: Kind, index: int | None) -> Entry:
    where = key if index is None else f"{key}[{index}]"
    unknown = sorted(set(raw) - {"filter", "value"})
    if unknown:
        raise ValueError(f"{where}: unknown key '{unknown[0]}' in a conditional entry; an entry has filter and value")
    if "value" not in raw:
        raise ValueError(f"{where}: a conditional entry needs a value")
    filt = raw.get("filter")
    if filt is not None and (not isinstance(filt, str) or not filt):
        raise ValueError(f"{where}.filter must be a non-empty piece of a tensor name, got {filt!r}")
    if isinstance(raw["value"], Mapping) or (
        isinstance(raw["value"], (list, tuple)) and any(isinstance(v, Mapping) for v in raw["value"])
    ):
        raise ValueError(f"{where}.value: entries do not nest; give a number or a list of numbers")
    return Entry(filt, _value(raw["value"], f"{where}.value", kind))


def _value(raw: Any, key: str, kind: Kind) -> Scalar | tuple[float, ...]:
    if isinstance(raw, (list, tuple)):
        if kind != "number":
            what = "true or false" if kind == "flag" else "one name"
            raise ValueError(
                f"{key}: a list (a per-layer gradient) needs a numeric parameter; this one is {what} and cannot "
                "vary over layers: give one value, or {filter, value} entries"
            )
        if not raw:
            raise ValueError(f"{key}: an empty list gives no value; give a number or a list of numbers")
        return tuple(_number(v, f"{key}[{j}]") for j, v in enumerate(raw))
    if kind == "number":
        return _number(raw, key)
    if kind == "flag":
        if not isinstance(raw, bool):
            raise ValueError(f"{key} must be true or false, got {raw!r}")
        return raw
    if not isinstance(raw, str):
        raise ValueError(f"{key} must be a name, got {raw!r}")
    return raw


def _number(raw: Any, key: str) -> float:
    """A number, also as YAML writes ``1e-3`` (a string to YAML 1.1); never a boolean."""
    if isinstance(raw, bool) or raw is None:
        raise ValueError(f"{key} must be a number, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {raw!r}")
    return value


# ------------------------------------------------------------------------------------------ where a tensor sits


#: The first ``.N.`` of a tensor name: ``model.layers.7.mlp...`` → prefix ``model.layers``, index 7.
_NUMBERED = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.")


@dataclass(frozen=True)
class LayerLayout:
    """Where the layers of an architecture are: the prefix of the numbered blocks and how many there are."""

    prefix: str | None
    num_layers: int

    @classmethod
    def from_names(cls, names: Sequence[str], num_layers: int | None) -> LayerLayout:
        """The numbered blocks whose indices are exactly ``0..num_layers-1`` (the most tensors wins a tie).

        ``num_layers`` is the config's ``num_hidden_layers``; without it, the prefix with the most
        tensors whose indices run from 0 without a gap.
        """
        found: dict[str, list[int]] = {}
        for name in names:
            m = _NUMBERED.match(name)
            if m:
                found.setdefault(m["prefix"], []).append(int(m["index"]))
        best: tuple[int, str, int] | None = None
        for prefix, indices in found.items():
            distinct = set(indices)
            n = max(distinct) + 1
            if distinct != set(range(n)) or (num_layers is not None and n != num_layers):
                continue
            if best is None or len(indices) > best[0]:
                best = (len(indices), prefix, n)
        if best is None:
            return cls(None, num_layers or 0)
        return cls(best[1], best[2])

    def layer_of(self, name: str) -> int | None:
        if self.prefix is None or not name.startswith(self.prefix + "."):
            return None
        m = _NUMBERED.match(name)
        return int(m["index"]) if m and m["prefix"] == self.prefix else None


def is_before_layers(name: str) -> bool:
    """Embeddings come before the layers (they read the first slice); every other non-layer tensor after."""
    return "embed" in name or any(part in ("wte", "wpe") for part in name.split("."))


@dataclass(frozen=True)
class TensorPoint:
    """Where one tensor sits for its parameters: its name, gradient position ``t`` and slice."""

    name: str
    t: float = 0.0
    slice: int = 0
    layer: int | None = None


def tensor_point(name: str, layout: LayerLayout | None, slice_starts: Sequence[int] = (0,)) -> TensorPoint:
    """The point of tensor ``name``; ``slice_starts`` are the first layers of the slices, in order."""
    layer = layout.layer_of(name) if layout is not None else None
    last = len(slice_starts) - 1
    if layer is None:
        return TensorPoint(name, 0.0, 0 if is_before_layers(name) else last, None)
    s = max(i for i, start in enumerate(slice_starts) if start <= layer)
    stop = slice_starts[s + 1] if s < last else layout.num_layers
    n = stop - slice_starts[s]
    t = (layer - slice_starts[s]) / (n - 1) if n > 1 else 1.0
    return TensorPoint(name, t, s, layer)


# ------------------------------------------------------------------------------------------ the table


@dataclass
class SliceParameters:
    """The settings of one slice: its own ``parameters`` and each merged model's."""

    start: int
    stop: int | None  # None: to the last layer (the ``models:`` form)
    shared: dict[str, Setting] = field(default_factory=dict)
    models: list[dict[str, Setting]] = field(default_factory=list)


@dataclass
class ParameterTable:
    """Every parameter setting of a merge config, where mergekit looks for it."""

    shared: dict[str, Setting]
    slices: list[SliceParameters]

    def settings(self) -> Iterator[Setting]:
        yield from self.shared.values()
        for s in self.slices:
            yield from s.shared.values()
            for m in s.models:
                yield from m.values()

    @property
    def varies(self) -> bool:
        """True when some parameter can differ between tensors (then there is no single value per merge)."""
        return len(self.slices) > 1 or any(s.varies for s in self.settings())

    @property
    def needs_layers(self) -> bool:
        """True when a tensor's layer matters (a gradient, or slices, whose layer ranges must fit the models)."""
        return any(s.stop is not None for s in self.slices) or any(s.gradient for s in self.settings())

    @property
    def slice_starts(self) -> tuple[int, ...]:
        return tuple(s.start for s in self.slices)

    def chain(self, key: str, point: TensorPoint | None, model: int | None) -> list[Setting]:
        """The settings of ``key`` for ``model`` (``None``: a shared parameter), highest precedence first."""
        s = self.slices[point.slice if point is not None else 0]
        found = []
        if model is not None and model < len(s.models) and key in s.models[model]:
            found.append(s.models[model][key])
        found += [d[key] for d in (s.shared, self.shared) if key in d]
        return found

    def present(self, key: str, model: int | None = None) -> bool:
        """Some setting of ``key`` exists for ``model`` in every slice (it may still not match every tensor)."""
        return all(
            bool(self.chain(key, TensorPoint("", 0.0, i), model)) for i in range(len(self.slices))
        )

    def value(self, key: str, point: TensorPoint | None, model: int | None = None) -> Scalar | None:
        """The value of ``key`` for ``model`` at ``point``; ``None`` when nothing gives one.

        ``point=None`` asks for the one value of the whole merge, which exists only when nothing
        varies (:attr:`varies`); a caller that can take per-tensor values passes a point.
        """
        if point is None:
            if self.varies:
                raise ValueError(f"parameter {key} varies from tensor to tensor; ask for it per tensor")
            point = TensorPoint("", 0.0, 0)
        for setting in self.chain(key, point, model):
            value = setting.evaluate(point.name, point.t)
            if value is not None:
                return value
        return None

    def unmatched_filters(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """(key, filter) of every filter that is a substring of none of ``names``."""
        out = []
        for setting in self.settings():
            for f in setting.filters:
                if not any(f in n for n in names):
                    out.append((setting.key, f))
        return out
