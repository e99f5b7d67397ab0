"""Evaluate a model folder from disk: what ``exme eval`` does, as a library call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exme.errors import ExmeError
from exme.evaluate.scores import Scores

SPLIT_CHOICES = ("dev", "test", "all")


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) from a HF model folder, in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExmeError(f"{model_dir} is not a model folder (no config.json); pass a folder saved with save_pretrained")
    dtypes = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ExmeError(f"dtype {dtype!r} is not one of {list(dtypes)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ExmeError(f"{model_dir}: cannot load its tokenizer ({err}); save one beside the weights") from None
    try:
        torch.device(device)
    except RuntimeError:
        raise ExmeError(f"device {device!r} is not a valid torch device (e.g. cpu, cuda, cuda:1)") from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtypes[dtype]).to(device).eval()
    return model, tokenizer


def evaluate_folder(
    model_dir: str | Path,
    spec: str | Path,
    *,
    split: str = "all",
    device: str = "cpu",
    dtype: str = "auto",
    limit: int | None = None,
    json_out: str | Path | None = None,
    backend: str = "hf",
    engine_options: dict[str, Any] | None = None,
    **opts: Any,
) -> dict[str, Scores]:
    """Scores of the model in ``model_dir`` on ``split`` (``"all"`` = dev and test), optionally written as JSON.

    The backend and the evaluator are checked first, so a missing package or a bad suite fails
    before the model is read. ``backend="vllm"`` serves suite tasks from one vLLM engine
    (``engine_options``: ``gpu_memory_utilization``, ``tensor_parallel_size``, ``max_model_len``,
    ``kv_cache_gib``).
    """
    from exme.evaluate import SuiteEvaluator, load_evaluator
    from exme.evaluate.backends import check_backend

    if split not in SPLIT_CHOICES:
        raise ExmeError(f"--split {split!r} is not one of {list(SPLIT_CHOICES)}")
    check_backend(backend)
    evaluator = load_evaluator(spec, **opts)
    if json_out is not None and isinstance(evaluator, SuiteEvaluator):
        evaluator.keep_items = True  # the JSON document carries every item's record
    if backend == "vllm":
        if not isinstance(evaluator, SuiteEvaluator):
            raise ExmeError(
                f"backend vllm scores suite YAML tasks only, not {str(spec)!r} (lm-eval tasks and custom "
                "evaluators run on the transformers module); use --backend hf"
            )
        model, tokenizer = _load_engine(model_dir, device=device, dtype=dtype, **(engine_options or {}))
    else:
        model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    splits = ("dev", "test") if split == "all" else (split,)
    results = {s: evaluator.evaluate(model, tokenizer, s, limit=limit) for s in splits}
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


def _load_engine(model_dir: str | Path, *, device: str, dtype: str, **engine_options: Any):
    """(vLLM engine, tokenizer) for a model folder: the evaluator tokenizes, the engine generates."""
    from transformers import AutoTokenizer

    from exme.evaluate.backends.vllm import VLLMBackend

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExmeError(f"{model_dir} is not a model folder (no config.json); pass a folder saved with save_pretrained")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ExmeError(f"{model_dir}: cannot load its tokenizer ({err}); save one beside the weights") from None
    return VLLMBackend(model_dir, device=device, dtype=dtype, **engine_options), tokenizer
