"""One model in memory whose weights are rewritten in place for every candidate.

Searching α and β means evaluating dozens of merged models. Writing each to disk and loading it
again costs seconds to minutes per candidate on a real model; rewriting the parameters of one
resident model costs one pass over memory. :class:`LiveModel` loads the base and the kept
checkpoints once and applies any candidate θ = θ_b + Σ cᵢ·(θᵢ − θ_b) in place.

Precision: every candidate is computed in float32 and cast once to the model's dtype, with the
same operations in the same order as ``exme.merge.methods.exme``, so the live weights are bitwise
those the merge engine writes. What is held (``store``):

* ``"checkpoints"`` (default): θ_b and each θᵢ exactly as stored (bf16 stays bf16); Δᵢ = θᵢ − θ_b is
  recomputed in float32 per candidate. Memory: (K + 2) × the model (base, K checkpoints, the live
  model).
* ``"float32-deltas"``: Δᵢ precomputed once in float32 (the very values the engine computes).
  Fewer operations per candidate (measured ~1.4× faster on a CPU), but each Δᵢ of a bf16 model
  takes twice its checkpoint's memory; TIES/DARE baselines then read θᵢ from disk per tensor.

On a CPU the pass runs in 1 MiB chunks that stay in cache, so float32 temporaries never reach
main memory.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from exme.errors import ExmeError
from exme.io import Checkpoint

_CHUNK = 1 << 18  # float32 elements per chunk on CPU: three 1 MiB buffers per worker stay in cache


def _open_checked(path: Path, names: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> Checkpoint:
    """Open a model folder after checking, from the headers only, that it has every tensor in the right shape.

    So a wrong checkpoint fails in milliseconds, naming the tensor, before anything is read.
    """
    ckpt = Checkpoint.open(path)
    missing = [n for n in names if not ckpt.has(n)]
    if missing:
        raise ExmeError(
            f"{path}: tensor {missing[0]} of the model is missing ({len(missing)} missing); "
            "every checkpoint must hold the base model's tensors"
        )
    for n in names:
        spec = ckpt.spec(n)
        if tuple(spec.shape) != tuple(shapes[n]):
            raise ExmeError(
                f"{path}: tensor {n} has shape {tuple(spec.shape)} but the base model's is {tuple(shapes[n])}; "
                "all checkpoints must share the base architecture and vocabulary"
            )
        if not spec.dtype.is_floating_point:
            raise ExmeError(f"{path}: tensor {n} has dtype {spec.dtype}; expected floating-point weights")
    return ckpt


def _read(path: Path, names: Sequence[str], shapes: dict[str, tuple[int, ...]], device: str) -> dict[str, torch.Tensor]:
    ckpt = _open_checked(path, names, shapes)
    return {n: ckpt.get(n, device) for n in names}


class LiveModel:
    """A ``transformers`` causal LM plus the base and checkpoint weights to rewrite it with.

    ``targets`` maps every (deduplicated) parameter of the model to the tensor name it is stored
    under: a tied ``lm_head`` is the same parameter as the embedding, so it is written once.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        base_path: str | Path,
        *,
        workers: int | None = None,
        store: Literal["checkpoints", "float32-deltas"] = "checkpoints",
    ):
        if store not in ("checkpoints", "float32-deltas"):
            raise ExmeError(f"store must be 'checkpoints' or 'float32-deltas', got {store!r}")
        self.store = store
        self.model = model
        self.workers = workers or torch.get_num_threads()
        self.base_path = Path(base_path)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # named_parameters() yields a tied parameter once, under its first name.
        self.targets: dict[str, torch.nn.Parameter] = dict(model.named_parameters())
        self._shapes = {n: tuple(p.shape) for n, p in self.targets.items()}
        self._hold_on = "cpu" if self.device.type == "cpu" else str(self.device)  # where θ_b, θᵢ live
        self.base = _read(self.base_path, list(self.targets), self._shapes, self._hold_on)
        self.models: list[dict[str, torch.Tensor]] = []  # θᵢ as stored, or Δᵢ in float32 (``store``)
        self._checkpoints: list[Checkpoint] = []
        self.model_paths: list[Path] = []
        self.current: tuple[Any, ...] | None = ("base",)

    @classmethod
    def load(
        cls,
        base: str | Path,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        store: Literal["checkpoints", "float32-deltas"] = "checkpoints",
    ) -> "LiveModel":
        """Load the base model once with ``from_pretrained`` (in ``dtype`` on ``device``); see ``store`` above."""
        from transformers import AutoModelForCausalLM

        torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
        except Exception as err:
            raise ExmeError(f"{base}: transformers cannot load this model ({err})") from None
        model.to(device).eval()
        return cls(model, base, store=store)

    # ------------------------------------------------------------------ inputs
    def set_models(self, paths: Sequence[str | Path]) -> None:
        """Hold the checkpoints θ₁..θ_K (the ones kept after ranking); replaces any held before."""
        self.models, self._checkpoints, self.model_paths = [], [], []
        names = list(self.targets)
        for path in paths:
            ckpt = _open_checked(Path(path), names, self._shapes)
            if self.store == "checkpoints":
                self.models.append({n: ckpt.get(n, self._hold_on) for n in names})
            else:  # Δ = θ − θ_b exactly as the merge methods compute it (float32 subtraction)
                self.models.append({n: torch.sub(ckpt.get(n, self._hold_on), self.base[n].float()) for n in names})
            self._checkpoints.append(ckpt)
            self.model_paths.append(Path(path))
        self.current = None

    def _model_tensors(self, name: str) -> list[torch.Tensor]:
        """θᵢ of one tensor for every held checkpoint (read from disk when only Δᵢ are held)."""
        if self.store == "checkpoints":
            return [m[name] for m in self.models]
        return [ck.get(name, self._hold_on) for ck in self._checkpoints]

    # ------------------------------------------------------------------ candidates
    @torch.no_grad()
    def load_checkpoint(self, path: str | Path) -> None:
        """Copy a checkpoint's weights exactly into the model (to score an SFT checkpoint as it is)."""
        path = Path(path)
        if path in self.model_paths and self.store == "checkpoints":
            held = self.models[self.model_paths.index(path)]
            for name, p in self.targets.items():
                p.copy_(held[name])
        else:  # tensor by tensor: never a second copy of the model in memory
            ckpt = _open_checked(path, list(self.targets), self._shapes)
            for name, p in self.targets.items():
                p.copy_(ckpt.get(name))
        self.current = ("checkpoint", str(path))

    @torch.no_grad()
    def apply_base(self) -> None:
        """Put the base weights back (cast to the model's dtype)."""
        for name, p in self.targets.items():
            p.copy_(self.base[name])
        self.current = ("base",)

    @torch.no_grad()
    def apply(self, coeffs: Sequence[float]) -> None:
        """Write θ_b + Σ cᵢ·(θᵢ − θ_b) into the parameters: float32 arithmetic, one cast per element.

        One pass per tensor; on a CPU in cache-sized chunks (the float32 intermediates never
        leave the cache), on an accelerator as whole-tensor operations.
        """
        coeffs = [float(c) for c in coeffs]
        if len(coeffs) != len(self.models):
            raise ExmeError(f"{len(coeffs)} coefficients given for {len(self.models)} held checkpoints")
        combine = _combine_into if self.store == "checkpoints" else _combine_deltas_into
        if self.device.type != "cpu":
            for name, p in self.targets.items():
                combine(p.data, self.base[name], [m[name] for m in self.models], coeffs, None, {})
        else:
            self._cpu_parallel(lambda name, p, bufs: combine(
                p.data, self.base[name], [m[name] for m in self.models], coeffs, _CHUNK, bufs))
        self.current = ("coeffs", tuple(coeffs))

    def _cpu_parallel(self, work: Callable[[str, torch.nn.Parameter, dict[str, torch.Tensor]], None]) -> None:
        """Run ``work`` over the tensors with one Python thread per core and torch's own threads off.

        Why: each chunk is too small for torch's intra-op threads to pay off, and when other
        processes share the cores those threads wait on each other at every operation (measured:
        up to 50× slower). Whole tensors per thread need no synchronisation; torch releases the
        GIL inside its kernels. The per-element arithmetic is unchanged, so results are identical.
        """
        threads = torch.get_num_threads()
        local = threading.local()

        def run(item: tuple[str, torch.nn.Parameter]) -> None:
            if not hasattr(local, "bufs"):
                local.bufs = {}
            with torch.no_grad():
                work(item[0], item[1], local.bufs)

        items = sorted(self.targets.items(), key=lambda kv: -kv[1].numel())  # big tensors first: balanced
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(threads, self.workers))) as pool:
                for _ in pool.map(run, items):
                    pass
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def apply_method(self, method: str, *, seed: int = 0, **params: Any) -> None:
        """Write a merge method's result (:mod:`exme.merge.registry`) tensor by tensor.

        For TIES and DARE baselines, whose per-tensor work (top-k masks, random drops) is not a
        linear combination. ``params`` are the method's function kwargs (``registry.baseline_kwargs``
        gives them for a baseline setting). DARE masks come from ``tensor_generator(seed, name)``,
        the same generator the merge engine uses, so a baseline can be written to disk identically.
        """
        from exme.merge import methods
        from exme.merge.registry import get_method

        spec = get_method(method)

        def one(name: str, p: torch.nn.Parameter, bufs: dict[str, torch.Tensor] | None = None) -> None:
            # A CPU generator, as the merge engine uses: the same masks on every device.
            generator = methods.tensor_generator(seed, name, "cpu") if spec.random else None
            base = self.base[name] if spec.needs_base else None
            out = spec.merge(base, self._model_tensors(name), **params, generator=generator, out_dtype=p.dtype)
            p.data.copy_(out)

        if self.device.type == "cpu":
            self._cpu_parallel(one)
        else:
            for name, p in self.targets.items():
                one(name, p)
        self.current = (method, tuple(sorted(params.items())), seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live weights by checkpoint tensor name (views, not copies)."""
        return {name: p.data for name, p in self.targets.items()}


def _combine_into(
    out: torch.Tensor,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    chunk: int | None,
    bufs: dict[str, torch.Tensor],
) -> None:
    """out ← cast(b + Σ cᵢ·(mᵢ − b)), all arithmetic in float32, in order i = 1..K."""
    o, b = out.view(-1), base.reshape(-1)
    ms = [m.reshape(-1) for m in models]
    n = o.numel()
    step = n if chunk is None else chunk
    size = min(step, n)
    if chunk is None:
        b32 = torch.empty(size, dtype=torch.float32, device=o.device)
        acc, d = torch.empty_like(b32), torch.empty_like(b32)
    else:
        if "b32" not in bufs:
            bufs.update({k: torch.empty(chunk, dtype=torch.float32) for k in ("b32", "acc", "d")})
        b32, acc, d = bufs["b32"][:size], bufs["acc"][:size], bufs["d"][:size]
    for s in range(0, n, step):
        e = min(n, s + step)
        k = e - s
        bb, aa, dd = b32[:k], acc[:k], d[:k]
        bb.copy_(b[s:e])
        if not ms:
            aa.copy_(bb)
        for i, (m, c) in enumerate(zip(ms, coeffs)):
            dd.copy_(m[s:e])
            dd.sub_(bb)
            if i == 0:  # aa = bb + c·dd without first copying bb into aa (same fused multiply-add)
                torch.add(bb, dd, alpha=c, out=aa)
            else:
                aa.add_(dd, alpha=c)
        o[s:e].copy_(aa)


def _combine_deltas_into(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    chunk: int | None,
    bufs: dict[str, torch.Tensor],
) -> None:
    """out ← cast(b + Σ cᵢ·Δᵢ) with Δᵢ precomputed in float32: the same operations as :func:`_combine_into`
    minus the per-candidate conversion and subtraction of each checkpoint."""
    o, b = out.view(-1), base.reshape(-1)
    ds = [d.reshape(-1) for d in deltas]
    n = o.numel()
    step = n if chunk is None else chunk
    size = min(step, n)
    if chunk is None:
        b32 = torch.empty(size, dtype=torch.float32, device=o.device)
        acc = torch.empty_like(b32)
    else:
        if "b32" not in bufs:
            bufs.update({k: torch.empty(chunk, dtype=torch.float32) for k in ("b32", "acc", "d")})
        b32, acc = bufs["b32"][:size], bufs["acc"][:size]
    for s in range(0, n, step):
        e = min(n, s + step)
        k = e - s
        bb, aa = b32[:k], acc[:k]
        bb.copy_(b[s:e])
        if not ds:
            aa.copy_(bb)
        for i, (d, c) in enumerate(zip(ds, coeffs)):
            if i == 0:
                torch.add(bb, d[s:e], alpha=c, out=aa)
            else:
                aa.add_(d[s:e], alpha=c)
        o[s:e].copy_(aa)
