"""``moslora export SRC OUT``: a MoSLoRA adapter directory as a plain LoRA adapter, exactly equal.

The mixer is folded into A (A' = M·A, so B·A' = B·M·A): the result has the same rank and loads
wherever LoRA does. No base model is loaded; this is tensor work on the adapter file only.
"""

from __future__ import annotations

import argparse

from moslora.io.export import FORMATS, export_lora


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export an adapter as plain LoRA for PEFT, vLLM or diffusers", description=__doc__)
    p.add_argument("src", help="adapter directory: native moslora, or the authors' PEFT-style checkpoint (lora_AB)")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", choices=FORMATS, default="peft", help="peft: adapter_config.json + adapter_model.safetensors; "
                   "diffusers: pytorch_lora_weights.safetensors (default: %(default)s)")  # fmt: skip
    p.add_argument("--prefix", default="unet", help="diffusers pipeline component, e.g. unet or transformer (default: %(default)s)")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default: the one SRC records)")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickled adapter_model.bin (only if you trust its source)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = export_lora(
        args.src, args.out, args.format, prefix=args.prefix, base_model_name_or_path=args.base_model, allow_pickle=args.allow_pickle
    )
    print(f"wrote a plain LoRA adapter ({args.format} format) to {out}")
    return 0
