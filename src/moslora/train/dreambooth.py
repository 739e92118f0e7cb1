"""DreamBooth subject-driven generation with MoSLoRA (the paper's §4.4), on a diffusers pipeline.

A few photos of one subject and an instance prompt (``"a photo of sks dog"``) teach the UNet the
subject: MoSLoRA adapters on the UNet's attention projections (``to_q``, ``to_k``, ``to_v``,
``to_out.0``) learn the denoising objective of DDPM,

    L = E_{x0, ε ~ N(0, I), t} ‖ ε_θ(√ᾱ_t·z0 + √(1-ᾱ_t)·ε, t, c) − ε ‖²,   z0 = VAE(x0)·scale,

with the target ε (or the velocity, for v-prediction models), c the frozen text encoders'
embedding of the instance prompt. The paper's setting is the default: SDXL base, r=4, AdamW at a
constant lr 1e-4, batch 1 with 4 accumulation steps, 500 steps, seed 0.

The loop is the one of diffusers' DreamBooth-LoRA example scripts, on ``accelerate`` (devices,
mixed precision, gradient accumulation, multi-GPU through ``accelerate launch``): frozen parts in
the mixed-precision dtype, the VAE in fp32 (SDXL's VAE overflows in fp16), adapters in fp32.
Stable Diffusion (1.x/2.x) and SDXL UNets are both handled; SDXL also gets its pooled text
embedding and size/crop conditioning.

Outputs under ``output``: the native adapter of the UNet, its diffusers export in
``diffusers_lora/`` (for ``pipeline.load_lora_weights``), adapter checkpoints, metrics and a loss curve.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moslora.hf.trainer import TRAINING_ARGS_JSON, NonFiniteLossError
from moslora.io.atomic import atomic_write_json
from moslora.io.diffusers_format import DIFFUSERS_DIR
from moslora.io.export import export_lora
from moslora.io.native import save_adapter
from moslora.model.inject import inject
from moslora.model.ops import parameter_counts
from moslora.train.recipe import RecipeBase, resolve_recipe
from moslora.train.report import plot_loss_curve
from moslora.train.run import LOSS_CURVE_PNG, METRICS_JSON

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class DreamBoothRecipe(RecipeBase):
    """Every knob of ``moslora train --task dreambooth``; the defaults are the paper's setting.

    ``data`` is a folder of subject images. ``batch_size`` is the effective batch over all
    processes, made of ``micro_batch_size`` images per forward and gradient accumulation.
    ``precision="auto"`` is bf16 mixed precision on a GPU that has it, fp16 on other GPUs, fp32 on CPU.
    """

    model: str | None = "stabilityai/stable-diffusion-xl-base-1.0"
    data: str | None = None
    output: str | None = None
    instance_prompt: str | None = None
    method: str = "moslora"
    mixer: str = "kaiming"
    r: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    max_steps: int = 500
    batch_size: int = 4
    micro_batch_size: int = 1
    resolution: int = 1024
    center_crop: bool = True
    save_steps: int = 500
    logging_steps: int = 10
    seed: int = 0
    precision: str = "auto"


@dataclass
class DreamBoothResult:
    """Where the run wrote (the native adapter is in ``output_dir`` itself, its diffusers export in
    ``diffusers_dir``), its final metrics and its recipe."""

    output_dir: Path
    diffusers_dir: Path
    metrics: dict[str, Any]
    recipe: DreamBoothRecipe


def mixed_precision(precision: str) -> str:
    """accelerate's ``mixed_precision`` for a recipe precision."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def instance_images(folder: str | os.PathLike) -> list[Path]:
    """The subject images of ``folder`` (sorted), refusing an empty folder or an unreadable image by name."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"instance image folder {str(folder)!r} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for path in paths:
        try:
            with Image.open(path) as im:
                im.size
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
    return paths


def prepare_image(path: Path, resolution: int, center_crop: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """An image as a 3×res×res tensor in [-1, 1], and SDXL's size conditioning
    (original height, width, crop top, left, target height, width)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    original = (im.height, im.width)
    scale = resolution / min(im.size)
    im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))), Image.BILINEAR)
    top = (im.height - resolution) // 2 if center_crop else 0
    left = (im.width - resolution) // 2 if center_crop else 0
    im = im.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, (*original, top, left, resolution, resolution)


def load_pipeline(name_or_path: str, *, dtype: torch.dtype = torch.float32):
    """A diffusers text-to-image pipeline (Stable Diffusion or SDXL) from a hub id or a local folder."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(name_or_path, dtype=dtype)


def _encode_prompt(pipe, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The frozen text conditioning of the instance prompt, computed once with the pipeline's own encoder."""
    with torch.no_grad():
        if _is_sdxl(pipe.unet):
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}
        embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
        return {"encoder_hidden_states": embeds}


def _is_sdxl(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def train_dreambooth(
    model: str | None = None,
    data: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    recipe: DreamBoothRecipe | str | os.PathLike | None = None,
    **overrides: Any,
) -> DreamBoothResult:
    """Teach a diffusers pipeline's UNet the subject in ``data`` with a MoSLoRA (or LoRA) adapter.

    ``recipe`` is a :class:`DreamBoothRecipe` or a YAML path; ``overrides`` are recipe fields that
    win over it. Returns where things went and the final metrics.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    recipe = resolve_recipe(recipe, DreamBoothRecipe, ("model", "data", "output", "instance_prompt"),
                            model=model, data=data, output=output, **overrides)
    out = Path(recipe.output)
    images = instance_images(recipe.data)

    # A transformers Trainer (or an Accelerator made earlier in this process) leaves accelerate's
    # process-wide state set with its own precision, and a new Accelerator then refuses the recipe's.
    # Forget that state (the process group, if any, stays) so this run gets the precision it asks for.
    AcceleratorState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=recipe.gradient_accumulation_steps(int(os.environ.get("WORLD_SIZE", 1))),
                              mixed_precision=mixed_precision(recipe.precision))
    set_seed(recipe.seed)  # before inject: A and M are drawn from it
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = load_pipeline(recipe.model, dtype=weight_dtype)  # frozen parts in the mixed-precision dtype
    device = accelerator.device
    if weight_dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)
    for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
        part = getattr(pipe, name, None)
        if part is not None:
            part.to(device).requires_grad_(False)
    unet = inject(pipe.unet, recipe.adapter_config())  # adapters in fp32 (adapter_dtype="float32"), on the base's device
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    condition = _encode_prompt(pipe, recipe.instance_prompt, device)
    with torch.no_grad():  # the instance set is small: encode it once, sample z0 from the cached distribution each step
        prepared = [prepare_image(p, recipe.resolution, recipe.center_crop) for p in images]
        moments = [pipe.vae.encode(pixels[None].to(device)).latent_dist for pixels, _ in prepared]
    time_ids = torch.tensor([ids for _, ids in prepared], dtype=torch.float32)
    scaling_factor, shift = pipe.vae.config.scaling_factor, getattr(pipe.vae.config, "shift_factor", None) or 0.0
    for name in ("text_encoder", "text_encoder_2"):  # no longer needed: free their memory
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)

    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, betas=(0.9, 0.999), weight_decay=recipe.weight_decay, eps=1e-8)
    data_order = torch.Generator().manual_seed(recipe.seed)
    loader = torch.utils.data.DataLoader(list(range(len(images))), batch_size=recipe.micro_batch_size, shuffle=True, generator=data_order)
    lr_scheduler = get_scheduler(recipe.lr_scheduler, optimizer, num_warmup_steps=recipe.warmup_steps * accelerator.num_processes,
                                 num_training_steps=recipe.max_steps * accelerator.num_processes)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    noise_gen = torch.Generator(device=device).manual_seed(recipe.seed + accelerator.process_index)

    if accelerator.is_main_process:
        atomic_write_json(out / TRAINING_ARGS_JSON, {"task": "dreambooth", "recipe": recipe.to_dict(), "world_size": accelerator.num_processes,
                                            "mixed_precision": accelerator.mixed_precision, "images": [str(p) for p in images]})
    log: list[dict[str, float]] = []
    step, window = 0, []
    start = time.perf_counter()
    unet.train()
    while step < recipe.max_steps:
        for index in loader:
            index = index.tolist()
            with accelerator.accumulate(unet):
                latents = torch.cat([moments[i].sample(generator=noise_gen) for i in index])
                latents = (latents - shift) * scaling_factor
                noise = torch.randn(latents.shape, generator=noise_gen, device=device)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=noise_gen, device=device)
                noisy = noise_scheduler.add_noise(latents, noise, t)
                kwargs = {"encoder_hidden_states": condition["encoder_hidden_states"].expand(latents.shape[0], -1, -1).to(weight_dtype)}
                if "text_embeds" in condition:
                    kwargs["added_cond_kwargs"] = {"text_embeds": condition["text_embeds"].expand(latents.shape[0], -1).to(weight_dtype),
                                                   "time_ids": time_ids[index].to(device, weight_dtype)}
                prediction = unet(noisy.to(weight_dtype), t, **kwargs).sample
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, t)
                else:
                    target = noise
                loss = F.mse_loss(prediction.float(), target.float())
                if not torch.isfinite(accelerator.gather(loss.detach()[None])).all():  # every process stops alike
                    raise NonFiniteLossError(f"the loss became non-finite (NaN or Inf) at step {step + 1}, before that step "
                                             "changed any weight; no adapter was saved for it")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, recipe.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            window.append(accelerator.gather(loss.detach()[None]).mean().item())
            if accelerator.sync_gradients:
                step += 1
                if step % recipe.logging_steps == 0 or step == recipe.max_steps:
                    log.append({"step": step, "loss": sum(window) / len(window), "learning_rate": lr_scheduler.get_last_lr()[0]})
                    window = []
                if step % recipe.save_steps == 0 and step < recipe.max_steps:  # every process: a sharded adapter is gathered
                    save_adapter(unet, out / f"checkpoint-{step}", base_model_name_or_path=recipe.model)
                if step >= recipe.max_steps:
                    break
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()

    counts = parameter_counts(accelerator.unwrap_model(unet))
    metrics = {
        "task": "dreambooth",
        "steps": step,
        "train_loss": log[-1]["loss"] if log else math.nan,
        "train_seconds": seconds,
        "images": len(images),
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "adapter_params": {"A": counts["A"], "M": counts["M"], "B": counts["B"]},
        "mixed_precision": accelerator.mixed_precision,
        "world_size": accelerator.num_processes,
        "method": recipe.method,
        "mixer": recipe.mixer_or_none,
        "log": log,
    }
    save_adapter(unet, out, base_model_name_or_path=recipe.model)  # every process: a sharded adapter is gathered
    if accelerator.is_main_process:
        export_lora(accelerator.unwrap_model(unet), out / DIFFUSERS_DIR, format="diffusers", prefix="unet")
        atomic_write_json(out / METRICS_JSON, metrics)
        curve = plot_loss_curve(log, out / LOSS_CURVE_PNG, title=f"DreamBooth {recipe.method} r={recipe.r}: {recipe.instance_prompt!r}")
        print(f"done: {step} steps in {seconds:.1f} s, final loss {metrics['train_loss']:.4f}, "
              f"{counts['trainable']:,} trainable parameters of {counts['total']:,}\n"
              f"  adapter        {out}\n  diffusers LoRA {out / DIFFUSERS_DIR}\n  metrics        {out / METRICS_JSON}"
              + (f"\n  loss curve     {curve}" if curve else ""))
    accelerator.end_training()
    return DreamBoothResult(out, out / DIFFUSERS_DIR, metrics, recipe)
