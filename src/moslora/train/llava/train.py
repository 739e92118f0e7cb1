"""Training LLaVA with MoSLoRA adapter groups: the model and data of this task, handed to the
shared run of :mod:`moslora.train.run` (the adapter groups are saved as a groups directory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from transformers import set_seed

from moslora.io.atomic import check_new_directory

from moslora.train.llava.data import ConversationCollator, ConversationDataset, read_conversations
from moslora.train.llava.model import export_merged_llava, load_llava
from moslora.train.llava.recipe import LlavaRecipe
from moslora.train.recipe import resolve_recipe
from moslora.train.run import TrainResult, inject_recipe, output_and_resume, run_training, training_arguments


def train_llava(
    model: str | None = None,
    data: str | os.PathLike | None = None,
    image_folder: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    recipe: LlavaRecipe | str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Iterable[Any] = (),
    **overrides: Any,
) -> TrainResult:
    """Visual instruction tuning of a LLaVA model with MoSLoRA (or LoRA) adapter groups.

    ``recipe`` is a :class:`LlavaRecipe` or a YAML path; ``overrides`` are recipe fields that win
    over it. Returns a :class:`moslora.train.TrainResult`; the adapter groups are in its
    ``output_dir`` (load them with :func:`moslora.load_adapter_groups`).
    """
    recipe = resolve_recipe(recipe, LlavaRecipe, ("model", "data", "image_folder", "output"),
                            model=model, data=data, image_folder=image_folder, output=output, **overrides)
    out, resume_from = output_and_resume(recipe, resume)
    if recipe.merged_output is not None:
        check_new_directory(recipe.merged_output)  # before hours of training, not after

    set_seed(recipe.seed)  # before inject: A and M are drawn from it
    base, processor = load_llava(recipe.model, precision=recipe.precision, quantize=recipe.quantize)
    rows = read_conversations(recipe.data, recipe.image_folder, image_token=processor.image_token, skip_bad_rows=recipe.skip_bad_rows)
    dataset = ConversationDataset(processor, rows.rows, system_prompt=recipe.system_prompt, cutoff_len=recipe.cutoff_len, template=recipe.template)
    if len(dataset) == 0:
        raise ValueError(f"{rows.path}: every row's answers are cut away by cutoff_len={recipe.cutoff_len}")
    lm = inject_recipe(base, recipe)
    args = training_arguments(recipe, out, warmup=recipe.warmup_ratio)  # a float in [0, 1) is a share of the steps
    if args.should_save and (rows.skipped or dataset.dropped):
        print(f"data: {len(rows.skipped)} bad rows skipped"
              + (f" (rows {rows.skipped[:10]}{'…' if len(rows.skipped) > 10 else ''})" if rows.skipped else "")
              + f", {dataset.dropped} rows whose answers were cut away by cutoff_len={recipe.cutoff_len}")

    def merged(out: Path) -> dict[str, Path]:
        if recipe.merged_output is None:
            return {}
        return {"merged model": export_merged_llava(recipe.model, out, recipe.merged_output, precision=recipe.precision)}

    return run_training(
        task="llava", recipe=recipe, model=lm, args=args, resume_from=resume_from, train_dataset=dataset,
        data_collator=ConversationCollator(processor.tokenizer.pad_token_id), callbacks=callbacks,
        data_metrics={"train_rows": len(dataset), "skipped_rows": len(rows.skipped), "dropped_no_response": dataset.dropped},
        title=f"LLaVA {recipe.method} r={recipe.r}/{recipe.vision_r} on {Path(recipe.data).name}",
        after_save=merged,
    )
