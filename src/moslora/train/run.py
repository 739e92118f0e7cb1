"""The one run/measure/save path of every Trainer-based task (causal LM, LLaVA).

A task loads its model and data; everything from there is here: the output folder and ``--resume``,
Trainer arguments from the recipe, the seed, injection of the recipe's adapters,
:class:`moslora.hf.AdapterTrainer`, the measured metrics, and the files a run leaves behind (final
adapter, arguments, metrics, loss curve, summary). Saving goes through the trainer, so it is the
same on every engine (a sharded adapter is gathered by all processes, process 0 writes).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from moslora.hf.state import last_checkpoint, read_trainer_state
from moslora.hf.trainer import TRAINING_ARGS_JSON, AdapterTrainer
from moslora.io.atomic import atomic_write_json
from moslora.model.groups import inject_groups
from moslora.model.sharded import sharding
from moslora.train.model import resolve_dtype
from moslora.train.progress import compact, on_terminal
from moslora.train.recipe import RecipeBase
from moslora.train.report import plot_loss_curve, summary

# What a run leaves in its output folder beside the adapter, the checkpoints and TRAINING_ARGS_JSON.
METRICS_JSON = "metrics.json"
LOSS_CURVE_PNG = "loss_curve.png"


@dataclass
class TrainResult:
    """Where a run wrote (the adapter is in ``output_dir`` itself), its final metrics, its recipe."""

    output_dir: Path
    metrics: dict[str, Any]
    recipe: RecipeBase


class LossAndLRBar(ProgressCallback):
    """Trainer's tqdm bar with the latest training loss and learning rate on it, compact off a
    terminal (:mod:`moslora.train.progress`)."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        compact(self.training_bar)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if on_terminal():  # the evaluation sub-bar only on a terminal
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            # refresh=False: the next step redraws it (and off a terminal each redraw would be kept).
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0.0):.2e}", refresh=False)
            return
        super().on_log(args, state, control, logs=logs, **kwargs)


def output_and_resume(recipe: RecipeBase, resume: bool) -> tuple[Path, Path | None]:
    """The run's output folder and the checkpoint to resume from (``None``: start afresh). Without
    ``resume`` an output folder that already has checkpoints is refused: it belongs to another run."""
    out = Path(recipe.output)
    found = last_checkpoint(out)
    if resume and found is None:
        print(f"--resume: no complete checkpoint in {out} yet; starting from the beginning")
    if not resume and found is not None:
        raise ValueError(f"{out} already has checkpoints; pass --resume to continue that run, or choose another --output")
    return out, found if resume else None


def inject_recipe(base: torch.nn.Module, recipe: RecipeBase) -> torch.nn.Module:
    """The recipe's adapters on ``base`` (A and M are drawn from the seed, set before)."""
    if getattr(recipe, "gradient_checkpointing", False):
        base.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    model = inject_groups(base, recipe.adapter_groups())
    model.config.use_cache = False
    return model


def training_arguments(recipe: RecipeBase, out: Path, *, warmup: float, eval_steps: int | None = None) -> TrainingArguments:
    """Trainer arguments from a recipe (any :class:`RecipeBase` with the shared training fields).

    ``warmup`` is a step count, or a float in [0, 1) for a share of the steps; ``eval_steps`` turns
    on a validation pass every that many steps."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dtype = resolve_dtype(recipe.precision)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=recipe.micro_batch_size,
        per_device_eval_batch_size=recipe.micro_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps(world_size),
        num_train_epochs=recipe.num_epochs,
        max_steps=recipe.max_steps if recipe.max_steps is not None else -1,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type=recipe.lr_scheduler,
        optim=recipe.optimizer,
        max_grad_norm=recipe.max_grad_norm,
        bf16=dtype == torch.bfloat16 and recipe.quantize is None,
        fp16=dtype == torch.float16 and recipe.quantize is None,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        seed=recipe.seed,
        data_seed=recipe.data_seed,
        activation_checkpointing=recipe.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )


def run_training(
    *,
    task: str,
    recipe: RecipeBase,
    model: torch.nn.Module,
    args: TrainingArguments,
    resume_from: Path | None,
    train_dataset: Any,
    data_collator: Any,
    eval_dataset: Any = None,
    callbacks: Iterable[TrainerCallback] = (),
    data_metrics: dict[str, Any],
    title: str,
    after_save: Callable[[Path], dict[str, Path]] | None = None,
) -> TrainResult:
    """Train ``model`` (injected) with :class:`moslora.hf.AdapterTrainer`, resuming from
    ``resume_from`` when given; write the final adapter, the arguments, the metrics (what the run
    measured plus ``data_metrics``) and the loss curve; print a summary. ``after_save(out)`` runs on
    the writing process after the adapter is saved and returns more outputs to list. Raises
    :class:`moslora.hf.NonFiniteLossError` if the loss stops being finite."""
    out = Path(args.output_dir)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             data_collator=data_collator, callbacks=list(callbacks), base_model_name_or_path=recipe.model)
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossAndLRBar)
    run_arguments = {"task": task, "recipe": recipe.to_dict(), "world_size": args.world_size,
                     "resumed_from": str(resume_from) if resume_from else None, "training_arguments": args.to_dict()}
    if args.should_save:
        atomic_write_json(out / TRAINING_ARGS_JSON, run_arguments)
    tokens_before = int(read_trainer_state(resume_from).get("num_input_tokens_seen", 0)) if resume_from else 0
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = int(trainer.state.num_input_tokens_seen) - tokens_before
    counts = trainer.parameter_counts
    metrics = {
        "task": task,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": logged[-1] if logged else result.training_loss,
        "mean_train_loss": result.training_loss,
        "eval_loss": trainer.evaluate()["eval_loss"] if eval_dataset is not None else None,
        "train_seconds": seconds,
        "tokens_seen": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else math.nan,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "adapter_params": {"A": counts["A"], "M": counts["M"], "B": counts["B"]},
        "world_size": args.world_size,
        "engine": trainer.engine,                               # what actually ran (accelerate turns FSDP on CPU into DDP)
        "adapter_sharding": sharding(trainer.model_wrapped),   # fsdp2, fsdp1, zero3, or None: whole on every process
        "method": recipe.method,
        "mixer": recipe.mixer_or_none,
        **data_metrics,
    }
    trainer.save_model(str(out))  # every process: a sharded adapter is gathered
    if args.should_save:
        written: dict[str, Path | None] = {"adapter": out}
        atomic_write_json(out / TRAINING_ARGS_JSON, run_arguments)  # save_model wrote Trainer's arguments alone there
        atomic_write_json(out / METRICS_JSON, metrics)
        written["metrics"] = out / METRICS_JSON
        written["arguments"] = out / TRAINING_ARGS_JSON
        written["loss curve"] = plot_loss_curve(trainer.state.log_history, out / LOSS_CURVE_PNG, title=title)
        written["checkpoints"] = last_checkpoint(out)
        if after_save is not None:
            written.update(after_save(out))
        print(summary(metrics, written))
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out, metrics, recipe)
