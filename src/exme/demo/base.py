"""The demo's base model: a tokenizer trained here and a small Llama pretrained on the demo corpus.

ExMe's premise is a base model that already knows things and SFT that teaches it to answer. To
show that for real without a model hub, the demo trains its own: a byte-level BPE tokenizer on
its own text (digits kept one per token, so arithmetic is not hidden inside merged tokens), then
a Llama of about a million parameters for a short causal-LM pass over the corpus. The result is saved as
an ordinary Hugging Face model folder, with a ``exme_demo_base.json`` stamp holding the settings
that made it, so a later run with the same settings reuses it instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
STAMP = "exme_demo_base.json"


class BaseModelSpec(BaseModel):
    """Tokenizer size, model shape and pretraining schedule of the demo's base model."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(384, ge=260)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 256
    block_size: int = Field(64, description="Tokens per pretraining sequence (documents are packed).")
    batch_size: int = 16
    steps: int = 500
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0

    @classmethod
    def quick(cls) -> "BaseModelSpec":
        return cls(vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, steps=12, warmup_steps=3, block_size=64)

    def fingerprint(self, corpus_text: str) -> str:
        """Hash of these settings and the corpus: the cache key of a built base."""
        digest = hashlib.sha256(self.model_dump_json().encode())
        digest.update(corpus_text.encode("utf-8"))
        return digest.hexdigest()[:16]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (BOS added in front of each text).

    Byte-level means every string round-trips exactly (code indentation and newlines included);
    splitting digits before BPE keeps each digit its own token, as Llama's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def llama_config(spec: BaseModelSpec, tokenizer) -> Any:
    """A small Llama config whose special-token ids match ``tokenizer``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def packed_blocks(token_docs: list[list[int]], block_size: int, eos_id: int) -> "Any":
    """Documents joined with EOS and cut into equal blocks (a ``[n_blocks, block_size]`` tensor)."""
    import torch

    stream: list[int] = []
    for ids in token_docs:
        stream.extend(ids)
        stream.append(eos_id)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def read_stamp(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / STAMP
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def build_base(folder: str | Path, corpus: str | Path, spec: BaseModelSpec, *, extra_tokenizer_text: Iterable[str] = (), progress: bool = True) -> tuple[Path, bool]:
    """Train the tokenizer and pretrain the base into ``folder``; reuse it when its stamp matches.

    Returns ``(folder, built)``: ``built`` is false when a cached base with the same settings and
    corpus was found. The folder is written under a temporary name and renamed at the end, so an
    interrupted build never leaves a half-trained base that a later run would take as cached.
    """
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    folder, corpus = Path(folder), Path(corpus)
    corpus_text = corpus.read_text(encoding="utf-8")
    key = spec.fingerprint(corpus_text)
    stamp = read_stamp(folder)
    if stamp is not None and stamp.get("fingerprint") == key and (folder / "config.json").is_file():
        return folder, False

    started = time.perf_counter()
    docs = [d for d in corpus_text.split("\n\n") if d.strip()]
    tokenizer = train_tokenizer([*docs, *extra_tokenizer_text], spec.vocab_size)
    token_docs = [tokenizer(d, add_special_tokens=True)["input_ids"] for d in docs]
    blocks = packed_blocks(token_docs, spec.block_size, tokenizer.eos_token_id)

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(llama_config(spec, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < spec.warmup_steps:
            return spec.learning_rate * (step + 1) / spec.warmup_steps
        progress_frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac)))

    generator = torch.Generator().manual_seed(spec.seed)
    losses: list[float] = []
    model.train()
    bar = _progress(progress, spec.steps, "pretraining the base model")
    try:
        for step in range(spec.steps):
            rows = torch.randint(0, blocks.shape[0], (spec.batch_size,), generator=generator)
            batch = blocks[rows]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.advance(loss=losses[-1])
    finally:
        bar.close()

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    stamp = {
        "fingerprint": key,
        "spec": json.loads(spec.model_dump_json()),
        "n_parameters": n_params,
        "n_corpus_tokens": int(sum(len(t) + 1 for t in token_docs)),
        "loss_first": losses[0],
        "loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": time.perf_counter() - started,
    }
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder, True


class _progress:
    """A rich progress bar showing the running loss (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[loss]}"), TimeElapsedColumn())
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, loss="")

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=f"loss {loss:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
