"""Fine-tuning a causal LM with MoSLoRA on the transformers ``Trainer``.

The loop, mixed precision and distribution (DDP, FSDP, DeepSpeed through ``accelerate launch`` or
``torchrun``) are Trainer's. moslora adds only what Trainer cannot know:

- checkpoints hold the adapter (native safetensors format), never a copy of the base model, and
  the optimizer, scheduler and RNG states as safetensors + JSON rather than pickles;
- a guard that stops at the first non-finite gradient before it reaches the weights;
- the progress bar shows the loss and the learning rate;
- the outputs a run leaves behind: final adapter, arguments, metrics, loss curve, summary.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from moslora.io.atomic import atomic_write_json
from moslora.io.load import load_adapter
from moslora.io.native import save_adapter
from moslora.model.inject import inject
from moslora.model.ops import parameter_counts
from moslora.train import checkpoint as ckpt
from moslora.train.data import build_datasets
from moslora.train.model import load_model, resolve_dtype
from moslora.train.recipe import Recipe, resolve_recipe
from moslora.train.report import plot_loss_curve, summary

logger = logging.getLogger(__name__)

TRAINING_ARGS_JSON = "training_args.json"
METRICS_JSON = "metrics.json"
LOSS_CURVE_PNG = "loss_curve.png"


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or Inf loss (seen through its gradients) and stopped."""


class AdapterTrainer(Trainer):
    """``Trainer`` whose checkpoints are adapter-only and pickle-free.

    Overrides only Trainer's save/load hooks. Under DeepSpeed and FSDP the optimizer state is
    sharded and those engines write it themselves (with ``torch.save``); everything else is ours.
    """

    def __init__(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        # Trainer refuses a quantized model unless transformers' PEFT flag says adapters are
        # attached. Ours are (inject ran first); raise the flag for that check only.
        flag = getattr(model, "is_quantized", False) and "_hf_peft_config_loaded" not in vars(model)
        if flag:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if flag:
                del model._hf_peft_config_loaded

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        save_adapter(self.accelerator.unwrap_model(self.model), folder)
        atomic_write_json(folder / TRAINING_ARGS_JSON, self.args.to_dict())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_adapter(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)

    def _sharded_state(self) -> bool:
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._sharded_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            ckpt.save_optimizer(self.optimizer, Path(output_dir))
            ckpt.save_scheduler(self.lr_scheduler, Path(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and (Path(checkpoint) / ckpt.OPTIMIZER_TENSORS).is_file():
            ckpt.load_optimizer(self.optimizer, Path(checkpoint), device=self.args.device)
            ckpt.load_scheduler(self.lr_scheduler, Path(checkpoint))
        else:
            super()._load_optimizer_and_scheduler(checkpoint)

    def _rank(self) -> int | None:
        return None if self.args.world_size <= 1 else self.args.process_index

    def _save_rng_state(self, output_dir: str) -> None:
        ckpt.save_rng(Path(output_dir), self._rank())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and not ckpt.load_rng(Path(checkpoint), self._rank()):
            logger.warning("checkpoint %s has no RNG state for this process; the resumed run is not bit-identical", checkpoint)


class NonFiniteGuard(TrainerCallback):
    """Stops training at the first optimizer step whose gradients hold NaN or Inf.

    A non-finite loss always poisons the gradients, so checking them (once per optimizer step,
    after DDP has reduced them) catches it on every process alike. The bad step is cancelled by
    dropping the gradients (optimizers skip parameters without one), no checkpoint is written for
    it, and training stops, so the weights and the last checkpoint stay the last good ones.
    Not used with fp16, where the loss scaler skips such steps on purpose.
    """

    def __init__(self) -> None:
        self.bad_step: int | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self.bad_step = state.global_step + 1
            for p in model.parameters():
                p.grad = None
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            control.should_save = False
            control.should_evaluate = False
        return control


class LossAndLRBar(ProgressCallback):
    """Trainer's tqdm bar with the latest training loss and learning rate on it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0.0):.2e}")
            return
        super().on_log(args, state, control, logs=logs, **kwargs)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    recipe: Recipe


def train_causal_lm(
    model: str | None = None,
    data: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    recipe: Recipe | str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Iterable[TrainerCallback] = (),
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``model`` on ``data`` with a MoSLoRA (or LoRA) adapter; write everything under ``output``.

    ``recipe`` is a :class:`Recipe` or a YAML path; ``overrides`` are recipe fields that win over
    it. With ``resume`` the run continues from the last complete checkpoint in ``output`` and
    ends with the same adapter an uninterrupted run would have. Returns where things went and the
    final metrics; raises :class:`NonFiniteLossError` if the loss stops being finite.
    """
    recipe = resolve_recipe(recipe, Recipe, ("model", "data", "output"), model=model, data=data, output=output, **overrides)
    out = Path(recipe.output)
    resume_from = ckpt.last_checkpoint(out) if resume else None
    if resume and resume_from is None:
        print(f"--resume: no complete checkpoint in {out} yet; starting from the beginning")
    if not resume and ckpt.last_checkpoint(out) is not None:
        raise ValueError(f"{out} already has checkpoints; pass --resume to continue that run, or choose another --output")

    set_seed(recipe.seed)  # before inject: A and M are drawn from it
    base, tokenizer = load_model(recipe.model, precision=recipe.precision, quantize=recipe.quantize)
    if recipe.gradient_checkpointing:
        base.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    lm = inject(base, recipe.adapter_config())
    lm.config.use_cache = False

    args = training_arguments(recipe, out, warmup=recipe.warmup_steps,
                              eval_steps=recipe.eval_steps if recipe.val_set_size > 0 else None)
    datasets = build_datasets(
        tokenizer, recipe.data, cutoff_len=recipe.cutoff_len, val_set_size=recipe.val_set_size, seed=recipe.data_seed,
        train_on_inputs=recipe.train_on_inputs, add_eos_token=recipe.add_eos_token, skip_bad_rows=recipe.skip_bad_rows,
    )
    if args.should_save and (datasets.skipped_rows or datasets.dropped_no_response):
        print(f"data: {len(datasets.skipped_rows)} bad rows skipped"
              + (f" (rows {datasets.skipped_rows[:10]}{'…' if len(datasets.skipped_rows) > 10 else ''})" if datasets.skipped_rows else "")
              + f", {datasets.dropped_no_response} rows whose response was cut away by cutoff_len={recipe.cutoff_len}")
    # Right padding for training: Llama-style models derive positions from the cache, not the
    # mask, so left padding would shift every padded row's positions.
    tokenizer.padding_side = "right"
    guard = NonFiniteGuard()
    trainer = AdapterTrainer(
        model=lm,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.val,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, padding=True, return_tensors="pt"),
        callbacks=([] if args.fp16 else [guard]) + list(callbacks),
    )
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossAndLRBar)
    if args.should_save:
        atomic_write_json(out / TRAINING_ARGS_JSON, {"recipe": recipe.to_dict(), "world_size": args.world_size,
                                                    "resumed_from": str(resume_from) if resume_from else None,
                                                    "training_arguments": args.to_dict()})

    metrics = run_and_measure(trainer, guard, out, resume_from, lm)
    metrics.update({
        "eval_loss": trainer.evaluate()["eval_loss"] if datasets.val is not None else None,
        "train_rows": len(datasets.train),
        "val_rows": len(datasets.val) if datasets.val is not None else 0,
        "skipped_rows": len(datasets.skipped_rows),
        "dropped_no_response": datasets.dropped_no_response,
        "method": recipe.method,
        "mixer": recipe.mixer_or_none,
    })
    written: dict[str, Path | None] = {}
    if args.should_save:
        written["adapter"] = save_adapter(lm, out, base_model_name_or_path=recipe.model)
        atomic_write_json(out / METRICS_JSON, metrics)
        written["metrics"] = out / METRICS_JSON
        written["arguments"] = out / TRAINING_ARGS_JSON
        written["loss curve"] = plot_loss_curve(trainer.state.log_history, out / LOSS_CURVE_PNG,
                                                title=f"{recipe.method} r={recipe.r} on {Path(recipe.data).name}")
        written["checkpoints"] = ckpt.last_checkpoint(out)
        print(summary(metrics, written))
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out, out, metrics, recipe)


def training_arguments(recipe: Any, out: Path, *, warmup: float, eval_steps: int | None = None) -> TrainingArguments:
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


def run_and_measure(trainer: Trainer, guard: Any, out: Path, resume_from: Path | None, model: torch.nn.Module) -> dict[str, Any]:
    """Run ``trainer`` (resuming from ``resume_from`` when given) and return the metrics every run
    reports: steps, losses, time, throughput and parameter counts. Raises
    :class:`NonFiniteLossError` naming the step and the last good checkpoint when ``guard`` saw a
    non-finite loss."""
    tokens_before = int(ckpt.read_trainer_state(resume_from).get("num_input_tokens_seen", 0)) if resume_from else 0
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    if guard.bad_step is not None:
        last = ckpt.last_checkpoint(out)
        raise NonFiniteLossError(
            f"the loss became non-finite (NaN or Inf) at step {guard.bad_step}; training stopped before that step "
            f"changed any weight. Last good checkpoint: {last if last else 'none (no checkpoint was saved yet)'}. "
            "Try a lower learning rate, fp32/bf16 instead of fp16, or check the data around that step."
        )
    counts = parameter_counts(model)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = int(trainer.state.num_input_tokens_seen) - tokens_before
    return {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": logged[-1] if logged else result.training_loss,
        "mean_train_loss": result.training_loss,
        "train_seconds": seconds,
        "tokens_seen": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else math.nan,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "adapter_params": {"A": counts["A"], "M": counts["M"], "B": counts["B"]},
        "world_size": trainer.args.world_size,
    }
