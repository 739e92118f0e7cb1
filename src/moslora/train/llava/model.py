"""The LLaVA model: loading it (optionally with a 4-bit language model) and exporting a trained
adapter merged into a plain model for evaluation tools."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from moslora.io.atomic import atomic_directory, check_new_directory
from moslora.io.load import load_adapter_groups
from moslora.model.ops import merge_and_unload
from moslora.train.model import keep_4bit_trainable_on_cpu, resolve_dtype


def load_llava(name_or_path: str, *, precision: str = "auto", quantize: str | None = None, for_training: bool = True) -> tuple[Any, Any]:
    """``(model, processor)`` of a ``LlavaForConditionalGeneration`` (hub id or local folder).

    With ``quantize="4bit"`` the language model's linear layers are NF4 with double quantization
    (QLoRA); the vision tower, projector and output head stay in ``precision``, as in XTuner's
    LLaVA QLoRA runs. The CPU repacking trap of 4-bit layers is disarmed for training
    (see :func:`moslora.train.model.load_model`).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dtype = resolve_dtype(precision)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=[r".*vision_tower", r".*multi_modal_projector", "lm_head"],  # matched from the name's start
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"}
    elif quantize is not None:
        raise ValueError(f"quantize must be None or '4bit', got {quantize!r}")
    model = LlavaForConditionalGeneration.from_pretrained(name_or_path, **kwargs)
    processor = AutoProcessor.from_pretrained(name_or_path)
    if processor.tokenizer.pad_token is None:
        tok = processor.tokenizer
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if quantize == "4bit" and for_training:
        keep_4bit_trainable_on_cpu(model)
    return model, processor


def export_merged_llava(base: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, precision: str = "auto") -> Path:
    """A plain ``LlavaForConditionalGeneration`` with the adapter merged in, and its processor,
    saved with ``save_pretrained`` for tools that know no adapters, into ``out_dir`` (a new folder,
    written whole or not at all).

    The base is loaded in full precision (``precision``) even when training used a 4-bit base:
    merging into the 4-bit weights would round ΔW away, so QLoRA adapters are merged, as usual,
    into the unquantized model.
    """
    check_new_directory(out_dir)
    model, processor = load_llava(base, precision=precision, for_training=False)
    load_adapter_groups(model, adapter_dir, trainable=False)
    merged = merge_and_unload(model, safe=True)
    with atomic_directory(out_dir) as tmp:  # the folder is complete or absent, never half-written
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)
