"""Coefficients per group of tensors: which group a tensor belongs to, and each group's coefficients.

ExMe with one α per checkpoint is θ_b + Σ cᵢΔᵢ with the same cᵢ for every tensor. Finer
coefficients (per module type, per block of decoder layers) give each *group* of tensors its own
cᵢ. The rule that maps a tensor name to its group is written in mergekit's own filter semantics —
an ordered list of ``(substring, group)``, the first substring contained in the name wins, names no
filter matches fall in a default group — so the live model, the pipeline and the ``merge.yaml`` a
run writes (``weight: [{filter: ..., value: ...}, ..., {value: ...}]``) resolve every tensor the
same way by construction, not by two implementations agreeing.

Both types are frozen and hashable, and :class:`GroupCoefficients` is canonical (floats, the rule's
group order), so equal candidates compare and hash equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from exme.errors import ExmeError
from exme.merge.parameters import LayerLayout

#: Substrings naming attention and MLP modules, in the spellings of common architectures (Llama,
#: Mistral, Qwen: ``self_attn``/``mlp``; GPT-2: ``attn``/``mlp``; GPT-NeoX: ``attention``; Mixtral-like
#: ``feed_forward``/``block_sparse_moe``). Dotted, so ``post_attention_layernorm`` is not attention.
ATTENTION_FILTERS = (".self_attn.", ".attention.", ".attn.")
MLP_FILTERS = (".mlp.", ".feed_forward.", ".block_sparse_moe.")
OTHER = "other"


@dataclass(frozen=True)
class GroupRule:
    """Tensor name → group: ``filters`` in order, the first substring contained in the name wins; else ``default``."""

    granularity: str  # "module" or "layers:N", as configured
    groups: tuple[str, ...]  # every group, in the order coefficients are given
    filters: tuple[tuple[str, str], ...]  # (substring, group)
    default: str

    def group_of(self, tensor: str) -> str:
        for substring, group in self.filters:
            if substring in tensor:
                return group
        return self.default


@dataclass(frozen=True)
class GroupCoefficients:
    """cᵢ per group (one tuple of K coefficients per group of ``rule.groups``, in that order)."""

    rule: GroupRule
    coeffs: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        coeffs = tuple(tuple(float(c) for c in cs) for cs in self.coeffs)
        if len(coeffs) != len(self.rule.groups):
            raise ExmeError(f"{len(coeffs)} coefficient sets for the {len(self.rule.groups)} groups {list(self.rule.groups)}")
        if len({len(cs) for cs in coeffs}) > 1:
            raise ExmeError(f"every group needs one coefficient per checkpoint, got {[len(cs) for cs in coeffs]}")
        object.__setattr__(self, "coeffs", coeffs)

    @classmethod
    def from_groups(cls, rule: GroupRule, by_group: dict[str, Sequence[float]]) -> "GroupCoefficients":
        missing = [g for g in rule.groups if g not in by_group]
        if missing:
            raise ExmeError(f"no coefficients for group(s) {missing}")
        return cls(rule, tuple(tuple(by_group[g]) for g in rule.groups))

    @property
    def k(self) -> int:
        return len(self.coeffs[0]) if self.coeffs else 0

    def of_group(self, group: str) -> tuple[float, ...]:
        return self.coeffs[self.rule.groups.index(group)]

    def for_tensor(self, tensor: str) -> tuple[float, ...]:
        return self.of_group(self.rule.group_of(tensor))

    def table(self, tensors: Iterable[str]) -> dict[str, tuple[float, ...]]:
        """Every tensor's coefficients, resolved once (what a pass over the model looks up)."""
        by_group = dict(zip(self.rule.groups, self.coeffs))
        return {t: by_group[self.rule.group_of(t)] for t in tensors}

    def uniform(self) -> tuple[float, ...] | None:
        """The global coefficients when every group has the same ones, else ``None``."""
        return self.coeffs[0] if len(set(self.coeffs)) == 1 else None


def parse_granularity(value: str) -> tuple[str, int | None]:
    """``"global"``, ``"module"`` or ``"layers:N"`` (N ≥ 1) → (kind, N); anything else is a ``ValueError``."""
    if value in ("global", "module"):
        return value, None
    m = re.fullmatch(r"layers:([1-9]\d*)", value)
    if m:
        return "layers", int(m.group(1))
    raise ValueError(f"granularity {value!r} is not one of global, module, layers:N (N a whole number >= 1)")


def group_rule(granularity: str, names: Sequence[str], source: str = "alpha.granularity") -> GroupRule | None:
    """The rule of ``granularity`` for a model with tensors ``names``; ``None`` for ``global``.

    ``module``: attention, MLP, and everything else (embeddings, head, norms) as a third group.
    ``layers:N``: the decoder layers in N contiguous blocks of near-equal size (block j holds layers
    ⌊jL/N⌋ … ⌊(j+1)L/N⌋ − 1), one filter per layer (``model.layers.3.``, dotted so ``layers.1.`` never
    matches ``layers.10.``); tensors outside the layers form their own group.
    """
    kind, n = parse_granularity(granularity)
    if kind == "global":
        return None
    if kind == "module":
        attention = [f for f in ATTENTION_FILTERS if any(f in name for name in names)][:1]
        mlp = [f for f in MLP_FILTERS if any(f in name for name in names)][:1]
        if not attention or not mlp:
            raise ExmeError(
                f"{source}: module needs attention and MLP tensors named with one of {ATTENTION_FILTERS} and "
                f"{MLP_FILTERS}; this model's tensor names hold {'no attention' if not attention else 'no MLP'}; "
                "use layers:N or global"
            )
        return GroupRule(granularity, ("attention", "mlp", OTHER),
                         ((attention[0], "attention"), (mlp[0], "mlp")), OTHER)
    # the layers as mergekit's gradients see them (one rule for both: exme.merge.parameters)
    layout = LayerLayout.from_names(names, None)
    if layout.prefix is None:
        raise ExmeError(f"{source}: no decoder layers (tensors named like model.layers.0.…) in the base model; use module or global")
    prefix, layers = layout.prefix + ".", layout.num_layers
    assert n is not None
    if n > layers:
        raise ExmeError(f"{source}: layers:{n} asks for more groups than the model's {layers} decoder layers; use at most layers:{layers}")
    bounds = [j * layers // n for j in range(n + 1)]
    groups = [f"layers {bounds[j]}-{bounds[j + 1] - 1}" if bounds[j + 1] - bounds[j] > 1 else f"layer {bounds[j]}"
              for j in range(n)]
    filters = tuple((f"{prefix}{i}.", groups[j]) for j in range(n) for i in range(bounds[j], bounds[j + 1]))
    return GroupRule(granularity, (*groups, OTHER), filters, OTHER)
