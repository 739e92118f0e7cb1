"""``moslora generate``: images from a diffusers pipeline with a DreamBooth adapter.

``--mode lora`` (default) loads the adapter's diffusers export with the pipeline's own
``load_lora_weights``; ``--mode merged`` merges the native adapter into the UNet first. Both give
the same images for the same ``--seed``.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate images with a DreamBooth adapter", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline: hub id or local folder (the one trained on)")
    p.add_argument("--adapter", required=True, help="output folder of moslora train --task dreambooth, a native adapter, "
                   "or a folder with pytorch_lora_weights.safetensors")  # fmt: skip
    p.add_argument("--prompt", required=True, nargs="+", help="one or more prompts, e.g. 'a photo of sks dog on the beach'")
    p.add_argument("--output", required=True, help="folder for the images (000.png, 001.png, …)")
    p.add_argument("--mode", choices=("lora", "merged"), default="lora", help="how the adapter is applied (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None, help="pipeline dtype (default: fp16 on GPU, fp32 on CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moslora.eval.generate import adapted_pipeline, generate, write_images

    precision = args.precision or ("fp16" if torch.cuda.is_available() else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    pipe = adapted_pipeline(args.model, args.adapter, mode=args.mode, dtype=dtype)
    images = generate(pipe, args.prompt, num_images=args.num_images, steps=args.steps, guidance_scale=args.guidance_scale,
                      seed=args.seed, height=args.height, width=args.width)
    paths = write_images(images, args.output)
    print(f"wrote {len(paths)} images ({args.mode}) to {args.output}")
    return 0
