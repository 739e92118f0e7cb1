"""``moslora train``: fine-tune a causal LM with a MoSLoRA (or LoRA) adapter on instruction data.

Paper defaults, overridden by ``--config recipe.yaml``, overridden by flags. Runs on one CPU or
GPU as is, and on many GPUs through ``accelerate launch`` or ``torchrun`` (the transformers
Trainer does the distribution). Writes adapter-only checkpoints, the final adapter, the training
arguments and metrics (JSON) and a loss curve (PNG) under ``--output``.
"""

from __future__ import annotations

import argparse
import sys

from moslora.cli import train_tasks
from moslora.cli.extras import require
from moslora.cli.inputs import check_inputs
from moslora.config import MIXERS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="fine-tune a causal LM with MoSLoRA or LoRA", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: hub id, local folder, or a .gguf file")
    p.add_argument("--data", help="JSON or JSONL rows {instruction, input, output, answer}")
    p.add_argument("--output", help="folder for checkpoints, the final adapter, metrics and the loss curve")
    p.add_argument("--config", help="YAML recipe (see recipes/); flags override it")
    p.add_argument("--method", choices=("moslora", "lora"), help="lora = the same adapter without the mixer")
    p.add_argument("--mixer", choices=MIXERS, help="mixer kind for --method moslora (default kaiming)")
    # --rank too: torchrun reads a bare --r as an abbreviation of its own --rdzv-* options
    p.add_argument("--r", "--rank", dest="r", type=int, help="rank (default 16)")
    p.add_argument("--alpha", type=float, help="scaling numerator (default 32)")
    p.add_argument("--dropout", type=float, help="adapter input dropout (default 0.05)")
    p.add_argument("--target-modules", nargs="+", help="layer names (default q_proj k_proj v_proj up_proj down_proj)")
    p.add_argument("--learning-rate", "--lr", type=float, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--num-epochs", type=float, help="epochs (default 3)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides epochs)")
    p.add_argument("--batch-size", type=int, help="effective batch over all processes (default 16)")
    p.add_argument("--micro-batch-size", type=int, help="per-process batch per forward (default 4)")
    p.add_argument("--cutoff-len", type=int, help="max tokens of prompt + response (default 256)")
    p.add_argument("--val-set-size", type=int, help="rows held out for validation loss (default 120)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 100)")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 80)")
    p.add_argument("--eval-steps", type=int, help="validation loss every N steps (default 80)")
    p.add_argument("--logging-steps", type=int, help="log the loss every N steps (default 10)")
    p.add_argument("--seed", type=int, help="seed for the adapter's init and dropout (default 42)")
    p.add_argument("--data-seed", type=int, help="seed for the validation split and data order (default 42)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="training precision (default auto)")
    p.add_argument("--quantize", choices=("4bit",), help="QLoRA: NF4 base weights through bitsandbytes")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory")
    p.add_argument("--train-on-inputs", action="store_true", default=None, help="also compute the loss on prompt tokens")
    p.add_argument("--skip-bad-rows", action="store_true", default=None, help="skip (and count) rows with missing fields")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --output")
    p.add_argument("--merged-output", help="also write the base model with the adapter merged in (save_pretrained) to this "
                   "new folder after training, for serving (causal-lm, llava)")  # fmt: skip
    train_tasks.add_arguments(p)  # --task and the flags of the vision tasks
    p.set_defaults(func=run)


_RECIPE_FLAGS = (
    "method", "mixer", "r", "alpha", "dropout", "target_modules", "learning_rate", "num_epochs", "max_steps",
    "batch_size", "micro_batch_size", "cutoff_len", "val_set_size", "warmup_steps", "save_steps", "eval_steps",
    "logging_steps", "seed", "data_seed", "precision", "quantize", "gradient_checkpointing", "train_on_inputs",
    "skip_bad_rows",
)


def run(args: argparse.Namespace) -> int:
    if args.task != "causal-lm":
        return train_tasks.run_task(args)
    require("train", "transformers", "accelerate", "datasets", "tqdm")
    if args.config is not None:
        require("train", "yaml", for_="--config")
    from moslora.train.recipe import Recipe, resolve_recipe

    # Everything that can be checked is, before a model loads: the recipe, the files, the extras.
    overrides = {name: getattr(args, name) for name in _RECIPE_FLAGS}
    recipe = resolve_recipe(args.config, Recipe, ("model", "data", "output"), model=args.model, data=args.data,
                            output=args.output, **overrides)
    check_inputs(recipe.model, recipe.quantize, data=recipe.data, merged_output=args.merged_output)
    from moslora.train import NonFiniteLossError, train_causal_lm

    try:
        train_causal_lm(recipe=recipe, resume=args.resume, merged_output=args.merged_output)
    except NonFiniteLossError as e:
        print(f"moslora train: stopped: {e}", file=sys.stderr)
        return 1
    return 0

