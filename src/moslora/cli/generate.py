"""``moslora generate``: text from a causal LM, or images from a diffusers pipeline, with a MoSLoRA adapter.

Which one is found from the model's files: a folder or Hub id whose config.json names a
…ForCausalLM (or a .gguf file) is a causal LM; one with model_index.json is a diffusers pipeline.
Other kinds of model are not supported.

Causal LM: each --prompt gets a greedy continuation, printed (and written to --output as JSON).
The prompt is written in --template first: alpaca (default) is the format moslora train and
moslora eval use, chat the tokenizer's chat template, raw the prompt as is. --adapter is optional
(without it, the base model answers).

Diffusers (a DreamBooth adapter): --mode lora (default) loads the adapter's diffusers export with
the pipeline's own load_lora_weights; --mode merged merges the native adapter into the UNet first.
Both give the same images for the same --seed. --adapter and --output (a folder) are required.

For a causal LM, --mode merged adds the adapter into the weights first; the text is the same.
"""

from __future__ import annotations

import argparse

from moslora.cli.extras import require, require_for_model
from moslora.cli.inputs import check_inputs

# Flags that only one kind of model takes (argparse default None = not given).
_TEXT_ONLY = ("max_new_tokens", "template", "quantize")
_IMAGE_ONLY = ("num_images", "steps", "guidance_scale", "seed", "height", "width")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text (causal LM) or images (diffusers) with an adapter",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="causal LM (folder, Hub id or .gguf file) or diffusers pipeline (folder or Hub id)")
    p.add_argument("--adapter", help="native moslora adapter, or the output folder of moslora train (required for images; "
                   "for images also a folder with pytorch_lora_weights.safetensors)")  # fmt: skip
    p.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
    p.add_argument("--output", help="causal LM: a JSON file of prompts and responses (optional); images: a folder for "
                   "000.png, 001.png, … (required)")  # fmt: skip
    p.add_argument("--mode", choices=("lora", "merged"), default="lora", help="how the adapter is applied (default: %(default)s)")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="model dtype (default auto: fp32 on CPU; bf16 for a causal LM, fp16 for a pipeline, on a GPU)")
    text = p.add_argument_group("causal LM")
    text.add_argument("--max-new-tokens", type=int, help="length of each response in tokens (default: 128)")
    text.add_argument("--template", choices=("alpaca", "chat", "raw"), help="how the prompt is written (default: alpaca)")
    text.add_argument("--quantize", choices=("4bit",), help="load the base model in 4 bits (bitsandbytes)")
    images = p.add_argument_group("diffusers pipeline")
    images.add_argument("--num-images", type=int, help="images per prompt (default: 1)")
    images.add_argument("--steps", type=int, help="denoising steps (default: 30)")
    images.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: 7.5)")
    images.add_argument("--seed", type=int, help="noise seed (default: 0)")
    images.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    images.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require("hf", "transformers")
    check_inputs(None, adapter=args.adapter)
    from moslora.eval.generate import model_kind

    kind = model_kind(args.model)
    wrong = [name for name in (_IMAGE_ONLY if kind == "causal-lm" else _TEXT_ONLY) if getattr(args, name) is not None]
    if wrong:
        raise ValueError(f"--{wrong[0].replace('_', '-')} does not apply to {args.model}, a {kind} model")
    return _text(args) if kind == "causal-lm" else _images(args)


def _text(args: argparse.Namespace) -> int:
    require_for_model(args.model, args.quantize)
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    check_inputs(args.model, args.quantize)
    from moslora.eval.generate import adapted_causal_lm, complete
    from moslora.io.atomic import atomic_write_json

    lm, tokenizer = adapted_causal_lm(args.model, args.adapter, mode=args.mode, precision=args.precision, quantize=args.quantize)
    responses = complete(lm, tokenizer, args.prompt, template=args.template or "alpaca", max_new_tokens=args.max_new_tokens or 128)
    for prompt, response in zip(args.prompt, responses):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(response.strip())
    if args.output:
        atomic_write_json(args.output, [{"prompt": p, "response": r} for p, r in zip(args.prompt, responses)])
    return 0


def _images(args: argparse.Namespace) -> int:
    require("diffusers", "diffusers", "transformers", "accelerate", "PIL")
    if args.adapter is None or args.output is None:
        raise ValueError(f"{args.model} is a diffusers pipeline: --adapter and --output (a folder for the images) are required")
    import torch

    from moslora.eval.generate import adapted_pipeline, generate, write_images

    precision = "fp16" if args.precision == "auto" and torch.cuda.is_available() else args.precision.replace("auto", "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    pipe = adapted_pipeline(args.model, args.adapter, mode=args.mode, dtype=dtype)
    images = generate(pipe, args.prompt, num_images=args.num_images or 1, steps=args.steps or 30,
                      guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale, seed=args.seed or 0,
                      height=args.height, width=args.width)
    paths = write_images(images, args.output)
    print(f"wrote {len(paths)} images ({args.mode}) to {args.output}")
    return 0
