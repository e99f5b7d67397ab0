"""Alignment rules between the inputs of a merge, decided once for the merge engine and the live model.

Given the inputs (reference first: the base for methods with a base), :func:`align_inputs` decides,
from headers only, for every tensor of the reference: which tensor to read in each input (a tied
output head reads the input embedding), the output shape and dtype, and how vocabulary tensors of
different row counts are combined. Every mismatch is an :class:`ExmeError` naming the tensor and
the input, raised before anything is read.

Added vocabulary rows (tokens added during fine-tuning): the rows every input has are merged; the
output has the tokenizer source's row count and its rows beyond the shared ones are copied from the
tokenizer source as stored, never extrapolated or averaged (as mergekit's tokenizer handling does).
The live model of ``exme run`` aligns with the base as the tokenizer source, so it merges the
base's rows and leaves rows a checkpoint added out (the base tokenizer cannot emit them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from exme.errors import ExmeError
from exme.io.checkpoint import TensorSpec

#: Tensor-name endings of input embeddings and output heads: the tensors whose row count is the
#: vocabulary size, and which may legitimately differ between checkpoints (added tokens).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")


def _is_vocab_tensor(name: str) -> bool:
    return name.endswith(EMBEDDING_SUFFIXES) or name.endswith(HEAD_SUFFIXES)


def _input_embedding_name(ckpt: Any) -> str | None:
    for name in ckpt.names:
        if name.endswith(EMBEDDING_SUFFIXES):
            return name
    return None


@dataclass(frozen=True)
class InputModel:
    """One input of the merge: its role and open checkpoint."""

    label: str  # "base", "model 1", ...
    checkpoint: Any  # a Checkpoint or an AdapterSource (exme.io.source)

    def describe(self) -> str:
        return f"{self.label} ({self.checkpoint.path})"


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made."""

    name: str
    out_spec: TensorSpec
    reads: tuple[str, ...]  # the tensor name to read in each input (differs for tied heads)
    merge: bool  # False: non-float tensor, copied from the reference input
    common_rows: int | None = None  # vocabulary tensors: rows present in every input
    extra_rows_from: int | None = None  # index of the input that supplies rows beyond common_rows


@dataclass
class Alignment:
    """What :func:`align_inputs` decided: one task per output tensor, notes for the user, config changes."""

    tasks: list[TensorTask] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config_updates: dict = field(default_factory=dict)


def align_inputs(inputs: Sequence[InputModel], out_dtype: torch.dtype, tok_index: int | None) -> Alignment:
    """Decide every output tensor of merging ``inputs`` (input 0 is the reference); see the module docstring.

    ``tok_index`` is the input whose vocabulary the output keeps (``None``: the reference's).
    """
    out = Alignment()
    ref = inputs[0]
    others = inputs[1:]
    ref_names = set(ref.checkpoint.names)
    ref_embed = _input_embedding_name(ref.checkpoint)
    # Tied embeddings: an input without an output head uses its input embedding as the head.
    for inp in others:
        extra = sorted(set(inp.checkpoint.names) - ref_names)
        for name in extra:
            if name.endswith(HEAD_SUFFIXES) and ref_embed is not None:
                raise ExmeError(
                    f"{inp.describe()} has a separate output head {name!r} but {ref.describe()} ties it to its "
                    f"input embeddings; merging would silently drop {inp.label}'s head. Untie the reference "
                    "(save it with tie_word_embeddings=false) or merge models of the same kind"
                )
            raise ExmeError(
                f"tensor {name!r} is in {inp.describe()} but not in {ref.describe()}; the models are not the "
                "same architecture"
            )
    if ref_embed and not any(n.endswith(HEAD_SUFFIXES) for n in ref_names):
        out.notes.append(
            f"tied embeddings: {ref.label} has no output head tensor (it reuses {ref_embed!r}); the merged "
            "model keeps the tie, so the head is merged once, through the embeddings"
        )

    # Tensors are processed in the reference's storage order, so inputs are read sequentially.
    order = sorted(ref.checkpoint.names, key=lambda n: (str(ref.checkpoint.file_of(n)), n))
    for name in order:
        ref_spec = ref.checkpoint.spec(name)
        reads = [name]
        specs = [ref_spec]
        for inp in others:
            read = name
            if not inp.checkpoint.has(name):
                alias = _input_embedding_name(inp.checkpoint)
                if name.endswith(HEAD_SUFFIXES) and alias is not None and inp.checkpoint.tied_embeddings:
                    read = alias
                    note = (
                        f"tied embeddings: {inp.label} has no {name!r}; its tied input embedding {alias!r} is "
                        f"used as its output head (the output keeps a separate {name!r})"
                    )
                    if note not in out.notes:
                        out.notes.append(note)
                else:
                    raise ExmeError(
                        f"tensor {name!r} is missing in {inp.describe()} (present in {ref.describe()}); "
                        "the models must have the same tensors"
                    )
            reads.append(read)
            specs.append(inp.checkpoint.spec(read))
        out.tasks.append(_align_tensor(out, inputs, out_dtype, name, tuple(reads), specs, tok_index))

    # Vocabulary size follows the output embedding rows.
    for task in out.tasks:
        if task.name.endswith(EMBEDDING_SUFFIXES) and task.out_spec.shape[0] != ref.checkpoint.spec(task.name).shape[0]:
            out.config_updates["vocab_size"] = task.out_spec.shape[0]
    return out


def _align_tensor(
    out: Alignment, inputs: Sequence[InputModel], out_dtype: torch.dtype, name: str, reads: tuple[str, ...],
    specs: list[TensorSpec], tok_index: int | None,
) -> TensorTask:
    ref_spec = specs[0]
    if not ref_spec.dtype.is_floating_point:
        for inp, spec in zip(inputs[1:], specs[1:]):
            if spec != ref_spec:
                raise ExmeError(f"non-float tensor {name!r} differs between {inputs[0].describe()} and {inp.describe()}")
        return TensorTask(name, ref_spec, reads, merge=False)
    for inp, spec in zip(inputs[1:], specs[1:]):
        if spec.dtype != ref_spec.dtype:
            raise ExmeError(
                f"dtype mismatch in tensor {name!r}: {ref_spec.dtype} in {inputs[0].describe()} but {spec.dtype} in "
                f"{inp.describe()}; convert the checkpoints to one dtype before merging"
            )
    shapes = [s.shape for s in specs]
    if len(set(shapes)) == 1:
        return TensorTask(name, TensorSpec(ref_spec.shape, out_dtype), reads, merge=True)
    same_but_rows = len({s[1:] for s in shapes}) == 1 and all(len(s) == 2 for s in shapes)
    if not (_is_vocab_tensor(name) and same_but_rows):
        listing = ", ".join(f"{inp.label} {tuple(s)}" for inp, s in zip(inputs, shapes))
        raise ExmeError(f"shape mismatch in tensor {name!r}: {listing}; the models are not the same architecture")
    # Extra embedding rows (added tokens): merge the rows every input has; the output vocabulary
    # follows the tokenizer source; its additional rows are copied from it, never cropped silently.
    rows = [s[0] for s in shapes]
    common = min(rows)
    target_index = tok_index if tok_index is not None else 0
    target_rows = rows[target_index]
    merged_desc = f"rows 0..{common - 1} of {name!r} merged from all inputs"
    if target_rows > common:
        out.notes.append(
            f"extra vocabulary rows: {merged_desc}; rows {common}..{target_rows - 1} copied from "
            f"{inputs[target_index].label} (the tokenizer source), whose vocabulary the output keeps"
        )
    else:
        out.notes.append(f"extra vocabulary rows: {merged_desc} (the tokenizer source has {target_rows} rows)")
    for inp, r in zip(inputs, rows):
        if r > target_rows:
            out.notes.append(
                f"extra vocabulary rows: rows {target_rows}..{r - 1} of {name!r} in {inp.describe()} are not in the "
                "output, because the tokenizer source has no such tokens; set tokenizer_source to keep them"
            )
    out_spec = TensorSpec((target_rows, *shapes[0][1:]), out_dtype)
    return TensorTask(
        name, out_spec, reads, merge=True, common_rows=common, extra_rows_from=target_index if target_rows > common else None
    )
