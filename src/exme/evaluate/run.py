"""Evaluate a model folder from disk: what ``exme eval`` does, as a library call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exme.errors import ExmeError
from exme.evaluate.scores import Scores

#: ``both``: dev and test, scored separately; ``all``: every item of each task as one split (the
#: number comparable with published full-set results, since exme divides every task into halves).
SPLIT_CHOICES = ("dev", "test", "both", "all")


def adapter_spec(model_dir: str | Path) -> tuple[Path, Path] | None:
    """``(base, adapter)`` when ``model_dir`` names a PEFT LoRA adapter, else ``None``.

    mergekit's ``BASE+ADAPTER`` names both; a bare adapter folder is applied to the local folder its
    ``adapter_config.json`` names as ``base_model_name_or_path`` (as given, or relative to the
    adapter). A base that is not on disk (a hub name) is an error: nothing is downloaded.
    """
    from exme.io.source import ADAPTER_CONFIG, is_adapter, split_base_plus_adapter

    base, adapter = split_base_plus_adapter(model_dir)
    if base is not None:
        if not is_adapter(adapter):
            raise ExmeError(f"{model_dir}: {adapter} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        return base, adapter
    if not is_adapter(adapter):
        return None
    try:
        named = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ExmeError(f"{adapter / ADAPTER_CONFIG}: cannot read it ({err})") from None
    for candidate in ([Path(named).expanduser(), adapter / named] if named else []):
        if (candidate / "config.json").is_file():
            return candidate, adapter
    raise ExmeError(
        f"{adapter} is a LoRA adapter whose base model {named!r} is not a model folder on this machine; "
        "pass BASE+ADAPTER with BASE the local folder of the model it was trained on"
    )


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) from a HF model folder or a LoRA adapter, in eval mode on ``device``.

    An adapter (``BASE+ADAPTER`` or an adapter folder, :func:`adapter_spec`) is read through the
    checkpoint source: the base is loaded and θ = θ_b + Δ written into it tensor by tensor, the
    same weights PEFT's ``merge_and_unload()`` gives. The tokenizer is the base's.
    """
    from exme.common import load_model as load_causal_lm
    from exme.common import load_tokenizer

    pair = adapter_spec(model_dir)
    if pair is not None:
        return _load_adapter(*pair, device=device, dtype=dtype)
    model_dir = _model_folder(model_dir)
    tokenizer = load_tokenizer(model_dir)
    return load_causal_lm(model_dir, dtype=dtype, device=device), tokenizer


def _model_folder(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExmeError(f"{model_dir} is not a model folder (no config.json); pass a folder saved with save_pretrained")
    return model_dir


def _load_adapter(base: Path, adapter: Path, *, device: str, dtype: str):
    """(model, tokenizer): the base with the adapter's weights written in (the live model's path)."""
    import torch

    from exme.common import load_tokenizer
    from exme.search.live import LiveModel

    if not (base / "config.json").is_file():
        raise ExmeError(f"{base} is not a model folder (no config.json); BASE in BASE+ADAPTER must be the model {adapter} was trained on")
    dtypes = ("auto", "float32", "float16", "bfloat16")
    if dtype not in dtypes:
        raise ExmeError(f"dtype {dtype!r} is not one of {list(dtypes)}")
    tokenizer = load_tokenizer(base)
    live = LiveModel.load(base, dtype=dtype, device=device)
    with torch.no_grad():
        live.load_checkpoint(adapter)
    model = live.model
    del live  # the base copy it holds is not needed to score
    return model, tokenizer


def evaluate_folder(
    model_dir: str | Path,
    spec: str | Path,
    *,
    split: str = "both",
    device: str = "cpu",
    dtype: str = "auto",
    limit: int | None = None,
    json_out: str | Path | None = None,
    backend: str = "hf",
    engine_options: dict[str, Any] | None = None,
    log_samples: str | Path | None = None,
    **opts: Any,
) -> dict[str, Scores]:
    """Scores of the model in ``model_dir`` on ``split`` (``"both"`` = dev and test), optionally written as JSON.

    The backend, its options and the evaluator are checked first, so a missing package, a bad
    option or a bad suite fails before the model is read. ``backend`` names an entry of
    :data:`exme.evaluate.backends.REGISTRY`; ``engine_options`` are validated by its options model
    (``vllm``, which serves suite and lm-eval tasks: ``gpu_memory_utilization``, ``tensor_parallel_size``, ``max_model_len``,
    ``kv_cache_gib``). ``log_samples`` (a folder) writes ``samples_<split>.jsonl`` there: one line
    per item with its record, the model's output and its score (as lm-eval's ``--log_samples``;
    evaluators that keep per-item records, i.e. suites).
    """
    from exme.evaluate import capabilities_of, load_evaluator, parse_evaluator_spec
    from exme.evaluate.backends import get_backend

    if split not in SPLIT_CHOICES:
        raise ExmeError(f"--split {split!r} is not one of {list(SPLIT_CHOICES)}")
    entry = get_backend(backend).check()
    options = entry.parse_options(engine_options, where="--backend-option")
    parsed = parse_evaluator_spec(spec, include_path=opts.pop("include_path", None))
    evaluator = load_evaluator(parsed, **opts)
    records = capabilities_of(evaluator).item_records
    if log_samples is not None and not records:
        raise ExmeError("--log-samples works with suite YAML files; lm-eval tasks log samples with lm-eval itself")
    if log_samples is not None:
        from exme.io.writer import check_output_location

        check_output_location(Path(log_samples), what="--log-samples folder")  # before the evaluation, not after
    refusal = entry.refusal(parsed.kind, str(spec))
    if refusal:
        raise ExmeError(f"{refusal}; use --backend hf")
    check = getattr(evaluator, "check_backend", None)  # lm-eval: every task's output type servable by the backend
    if check is not None:
        check(backend)  # before the engine starts
    if entry.factory is None:
        model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    else:
        if not entry.adapters and adapter_spec(model_dir) is not None:
            raise ExmeError(
                f"{model_dir}: backend {backend} scores model folders; for a LoRA adapter use --backend hf, or "
                "write the merged model first (exme merge)"
            )
        from exme.common import load_tokenizer

        folder = _model_folder(model_dir)
        tokenizer = load_tokenizer(folder)  # the evaluator tokenizes; the engine only runs the model
        model = entry.factory(folder, device=device, dtype=dtype, **options.model_dump())
    # The JSON document and the samples files carry every item's record, when the evaluator keeps them.
    keep = {"keep_items": True} if records and (json_out is not None or log_samples is not None) else {}
    splits = ("dev", "test") if split == "both" else (split,)
    results = {s: evaluator.evaluate(model, tokenizer, s, limit=limit, **keep) for s in splits}
    if log_samples is not None:
        for s, scores in results.items():
            write_samples(evaluator.suite, s, scores, Path(log_samples) / f"samples_{s}.jsonl")
    if json_out is not None:
        describe = getattr(evaluator, "describe", None)
        document = {
            "model": str(model_dir),
            "evaluator": str(spec),
            "suite": describe() if describe else None,
            "limit": limit,
            "backend": backend,
            "scores": {s: sc.model_dump() for s, sc in results.items()},
        }
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return results


def write_samples(suite: Any, split: str, scores: Scores, path: Path) -> Path:
    """One JSON line per scored item: task, split, position, the record, and what the model did.

    Moves the per-item records out of ``scores.details``: with ``--log-samples`` they live in the
    samples files, not twice in the scores JSON.
    """
    from exme.io.writer import write_faults

    with write_faults(path, "writing samples to"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as fh:
            for task in suite.tasks:
                items = scores.details.get(task.name, {}).pop("items", None) or []
                for position, (record, item) in enumerate(zip(task.records(split), items)):
                    line = {"task": task.name, "split": split, "position": position, "doc": record, **item}
                    fh.write(json.dumps(line, default=str) + "\n")
    return path
