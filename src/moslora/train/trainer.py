"""Fine-tuning a causal LM with MoSLoRA on instruction data (``moslora train``).

The loop, mixed precision and distribution (DDP, FSDP, DeepSpeed through ``accelerate launch`` or
``torchrun``) are Trainer's, through :class:`moslora.hf.AdapterTrainer` (adapter-only, pickle-free
checkpoints, resume, the non-finite guard); this module only loads the model and the data and hands
them to the shared run of :mod:`moslora.train.run`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from transformers import DataCollatorForSeq2Seq, TrainerCallback, set_seed

from moslora.hf import AdapterTrainer  # noqa: F401 - compare/runner.py imports it from here; it lives in moslora.hf
from moslora.io.atomic import check_new_directory
from moslora.train.data import build_datasets
from moslora.train.merged import export_merged
from moslora.train.model import load_model
from moslora.train.recipe import Recipe, resolve_recipe
from moslora.train.run import TrainResult, inject_recipe, output_and_resume, run_training, training_arguments


def train_causal_lm(
    model: str | None = None,
    data: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    recipe: Recipe | str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Iterable[TrainerCallback] = (),
    merged_output: str | os.PathLike | None = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``model`` on ``data`` with a MoSLoRA (or LoRA) adapter; write everything under ``output``.

    ``recipe`` is a :class:`Recipe` or a YAML path; ``overrides`` are recipe fields that win over
    it. With ``resume`` the run continues from the last complete checkpoint in ``output`` and
    ends with the same adapter an uninterrupted run would have. Returns where things went and the
    final metrics; raises :class:`moslora.hf.NonFiniteLossError` if the loss stops being finite. With
    ``merged_output`` the base with the adapter merged in is saved there too (:func:`export_merged`).
    """
    recipe = resolve_recipe(recipe, Recipe, ("model", "data", "output"), model=model, data=data, output=output, **overrides)
    out, resume_from = output_and_resume(recipe, resume)
    if merged_output is not None:
        check_new_directory(merged_output)

    set_seed(recipe.seed)  # before inject: A and M are drawn from it
    base, tokenizer = load_model(recipe.model, precision=recipe.precision, quantize=recipe.quantize)
    lm = inject_recipe(base, recipe)
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
    return run_training(
        task="causal-lm", recipe=recipe, model=lm, args=args, resume_from=resume_from,
        train_dataset=datasets.train, eval_dataset=datasets.val,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, padding=True, return_tensors="pt"),
        callbacks=callbacks,
        data_metrics={"train_rows": len(datasets.train), "val_rows": len(datasets.val) if datasets.val is not None else 0,
                      "skipped_rows": len(datasets.skipped_rows), "dropped_no_response": datasets.dropped_no_response},
        title=f"{recipe.method} r={recipe.r} on {Path(recipe.data).name}",
        after_save=None if merged_output is None else
        lambda out: {"merged model": export_merged(out, merged_output, recipe.model, precision=recipe.precision)},
    )
