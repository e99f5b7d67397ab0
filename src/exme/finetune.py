"""Stage 1 for real: supervised fine-tuning that leaves a folder of ``checkpoint-*`` snapshots.

ExMe needs a *run*, not a single model: several checkpoints of one SFT trajectory, each a full
model folder that ``AutoModelForCausalLM.from_pretrained`` can load. ``finetune`` makes one with
transformers' ``Trainer`` and nothing exotic, so the checkpoints look exactly like those users
already have from their own runs (same layout, tokenizer saved beside the weights).

The loss is on the completion only: prompt tokens are labelled -100, because what an instruction
model should learn is the answer, not to reproduce the question; the same masking is what makes
the task vectors Δ = θ_sft − θ_base carry the skill rather than the data's surface.

Input is JSONL, one example per line, in either common form:

- ``{"prompt": "...", "completion": "..."}``
- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``
  (rendered with the tokenizer's chat template; the loss is on the last assistant message).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exme.errors import ExmeError
from exme.runtime import is_verbose
from exme.io.jsonl import iter_jsonl

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and transformers' losses) skip


@dataclass(frozen=True)
class SFTExample:
    """One training example as text: what the model is shown and what it must learn to write.

    ``chat`` is true when the text came from a chat template, which already holds its special
    tokens (BOS, end-of-turn), so encoding must not add BOS or EOS again.
    """

    prompt: str
    completion: str
    chat: bool = False


class FinetuneConfig(BaseModel):
    """Options of one SFT run. Unknown keys are an error: a typo must never train with a default."""

    model_config = ConfigDict(extra="forbid")

    model: Path = Field(description="Base model folder (HF format, with its tokenizer).")
    data: Path = Field(description="Training data: JSONL of prompt/completion or chat messages.")
    output: Path = Field(description="Run folder; checkpoints go to output/checkpoint-<step>.")
    learning_rate: float = Field(5e-5, gt=0)
    epochs: float | None = Field(None, gt=0, description="Passes over the data (1 when neither it nor max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps, instead of epochs.")
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(512, gt=1, description="Tokens per example; longer ones are cut at the end.")
    save_steps: int = Field(50, gt=0, description="Write a checkpoint every this many optimizer steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: str = Field("linear", description="transformers scheduler name: linear, cosine, constant, ...")
    seed: int = 0
    device: str = Field("cpu", description="cpu, cuda, mps or auto (the best available).")
    save_optimizer: bool = Field(False, description="Also save optimizer/scheduler state (resumable, ~3x larger).")
    logging_steps: int | None = Field(
        None, gt=0, description="Log the training loss every this many steps; default: every step for runs of up "
        "to 100 steps, else about 100 points over the run (the first step is always logged).")
    progress: bool = True
    force: bool = Field(False, description="Replace checkpoint-* folders already in output.")
    lora_r: int | None = Field(None, gt=0, description="Train a LoRA adapter of this rank instead of every weight.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator (Δ = alpha/r · B@A); default 2·r.")
    lora_targets: list[str] | None = Field(
        None, description="Module names LoRA adapts (e.g. q_proj, v_proj); default: PEFT's choice for the architecture.")

    @classmethod
    def from_options(cls, **options: Any) -> FinetuneConfig:
        """Validate options, turning pydantic's report into one :class:`ExmeError` naming each bad key."""
        try:
            return cls(**options)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in err.errors())
            raise ExmeError(f"finetune options: {problems}") from None

    @model_validator(mode="after")
    def _one_length(self) -> FinetuneConfig:
        """epochs and max_steps both say how long to train; taking one silently would ignore the other."""
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give epochs or max_steps, not both: they both set the length of the run")
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self

    @model_validator(mode="after")
    def _lora_options(self) -> FinetuneConfig:
        """LoRA's alpha and targets mean nothing without a rank: refuse them rather than train every weight."""
        if self.lora_r is None and (self.lora_alpha is not None or self.lora_targets):
            raise ValueError("lora_alpha and lora_targets need lora_r (the adapter's rank)")
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in {"cpu", "cuda", "mps", "auto"}:
            raise ValueError(f"device must be cpu, cuda, mps or auto, not {value!r}")
        return value


@dataclass(frozen=True)
class FinetuneResult:
    """What a run left behind: its folder, its checkpoints in step order, and the logged losses."""

    output: Path
    checkpoints: list[Path]
    loss_history: list[tuple[int, float]]


def loss_summary(history: list[tuple[int, float]]) -> str | None:
    """The run's loss in one line: first and last logged losses with their steps, or the one there is.

    A run with a single logged step says so rather than printing that step twice as "first -> last".
    """
    if not history:
        return None
    (s0, l0), (s1, l1) = history[0], history[-1]
    if s0 == s1:
        return f"training loss {l0:.4f} (step {s0}; the only logged step)"
    return f"training loss {l0:.4f} (step {s0}) -> {l1:.4f} (step {s1}), {len(history)} logged steps"


# ----------------------------------------------------------------------------------------- data


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Records of a JSONL file with their 1-based line numbers; blank lines are skipped.

    A line that is not a JSON object is an :class:`ExmeError` naming the file and line, so a broken
    file fails before a model is even loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise ExmeError(f"{path}: training data file not found; pass a JSONL file of prompt/completion records")
    records = list(iter_jsonl(path))
    if not records:
        raise ExmeError(f"{path}: no training records; the file is empty")
    return records


def record_to_example(record: dict[str, Any], tokenizer: Any, where: str) -> SFTExample:
    """Turn one JSONL record into prompt/completion text (``where`` is ``file:line`` for messages)."""
    if "messages" in record:
        messages = record["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
        ):
            raise ExmeError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        if messages[-1]["role"] != "assistant":
            raise ExmeError(f"{where}: the last message must have role 'assistant' (it is what the model learns)")
        if len(messages) < 2:
            raise ExmeError(f"{where}: 'messages' needs at least one message before the assistant's answer")
        if not getattr(tokenizer, "chat_template", None):
            raise ExmeError(
                f"{where}: chat 'messages' need a tokenizer with a chat template; use prompt/completion records "
                "or add a chat_template to the model's tokenizer_config.json"
            )
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ExmeError(f"{where}: the chat template renders the conversation without its prompt as a prefix")
        return SFTExample(prompt=prompt, completion=full[len(prompt) :], chat=True)
    missing = [key for key in ("prompt", "completion") if key not in record]
    if missing:
        raise ExmeError(
            f"{where}: missing field {', '.join(repr(m) for m in missing)}; each record needs "
            "'prompt' and 'completion' (or 'messages')"
        )
    for key in ("prompt", "completion"):
        if not isinstance(record[key], str):
            raise ExmeError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    if not record["completion"]:
        raise ExmeError(f"{where}: field 'completion' is empty; there is nothing to learn from this record")
    return SFTExample(prompt=record["prompt"], completion=record["completion"])


def load_examples(path: Path, tokenizer: Any) -> list[SFTExample]:
    """Every example of a JSONL training file, validated line by line."""
    return [record_to_example(rec, tokenizer, f"{path}:{line}") for line, rec in read_jsonl(Path(path))]


def encode_example(example: SFTExample, tokenizer: Any, max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels with the prompt masked out (-100); ``None`` when no completion token fits.

    Prompt and completion are tokenized separately, exactly as at inference time, where the model
    continues the prompt's tokens; an EOS is appended to plain completions so the model learns to stop.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=not example.chat)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if not example.chat and tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def pad_batch(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch: pads get attention 0 and label -100, so they change neither the sum nor the count."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    input_ids, labels, attention = [], [], []
    for f in features:
        pad = width - len(f["input_ids"])
        input_ids.append(f["input_ids"] + [pad_id] * pad)
        labels.append(f["labels"] + [IGNORE_INDEX] * pad)
        attention.append([1] * len(f["input_ids"]) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
    }


def completion_loss(model: Any, tokenizer: Any, examples: list[SFTExample], max_length: int = 512, batch_size: int = 16) -> float:
    """Mean cross-entropy per completion token over ``examples`` (the quantity SFT minimises)."""
    import torch

    encoded = [e for e in (encode_example(x, tokenizer, max_length) for x in examples) if e is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = pad_batch(encoded[start : start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += float(losses)
            count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


class _ListDataset:
    """A map-style dataset over pre-tokenized examples (what ``Trainer`` needs, without ``datasets``)."""

    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


# ------------------------------------------------------------------------------------- training


def list_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders of a run, in step order (not string order: 100 comes after 20)."""
    found = []
    for child in Path(run_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ExmeError(f"{model_dir}: not a model folder (no config.json); pass a Hugging Face model directory")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001 - any failure here means the folder lacks a usable tokenizer
        raise ExmeError(f"{model_dir}: cannot load its tokenizer ({type(err).__name__}); save the tokenizer beside the weights") from None


class _TrainingProgress:
    """Training steps on :class:`exme.progress.Progress`, with the latest logged loss as its info."""

    def __init__(self, enabled: bool):
        from exme.progress import Progress

        self.progress = Progress(enabled)
        self.bar = None

    def callback(self):
        from transformers import TrainerCallback

        owner = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                owner.progress.__enter__()
                owner.bar = owner.progress.bar("finetune steps", state.max_steps or None, min_interval=10.0)

            def on_step_end(self, args, state, control, **kwargs):
                if owner.bar is not None:
                    owner.bar.advance()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if owner.bar is not None and logs and "loss" in logs:
                    owner.bar.set_info(f"loss {float(logs['loss']):.4f}")

        return _Callback()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.progress.stop()


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ExmeError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ExmeError("device 'mps' requested but MPS is not available; use --device cpu or auto")


def _remove_incomplete_checkpoints(output: Path) -> list[Path]:
    """Checkpoint folders a write fault cut short: transformers writes ``trainer_state.json`` last,
    so a folder without it never finished and is removed (it must never be taken for a checkpoint)."""
    cut = [c for c in list_checkpoints(output) if not (c / "trainer_state.json").is_file()]
    for folder in cut:
        shutil.rmtree(folder, ignore_errors=True)
    return cut


def _planned_checkpoint_bytes(model: Any, config: FinetuneConfig, n_examples: int) -> int:
    """Bytes every checkpoint of the run takes together: the saved weights (the adapter's trainable
    factors with LoRA) times the number of saves, optimizer state (2 moments) when kept."""
    params = [p for p in model.parameters() if p.requires_grad or config.lora_r is None]
    weights = sum(p.numel() * p.element_size() for p in params)
    if config.save_optimizer:
        weights += 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    total = _total_steps(config, n_examples)
    saves = total // config.save_steps + (1 if total % config.save_steps else 0)
    return max(1, saves) * weights


def _total_steps(config: FinetuneConfig, n_examples: int) -> int:
    """Optimizer steps the run will take: ``max_steps``, or the epochs' batches over accumulation."""
    if config.max_steps is not None:
        return config.max_steps
    batches = math.ceil(n_examples / config.batch_size)
    return math.ceil(math.ceil(batches / config.gradient_accumulation_steps) * config.epochs)


def _warmup_steps(config: FinetuneConfig, n_examples: int) -> int:
    """Warmup as a step count (transformers versions disagree on how a ratio is passed)."""
    if config.warmup_ratio == 0:
        return 0
    return math.ceil(_total_steps(config, n_examples) * config.warmup_ratio)


LOG_POINTS = 100  # loss points of a long run's curve when logging_steps is not given


def logging_steps(config: FinetuneConfig, n_examples: int) -> int:
    """Steps between two logged losses: the user's ``logging_steps``, else 1 up to ``LOG_POINTS`` steps
    and ``ceil(total / LOG_POINTS)`` beyond.

    Why: a fixed 10 left short runs (a real LoRA SFT of a few dozen slow steps) with one logged loss
    or none, so the run's summary could not say whether the loss went down.
    """
    if config.logging_steps is not None:
        return config.logging_steps
    return max(1, math.ceil(_total_steps(config, n_examples) / LOG_POINTS))


def _with_lora(model: Any, config: FinetuneConfig, model_dir: Path) -> Any:
    """Wrap the model in a PEFT LoRA adapter: checkpoints then hold adapter files (a few MB), not the model.

    Every target must name a module of the model, so a typo is an error before training, not an
    adapter that changes nothing.
    """
    from peft import LoraConfig, get_peft_model

    if config.lora_targets:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in config.lora_targets if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m.__class__.__name__ == "Linear"})
            raise ExmeError(f"{model_dir}: the model has no module named {missing[0]!r}; LoRA can target {', '.join(linear)}")
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r,
        target_modules=list(config.lora_targets) if config.lora_targets else None, lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ExmeError(f"{model_dir}: cannot add a LoRA adapter ({err}); give --lora-targets".splitlines()[0]) from None


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` and write ``checkpoint-*`` folders into ``config.output``.

    Every input is checked before the model is trained (data file and records, device, output), so
    a mistake costs seconds, not a run. Each checkpoint holds the weights (safetensors), config,
    generation config and tokenizer; ``trainer_state.json`` keeps the loss log.
    """
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    model_dir, output = Path(config.model), Path(config.output)
    if not model_dir.is_dir():
        raise ExmeError(f"{model_dir}: model folder not found")
    records = read_jsonl(Path(config.data))  # file errors first, before any model is loaded
    _check_device(config.device)
    existing = list_checkpoints(output)
    if existing and not config.force:
        raise ExmeError(f"{output}: already holds {len(existing)} checkpoint-* folders; choose another output or pass --force")
    if output.resolve() == model_dir.resolve() or model_dir.resolve() in output.resolve().parents:
        raise ExmeError(f"{output}: the output must not be inside the model folder {model_dir}")

    tokenizer = _load_tokenizer(model_dir)
    examples = [record_to_example(rec, tokenizer, f"{config.data}:{line}") for line, rec in records]
    encoded = [e for e in (encode_example(x, tokenizer, config.max_length) for x in examples) if e is not None]
    if not encoded:
        raise ExmeError(f"{config.data}: no example keeps a completion token within max_length={config.max_length}; raise --max-length")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ExmeError(f"{model_dir}: the tokenizer has neither a pad nor an EOS token; set pad_token in tokenizer_config.json")

    set_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if config.lora_r is not None:
        model = _with_lora(model, config, model_dir)
    from exme.io.writer import SIDE_FILES_SLACK, check_output_location, write_faults

    check_output_location(output, _planned_checkpoint_bytes(model, config, len(encoded)) + SIDE_FILES_SLACK,
                          what="finetune output")
    for old in existing:  # only reached with force=True
        shutil.rmtree(old)
    with write_faults(output, "creating"):
        output.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(
        output_dir=str(output),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs if config.epochs is not None else 1.0,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=_warmup_steps(config, len(encoded)),
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_only_model=not config.save_optimizer,
        logging_steps=logging_steps(config, len(encoded)),
        logging_first_step=True,  # the summary's first loss is the untrained model's, at step 1
        seed=config.seed,
        use_cpu=config.device == "cpu",
        report_to="none",
        # transformers' own tqdm bar and its raw {'loss': ...} lines only with --verbose; otherwise
        # exme's progress (a bar with the loss on a terminal, a line every few seconds in a log).
        disable_tqdm=not (config.progress and is_verbose()),
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_ListDataset(encoded),
        data_collator=lambda feats: pad_batch(feats, pad_id),
        processing_class=tokenizer,
    )
    bar = None
    if not is_verbose():
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        bar = _TrainingProgress(config.progress)
        trainer.add_callback(bar.callback())
    try:
        trainer.train()
    except Exception as err:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        from exme.io.writer import write_fault_message, write_fault_of

        fault = write_fault_of(err)
        if fault is None:
            raise
        cut = _remove_incomplete_checkpoints(output)
        kept = f"; removed the incomplete {', '.join(c.name for c in cut)}" if cut else ""
        raise ExmeError(write_fault_message(fault, output, "writing a checkpoint into") + kept
                        + f"; the complete checkpoints already in {output} are kept") from None
    finally:
        if bar is not None:
            bar.stop()
    history = [(int(log["step"]), float(log["loss"])) for log in trainer.state.log_history if "loss" in log]
    checkpoints = list_checkpoints(output)
    (output / "exme_finetune.json").write_text(
        json.dumps(
            {
                "config": json.loads(config.model_dump_json()),
                "n_examples": len(examples),
                "n_trained": len(encoded),
                "checkpoints": [c.name for c in checkpoints],
                "loss_history": history,
            },
            indent=2,
        )
    )
    return FinetuneResult(output=output, checkpoints=checkpoints, loss_history=history)
