"""Images from a diffusers pipeline with a DreamBooth adapter (``moslora generate``).

Two ways, which give the same images:

- ``"lora"``: the adapter's diffusers export goes in through diffusers' own
  ``pipeline.load_lora_weights``, the path every diffusers user takes (the mixer is folded into
  A and the scaling into B, so diffusers' plain LoRA computes exactly the MoSLoRA update);
- ``"merged"``: the native adapter is loaded into the UNet and merged into its weights
  (:func:`moslora.merge_and_unload`), leaving a plain pipeline with no adapter at all.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from moslora.io.atomic import atomic_write
from moslora.io.diffusers_format import WEIGHTS_NAME as DIFFUSERS_WEIGHTS
from moslora.io.export import export_lora
from moslora.io.load import load_adapter
from moslora.io.native import CONFIG_NAME
from moslora.model.ops import merge_and_unload

MODES = ("lora", "merged")
DIFFUSERS_DIR = "diffusers_lora"  # where ``moslora train --task dreambooth`` puts the export


def adapted_pipeline(model: str, adapter: str | os.PathLike, *, mode: str = "lora", dtype: torch.dtype = torch.float32, device: str | None = None):
    """The pipeline ``model`` with the DreamBooth ``adapter`` applied the ``mode`` way.

    ``adapter`` is a training output folder, a native adapter folder, or (``"lora"`` only) a
    folder with a diffusers ``pytorch_lora_weights.safetensors``.
    """
    from diffusers import DiffusionPipeline

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter folder {str(adapter)!r} does not exist")
    native = (adapter / CONFIG_NAME).is_file()
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    if mode == "merged":
        if not native:
            raise ValueError(f"{adapter}: the merged path needs the native moslora adapter (adapter_config.json), "
                             "e.g. the output folder of moslora train --task dreambooth")
        load_adapter(pipe.unet, adapter, trainable=False)
        pipe.unet = merge_and_unload(pipe.unet)
    else:
        lora = next((d for d in (adapter / DIFFUSERS_DIR, adapter) if (d / DIFFUSERS_WEIGHTS).is_file()), None)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        elif native:
            with tempfile.TemporaryDirectory() as tmp:
                pipe.load_lora_weights(str(export_lora(adapter, tmp, format="diffusers", prefix="unet")))
        else:
            raise FileNotFoundError(f"{adapter}: no {DIFFUSERS_WEIGHTS} (in it or in {DIFFUSERS_DIR}/) and no native adapter")
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def generate(pipe, prompts: list[str], *, num_images: int = 1, steps: int = 30, guidance_scale: float = 7.5, seed: int = 0,
             height: int | None = None, width: int | None = None, output_type: str = "pil") -> list[Any]:
    """``num_images`` images per prompt, prompt by prompt, each prompt's noise drawn from ``seed``
    (so the same seed gives the same images whatever the adapter path)."""
    images = []
    for prompt in prompts:
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        result = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                      num_images_per_prompt=num_images, height=height, width=width, output_type=output_type)
        images.extend(result.images)
    return images


def write_images(images: list[Any], out_dir: str | os.PathLike) -> list[Path]:
    """PIL images as ``000.png``, ``001.png``, … in ``out_dir`` (each written atomically)."""
    out_dir = Path(out_dir)
    paths = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path = out_dir / f"{i:03d}.png"
        atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
        paths.append(path)
    return paths
