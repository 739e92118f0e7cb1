r"""diffusers' LoRA file: ``pytorch_lora_weights.safetensors``, loaded by ``pipeline.load_lora_weights``
and ``unet.load_lora_adapter`` (and by ComfyUI and other tools that read the same layout).

Key layout, for a module ``<m>`` of the denoiser and ``<prefix>`` its pipeline component
(``unet`` for UNet pipelines, ``transformer`` for DiT ones such as SD3 or Flux)::

    <prefix>.<m>.lora_A.weight    r×in     (conv: r×in×k…)
    <prefix>.<m>.lora_B.weight    out×r    (conv: out×r×1…)

There is no config file: diffusers reads r from lora_B's shape and, with no alpha information,
takes alpha = r, i.e. s = 1. So the scaling is baked into B: the file holds (A' = M·A, B' = s·B),
and every loader that assumes alpha = r gets ΔW = B'·A' = s·B·M·A exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from moslora.io.atomic import atomic_write
from moslora.io.peft_format import PREFIX, peft_tensors
from moslora.model.description import AdapterDescription
from moslora.version import __version__

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# The folder inside a training run's output where `moslora train --task dreambooth` writes this export
# and where `moslora generate` looks for it.
DIFFUSERS_DIR = "diffusers_lora"


def write_diffusers(directory: str | os.PathLike, description: AdapterDescription, tensors: dict[str, torch.Tensor], *, prefix: str = "unet") -> Path:
    """Write the native adapter as a diffusers LoRA file under ``prefix`` (a pipeline component)."""
    if not prefix or "." in prefix:
        raise ValueError(f"prefix must be a pipeline component name such as 'unet' or 'transformer', got {prefix!r}")
    if description.modules_to_save:
        raise ValueError("a diffusers LoRA file has no place for modules_to_save; export to format='peft' instead")
    embeddings = [name for name, layer in description.modules.items() if layer.kind == "embedding"]
    if embeddings:
        raise ValueError(f"diffusers' LoRA loaders handle linear and conv layers, not embedding {embeddings[0]!r}; export to format='peft' instead")
    scaling = description.config.scaling
    out = {}
    for key, tensor in peft_tensors(description, tensors).items():
        name = key[len(PREFIX) :]
        out[f"{prefix}.{name}"] = (tensor * scaling).contiguous() if name.endswith(".lora_B.weight") else tensor
    directory = Path(directory)
    metadata = {"format": "pt", "exported_by": f"moslora {__version__}: mixer folded into lora_A (A' = M·A), scaling into lora_B (B' = s·B)"}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(out, str(tmp), metadata=metadata))
    return directory
