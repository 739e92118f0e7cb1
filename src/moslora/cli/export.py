"""``moslora export SRC OUT``: a MoSLoRA adapter directory as a plain LoRA adapter, exactly equal;
or, with ``--merged``, the base model with the adapter merged in, for serving.

Plain LoRA: the mixer is folded into A (A' = M·A, so B·A' = B·M·A): the result has the same rank
and loads wherever LoRA does. No base model is loaded; this is tensor work on the adapter file only.
``--format peft-mixer`` keeps the mixer instead: the PEFT route's folder, for ``moslora.peft``.

``--merged``: the base causal LM (``--base-model``, default the one SRC records) is loaded, the
adapter added into its weights, and the plain model saved with ``save_pretrained``:
``AutoModelForCausalLM.from_pretrained(OUT)`` gives the adapted model's outputs. A GGUF or
quantized base is dequantized first, so the merged model is full precision.
"""

from __future__ import annotations

import argparse

from moslora.cli.extras import require, require_for_model
from moslora.config import PEFT_TASK_TYPES
from moslora.io.export import FORMATS, export_lora


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export an adapter as plain LoRA (PEFT, vLLM, diffusers) or a merged model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="adapter directory: native moslora, a PEFT-route folder (moslora.peft), or the authors' "
                   "PEFT-style checkpoint (lora_AB)")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", choices=FORMATS, default=None, help="peft: adapter_config.json + adapter_model.safetensors; "
                   "peft-mixer: the same with the mixer kept, for moslora.peft (linear layers); "
                   "diffusers: pytorch_lora_weights.safetensors (default: peft)")  # fmt: skip
    p.add_argument("--prefix", default=None, help="diffusers pipeline component, e.g. unet or transformer (default: unet)")
    p.add_argument("--base-model", default=None, help="the base model: recorded in the export, or with --merged the one to "
                   "merge into (default: the one SRC records)")  # fmt: skip
    p.add_argument("--task-type", choices=PEFT_TASK_TYPES, default=None,
                   help="PEFT's task type to record, so AutoPeftModelFor… loads the export (default: the one SRC records)")
    p.add_argument("--merged", action="store_true", help="write the base model with the adapter merged in (save_pretrained)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="--merged: dtype of the merged weights (default: fp32)")
    p.add_argument("--allow-pickle", action="store_true", help="read a pickled adapter_model.bin (only if you trust its source)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.merged:
        return _run_merged(args)
    if args.precision is not None:
        raise ValueError("--precision applies to --merged only")
    fmt = args.format or "peft"
    if args.prefix is not None and fmt != "diffusers":
        raise ValueError("--prefix applies to --format diffusers only")
    out = export_lora(args.src, args.out, fmt, prefix=args.prefix or "unet", base_model_name_or_path=args.base_model,
                      task_type=args.task_type, allow_pickle=args.allow_pickle)
    what = "a PEFT-route adapter with its mixer, for moslora.peft," if fmt == "peft-mixer" else f"a plain LoRA adapter ({fmt} format)"
    print(f"wrote {what} to {out}")
    return 0


def _run_merged(args: argparse.Namespace) -> int:
    unused = [flag for flag, value in (("--format", args.format), ("--prefix", args.prefix), ("--task-type", args.task_type)) if value]
    if unused:
        raise ValueError(f"{unused[0]} does not apply to --merged (it writes a whole model, not an adapter)")
    require("hf", "transformers", "accelerate", for_="--merged")
    from moslora.train.merged import check_merged_export, export_merged

    base = check_merged_export(args.src, args.out, args.base_model)
    require_for_model(base)
    out = export_merged(args.src, args.out, base, precision=args.precision or "fp32", allow_pickle=args.allow_pickle)
    print(f"wrote {base} with the adapter of {args.src} merged in to {out}; load it with AutoModelForCausalLM.from_pretrained")
    return 0
