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

* LoRA adapters (PEFT adapter folders, :mod:`exme.io.source`) are held as their A/B factors.
  ``lora_cache`` decides what a candidate switch costs: with the cache (``"auto"`` turns it on when
  the targeted tensors of every adapter fit in half the available memory) θᵢ = θ_b + Δᵢ of each
  targeted tensor is built once, when the adapters are set, and a switch costs what it costs for
  full models (untargeted tensors are θ_b itself, never copied); without it θᵢ is rebuilt per
  tensor from the factors at every switch (Δ = s·B@A each time, measured 2.6× slower), so memory
  is the base, the live model, the adapters and one tensor's temporaries per worker thread.
  Either way θᵢ is the same float (the cast of θ_b + Δᵢ to the base dtype that the merge engine
  reads), so the live weights do not depend on the cache.

Coefficients may differ per tensor (:class:`exme.merge.groups.GroupCoefficients`: a group per
module type or per block of layers, each with its own cᵢ): ``apply`` resolves each tensor's
coefficients once per call and runs the same kernel per tensor, so a per-tensor candidate costs
what a global one does, and a tensor's weights are bitwise those of a global candidate with that
tensor's coefficients.

Inputs are opened and aligned with the base by the rules of the merge engine
(:func:`exme.io.align.align_inputs` with the base as tokenizer source): a checkpoint with added
vocabulary rows is accepted, and its rows beyond the base's are left out (the base tokenizer never
emits them), as ``exme merge`` leaves them out with ``tokenizer_source: base``.

On a CPU the pass runs in 1 MiB chunks that stay in cache, so float32 temporaries never reach
main memory.

Where the weights go: by default into the ``transformers`` module's parameters. With a ``sink``
(an engine's weight loader, e.g. the vLLM backend's ``load_weights``) no module holds weights: the
module is a shell on the ``meta`` device that only names and shapes the parameters, and every
candidate is computed tensor by tensor (the same arithmetic) and streamed into the sink, so the
engine's copy is the only live copy: memory is (K + 2) × the model, engine included, plus what is
in flight during a swap, which scales with the largest tensor, not the model: the few tensors
computed ahead, and the engine's own per-layer reload copies (vLLM's CPU build: the largest layer
in checkpoint layout and repacked; benchmarks/RESULTS.md, "vLLM search memory").
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch

from exme.errors import ExmeError
from exme.io import Checkpoint
from exme.io.align import InputModel, align_inputs
from exme.io.source import AdapterSource, open_source
from exme.merge import methods
from exme.merge.groups import GroupCoefficients

_CHUNK = 1 << 18  # float32 elements per chunk on CPU: three 1 MiB buffers per worker stay in cache


class NonFiniteCandidate(ExmeError):
    """A candidate's weights hold NaN or Inf (an overflow in the model dtype, or a bad input).

    A distinct type so a search can score that candidate as failed and go on; the model then holds
    the base weights again.
    """


class _Held:
    """One held checkpoint: where its tensors come from and how they line up with the base."""

    def __init__(self, path: Path, source: Any, reads: dict[str, str], rows: dict[str, int]) -> None:
        self.path = path
        self.source = source  # Checkpoint or AdapterSource
        self.reads = reads  # live target name → tensor name in this checkpoint (tied heads differ)
        self.rows = rows  # target name → this checkpoint's row count, where it differs from the base's
        self.tensors: dict[str, torch.Tensor] | None = None  # θᵢ (or Δᵢ in float32) held in memory, full checkpoints only

    @property
    def lazy(self) -> bool:
        return self.tensors is None


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
        lora_cache: Literal["auto"] | bool = "auto",
        sink: Callable[[Iterable[tuple[str, torch.Tensor]]], None] | None = None,
        hold_on: str | None = None,
    ):
        if lora_cache not in ("auto", True, False):
            raise ExmeError(f"lora_cache must be 'auto', true or false, got {lora_cache!r}")
        self.lora_cache = lora_cache
        if store not in ("checkpoints", "float32-deltas"):
            raise ExmeError(f"store must be 'checkpoints' or 'float32-deltas', got {store!r}")
        self.store = store
        self.model = model
        self.sink = sink  # where candidates go when ``model`` is a meta-device shell (see the module docstring)
        self.workers = workers or torch.get_num_threads()
        self.base_path = Path(base_path)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # named_parameters() yields a tied parameter once, under its first name.
        self.targets: dict[str, torch.nn.Parameter] = dict(model.named_parameters())
        self._shapes = {n: tuple(p.shape) for n, p in self.targets.items()}
        if hold_on is None:
            hold_on = "cpu" if self.device.type in ("cpu", "meta") else str(self.device)
        self._hold_on = hold_on  # where θ_b, θᵢ live (and, with a sink, where candidates are computed)
        if self.device.type == "meta":
            self.device = torch.device(hold_on)
        self._base_ckpt = Checkpoint.open(self.base_path)
        self._align([])  # the base itself must hold every parameter of the model, in its shape
        self.base = {n: self._base_ckpt.get(n, self._hold_on) for n in self.targets}
        self._held: list[_Held] = []
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
        lora_cache: Literal["auto"] | bool = "auto",
        shell: bool = False,
    ) -> "LiveModel":
        """Load the base model once with ``from_pretrained`` (in ``dtype`` on ``device``); see ``store``
        and ``lora_cache`` above.

        ``shell``: build the module on the ``meta`` device instead (names, shapes, dtype and tied
        parameters, no weights) for a live model that writes into a ``sink``; the held tensors then
        live on ``device``. Set ``sink`` before the first candidate is written.
        """
        from exme.common import load_model

        if shell:
            return cls(meta_shell(base, dtype), base, store=store, hold_on=device, lora_cache=lora_cache)
        model = load_model(base, dtype=dtype, device=device)
        return cls(model, base, store=store, lora_cache=lora_cache)

    # ------------------------------------------------------------------ inputs
    def _align(self, paths: Sequence[str | Path]) -> list[_Held]:
        """Open ``paths`` (model or adapter folders) and align them with the base, headers only.

        The rules are the merge engine's (:func:`exme.io.align.align_inputs`), with the base as
        reference and tokenizer source; every mismatch is one ``ExmeError`` before anything is read.
        """
        inputs = [InputModel("base", self._base_ckpt)]
        for i, path in enumerate(paths, start=1):
            inputs.append(InputModel(f"model {i}", open_source(path, self._base_ckpt)))
        alignment = align_inputs(inputs, self.dtype, 0)
        tasks = {t.name: t for t in alignment.tasks}
        for name, shape in self._shapes.items():
            task = tasks.get(name)
            if task is None:
                raise ExmeError(f"{self.base_path}: the model's parameter {name} is not stored in the base model folder")
            if tuple(task.out_spec.shape) != shape or not task.merge:
                raise ExmeError(
                    f"{self.base_path}: tensor {name} is stored as {tuple(task.out_spec.shape)} "
                    f"{task.out_spec.dtype}, but the loaded model's parameter is {shape}"
                )
        held = []
        for i, inp in enumerate(inputs[1:], start=1):
            reads = {name: tasks[name].reads[i] for name in self.targets}
            rows = {name: inp.checkpoint.spec(tasks[name].reads[i]).shape[0] for name in self.targets
                    if tasks[name].common_rows is not None
                    and inp.checkpoint.spec(tasks[name].reads[i]).shape[0] != self._shapes[name][0]}
            held.append(_Held(Path(paths[i - 1]), inp.checkpoint, reads, rows))
        return held

    def set_models(self, paths: Sequence[str | Path]) -> None:
        """Hold the checkpoints θ₁..θ_K (the ones kept after ranking); replaces any held before.

        A path may be a full model folder or a PEFT LoRA adapter folder (held as its factors).
        """
        held = self._align(paths)
        cache = self._cache_adapters(held)
        for h in held:
            if isinstance(h.source, AdapterSource) and not cache:
                continue  # rebuilt per tensor from the factors: never a full θᵢ in memory
            if self.store == "checkpoints":
                h.tensors = {n: self._theta(h, n) for n in self.targets}
            else:  # Δ = θ − θ_b exactly as the merge methods compute it (float32 subtraction)
                h.tensors = {n: torch.sub(self._theta(h, n), self.base[n].float()) for n in self.targets}
        self._held = held
        self.model_paths = [h.path for h in held]
        self.current = None

    def _cache_adapters(self, held: Sequence[_Held]) -> bool:
        """Whether θᵢ of the adapters' targeted tensors is built once (see ``lora_cache``).

        ``"auto"``: when those tensors (in the held dtype) take at most half the memory available
        where they would live, so the cache never pushes the machine into swap or out of GPU memory.
        """
        adapters = [h.source for h in held if isinstance(h.source, AdapterSource)]
        if not adapters or self.lora_cache is False:
            return False
        if self.lora_cache is True:
            return True
        if self.store == "float32-deltas":  # Δᵢ of every tensor in float32
            need = sum(4 * self.base[n].numel() for _ in adapters for n in self.targets)
        else:  # θᵢ of the targeted tensors only; the others are θ_b itself
            need = sum(self.base[n].numel() * self.base[n].element_size() for s in adapters for n in self.targets
                       if n in s.factors or n in s.replaced)
        return need <= 0.5 * _available_bytes(self._hold_on)

    def _theta(self, h: _Held, name: str) -> torch.Tensor:
        """θᵢ of one tensor read from its source, lined up with the base's rows.

        Added vocabulary rows are left out; a checkpoint with fewer rows than the base takes the
        base's rows beyond its own (Δ = 0 there), as the merge engine copies them from the base.
        """
        source = h.source
        if isinstance(source, AdapterSource) and name not in source.replaced and not h.rows:
            # From the base already in memory, not from disk: the same values source.get() reads.
            delta = source.delta(name, self._hold_on)
            if delta is None:
                return self.base[name]  # Δ = 0: θᵢ is θ_b itself, no copy
            theta = self.base[name].to(torch.float32, copy=True)
            theta.add_(delta)
            return theta.to(self.base[name].dtype)
        t = source.get(h.reads[name], self._hold_on)
        rows = h.rows.get(name)
        if rows is None:
            return t
        base_rows = self._shapes[name][0]
        if rows > base_rows:
            return t[:base_rows]
        return torch.cat([t, self.base[name][rows:].to(t.dtype)])

    @property
    def models(self) -> list[Any]:
        """What is held per checkpoint: a dict of θᵢ (or Δᵢ) tensors, or the adapter source."""
        return [h.source if h.lazy else h.tensors for h in self._held]

    def _model_tensors(self, name: str) -> list[torch.Tensor]:
        """θᵢ of one tensor for every held checkpoint (read or rebuilt when only Δᵢ or factors are held)."""
        if self.store == "checkpoints":
            return [self._theta(h, name) if h.lazy else h.tensors[name] for h in self._held]
        return [self._theta(h, name) for h in self._held]

    def _combine_inputs(self, name: str) -> tuple[list[torch.Tensor], bool]:
        """The per-checkpoint tensors ``apply`` combines: θᵢ, or Δᵢ in float32 (the bool says which)."""
        if self.store == "checkpoints":
            return [self._theta(h, name) if h.lazy else h.tensors[name] for h in self._held], False
        deltas = [torch.sub(self._theta(h, name), self.base[name].float()) if h.lazy else h.tensors[name]
                  for h in self._held]
        return deltas, True

    # ------------------------------------------------------------------ candidates
    @torch.no_grad()
    def load_checkpoint(self, path: str | Path) -> None:
        """Copy a checkpoint's weights exactly into the model (to score an SFT checkpoint as it is)."""
        path = Path(path)
        if path in self.model_paths and self.store == "checkpoints":
            h = self._held[self.model_paths.index(path)]
        else:  # tensor by tensor: never a second copy of the model in memory
            h = self._align([path])[0]
        def one(name: str, p: torch.Tensor, bufs: dict[str, torch.Tensor] | None = None) -> None:
            p.copy_(self._theta(h, name) if h.lazy else h.tensors[name])

        self._write(one, f"checkpoint {path}", parallel=False)
        self.current = ("checkpoint", str(path))

    @torch.no_grad()
    def apply_base(self) -> None:
        """Put the base weights back (cast to the model's dtype)."""
        if self.sink is not None:
            self.sink((name, self.base[name].to(self.dtype)) for name in self.targets)
        else:
            for name, p in self.targets.items():
                p.copy_(self.base[name])
        self.current = ("base",)

    @torch.no_grad()
    def apply(self, coeffs: Sequence[float] | GroupCoefficients) -> None:
        """Write θ_b + Σ cᵢ·(θᵢ − θ_b) into the parameters: float32 arithmetic, one cast per element.

        ``coeffs``: one cᵢ per held checkpoint for every tensor, or a
        :class:`~exme.merge.groups.GroupCoefficients` giving each tensor its group's cᵢ (resolved
        once per call; when every group has the same cᵢ this is the global candidate, bitwise).
        One pass per tensor; on a CPU in cache-sized chunks (the float32 intermediates never
        leave the cache), on an accelerator as whole-tensor operations.
        """
        table: dict[str, tuple[float, ...]] | None = None
        if isinstance(coeffs, GroupCoefficients):
            uniform = coeffs.uniform()
            current: Any = coeffs if uniform is None else tuple(uniform)
            if uniform is None:
                table = coeffs.table(self.targets)
                flat = list(coeffs.coeffs[0])
            else:
                flat = list(uniform)
        else:
            flat = [float(c) for c in coeffs]
            current = tuple(flat)
        if len(flat) != len(self._held):
            raise ExmeError(f"{len(flat)} coefficients given for {len(self._held)} held checkpoints")

        def one(name: str, p: torch.nn.Parameter, bufs: dict[str, torch.Tensor]) -> None:
            tensors, deltas = self._combine_inputs(name)
            chunk = None if self.device.type != "cpu" else _CHUNK
            cs = flat if table is None else table[name]
            methods.combine_into(p.data, self.base[name], tensors, cs, deltas=deltas, chunk=chunk, bufs=bufs)

        shown = flat if table is None else dict(zip(coeffs.rule.groups, coeffs.coeffs))  # type: ignore[union-attr]
        self._write(one, f"candidate θ_b + Σ cᵢΔᵢ with c = {shown}")
        self.current = ("coeffs", current)

    def _write(self, work: Callable[..., None], what: str, *, parallel: bool = True) -> None:
        """Run ``work(name, out, bufs)`` for every parameter, then refuse NaN/Inf weights.

        Without a sink ``out`` is the module's parameter (CPU: one thread per core). With one, ``out``
        is a fresh tensor per parameter, computed up to ``workers`` ahead on worker threads and
        streamed to the sink in order; a non-finite tensor ends the stream, and the base is written
        back before :class:`NonFiniteCandidate` is raised (the engine never keeps a half candidate).
        """
        if self.sink is None:
            if self.device.type == "cpu" and parallel:
                self._cpu_parallel(work)
            else:
                for name, p in self.targets.items():
                    work(name, p, {})
            self._check_finite(what)
            return
        bad: list[str] = []
        try:
            self.sink(self._stream(work, bad))
        except Exception:
            if not bad:
                raise
            # The cut stream left the engine short of tensors (an engine may refuse that): the base follows.
        if bad:
            self.apply_base()
            raise self._non_finite(what, bad[0])

    def _stream(self, work: Callable[..., None], bad: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every parameter, each computed by ``work`` into a fresh tensor."""
        local = threading.local()

        def compute(name: str) -> torch.Tensor:
            if not hasattr(local, "bufs"):
                local.bufs = {}
            out = torch.empty(self._shapes[name], dtype=self.dtype, device=self._hold_on)
            with torch.no_grad():
                work(name, out, local.bufs)
            return out

        names, ahead = list(self.targets), max(1, self.workers)
        with ThreadPoolExecutor(max_workers=ahead) as pool:
            pending: deque = deque()
            queued = 0
            while queued < len(names) or pending:
                while queued < len(names) and len(pending) <= ahead:  # at most ahead + 1 tensors in memory
                    pending.append((names[queued], pool.submit(compute, names[queued])))
                    queued += 1
                name, future = pending.popleft()
                tensor = future.result()
                if not _finite(tensor):
                    bad.append(name)
                    return
                yield name, tensor

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
        from exme.merge.registry import get_method

        spec = get_method(method)

        def one(name: str, p: torch.nn.Parameter, bufs: dict[str, torch.Tensor] | None = None) -> None:
            # A CPU generator, as the merge engine uses: the same masks on every device.
            generator = methods.tensor_generator(seed, name, "cpu") if spec.random else None
            base = self.base[name] if spec.needs_base else None
            out = spec.merge(base, self._model_tensors(name), **params, generator=generator, out_dtype=p.dtype)
            p.data.copy_(out)

        self._write(one, f"{method} with {params}")
        self.current = (method, tuple(sorted(params.items())), seed)

    def _check_finite(self, what: str) -> None:
        """Refuse NaN/Inf weights: put the base back and raise :class:`NonFiniteCandidate`.

        A finite sum means every element is finite, so the common case costs one reduction per tensor.
        """
        for name, p in self.targets.items():
            if not _finite(p.data):
                self.apply_base()
                raise self._non_finite(what, name)

    def _non_finite(self, what: str, name: str) -> NonFiniteCandidate:
        return NonFiniteCandidate(
            f"{what}: tensor {name} has NaN or Inf in {str(self.dtype).removeprefix('torch.')} (an overflow, or a "
            "non-finite input); this candidate cannot be evaluated"
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live weights by checkpoint tensor name (views, not copies); with a sink, only the sink holds them."""
        if self.sink is not None:
            raise ExmeError("this live model writes its candidates into an engine and holds no weights of its own")
        return {name: p.data for name, p in self.targets.items()}


def _available_bytes(device: str) -> int:
    """Memory free for new tensors on ``device``: MemAvailable on a CPU (Linux), free memory on a GPU."""
    if device != "cpu" and torch.cuda.is_available() and device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    from exme.common import host_memory_available

    available = host_memory_available()
    if available is not None:
        return available
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: "auto" then keeps the factors only


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf. A finite sum means every element is finite, so the common case is one reduction."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def meta_shell(base: str | Path, dtype: str = "auto") -> torch.nn.Module:
    """The base's ``transformers`` module on the ``meta`` device: parameter names, shapes, dtype and
    tying, without memory for weights (a live model that writes into an engine needs only these)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from exme.common import parse_dtype

    try:
        config = AutoConfig.from_pretrained(base)
    except Exception as err:  # noqa: BLE001 - any failure here is a model folder transformers cannot read
        raise ExmeError(f"{base}: transformers cannot read this model's config ({err})".splitlines()[0]) from None
    if dtype == "auto":
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = getattr(torch, stored)
        if not isinstance(stored, torch.dtype):
            ckpt = Checkpoint.open(base)
            stored = next((ckpt.spec(n).dtype for n in ckpt.names if ckpt.spec(n).dtype.is_floating_point), torch.float32)
        torch_dtype = stored
    else:
        torch_dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return model.eval()
