"""A merge of LoRA adapters written as one PEFT LoRA adapter, exactly (``--format peft``).

For a method linear in the task vectors (``exme``, ``extrapolate``, ``task_arithmetic``,
``linear`` with a base), the merge is θ* = θ_b + Σ cᵢΔᵢ (:meth:`MergeMethod.coefficients`). With
Δᵢ = sᵢ·Bᵢ@Aᵢ on a module, Σ cᵢΔᵢ = s*·B*@A* exactly for the stacked factors

    A* = [A₁; A₂; …]           (rank r* = r₁ + r₂ + …, adapters that target the module)
    B* = [c₁s₁B₁, c₂s₂B₂, …] / s*

Scaling used here: s* = 1 — each module gets ``r = lora_alpha = r*`` (through ``rank_pattern`` and
``alpha_pattern`` where a module's r* differs from the adapter-wide value), ``use_rslora: false``.
Modules an adapter replaces (``modules_to_save``) are written as ``modules_to_save`` holding the
merged tensor θ_b + Σ cᵢ(θᵢ − θ_b), computed by the method itself.

What it buys: an adapter of a few MB, loadable with ``PeftModel.from_pretrained(base, OUT)`` and
servable next to the base (e.g. by vLLM's LoRA support). What it costs: the rank grows with the
number of adapters merged (r* = Σ rᵢ), and so do the adapter's size and its per-token compute.
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from exme.errors import ExmeError
from exme.io.checkpoint import Checkpoint
from exme.io.source import PEFT_PREFIX, AdapterSource, open_source
from exme.io.writer import AtomicOutputFolder, check_output_target, copy_side_files
from exme.merge.config import MergeConfig
from exme.merge.engine import parameter_resolver

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _refuse_nonlinear(config: MergeConfig) -> None:
    linear = ", ".join(n for n in ("extrapolate", "exme", "task_arithmetic", "linear"))
    detail = " (its weights do not sum to 1 without normalize)" if config.method.linear else ""
    raise ExmeError(
        f"--format peft writes a merge that is linear in the task vectors ({linear}); merge_method "
        f"{config.merge_method}{detail} is not, so it cannot be one LoRA adapter: write a full model instead"
    )


def _checked_inputs(config: MergeConfig) -> tuple[Checkpoint, list[AdapterSource], Callable[[str], dict]]:
    """The base, the adapters and ``tensor name -> kwargs`` (the per-tensor resolution the full merge uses)."""
    if not config.method.linear:
        _refuse_nonlinear(config)
    if not config.base_model:
        raise ExmeError("--format peft needs base_model: the model the adapters were trained on")
    base = Checkpoint.open(config.base_model)
    sources = []
    for entry in config.merge_models:
        source = open_source(entry.model, base)
        if not isinstance(source, AdapterSource):
            raise ExmeError(
                f"{entry.model} is a full model; --format peft merges LoRA adapters of one base only "
                "(write a full model to merge full checkpoints)"
            )
        sources.append(source)
    fan = {bool(s.adapter_config.get("fan_in_fan_out")) for s in sources}
    if len(fan) > 1:
        raise ExmeError("the adapters disagree on fan_in_fan_out; --format peft needs adapters of one layout")
    resolve = parameter_resolver(config, base.names, base.config, f"base model {config.base_model}")
    for name in sorted({t for s in sources for t in (*s.factors, *s.replaced)}):
        if config.method.coefficients(resolve(name)) is None:  # checked for every tensor before writing
            _refuse_nonlinear(config)
    return base, sources, resolve


def peft_tensors(config: MergeConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The merged adapter's tensors (PEFT key names) and its ``adapter_config.json``."""
    base, sources, resolve = _checked_inputs(config)
    method = config.method
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    targets = sorted({t for s in sources for t in s.factors})
    for target in targets:
        # This module's coefficients (they may vary per tensor: filters, gradients, slices). An adapter
        # of coefficient 0 adds nothing: its factors would only raise the rank (and the size).
        coeffs = [float(c) for c in method.coefficients(resolve(target))]
        parts = [(s.factors[target], c) for s, c in zip(sources, coeffs) if target in s.factors and c != 0.0]
        if not parts:
            continue
        if any(target in s.replaced for s in sources):
            raise ExmeError(
                f"{target} is both a LoRA target and a saved module in the adapters; --format peft cannot express "
                "that merge: write a full model instead"
            )
        module = parts[0][0].module
        transpose = {f.transpose for f, _ in parts}
        if len(transpose) > 1:
            raise ExmeError(f"module {module!r} is an embedding adapter in one input and a linear one in another")
        a = torch.cat([f.a.to(torch.float32) for f, _ in parts], dim=0)
        b = torch.cat([f.b.to(torch.float32) * (c * f.scale) for f, c in parts], dim=1)  # s* = 1
        embedding = parts[0][0].transpose and not sources[0].adapter_config.get("fan_in_fan_out")
        key_a, key_b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{module}.{key_a}"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.{key_b}"] = b.contiguous()
        ranks[module] = int(a.shape[0])
    saved = sorted({t for s in sources for t in s.replaced})
    for target in saved:
        # The method's own arithmetic on the full tensors: θ_b + Σ cᵢ(θᵢ − θ_b) for a linear method.
        theta_b = base.get(target)
        merged = method.merge(theta_b if method.needs_base else None, [s.get(target) for s in sources], **resolve(target),
                              out_dtype=theta_b.dtype)
        tensors[f"{PEFT_PREFIX}{target}"] = merged.contiguous()
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    odd = {m: r for m, r in ranks.items() if r != common}
    first = sources[0].adapter_config
    adapter_config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": str(config.base_model),
        "r": common,
        "lora_alpha": common,  # scaling s* = lora_alpha / r = 1 on every module
        "rank_pattern": odd,
        "alpha_pattern": dict(odd),
        "use_rslora": False,
        "target_modules": target_module_names(sorted(ranks), base.names),
        "modules_to_save": [t.removesuffix(".weight") for t in saved] or None,
        "fan_in_fan_out": bool(first.get("fan_in_fan_out")),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return tensors, adapter_config


def target_module_names(modules: list[str], base_names: list[str]) -> list[str]:
    """``target_modules`` as PEFT users write them: module types (``q_proj``, ``v_proj``) when those select
    exactly ``modules`` in the base, else the full module paths.

    PEFT targets a module whose name equals an entry or ends with ``"." + entry``, so the types are exact
    when every base module (a tensor ``<module>.weight``) of those types is one of ``modules``.
    """
    types = sorted({m.rsplit(".", 1)[-1] for m in modules})
    base_modules = {n.removesuffix(".weight") for n in base_names if n.endswith(".weight")}
    selected = {m for m in base_modules if m.rsplit(".", 1)[-1] in types}
    return types if selected == set(modules) else list(modules)


def write_peft_adapter(config: MergeConfig, out_dir: str | Path, *, force: bool = False, progress: bool = True) -> Path:
    """Write the merge of ``config`` (LoRA adapters, linear method) as one PEFT adapter folder ``out_dir``."""
    from safetensors.torch import save_file

    target = check_output_target(Path(out_dir), config.input_paths(), force)
    tensors, adapter_config = peft_tensors(config)
    with AtomicOutputFolder(target, force=force) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        source = Path(config.tokenizer_source) if config.tokenizer_source not in (None, "base") else Path(config.base_model)
        copied = copy_side_files(source, source, tmp)
        (tmp / "README.md").write_text(_card(config, adapter_config, tensors, copied))
    return target


def _card(config: MergeConfig, adapter_config: dict, tensors: dict[str, torch.Tensor], copied: list[str]) -> str:
    from exme import __version__

    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    ranks = sorted({adapter_config["r"], *adapter_config["rank_pattern"].values()})
    lines = [
        "---", "library_name: peft", "tags: [exme, merge, lora]", f"base_model: {json.dumps(str(config.base_model))}", "---", "",
        f"# Merged LoRA adapter ({config.merge_method})", "",
        f"Made with exme {__version__} on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}.", "",
        "Exactly the merge θ_b + Σ cᵢΔᵢ of the input adapters: per module A* = [A₁; A₂; …], "
        "B* = [c₁s₁B₁, c₂s₂B₂, …] with scaling s* = lora_alpha / r = 1.", "",
        "## Inputs", "", *[f"- `{e.model}`" for e in config.merge_models], "",
        "## Parameters", "", "| parameter | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in config.merge_parameters().items()],
        f"| rank (r₁ + r₂ + …) | {', '.join(map(str, ranks))} |",
        f"| modules | {sum(k.endswith(('lora_A.weight', 'lora_embedding_A')) for k in tensors)} LoRA "
        f"(target_modules: {', '.join(adapter_config['target_modules'])}), {len(adapter_config['modules_to_save'] or [])} saved |",
        f"| size | {nbytes / 2**20:.2f} MiB |",
        f"| tokenizer files | {', '.join(copied) or 'none found'} |",
        "", "## Config", "", "```yaml", config.to_yaml().rstrip(), "```", "",
    ]
    return "\n".join(lines)
