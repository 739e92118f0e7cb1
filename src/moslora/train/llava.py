"""Visual instruction tuning of LLaVA with MoSLoRA (the paper's §4.3), on the transformers Trainer.

The model is transformers' ``LlavaForConditionalGeneration``: a CLIP-style vision tower, a
projector, and a causal LM. As in the paper (which follows LLaVA-1.5 through XTuner), the language
model and the vision tower get adapters with separate settings, as two adapter groups
(:mod:`moslora.model.groups`): LLM r=64, alpha=128; vision r=64, alpha=16; dropout 0.05; AdamW at
lr 2e-5 for one epoch, 3% linear warmup then cosine decay; optionally a 4-bit NF4 language model
with double quantization (QLoRA; the vision tower and projector stay in full precision).

Data is LLaVA's conversation JSON (a list, or JSON Lines)::

    {"image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}

with ``image`` relative to an image folder. Each row becomes LLaVA-1.5's conversation template
(``<system> USER: <question> ASSISTANT: <answer></s>USER: ...``), or the processor's own chat
template with ``template="chat"``; the loss sees only the answers and their end-of-turn tokens.

Outputs under ``output``: the adapter groups (:mod:`moslora.io.groups`), adapter-only
checkpoints, metrics, a loss curve; :func:`export_merged_llava` writes a plain model for
evaluation tools.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

from moslora.config import ALL_LINEAR, MIXERS, MoSLoRAConfig
from moslora.io.atomic import atomic_write_json
from moslora.io.groups import save_adapter_groups
from moslora.io.load import load_adapter_groups
from moslora.model.groups import inject_groups
from moslora.model.ops import merge_and_unload
from moslora.train import checkpoint as ckpt
from moslora.train.data import IGNORE_INDEX
from moslora.train.model import keep_4bit_trainable_on_cpu, resolve_dtype
from moslora.train.recipe import METHODS, PRECISIONS, QUANTIZE, RecipeBase, _number, resolve_recipe
from moslora.train.report import plot_loss_curve, summary
from moslora.train.trainer import (
    LOSS_CURVE_PNG,
    METRICS_JSON,
    TRAINING_ARGS_JSON,
    AdapterTrainer,
    LossAndLRBar,
    NonFiniteGuard,
    TrainResult,
    run_and_measure,
    training_arguments,
)

LANGUAGE_MODEL = "model.language_model"
VISION_TOWER = "model.vision_tower"
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ROLES = ("human", "gpt")  # LLaVA's speaker names: question, answer


@dataclass
class LlavaRecipe(RecipeBase):
    """Every knob of ``moslora train --task llava``; the defaults are the paper's LLaVA setting.

    ``r``/``alpha``/``dropout``/``target_modules`` set the language model's adapter, ``vision_*``
    the vision tower's (``vision_r=0`` leaves the tower frozen and unadapted). Targets are matched
    inside each submodule; ``"all-linear"`` takes every linear layer of it. ``batch_size`` is the
    effective batch over all processes, ``warmup_ratio`` the share of steps with linear warmup.
    ``template`` is ``"llava-v1"`` (LLaVA-1.5's ``USER: … ASSISTANT: …``) or ``"chat"`` (the
    processor's own chat template, for LLaVA models trained with another one, e.g. Llama-3's).
    ``merged_output``, when set, is where the merged plain model goes after training
    (:func:`export_merged_llava`). The projector stays frozen.
    """

    model: str | None = None
    data: str | None = None
    image_folder: str | None = None
    output: str | None = None
    method: str = "moslora"
    mixer: str = "kaiming"
    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    target_modules: list[str] | str = ALL_LINEAR
    vision_r: int = 64
    vision_alpha: float = 16.0
    vision_dropout: float = 0.05
    vision_target_modules: list[str] | str = ALL_LINEAR
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    num_epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 128
    micro_batch_size: int = 16
    cutoff_len: int = 2048
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw_torch"
    max_grad_norm: float = 1.0
    template: str = "llava-v1"
    system_prompt: str = LLAVA_SYSTEM
    save_steps: int = 500
    logging_steps: int = 10
    save_total_limit: int | None = 2
    seed: int = 42
    data_seed: int = 42
    precision: str = "auto"
    quantize: str | None = None
    gradient_checkpointing: bool = False
    skip_bad_rows: bool = False
    merged_output: str | None = None

    def __post_init__(self) -> None:
        for name in ("alpha", "dropout", "vision_alpha", "vision_dropout", "learning_rate", "weight_decay",
                     "num_epochs", "max_grad_norm", "warmup_ratio"):
            setattr(self, name, _number(name, getattr(self, name)))
        if self.method not in METHODS:
            raise ValueError(f"recipe: method must be one of {METHODS}, got {self.method!r}")
        if self.mixer not in MIXERS:
            raise ValueError(f"recipe: mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"recipe: quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"recipe: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"recipe: template must be one of {tuple(TEMPLATES)}, got {self.template!r}")
        for name in ("batch_size", "micro_batch_size", "cutoff_len", "save_steps", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"recipe: {name} must be a positive integer, got {value!r}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"recipe: batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"recipe: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"recipe: max_steps must be positive, got {self.max_steps}")
        if isinstance(self.vision_r, bool) or not isinstance(self.vision_r, int) or self.vision_r < 0:
            raise ValueError(f"recipe: vision_r must be a non-negative integer (0: no vision adapter), got {self.vision_r!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"recipe: learning_rate must be positive, got {self.learning_rate}")
        self.adapter_groups()  # ranks, alphas, dropouts and targets are checked where they are defined

    def adapter_groups(self) -> dict[str, MoSLoRAConfig]:
        """The two adapter settings, keyed by the submodule each applies to."""
        mixer = None if self.method == "lora" else self.mixer
        groups = {LANGUAGE_MODEL: MoSLoRAConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules, mixer=mixer)}
        if self.vision_r:
            groups[VISION_TOWER] = MoSLoRAConfig(
                r=self.vision_r, alpha=self.vision_alpha, dropout=self.vision_dropout, target_modules=self.vision_target_modules, mixer=mixer
            )
        return groups



# ----- data ----------------------------------------------------------------------------------------


@dataclass
class ConversationRows:
    """The good rows of a LLaVA JSON file (image resolved to a path) and the 1-based numbers of the skipped ones."""

    rows: list[dict[str, Any]]
    path: Path
    skipped: list[int] = field(default_factory=list)


def read_conversations(path: str | os.PathLike, image_folder: str | os.PathLike, *, image_token: str = "<image>",
                       skip_bad_rows: bool = False) -> ConversationRows:
    """Read and check every row of a LLaVA conversation file.

    A row needs ``image`` (a file under ``image_folder`` that PIL can open) and ``conversations``:
    turns ``{"from": "human"|"gpt", "value": str}`` starting with a human turn, with at least one
    answer and at most one ``<image>`` (put at the start of the first question when absent, as
    LLaVA does). A bad row is an error naming the file and the row; with ``skip_bad_rows`` it is
    dropped and its number recorded.
    """
    path, image_folder = Path(path), Path(image_folder)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not image_folder.is_dir():
        raise FileNotFoundError(f"image folder {str(image_folder)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg}); expected a JSON list or JSON Lines") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows or JSON Lines, got a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: no rows")
    rows, skipped = [], []
    for number, row in enumerate(data, start=1):
        problem, clean = _check_row(row, image_folder, image_token)
        if problem is None:
            rows.append(clean)
        elif skip_bad_rows:
            skipped.append(number)
        else:
            raise ValueError(f"{path}: row {number}: {problem} (use --skip-bad-rows to skip such rows)")
    if not rows:
        raise ValueError(f"{path}: all {len(data)} rows are bad (e.g. row {skipped[0]}: {_check_row(data[skipped[0] - 1], image_folder, image_token)[0]})")
    return ConversationRows(rows, path, skipped)


def _check_row(row: Any, image_folder: Path, image_token: str) -> tuple[str | None, dict[str, Any] | None]:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object", None
    for key in ("image", "conversations"):
        if key not in row:
            return f"missing field {key!r}", None
    if not isinstance(row["image"], str) or not row["image"]:
        return f"field 'image' must be a file name, got {row['image']!r}", None
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        return "field 'conversations' must be a non-empty list of turns", None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            return f"conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r}", None
        if turn["from"] != ("human" if i % 2 == 0 else "gpt"):
            return f"conversations[{i}] is from {turn['from']!r}; turns must alternate human, gpt, starting with human", None
    if len(turns) < 2:
        return "no answer ('gpt' turn) to learn from", None
    n_images = sum(turn["value"].count(image_token) for turn in turns)
    if n_images > 1:
        return f"{n_images} {image_token} tokens; LLaVA rows have one image", None
    image = image_folder / row["image"]
    if not image.is_file():
        return f"image {str(image)!r} does not exist", None
    try:
        with Image.open(image) as im:
            im.size  # the header is read: a file PIL cannot identify fails here
    except (UnidentifiedImageError, OSError) as e:
        return f"image {str(image)!r} cannot be read ({e})", None
    turns = [{"role": t["from"], "value": t["value"]} for t in turns]
    if n_images == 0:
        turns[0]["value"] = f"{image_token}\n{turns[0]['value']}"
    return None, {"image": str(image), "turns": turns}


def image_token_count(processor) -> int:
    """How many ``<image>`` tokens the processor expands one image into (probed with a blank image)."""
    from PIL import Image

    size = processor.image_processor.crop_size if getattr(processor.image_processor, "do_center_crop", False) else processor.image_processor.size
    side = max(v for v in dict(size).values()) if size else 32
    ids = processor(text=processor.image_token, images=Image.new("RGB", (side, side)), add_special_tokens=False)["input_ids"][0]
    return sum(1 for i in ids if i == processor.image_token_id)


def llava_v1_segments(processor, turns: list[dict[str, str]], system_prompt: str) -> list[tuple[str, bool]]:
    """LLaVA-1.5's template (``vicuna_v1``) as (text, is_answer) pieces:
    ``<s><system> USER: <question> ASSISTANT: <answer></s>USER: ...``."""
    tokenizer = processor.tokenizer
    pieces = [] if tokenizer.bos_token is None else [(tokenizer.bos_token, False)]
    for i, turn in enumerate(turns):
        if turn["role"] == "human":
            pieces.append((f"{system_prompt + ' ' if i == 0 and system_prompt else ''}USER: {turn['value']} ASSISTANT:", False))
        else:
            pieces.append((f" {turn['value']}{tokenizer.eos_token}", True))
    return pieces


def chat_template_segments(processor, turns: list[dict[str, str]], system_prompt: str) -> list[tuple[str, bool]]:
    """The processor's own chat template as (text, is_answer) pieces: each turn is what rendering
    one more message adds (the generation prompt goes with the question, so the answer piece is
    the answer and its end-of-turn tokens)."""
    image_token = processor.image_token
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    pieces, previous = [], ""
    for turn in turns:
        content = [{"type": "text", "text": turn["value"].replace(image_token + "\n", "").replace(image_token, "")}]
        if image_token in turn["value"]:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user" if turn["role"] == "human" else "assistant", "content": content})
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=turn["role"] == "human")
        if not text.startswith(previous):
            raise ValueError("the processor's chat template does not render a conversation as a growing prefix; use template='llava-v1'")
        pieces.append((text[len(previous):], turn["role"] == "gpt"))
        previous = text
    return pieces


TEMPLATES = {"llava-v1": llava_v1_segments, "chat": chat_template_segments}


def tokenize_conversation(processor, turns: list[dict[str, str]], *, system_prompt: str, n_image_tokens: int,
                          cutoff_len: int, template: str = "llava-v1") -> dict[str, list[int]] | None:
    """Token ids and labels of one conversation in ``template``, answers only in the labels.

    Returns ``None`` when ``cutoff_len`` would cut into the image tokens or leave no answer token.
    """
    tokenizer, image_token = processor.tokenizer, processor.image_token
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in TEMPLATES[template](processor, turns, system_prompt):
        piece = tokenizer(text.replace(image_token, image_token * n_image_tokens), add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    found = sum(1 for t in ids if t == processor.image_token_id)
    if found != n_image_tokens:
        raise ValueError(f"the tokenizer splits {image_token!r}: {found} image tokens instead of {n_image_tokens}; add it as a special token")
    ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if sum(1 for t in ids if t == processor.image_token_id) != n_image_tokens or all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


class ConversationDataset(torch.utils.data.Dataset):
    """Rows tokenized up front (so rows cut away by ``cutoff_len`` are known and counted); images
    are read and processed when a row is fetched."""

    def __init__(self, processor, rows: list[dict[str, Any]], *, system_prompt: str, cutoff_len: int, template: str = "llava-v1") -> None:
        self.processor = processor
        n = image_token_count(processor)
        self.examples, self.dropped = [], 0
        for row in rows:
            tokens = tokenize_conversation(processor, row["turns"], system_prompt=system_prompt, n_image_tokens=n, cutoff_len=cutoff_len,
                                           template=template)
            if tokens is None:
                self.dropped += 1
            else:
                self.examples.append({**tokens, "image": row["image"]})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        example = self.examples[index]
        with Image.open(example["image"]) as im:
            pixels = self.processor.image_processor(im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return {"input_ids": example["input_ids"], "labels": example["labels"], "pixel_values": pixels}


@dataclass
class ConversationCollator:
    """Right-pads ids (pad token), labels (ignored) and the attention mask; stacks the images."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.stack([b["pixel_values"] for b in batch])}


# ----- model ---------------------------------------------------------------------------------------


def load_llava(name_or_path: str, *, precision: str = "auto", quantize: str | None = None, for_training: bool = True) -> tuple[Any, Any]:
    """``(model, processor)`` of a ``LlavaForConditionalGeneration`` (hub id or local folder).

    With ``quantize="4bit"`` the language model's linear layers are NF4 with double quantization
    (QLoRA); the vision tower, projector and output head stay in ``precision``, as in XTuner's
    LLaVA QLoRA runs. The CPU repacking trap of 4-bit layers is disarmed for training
    (see :func:`moslora.train.model.load_model`).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dtype = resolve_dtype(precision)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=[r".*vision_tower", r".*multi_modal_projector", "lm_head"],  # matched from the name's start
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"}
    elif quantize is not None:
        raise ValueError(f"quantize must be None or '4bit', got {quantize!r}")
    model = LlavaForConditionalGeneration.from_pretrained(name_or_path, **kwargs)
    processor = AutoProcessor.from_pretrained(name_or_path)
    if processor.tokenizer.pad_token is None:
        tok = processor.tokenizer
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if quantize == "4bit" and for_training:
        keep_4bit_trainable_on_cpu(model)
    return model, processor


def export_merged_llava(base: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, precision: str = "auto") -> Path:
    """A plain ``LlavaForConditionalGeneration`` with the adapter merged in, and its processor,
    saved with ``save_pretrained`` for tools that know no adapters.

    The base is loaded in full precision (``precision``) even when training used a 4-bit base:
    merging into the 4-bit weights would round ΔW away, so QLoRA adapters are merged, as usual,
    into the unquantized model.
    """
    model, processor = load_llava(base, precision=precision, for_training=False)
    load_adapter_groups(model, adapter_dir, trainable=False)
    merged = merge_and_unload(model, safe=True)
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ----- training ------------------------------------------------------------------------------------


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
    ``adapter_dir`` (load them with :func:`moslora.load_adapter_groups`).
    """
    recipe = resolve_recipe(recipe, LlavaRecipe, ("model", "data", "image_folder", "output"),
                            model=model, data=data, image_folder=image_folder, output=output, **overrides)
    out = Path(recipe.output)
    resume_from = ckpt.last_checkpoint(out) if resume else None
    if not resume and ckpt.last_checkpoint(out) is not None:
        raise ValueError(f"{out} already has checkpoints; pass --resume to continue that run, or choose another --output")

    set_seed(recipe.seed)  # before inject: A and M are drawn from it
    base, processor = load_llava(recipe.model, precision=recipe.precision, quantize=recipe.quantize)
    rows = read_conversations(recipe.data, recipe.image_folder, image_token=processor.image_token, skip_bad_rows=recipe.skip_bad_rows)
    dataset = ConversationDataset(processor, rows.rows, system_prompt=recipe.system_prompt, cutoff_len=recipe.cutoff_len, template=recipe.template)
    if len(dataset) == 0:
        raise ValueError(f"{rows.path}: every row's answers are cut away by cutoff_len={recipe.cutoff_len}")
    if recipe.gradient_checkpointing:
        base.enable_input_require_grads()
    lm = inject_groups(base, recipe.adapter_groups())
    lm.config.use_cache = False
    args = training_arguments(recipe, out, warmup=recipe.warmup_ratio)  # a float in [0, 1) is a share of the steps
    if args.should_save and (rows.skipped or dataset.dropped):
        print(f"data: {len(rows.skipped)} bad rows skipped"
              + (f" (rows {rows.skipped[:10]}{'…' if len(rows.skipped) > 10 else ''})" if rows.skipped else "")
              + f", {dataset.dropped} rows whose answers were cut away by cutoff_len={recipe.cutoff_len}")
    guard = NonFiniteGuard()
    trainer = GroupsTrainer(
        model=lm, args=args, train_dataset=dataset, data_collator=ConversationCollator(processor.tokenizer.pad_token_id),
        callbacks=([] if args.fp16 else [guard]) + list(callbacks),
    )
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossAndLRBar)
    if args.should_save:
        atomic_write_json(out / TRAINING_ARGS_JSON, {"task": "llava", "recipe": recipe.to_dict(), "world_size": args.world_size,
                                                    "resumed_from": str(resume_from) if resume_from else None,
                                                    "training_arguments": args.to_dict()})
    metrics = run_and_measure(trainer, guard, out, resume_from, lm)
    metrics.update({
        "task": "llava",
        "eval_loss": None,
        "train_rows": len(dataset),
        "skipped_rows": len(rows.skipped),
        "dropped_no_response": dataset.dropped,
        "method": recipe.method,
        "mixer": None if recipe.method == "lora" else recipe.mixer,
    })
    if args.should_save:
        written = {"adapter": save_adapter_groups(lm, out, base_model_name_or_path=recipe.model)}
        atomic_write_json(out / METRICS_JSON, metrics)
        written["metrics"] = out / METRICS_JSON
        written["arguments"] = out / TRAINING_ARGS_JSON
        written["loss curve"] = plot_loss_curve(trainer.state.log_history, out / LOSS_CURVE_PNG,
                                                title=f"LLaVA {recipe.method} r={recipe.r}/{recipe.vision_r} on {Path(recipe.data).name}")
        written["checkpoints"] = ckpt.last_checkpoint(out)
        if recipe.merged_output is not None:
            written["merged model"] = export_merged_llava(recipe.model, out, recipe.merged_output, precision=recipe.precision)
        print(summary(metrics, written))
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out, out, metrics, recipe)


class GroupsTrainer(AdapterTrainer):
    """:class:`moslora.train.trainer.AdapterTrainer` whose checkpoints hold adapter groups."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        save_adapter_groups(self.accelerator.unwrap_model(self.model), folder)
        atomic_write_json(folder / TRAINING_ARGS_JSON, self.args.to_dict())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_adapter_groups(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)
