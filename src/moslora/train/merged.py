"""A merged model for serving: a base causal LM with its adapter added into the weights, saved as
a plain transformers model.

Every adapted weight becomes ``W0 + s·B·M·A`` (:func:`moslora.model.ops.merge_and_unload`) and the
adapter layers are gone, so ``AutoModelForCausalLM.from_pretrained``, vLLM, TGI or llama.cpp's
converter load the folder with no adapter code, at the base model's speed, to the adapted model's
outputs.

An exact merge needs full-precision weights. A GGUF base is dequantized by transformers as it
loads; a checkpoint saved quantized (bitsandbytes, …) is dequantized before merging
(``merge_and_unload(dequantize=True)``). Either way the merged model is full precision, and
:func:`export_merged` says so. QLoRA adapters (trained on a 4-bit base) are merged the usual way:
into the full-precision base.
"""

from __future__ import annotations

import os
from pathlib import Path

from moslora.io.atomic import atomic_directory, check_new_directory
from moslora.io.groups import is_groups_dir
from moslora.io.load import load_adapter
from moslora.io.native import read_adapter
from moslora.io.peft_format import is_peft_dir, read_peft_dir
from moslora.model.ops import merge_and_unload
from moslora.train.model import check_source, load_model, resolve_dtype
from moslora.train.recipe import PRECISIONS


def check_merged_export(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None) -> str:
    """Everything :func:`export_merged` can check before loading a model: the adapter reads, the base
    is named (``base``, else the one the adapter records) and exists, ``out_dir`` is new. Returns the base."""
    adapter_dir = Path(adapter_dir)
    if is_groups_dir(adapter_dir):
        raise ValueError(f"{adapter_dir} holds adapter groups (LLaVA); merge those with "
                         "moslora train --task llava --merged-output")
    recorded = (read_peft_dir(adapter_dir)[0] if is_peft_dir(adapter_dir) else read_adapter(adapter_dir)[0]).base_model_name_or_path
    base = base or recorded
    if base is None:
        raise ValueError(f"{adapter_dir} does not record its base model; name it with --base-model")
    check_source(base)
    check_new_directory(out_dir)
    return base


def export_merged(
    adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None, *, precision: str = "fp32",
    allow_pickle: bool = False,
) -> Path:
    """Load ``base`` (default: the base model ``adapter_dir`` records), add the adapter into its
    weights and ``save_pretrained`` the plain model and its tokenizer to ``out_dir`` (a new folder,
    written whole or not at all). ``precision`` is the dtype of the merged weights (``"auto"``: bf16
    on a GPU that has it, else fp32). Returns ``out_dir``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    base = check_merged_export(adapter_dir, out_dir, base)
    model, tokenizer = load_model(base, precision=precision, for_training=False)
    dequantized = _what_is_dequantized(base, model)
    load_adapter(model, adapter_dir, trainable=False, allow_pickle=allow_pickle)
    merged = merge_and_unload(model, dequantize=True)
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if dequantized:
        print(f"merged into a full-precision model ({resolve_dtype(precision)}): {dequantized}")
    return Path(out_dir)


def _what_is_dequantized(base: str, model) -> str | None:
    if Path(base).suffix == ".gguf":
        return "the GGUF base was dequantized when it was loaded"
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if getattr(model, "is_quantized", False) or config is not None:
        method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
        return f"the quantized base ({getattr(method, 'value', method) or 'quantized'}) was dequantized before merging"
    return None
