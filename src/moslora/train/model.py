"""Loading a base causal LM and its tokenizer for training or evaluation: a hub id, a local
folder, or a single ``.gguf`` file (dequantized by transformers), optionally 4-bit (QLoRA)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def resolve_dtype(precision: str) -> torch.dtype:
    """``auto`` is bf16 on a GPU that has it, fp32 otherwise (CPU fp16/bf16 training is slow or lossy)."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_model(name_or_path: str, *, precision: str = "auto", quantize: str | None = None, for_training: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)``. The tokenizer gets a pad token (unk, else EOS) when it has none. A
    ``.gguf`` model is dequantized to ``precision`` and is then a plain full-precision model.

    With ``quantize="4bit"`` the linear layers are NF4 with double quantization and the adapters
    stay in fp32 (the QLoRA recipe). On CPU, bitsandbytes repacks a 4-bit weight for faster
    inference the first time it runs in eval mode without grad; after that its matmul no longer
    passes gradients back, so every adapter below it silently stops learning. For training the
    repacking is switched off on every 4-bit layer before anything runs.
    """
    check_source(name_or_path, quantize)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, extra = _source(name_or_path)
    dtype = resolve_dtype(precision)
    kwargs: dict[str, Any] = {"dtype": dtype, **extra}
    if quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        kwargs["device_map"] = {"": local_rank if torch.cuda.is_available() else "cpu"}
    elif quantize is not None:
        raise ValueError(f"quantize must be None or '4bit', got {quantize!r}")
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if "gguf_file" in extra:
        # transformers dequantizes a GGUF file as it loads it, yet marks the model quantized (GGUF), and a
        # Trainer (TRL's, with a PEFT model too) then refuses to train it. It is a full-precision model.
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if quantize == "4bit" and for_training:
        keep_4bit_trainable_on_cpu(model)
    return model, tokenizer


def load_skeleton(name_or_path: str) -> torch.nn.Module:
    """The causal LM ``name_or_path`` names, built from its config on the meta device: its module
    names and shapes, no weights and no memory (to check targets before a slow load)."""
    check_source(name_or_path, None)
    from transformers import AutoConfig, AutoModelForCausalLM

    source, extra = _source(name_or_path)
    config = AutoConfig.from_pretrained(source, **extra)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def keep_4bit_trainable_on_cpu(model: torch.nn.Module) -> int:
    """Switch off bitsandbytes' CPU inference repacking on every 4-bit layer. Returns how many."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def check_source(name_or_path: str, quantize: str | None = None) -> None:
    """Refuse, before anything is loaded, a model that cannot load as asked: a local file or folder
    that does not exist, or a GGUF file with ``quantize`` (transformers dequantizes GGUF weights
    as it loads them and cannot hand them to bitsandbytes)."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist")
        if quantize is not None:
            raise ValueError(f"{quantize} quantization (--quantize {quantize}) cannot be used with a .gguf model: transformers dequantizes GGUF "
                             "weights when it loads them and cannot quantize them again. Drop --quantize (the model "
                             "loads in full precision), or quantize the original safetensors checkpoint instead")
    elif not path.exists() and (path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1):
        # Not a Hub id either (those are "name" or "org/name").
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")


def _source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}
