"""The vision tasks of ``moslora train``: ``--task llava`` and ``--task dreambooth``.

``moslora train`` keeps its flags; this module adds the ones only these tasks have and runs them.
A flag is passed on to the task's recipe under its own name (``--vision-r`` → ``vision_r``); a
flag the chosen task has no use for is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

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
    llava.add_argument("--merged-output", help="also write the merged plain model (save_pretrained) here after training")
    dreambooth = p.add_argument_group("--task dreambooth")
    dreambooth.add_argument("--instance-prompt", help="the prompt naming the subject, e.g. 'a photo of sks dog'")
    dreambooth.add_argument("--resolution", type=int, help="training image size (default 1024)")


def run_task(args: argparse.Namespace) -> int:
    from moslora.hf import NonFiniteLossError
    from moslora.train.dreambooth import DreamBoothRecipe, train_dreambooth
    from moslora.train.llava import LlavaRecipe, train_llava

    recipe_cls = {"llava": LlavaRecipe, "dreambooth": DreamBoothRecipe}[args.task]
    fields = {f.name for f in dataclasses.fields(recipe_cls)}
    given = {name: value for name, value in vars(args).items() if name not in _NOT_RECIPE and value is not None}
    unused = sorted(name for name in given if name not in fields)
    if unused:
        raise ValueError(f"--{unused[0].replace('_', '-')} does not apply to --task {args.task}")
    if args.task == "dreambooth" and args.resume:
        raise ValueError("--resume is not supported for --task dreambooth (its checkpoints hold the adapter only)")
    try:
        if args.task == "dreambooth":
            train_dreambooth(recipe=args.config, **given)
        else:
            train_llava(recipe=args.config, resume=args.resume, **given)
    except NonFiniteLossError as e:
        print(f"moslora train: stopped: {e}", file=sys.stderr)
        return 1
    return 0
