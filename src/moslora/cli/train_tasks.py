"""The vision tasks of ``moslora train``: ``--task llava`` and ``--task dreambooth``.

``moslora train`` keeps its flags; this module adds the ones only these tasks have and runs them.
A flag is passed on to the task's recipe under its own name (``--vision-r`` → ``vision_r``); a
flag the chosen task has no use for is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from moslora.cli.extras import require
from moslora.cli.inputs import check_inputs

TASKS = ("causal-lm", "llava", "dreambooth")
# What argparse puts in the namespace that is not a recipe field.
_NOT_RECIPE = {"command", "func", "task", "config", "resume"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASKS, default="causal-lm",
                   help="causal-lm (default): instruction tuning; llava: visual instruction tuning of a "
                        "LlavaForConditionalGeneration (--data is LLaVA conversation JSON); dreambooth: a diffusers "
                        "pipeline's UNet on a folder of subject images (--data is that folder)")  # fmt: skip
    llava = p.add_argument_group("--task llava")
    llava.add_argument("--image-folder", help="folder the rows' image paths are relative to")
    llava.add_argument("--vision-r", type=int, help="vision tower adapter rank (default 64; 0: no vision adapter)")
    llava.add_argument("--vision-alpha", type=float, help="vision tower scaling numerator (default 16)")
    llava.add_argument("--vision-dropout", type=float, help="vision tower adapter dropout (default 0.05)")
    llava.add_argument("--vision-target-modules", nargs="+", help="vision tower layers (default all-linear)")
    llava.add_argument("--warmup-ratio", type=float, help="share of the steps with linear warmup (default 0.03)")
    llava.add_argument("--template", choices=("llava-v1", "chat"), help="conversation format: LLaVA-1.5's USER/ASSISTANT "
                       "(default) or the processor's own chat template")  # fmt: skip
    dreambooth = p.add_argument_group("--task dreambooth")
    dreambooth.add_argument("--instance-prompt", help="the prompt naming the subject, e.g. 'a photo of sks dog'")
    dreambooth.add_argument("--resolution", type=int, help="training image size (default 1024)")


def run_task(args: argparse.Namespace) -> int:
    if args.task == "dreambooth":
        require("diffusers", "diffusers", "transformers", "accelerate", "PIL")
    else:
        require("train", "transformers", "accelerate", "PIL", "tqdm")
    if args.config is not None:
        require("train", "yaml", for_="--config")
    from moslora.hf import NonFiniteLossError
    from moslora.train.dreambooth import DreamBoothRecipe, train_dreambooth
    from moslora.train.llava import LlavaRecipe, train_llava
    from moslora.train.recipe import load_recipe

    recipe_cls = {"llava": LlavaRecipe, "dreambooth": DreamBoothRecipe}[args.task]
    fields = {f.name for f in dataclasses.fields(recipe_cls)}
    given = {name: value for name, value in vars(args).items() if name not in _NOT_RECIPE and value is not None}
    unused = sorted(name for name in given if name not in fields)
    if unused:
        raise ValueError(f"--{unused[0].replace('_', '-')} does not apply to --task {args.task}")
    recipe = load_recipe(args.config, cls=recipe_cls, **given)
    if args.task == "dreambooth":
        check_inputs(recipe.model, data_folder=recipe.data)
        if args.resume:
            raise ValueError("--resume is not supported for --task dreambooth (its checkpoints hold the adapter only)")
    else:
        check_inputs(recipe.model, recipe.quantize, data=recipe.data, merged_output=recipe.merged_output)
        if recipe.image_folder is not None and not Path(recipe.image_folder).is_dir():
            raise FileNotFoundError(f"--image-folder: folder {recipe.image_folder!r} does not exist")
    try:
        if args.task == "dreambooth":
            train_dreambooth(recipe=args.config, **given)
        else:
            train_llava(recipe=args.config, resume=args.resume, **given)
    except NonFiniteLossError as e:
        print(f"moslora train: stopped: {e}", file=sys.stderr)
        return 1
    return 0

