"""Export a MoSLoRA adapter as a plain LoRA adapter that runs wherever LoRA does.

ΔW = s·B·M·A = s·B·(M·A): folding the r×r mixer into A gives a LoRA adapter (A' = M·A, B) of the
same rank that is exactly equal, so inference costs nothing extra. From a directory this is pure
tensor work on the adapter file (no base model is loaded), so any size of model exports in seconds.
The formats and their key layouts are described in :mod:`moslora.io.peft_format` and
:mod:`moslora.io.diffusers_format`.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from moslora.config import PEFT_TASK_TYPES
from moslora.io.diffusers_format import write_diffusers
from moslora.io.groups import export_groups_peft, is_groups_dir
from moslora.io.native import adapter_contents, read_adapter
from moslora.io.peft_format import export_peft, export_peft_mixer, is_peft_dir, read_peft_dir
from moslora.model.groups import adapter_groups
from moslora.model.inject import adapter_layers

FORMATS = ("peft", "peft-mixer", "diffusers")


def export_lora(
    src: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    format: str = "peft",
    *,
    prefix: str = "unet",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Write ``src``'s adapter to ``out_dir`` as a plain LoRA adapter, exactly equal to it (or, with
    ``format="peft-mixer"``, as the PEFT route's folder, which keeps the mixer).

    Args:
        src: a model with MoSLoRA adapters, or an adapter directory (native, or the authors'
            PEFT-style checkpoint with ``lora_AB`` / ``lora_mixer`` tensors; a plain PEFT LoRA
            directory is rewritten as is). A model with adapter groups, or a groups directory,
            becomes one PEFT adapter of the whole model (:func:`moslora.io.groups.export_groups_peft`).
        out_dir: where to write; created if needed.
        format: ``"peft"`` (``adapter_config.json`` + ``adapter_model.safetensors`` for
            ``PeftModel.from_pretrained``, vLLM, TGI, llama.cpp's converter), ``"peft-mixer"`` (the
            same files with the mixer kept, for ``moslora.peft.PeftModel.from_pretrained``: training
            goes on in PEFT or TRL; linear layers only) or ``"diffusers"``
            (``pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights``).
        prefix: the diffusers pipeline component the adapter belongs to (``"unet"``,
            ``"transformer"``); only for ``format="diffusers"``.
        base_model_name_or_path: recorded in the PEFT config (default: what ``src`` records).
        task_type: PEFT's task type to record, e.g. ``"CAUSAL_LM"`` (default: what ``src``
            records, which a model's class gives); ``AutoPeftModelFor…`` needs it.
        allow_pickle: read the authors' pickled ``adapter_model.bin`` (with ``weights_only=True``).

    Returns the output directory.

    PEFT and diffusers build a conv adapter's A with the base kernel, stride and padding only, so a
    conv with dilation or a non-zero ``padding_mode`` is refused when ``src`` is a model (a native
    directory does not record them: export such adapters from the model).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"task_type must be one of PEFT's {PEFT_TASK_TYPES}, got {task_type!r}")
    if task_type is not None and format != "peft":
        raise ValueError("task_type is PEFT's; a diffusers LoRA file has no place for it")
    if _has_groups(src):
        # Adapter groups (e.g. LLaVA's language model and vision tower): one PEFT adapter for the whole model.
        if format != "peft":
            raise ValueError("adapter groups export to format='peft' only (one group alone: export its subfolder)")
        if task_type is not None:
            raise ValueError("adapter groups (e.g. LLaVA's) have no PEFT task type to set")
        return export_groups_peft(src, out_dir, base_model_name_or_path=base_model_name_or_path)
    base_weights = {}
    if isinstance(src, nn.Module):
        _check_convs_run_alike(src)
        description, tensors = adapter_contents(src)
    elif is_peft_dir(src):
        description, tensors, base_weights = read_peft_dir(src, allow_pickle=allow_pickle)
    else:
        description, tensors = read_adapter(src)
    if base_model_name_or_path is not None:
        description = description.replace(base_model_name_or_path=base_model_name_or_path)
    if task_type is not None:
        description = description.replace(task_type=task_type)
    if format == "peft":
        return export_peft(out_dir, description, tensors, base_weights)
    if format == "peft-mixer":
        return export_peft_mixer(out_dir, description, tensors, base_weights)
    if base_weights:
        raise ValueError(f"{src} stores base-layer weights of embeddings, which a diffusers LoRA file cannot carry")
    return write_diffusers(out_dir, description, tensors, prefix=prefix)


def _check_convs_run_alike(model: nn.Module) -> None:
    for name, layer in adapter_layers(model):
        if layer.kind != "conv":
            continue
        base = layer.base_layer
        if any(d != 1 for d in base.dilation) or base.padding_mode != "zeros":
            raise ValueError(
                f"conv layer {name!r} has dilation={base.dilation}, padding_mode={base.padding_mode!r}; PEFT and diffusers "
                "run a conv LoRA's A with the kernel, stride and padding only, so the exported adapter would not be equal"
            )


def _has_groups(src: nn.Module | str | os.PathLike) -> bool:
    if isinstance(src, nn.Module):
        groups = adapter_groups(src)
        return bool(groups) and "" not in groups
    return is_groups_dir(src)
