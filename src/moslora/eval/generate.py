"""``moslora generate``: text from a causal LM, images from a diffusers pipeline, with an adapter.

Which of the two a model is, :func:`model_kind` tells from its files (``model_index.json``: a
diffusers pipeline; ``config.json`` naming a ``…ForCausalLM``, or a ``.gguf`` file: a causal LM).

Text: greedy continuations of each prompt, written in the template the model was trained on
(``alpaca``, what ``moslora train`` and ``moslora eval`` use), the tokenizer's ``chat`` template, or
``raw``. The adapter runs as adapter layers (``"lora"``) or merged into the weights
(``"merged"``, :func:`moslora.merge_and_unload`); both give the same outputs up to fp32 round-off.

Images, from a DreamBooth adapter, two ways which give the same images:

- ``"lora"``: the adapter's diffusers export goes in through diffusers' own
  ``pipeline.load_lora_weights``, the path every diffusers user takes (the mixer is folded into
  A and the scaling into B, so diffusers' plain LoRA computes exactly the MoSLoRA update);
- ``"merged"``: the native adapter is loaded into the UNet and merged into its weights
  (:func:`moslora.merge_and_unload`), leaving a plain pipeline with no adapter at all.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from moslora.eval.evaluate import generate_responses
from moslora.io.atomic import atomic_write
from moslora.io.diffusers_format import DIFFUSERS_DIR
from moslora.io.diffusers_format import WEIGHTS_NAME as DIFFUSERS_WEIGHTS
from moslora.io.export import export_lora
from moslora.io.load import load_adapter
from moslora.io.native import CONFIG_NAME
from moslora.model.ops import merge_and_unload
from moslora.train.data import prompt as alpaca_prompt
from moslora.train.model import load_model

MODES = ("lora", "merged")
KINDS = ("causal-lm", "diffusers")
TEMPLATES = ("alpaca", "chat", "raw")
SUPPORTED = ("moslora generate supports causal LMs (a …ForCausalLM folder or Hub id, or a .gguf file) for text, "
             "and diffusers pipelines (a folder or Hub id with model_index.json) for images")


def model_kind(model: str) -> str:
    """``"causal-lm"`` or ``"diffusers"``, from the model's own files (a local folder, a ``.gguf``
    file, or a Hub id, whose two small index files are looked up); ``ValueError`` for anything else."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {model!r} does not exist")
        return "causal-lm"
    if path.is_dir():
        index, config = path / "model_index.json", path / "config.json"
    elif path.exists():
        raise ValueError(f"{model} is a file; {SUPPORTED}")
    else:
        index, config = _hub_file(model, "model_index.json"), _hub_file(model, "config.json")
    if index is not None and index.is_file():
        return "diffusers"
    if config is not None and config.is_file():
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return "causal-lm"
        raise ValueError(f"{model} is a {', '.join(architectures) or 'transformers model of no named class'}; {SUPPORTED}")
    raise ValueError(f"{model} has neither model_index.json (diffusers) nor config.json (transformers); {SUPPORTED}")


def _hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of the Hub model ``repo_id`` (from the cache when there), or ``None`` if it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
        raise FileNotFoundError(f"{repo_id!r} is not a local file or folder, and the Hub cannot be reached to look it "
                                "up (offline?); pass a local folder") from None
    except EntryNotFoundError:
        return None
    except (RepositoryNotFoundError, HFValidationError):
        raise FileNotFoundError(f"{repo_id!r} is neither a local file or folder nor a model on the Hub") from None


def adapted_causal_lm(model: str, adapter: str | os.PathLike | None = None, *, mode: str = "lora", precision: str = "auto",
                      quantize: str | None = None):
    """``(model, tokenizer)``: the causal LM ``model`` with the native ``adapter`` (when given)
    applied the ``mode`` way. ``"merged"`` dequantizes a quantized base first, so the merge is exact."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lm, tokenizer = load_model(model, precision=precision, quantize=quantize, for_training=False)
    if adapter is not None:
        load_adapter(lm, adapter, trainable=False)
        if mode == "merged":
            lm = merge_and_unload(lm, dequantize=True)
    if torch.cuda.is_available() and quantize is None:
        lm = lm.to("cuda")
    return lm.eval(), tokenizer


def complete(model, tokenizer, prompts: list[str], *, template: str = "alpaca", max_new_tokens: int = 128,
             batch_size: int = 8) -> list[str]:
    """Greedy continuations of ``prompts``, each written in ``template`` first: ``"alpaca"`` (the
    prompt is the instruction, in the format ``moslora train`` uses), ``"chat"`` (the user's
    message in the tokenizer's chat template) or ``"raw"`` (as is)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use --template alpaca or raw")
    if template == "alpaca":
        texts = [alpaca_prompt(p) for p in prompts]
    elif template == "chat":
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
    else:
        texts = list(prompts)
    padding_side = tokenizer.padding_side
    try:
        return generate_responses(model, tokenizer, texts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    finally:
        tokenizer.padding_side = padding_side


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
