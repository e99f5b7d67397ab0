"""The streaming merge engine: plan every output tensor, then read → merge → write one at a time.

Two phases, so that every user mistake surfaces before any long work:

1. :func:`plan_merge` opens every input (headers only), checks names, shapes and dtypes across
   models, decides how tied embeddings and extra vocabulary rows are handled, and fixes every
   output name, shape and dtype. Nothing is read or written yet.
2. :func:`run_merge` streams: a reader thread fetches the next tensors of all inputs while the
   current one is merged (with :mod:`exme.merge.methods`) and a writer thread puts the previous
   result into its place in the pre-declared shard. Peak memory is a few tensors per input.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exme.errors import ExmeError
from exme.io.align import InputModel, TensorTask, align_inputs
from exme.io.checkpoint import Checkpoint
from exme.io.source import open_source
from exme.io.writer import (
    AtomicOutputFolder,
    ShardedSafetensorsWriter,
    check_output_target,
    copy_side_files,
    dtype_name,
    parse_size,
    plan_shards,
    side_files_bytes,
    write_config,
)
from exme.merge import methods
from exme.merge.config import MergeConfig
from exme.merge.parameters import LayerLayout, tensor_point
from exme.merge.registry import REGISTRY, tensor_kwargs

@dataclass
class MergePlan:
    """Everything decided before the first byte is read: inputs, output tensors, notes for the user."""

    config: MergeConfig
    inputs: list[InputModel]
    tasks: list[TensorTask]
    out_dtype: torch.dtype
    compute_dtype: torch.dtype
    config_updates: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tokenizer_source: Path | None = None
    #: the method's kwargs for each task (``None`` for tensors that are copied, not merged)
    kwargs: list[dict | None] = field(default_factory=list)

    @property
    def reference(self) -> InputModel:
        return self.inputs[0]

    @property
    def output_bytes(self) -> int:
        return sum(t.out_spec.nbytes for t in self.tasks)


# ------------------------------------------------------------------------------------------ plan


def _open_inputs(config: MergeConfig) -> list[InputModel]:
    """Input 0 is the base (methods with a base) or the first model (linear); then the models."""
    inputs: list[InputModel] = []
    # Adapters read relative to base_model, also for methods that do not otherwise use it (linear).
    base = Checkpoint.open(config.base_model) if config.base_model else None
    if base is not None and config.method.needs_base:
        inputs.append(InputModel("base", base))
    for i, entry in enumerate(config.merge_models, start=1):
        inputs.append(InputModel(f"model {i}", open_source(entry.model, base)))
    return inputs


def _resolve_tokenizer_source(config: MergeConfig, inputs: list[InputModel]) -> tuple[Path, int | None]:
    """The folder tokenizer files come from and, when it is an input, that input's index."""
    source = config.tokenizer_source
    if source is None or source == "base":
        if source == "base" and not config.base_model:
            raise ExmeError("tokenizer_source: base needs base_model")
        folder = Path(config.base_model) if config.base_model else inputs[0].checkpoint.path
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise ExmeError(f"tokenizer_source {source} is not a folder; give base or a model folder")
    resolved = folder.expanduser().resolve()
    for i, inp in enumerate(inputs):
        if inp.checkpoint.path.expanduser().resolve() == resolved:
            return folder, i
    return folder, None


def plan_merge(config: MergeConfig) -> MergePlan:
    """Open the inputs and decide every output tensor; raise :class:`ExmeError` on any mismatch.

    The alignment rules (missing tensors, shapes, dtypes, tied heads, added vocabulary rows) are
    :func:`exme.io.align.align_inputs`, the same ones the live model applies.
    """
    inputs = _open_inputs(config)
    ref = inputs[0]
    out_dtype = config.output_dtype(ref.checkpoint.spec(ref.checkpoint.names[0]).dtype if ref.checkpoint.names else torch.float32)
    plan = MergePlan(config, inputs, [], out_dtype, config.compute_dtype())
    tok_folder, tok_index = _resolve_tokenizer_source(config, inputs)
    plan.tokenizer_source = tok_folder
    aligned = align_inputs(inputs, out_dtype, tok_index)
    plan.tasks, plan.notes, plan.config_updates = aligned.tasks, aligned.notes, aligned.config_updates
    plan.kwargs = _tensor_parameters(config, plan)
    return plan


#: Config keys that give the number of layers, by architecture family.
_NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _tensor_parameters(config: MergeConfig, plan: MergePlan) -> list[dict | None]:
    """Each merged tensor's parameters (:func:`exme.merge.registry.tensor_kwargs`), all checked here,
    from the headers alone: a filter that matches nothing, slices that miss layers or a value that
    breaks a method's rule stop the merge before the first tensor is read."""
    names = sorted({n for t in plan.tasks for n in (t.name, *t.reads)})
    resolve = parameter_resolver(config, names, plan.reference.checkpoint.config, plan.reference.describe())
    return [resolve(t.name) if t.merge else None for t in plan.tasks]


def parameter_resolver(config: MergeConfig, names: list[str], ref_config: dict, describe: str) -> Callable[[str], dict]:
    """``name -> kwargs``: the method's parameters for the tensor ``name`` (one of ``names``, the models'
    tensor names; ``ref_config`` the reference model's config.json, ``describe`` how errors name it).

    The one per-tensor resolution the full-model merge and the PEFT adapter output share; the
    config-wide checks (filters matching nothing, layers) happen here, before any tensor is read.
    """
    table = config.table
    for key, filt in table.unmatched_filters(names):
        raise ExmeError(
            f"{key}: filter {filt!r} matches no tensor of the models (names look like {names[len(names) // 2]!r}); "
            "a filter is a piece of a tensor name: check its spelling"
        )
    layout = None
    if table.needs_layers:
        num = next((int(ref_config[k]) for k in _NUM_LAYERS_KEYS if isinstance(ref_config.get(k), int)), None)
        layout = LayerLayout.from_names(names, num)
        if layout.prefix is None:
            raise ExmeError(
                f"parameters vary over layers (a gradient list or slices), but {describe} has no "
                f"numbered layers{f' 0..{num - 1}' if num else ''} in its tensor names; give plain values or filters"
            )
        stops = [s.stop for s in table.slices if s.stop is not None]
        if stops and stops[-1] != layout.num_layers:
            raise ExmeError(
                f"slices[{len(stops) - 1}].sources[0].layer_range ends at layer {stops[-1]}, but the models have "
                f"{layout.num_layers} layers; exme's slices cover every layer (dropping layers is a mergekit frankenmerge)"
            )
    if not table.varies:
        try:
            one = tensor_kwargs(config, None)
        except ValueError as err:
            raise ExmeError(str(err)) from None
        return lambda name: one

    def resolve(name: str) -> dict:
        try:
            return tensor_kwargs(config, tensor_point(name, layout, table.slice_starts))
        except ValueError as err:
            raise ExmeError(f"tensor {name!r}: {err}") from None

    return resolve


# ------------------------------------------------------------------------------------------ merge one tensor


#: Methods whose result at an element depends only on the inputs at that element are streamed in
#: chunks (``MergeMethod.elementwise``). TIES is streamed in chunks too, after a first pass that
#: fixes each task vector's global top-k threshold. DARE and SLERP see whole tensors.
ELEMENTWISE_METHODS = tuple(n for n, m in REGISTRY.items() if m.elementwise)
CHUNKED_METHODS = tuple(n for n, m in REGISTRY.items() if m.elementwise or m.magnitude_pass)

#: Elements per chunk. Why this small: every temporary of a chunk then comes from memory the
#: allocator reuses, while tensor-sized temporaries cost fresh, zero-filled pages each time
#: (measured: a task-arithmetic pass over a 49M-element tensor is ~4× faster in 256K chunks).
CHUNK_ELEMENTS = 1 << 18

#: Bytes of input the reader thread may hold ahead of the merge (at least one step always).
READ_AHEAD_BYTES = 256 * 2**20


def tensor_merger(
    config: MergeConfig, out_dtype: torch.dtype, compute_dtype: torch.dtype, seed: int
) -> Callable[..., torch.Tensor]:
    """The per-tensor function of this config: ``(name, [input tensors], kwargs) -> merged tensor``.

    ``kwargs`` are the tensor's parameters (``MergePlan.kwargs``). Inputs are ordered as in
    :class:`MergePlan` (base first for methods with a base). For TIES
    the engine passes ``selectors=`` so that chunks of one tensor share its global top-k, and the
    task vectors its magnitude pass kept (``deltas=True``), so the merge pass reads only the base.
    """
    method = config.method
    common = {"out_dtype": out_dtype, "compute_dtype": compute_dtype}
    if method.workspace:  # one per merge: buffers reused from tensor to tensor
        common["workspace"] = methods.Workspace()
    with_base = method.needs_base

    def merge(name: str, ts: list[torch.Tensor], kwargs: dict, selectors=None, deltas: bool = False) -> torch.Tensor:
        # A CPU generator on every device, so a CUDA merge draws the same masks as a CPU one.
        generator = methods.tensor_generator(seed, name, "cpu") if method.random else None
        base, models = (ts[0], ts[1:]) if with_base else (None, ts)
        extra = {"deltas": True} if deltas else {}
        return method.merge(base, models, **kwargs, generator=generator, selectors=selectors, **extra, **common)

    return merge


@dataclass(frozen=True)
class _Step:
    """One unit of reading: which elements of which tensors, and what the merge does with them.

    kind: ``copy`` (non-float tensor, reference only), ``magnitude`` (TIES first pass),
    ``chunk`` (merge elements [start, stop)), ``whole`` (merge the whole merged region),
    ``extra`` (copy rows beyond the common vocabulary from one input).
    """

    task: int
    kind: str
    start: int
    stop: int


def _schedule(plan: MergePlan, chunk: int) -> list[_Step]:
    """Every read of the merge, in order; the reader thread and the merge loop both follow it."""
    steps: list[_Step] = []
    method = plan.config.merge_method
    two_pass = plan.config.method.magnitude_pass
    for i, task in enumerate(plan.tasks):
        numel = task.out_spec.numel
        if not task.merge:
            steps.append(_Step(i, "copy", 0, numel))
            continue
        region = _region(task)
        if method in CHUNKED_METHODS:
            if two_pass:
                steps += [_Step(i, "magnitude", s, min(s + chunk, region)) for s in range(0, region, chunk)]
            steps += [_Step(i, "chunk", s, min(s + chunk, region)) for s in range(0, region, chunk)]
        else:
            steps.append(_Step(i, "whole", 0, region))
        if task.extra_rows_from is not None:
            steps += [_Step(i, "extra", s, min(s + chunk, numel)) for s in range(region, numel, chunk)]
    return steps


def _read_step(plan: MergePlan, step: _Step) -> list[torch.Tensor]:
    task = plan.tasks[step.task]
    if step.kind == "copy" or (step.kind == "chunk" and plan.config.method.magnitude_pass):
        sources = [0]  # a two-pass merge takes the models' task vectors from its first pass
    elif step.kind == "extra":
        sources = [task.extra_rows_from]
    else:
        sources = range(len(plan.inputs))
    return [plan.inputs[j].checkpoint.get_flat(task.reads[j], step.start, step.stop) for j in sources]


class _Reader:
    """Reads the schedule ahead of the merge in a thread, holding at most ``READ_AHEAD_BYTES``."""

    def __init__(self, plan: MergePlan, steps: list[_Step]) -> None:
        self._plan, self._steps = plan, steps
        self._items: deque = deque()
        self._held = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="exme-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for step in self._steps:
            try:
                tensors = _read_step(self._plan, step)
                item = (tensors, None, sum(t.numel() * t.element_size() for t in tensors))
            except BaseException as err:  # handed to the merge loop, which raises it
                item = (None, err, 0)
            with self._cond:
                while not self._stop and self._items and self._held + item[2] > READ_AHEAD_BYTES:
                    self._cond.wait()
                if self._stop:
                    return
                self._items.append(item)
                self._held += item[2]
                self._cond.notify_all()
            if item[1] is not None:
                return

    def next(self) -> list[torch.Tensor]:
        with self._cond:
            while not self._items:
                self._cond.wait()
            tensors, err, size = self._items.popleft()
            self._held -= size
            self._cond.notify_all()
        if err is not None:
            raise err
        return tensors

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._items.clear()
            self._cond.notify_all()
        self._thread.join()


class _Writer:
    """Writes merged chunks in a thread, so disk writes overlap the next chunk's arithmetic."""

    def __init__(self, writer: ShardedSafetensorsWriter) -> None:
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="exme-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            op, arg = self._queue.get()
            if op == "stop":
                return
            if self._error is not None:
                continue
            try:
                getattr(self._writer, op)(*arg)
            except BaseException as err:
                self._error = err

    def put(self, op: str, *arg) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((op, arg))

    def finish(self) -> None:
        """Wait for every queued write; re-raise a write error."""
        self._queue.put(("stop", ()))
        self._thread.join()
        if self._error is not None:
            raise self._error


def _raise_non_finite(plan: MergePlan, task: TensorTask) -> None:
    """The result is not finite: name the input tensor that holds NaN/Inf, or blame the merge."""
    for inp, read in zip(plan.inputs, task.reads):
        if not bool(torch.isfinite(inp.checkpoint.get(read)).all()):
            raise ExmeError(f"tensor {read!r} in {inp.describe()} contains NaN or Inf; fix or re-export that checkpoint")
    raise ExmeError(
        f"the merge produced NaN or Inf in tensor {task.name!r} (inputs are finite); the parameters overflow "
        f"{dtype_name(plan.out_dtype)}: lower weights/alpha or choose a wider --dtype"
    )


def _finished(plan: MergePlan, task: TensorTask, result: torch.Tensor) -> torch.Tensor:
    """Check a result chunk (computed in the arithmetic dtype) and make its single cast.

    A method that ``casts_output`` returns the chunk rounded to the output dtype already; then the
    check is that the rounded values are finite.
    """
    # a finite sum means every element is finite (summed in float32 at least: a float16 chunk's
    # own sum would overflow for ordinary values and send every chunk to the elementwise check)
    if not bool(torch.isfinite(result.sum(dtype=torch.promote_types(result.dtype, torch.float32)))):
        if not bool(torch.isfinite(result).all()):
            _raise_non_finite(plan, task)
    limit = torch.finfo(plan.out_dtype).max
    if limit < torch.finfo(result.dtype).max and result.numel():
        if float(result.amax()) > limit or float(result.amin()) < -limit:  # would round to ±Inf
            _raise_non_finite(plan, task)
    return result.to(plan.out_dtype).to("cpu")


def _region(task: TensorTask) -> int:
    """Elements merged from all inputs: all of them, or the rows every input has."""
    if task.common_rows is None:
        return task.out_spec.numel
    return task.common_rows * math.prod(task.out_spec.shape[1:])


def _stream(plan: MergePlan, steps: list[_Step], merger: Callable, device: str, writer: _Writer, advance: Callable[[int], None]) -> None:
    """The merge loop: consume the reader's steps in schedule order, hand results to the writer."""
    reader = _Reader(plan, steps)
    magnitudes = methods.MagnitudePass(device, plan.compute_dtype)  # TIES' first pass, reused from tensor to tensor
    selectors: list[methods.MagnitudeSelector] | None = None
    compute = plan.compute_dtype
    try:
        current = -1
        for step in steps:
            task = plan.tasks[step.task]
            if step.task != current:
                if current >= 0:
                    writer.put("end")
                writer.put("begin", task.name)
                current, selectors = step.task, None
            tensors = [t.to(device, non_blocking=True) for t in reader.next()]
            if step.kind == "copy":
                writer.put("append", tensors[0])
            elif step.kind == "extra":
                writer.put("append", tensors[0].to(plan.out_dtype))
            elif step.kind == "magnitude":
                if step.start == 0:
                    magnitudes.start(_region(task), len(tensors) - 1)
                base = tensors[0] if tensors[0].dtype.itemsize <= compute.itemsize else tensors[0].to(compute)
                for j, model in enumerate(tensors[1:]):
                    if not magnitudes.finite(j, magnitudes.add(j, step.start, model, base)):
                        _raise_non_finite(plan, task)
            else:
                if step.kind == "chunk" and plan.config.method.magnitude_pass:
                    if selectors is None:  # the magnitude pass of this tensor is complete
                        selectors = magnitudes.selectors(plan.kwargs[step.task]["density"])
                    deltas = [magnitudes.chunk(j, step.start, step.stop) for j in range(len(selectors))]
                    result = merger(task.name, [tensors[0], *deltas], plan.kwargs[step.task], selectors=selectors, deltas=True)
                else:
                    if step.kind == "whole":
                        shape = (task.common_rows, *task.out_spec.shape[1:]) if task.common_rows is not None else task.out_spec.shape
                        tensors = [t.reshape(shape) for t in tensors]
                    result = merger(task.name, tensors, plan.kwargs[step.task])
                writer.put("append", _finished(plan, task, result))
            advance(sum(t.numel() for t in tensors[:1]) * plan.out_dtype.itemsize if step.kind != "magnitude" else 0)
        if current >= 0:
            writer.put("end")
    finally:
        reader.stop()


# ------------------------------------------------------------------------------------------ run


def _progress(enabled: bool):
    """A rich progress bar over output bytes, on stderr; silent when disabled."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,  # the bar disappears when done (or failed), leaving one summary or error line
    )


def run_merge(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    out_dtype: str | torch.dtype | None = None,
    plan_notes: list[str] | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Path:
    """Merge the models of ``config`` into the HF model folder ``out_dir`` and return its path.

    Every check (paths, output location, names, shapes, dtypes, parameters) runs before the first
    tensor is read. The output appears atomically: on any failure there is no ``out_dir`` (or the
    previous one, untouched). ``out_dtype`` overrides the config's output dtype (CLI ``--dtype``);
    ``seed`` drives DARE masks through :func:`exme.merge.methods.tensor_generator`. Notes about
    tied embeddings and extra vocabulary rows are printed, written to the model card, and appended
    to ``plan_notes`` when given. ``chunk_elements`` sets the streaming granularity (results do
    not depend on it).
    """
    if config.output_format == "peft":
        from exme.merge.peft_output import write_peft_adapter

        if out_dtype is not None:
            raise ExmeError("--dtype does not apply to --format peft (the adapter's factors are written in float32)")
        return write_peft_adapter(config, out_dir, force=force, progress=progress)
    if out_dtype is not None:
        from exme.merge.config import parse_dtype

        forced = out_dtype if isinstance(out_dtype, torch.dtype) else parse_dtype(out_dtype, "output dtype")
        config = config.model_copy(update={"out_dtype": dtype_name(forced)})
    shard_bytes = parse_size(max_shard_size)
    _check_device(device)
    target = check_output_target(Path(out_dir), config.input_paths(), force)
    plan = plan_merge(config)
    # Results come back in the arithmetic dtype, checked and cast once by _finished; a method that
    # rounds to the output dtype itself (a fused kernel) gets it, and _finished checks its rounded result.
    merger = tensor_merger(config, plan.out_dtype if config.method.casts_output else plan.compute_dtype, plan.compute_dtype, seed)
    shards = plan_shards([(t.name, t.out_spec) for t in plan.tasks], shard_bytes)
    steps = _schedule(plan, max(1, int(chunk_elements)))

    with AtomicOutputFolder(target, force=force, needed_bytes=plan.output_bytes + side_files_bytes(plan.tokenizer_source or plan.reference.checkpoint.path)) as tmp, _single_threaded_arithmetic(device):
        writer = ShardedSafetensorsWriter(tmp, shards)
        with _progress(progress) as bar:
            if progress:
                from exme.runtime import is_verbose

                # Tied embeddings are routine (the model card records how they were handled): --verbose shows them.
                for note in (n for n in plan.notes if is_verbose() or not n.startswith("tied embeddings")):
                    bar.console.print(f"[yellow]note:[/] {note}")
            job = bar.add_task(config.merge_method, total=plan.output_bytes)
            background = _Writer(writer)
            try:
                _stream(plan, steps, merger, device, background, lambda n: bar.update(job, advance=n))
                background.put("close")
                background.finish()
            except BaseException:
                try:
                    background.finish()
                except BaseException:  # noqa: BLE001 - the first error is the one to report
                    pass
                writer.abort()
                raise
        tok_source = plan.tokenizer_source or plan.reference.checkpoint.path
        copied = copy_side_files(tok_source, tok_source, tmp)
        write_config(plan.reference.checkpoint.config, tmp, plan.out_dtype, plan.config_updates)
        (tmp / "README.md").write_text(model_card(plan, seed=seed, shards=len(shards.files), copied=copied))
    for inp in plan.inputs:
        inp.checkpoint.close()
    if plan_notes is not None:
        plan_notes.extend(plan.notes)
    return target


@contextlib.contextmanager
def _single_threaded_arithmetic(device: str):
    """One torch intra-op thread while streaming on the CPU, restored afterwards.

    Why: chunks are small, so OpenMP workers would spend the time between operations
    spin-waiting, competing for cores with the reader and writer threads (measured on 2 cores:
    several times more CPU time for the same merge). The reader and writer threads use the
    other cores instead.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ExmeError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExmeError(f"device {device!r} requested but CUDA is not available; use --device cpu")


# ------------------------------------------------------------------------------------------ model card


def model_card(plan: MergePlan, *, seed: int, shards: int, copied: list[str]) -> str:
    """A README.md that records the method, every parameter and every input of the merge."""
    from exme import __version__

    config = plan.config
    params = config.merge_parameters()
    lines = [
        "---",
        "library_name: transformers",
        "tags: [exme, merge]",
    ]
    if config.base_model:
        lines.append(f"base_model: {json.dumps(str(config.base_model))}")
    lines += [
        "---",
        "",
        f"# Merged model ({config.merge_method})",
        "",
        f"Made with exme {__version__} on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}.",
        "",
        "## Inputs",
        "",
    ]
    for inp in plan.inputs:
        lines.append(f"- {inp.label}: `{inp.checkpoint.path}` ({inp.checkpoint.format}, {len(inp.checkpoint.names)} tensors)")
    lines += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
    for key, value in params.items():
        lines.append(f"| {key} | {value} |")
    lines.append(f"| output dtype | {dtype_name(plan.out_dtype)} |")
    lines.append(f"| arithmetic dtype | {dtype_name(plan.compute_dtype)} |")
    if config.method.random:
        lines.append(f"| seed (DARE masks) | {seed} |")
    lines.append(f"| shards | {shards} |")
    lines.append(f"| tokenizer and generation config from | `{plan.tokenizer_source}` ({', '.join(copied) or 'none found'}) |")
    if plan.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in plan.notes]
    lines += ["", "## Config", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
