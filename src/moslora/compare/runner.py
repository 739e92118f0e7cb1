"""Train every method × seed on a task, paired, and collect the results.

Pairing: for a seed, every method starts from the same model and sees the same data.
``torch.manual_seed(seed)`` is set right before the model is loaded, so the new classifier head
and then A (which :func:`moslora.inject` draws for every layer before any mixer) are identical
across methods; the data order comes from its own ``torch.Generator`` seeded with the seed, so it
does not depend on how many random numbers a method's initialisation drew. The only difference
between two runs of a seed is the mixer.

Fairness: the mixer changes the effective step size (a kaiming M scales M·A to about 1/√3 of A), so
each method gets its own learning rate, the best of a grid on the validation split with seeds that
are not test seeds (:data:`VALIDATION_SEED_BASE` + i). Test seeds 0..n−1 then run on the test split.

Training is the Hugging Face ``Trainer`` (AdamW, linear decay after warm-up, no weight decay) with a
sequential sampler over the pre-ordered examples, the same for both kinds of task. A classification
task is scored by the accuracy of the classifier; an instruction task by the accuracy of the answers
:func:`moslora.eval.evaluate` reads from the model's output (the paper's extraction).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

import moslora
from moslora.compare.tasks import InstructionTask, Split, Task

# Each method is a change to the same MoSLoRAConfig; "lora" is the mixer-less case of the same code.
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"mixer": None},
    "moslora": {"mixer": "kaiming"},
    "moslora-frozen": {"mixer": "kaiming", "train_mixer": False},
    "moslora-orthogonal": {"mixer": "orthogonal"},
}
BASELINE = "lora"
VALIDATION_SEED_BASE = 1000


def method_config(task: Task | InstructionTask, method: str, r: int) -> moslora.MoSLoRAConfig:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {list(METHODS)}")
    return moslora.MoSLoRAConfig(
        r=r,
        alpha=task.alpha_over_r * r,
        dropout=task.dropout,
        target_modules=task.target_modules,
        modules_to_save=list(task.modules_to_save),
        **METHODS[method],
    )


def data_order(seed: int, n: int, count: int) -> list[int]:
    """The first ``count`` indices of a stream of shuffled passes over ``n`` examples, drawn from a
    generator of its own so the order depends on the seed only."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < count:
        order.extend(torch.randperm(n, generator=generator).tolist())
    return order[:count]


class EncodedTask:
    """A task's tokenizer and its three splits tokenized once, shared by every run; with
    ``task.frozen_layers`` also the frozen bottom's output for every example."""

    def __init__(self, task: Task) -> None:
        from transformers import AutoTokenizer

        self.task = task
        self.tokenizer = AutoTokenizer.from_pretrained(task.model)
        self.splits = {name: self._encode(getattr(task, name)) for name in ("train", "validation", "test")}
        if task.frozen_layers:
            bottom = _load(task).eval()
            parent, attr, layers = _encoder_layers(bottom, task.frozen_layers)
            setattr(parent, attr, layers[: task.frozen_layers])
            self.splits = {name: _frozen_states(bottom, examples) for name, examples in self.splits.items()}

    def _encode(self, split: Split) -> list[dict[str, Any]]:
        encoded = self.tokenizer(split.texts, truncation=True, max_length=self.task.max_length)
        keys = list(encoded.keys())
        return [{**{k: encoded[k][i] for k in keys}, "labels": label} for i, label in enumerate(split.labels)]

    @property
    def train(self) -> list[dict[str, Any]]:
        return self.splits["train"]

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        from transformers import DataCollatorWithPadding

        return _pad_states if self.task.frozen_layers else DataCollatorWithPadding(self.tokenizer)

    def build(self, method: str, seed: int, r: int) -> torch.nn.Module:
        return build_model(self.task, method, seed, r)

    def score(self, trainer: Any, model: torch.nn.Module, split: str) -> dict[str, Any]:
        predictions = trainer.predict(self.splits[split])
        logits = predictions.predictions[0] if isinstance(predictions.predictions, tuple) else predictions.predictions
        return {"metric": "accuracy", "value": float((logits.argmax(-1) == predictions.label_ids).mean())}


class InstructionData:
    """An instruction task's base model (loaded once, copied for every run), its tokenizer and its
    training rows tokenized once, as ``moslora train`` tokenizes them."""

    def __init__(self, task: InstructionTask) -> None:
        from moslora.train.data import has_response, tokenize_row
        from moslora.train.model import load_model

        self.task = task
        # fp32 everywhere (the adapters too); a 135M model needs no bf16, and the runs stay comparable.
        self.base, self.tokenizer = load_model(task.model, precision="fp32", for_training=False)
        if torch.cuda.is_available():
            self.base = self.base.to("cuda")
        self.base.requires_grad_(False)
        # Right padding for training: Llama-style models take positions from the cache, not the mask
        # (scoring pads left for generation and puts it back).
        self.tokenizer.padding_side = "right"
        rows = [tokenize_row(self.tokenizer, row, cutoff_len=task.max_length) for row in task.train]
        # A row whose response is cut away by max_length teaches nothing (and makes a 0/0 loss).
        self.train = [row for row in rows if has_response(row)]
        if not self.train:
            raise ValueError(f"task {task.name}: every training row's response is cut away by max_length={task.max_length}")
        if len(self.train) < len(rows):
            warnings.warn(f"task {task.name}: {len(rows) - len(self.train)} of {len(rows)} training rows dropped: "
                          f"max_length={task.max_length} cuts their response away", stacklevel=2)

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(self.tokenizer, pad_to_multiple_of=8, padding=True, return_tensors="pt")

    def build(self, method: str, seed: int, r: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # A (then M) are drawn from it, the same A for every method
        model = moslora.inject(copy.deepcopy(self.base), method_config(self.task, method, r))
        model.config.use_cache = False  # training only; generation turns its cache on itself
        return model

    def score(self, trainer: Any, model: torch.nn.Module, split: str) -> dict[str, Any]:
        from moslora.eval import evaluate

        task = self.task
        result = evaluate(model, self.tokenizer, getattr(task, split), task.dataset, scoring=task.scoring,
                          batch_size=task.eval_batch_size, max_new_tokens=task.max_new_tokens)
        return {"metric": "accuracy", "value": result["accuracy"], "no_answer": result["no_answer"],
                "answers": [example["extracted"] for example in result["examples"]]}


def prepare(task: Task | InstructionTask) -> EncodedTask | InstructionData:
    """What every run of ``task`` shares, made once: tokenized data (and a cache or a base model)."""
    return InstructionData(task) if isinstance(task, InstructionTask) else EncodedTask(task)


@torch.no_grad()
def _frozen_states(bottom: torch.nn.Module, examples: list[dict[str, Any]], batch: int = 64) -> list[dict[str, Any]]:
    """Each example's hidden states after the frozen bottom (unpadded, ``length × hidden``)."""
    states = []
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        inputs = {k: v for k, v in _pad_ids(chunk).items() if k != "labels"}
        hidden = bottom.base_model(**inputs).last_hidden_state
        for example, h in zip(chunk, hidden):
            states.append({"inputs_embeds": h[: len(example["input_ids"])].clone(), "labels": example["labels"]})
    return states


def _pad_ids(chunk: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    # Token ids padded with 0 and a 0/1 attention mask; padding positions are dropped afterwards.
    length = max(len(e["input_ids"]) for e in chunk)
    out = {}
    for key in chunk[0]:
        if key == "labels":
            out[key] = torch.tensor([e[key] for e in chunk])
        else:
            out[key] = torch.tensor([e[key] + [0] * (length - len(e[key])) for e in chunk])
    return out


def _pad_states(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    length = max(e["inputs_embeds"].shape[0] for e in batch)
    hidden = batch[0]["inputs_embeds"].shape[1]
    states = torch.zeros(len(batch), length, hidden)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, e in enumerate(batch):
        n = e["inputs_embeds"].shape[0]
        states[i, :n] = e["inputs_embeds"]
        mask[i, :n] = 1
    return {"inputs_embeds": states, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in batch])}


class _PassThrough(torch.nn.Module):
    """Stands in for the embeddings when the model is fed the frozen bottom's cached output."""

    def forward(self, inputs_embeds: torch.Tensor, **_: Any) -> torch.Tensor:
        return inputs_embeds


def _encoder_layers(model: torch.nn.Module, frozen: int) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """The encoder's stack of transformer layers (BERT-style: ``base_model.embeddings`` plus a
    ModuleList of ``config.num_hidden_layers`` layers)."""
    count = getattr(model.config, "num_hidden_layers", None)
    base = model.base_model
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and hasattr(base, "embeddings"):
            if frozen >= count:
                raise ValueError(f"frozen_layers={frozen} leaves no layer to adapt: the model has {count}")
            parent_name, _, attr = name.rpartition(".")
            return (base.get_submodule(parent_name) if parent_name else base), attr, module
    raise ValueError(
        f"frozen_layers needs a BERT-style encoder (base_model.embeddings and a list of num_hidden_layers layers); "
        f"{type(model).__name__} is not one"
    )


def _load(task: Task) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report lists the new head as missing: expected here
    hf_logging.disable_progress_bar()  # one bar per load would break up the comparison's own bar
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            task.model,
            num_labels=len(task.label_names),
            id2label=dict(enumerate(task.label_names)),
            label2id={name: i for i, name in enumerate(task.label_names)},
            ignore_mismatched_sizes=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def build_model(task: Task, method: str, seed: int, r: int) -> torch.nn.Module:
    """The task's model (above its frozen bottom, if any) with a fresh head and adapters for
    ``method``; the head and A depend only on ``seed``, never on the method."""
    torch.manual_seed(seed)
    model = _load(task)
    if task.frozen_layers:
        parent, attr, layers = _encoder_layers(model, task.frozen_layers)
        setattr(parent, attr, layers[task.frozen_layers :])
        model.base_model.embeddings = _PassThrough()
    return moslora.inject(model, method_config(task, method, r))


@dataclass
class RunSpec:
    method: str
    seed: int
    lr: float
    split: str  # "validation" (learning-rate search) or "test"


def train_and_score(prepared: EncodedTask | InstructionData, spec: RunSpec, r: int, callbacks: Iterable[Any] = ()) -> dict[str, Any]:
    """One run: build, train with the Trainer (plus ``callbacks``), score on ``spec.split``. Returns
    the run's record for the results file (config, seed, lr, loss curve, metric, time, parameter
    counts)."""
    from transformers import PrinterCallback

    from moslora.train.trainer import AdapterTrainer  # a Trainer that also takes GGUF- or 4-bit-loaded bases

    task = prepared.task
    model = prepared.build(spec.method, spec.seed, r)
    counts = moslora.parameter_counts(model)
    order = data_order(spec.seed, len(prepared.train), task.steps * task.batch_size)
    train = [prepared.train[i] for i in order]
    with tempfile.TemporaryDirectory(prefix="moslora-compare-") as tmp:
        trainer = AdapterTrainer(model=model, args=_training_arguments(task, spec, tmp), train_dataset=train,
                                 data_collator=prepared.collator(), callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)  # the log dicts would drown the progress bar
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        scored = prepared.score(trainer, model, spec.split)
    curve = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return {
        "method": spec.method,
        "seed": spec.seed,
        "lr": spec.lr,
        "split": spec.split,
        **scored,
        "train_seconds": seconds,
        "curve": {"step": [s for s, _ in curve], "loss": [loss for _, loss in curve]},
        "trainable_params": counts["trainable"],
        "parameter_counts": counts,
        "config": moslora.get_config(model).to_dict(),
    }


def _step_on_bar(bar: Any, label: str) -> Any:
    """A callback that shows the current run's step (then "scoring") on the comparison's bar: a run
    of an instruction task on CPU takes minutes."""
    from transformers import TrainerCallback

    class StepOnBar(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bar.set_postfix_str(f"{label} step {state.global_step}/{state.max_steps}")

        def on_train_end(self, args, state, control, **kwargs):
            bar.set_postfix_str(f"{label} scoring")

    return StepOnBar()


def _training_arguments(task: Task | InstructionTask, spec: RunSpec, output_dir: str) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=task.steps,
        per_device_train_batch_size=task.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=spec.lr,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=task.warmup_steps,
        logging_steps=task.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec.seed,
        # The examples are already in the seed's order (data_order); the sampler must keep it.
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def _environment() -> dict[str, Any]:
    import os
    import platform

    import transformers

    return {
        "moslora": moslora.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def plan(methods: list[str], seeds: int, lrs: list[float], validation_seeds: int) -> tuple[list[RunSpec], list[int]]:
    """The learning-rate search runs (empty for a single learning rate) and the test seeds."""
    search = []
    if len(lrs) > 1:
        search = [
            RunSpec(method, VALIDATION_SEED_BASE + i, lr, "validation")
            for method in methods
            for lr in lrs
            for i in range(validation_seeds)
        ]
    return search, list(range(seeds))


def pick_lrs(runs: Iterable[dict[str, Any]], methods: list[str], lrs: list[float]) -> dict[str, float]:
    """Each method's learning rate with the best mean validation metric (ties: the first in ``lrs``)."""
    picked = {}
    for method in methods:
        scores = {}
        for lr in lrs:
            values = [run["value"] for run in runs if run["method"] == method and run["lr"] == lr and run["split"] == "validation"]
            scores[lr] = sum(values) / len(values) if values else -math.inf
        picked[method] = max(lrs, key=lambda lr: scores[lr])
    return picked


def run_comparison(
    task: Task | InstructionTask,
    *,
    methods: list[str],
    seeds: int,
    r: int,
    lrs: list[float],
    validation_seeds: int = 1,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search each method's learning rate on validation, then train every method on test seeds
    0..seeds−1 at its picked rate. ``on_run(results)`` is called after every run with the results so
    far (to save them as they come). Returns the results: task, settings, picked LRs, every run."""
    from tqdm.auto import tqdm

    for method in methods:
        method_config(task, method, r)  # fail on a bad method or rank before any training
    if BASELINE not in methods:
        raise ValueError(f"the comparison is against {BASELINE!r}: include it in the methods")
    if seeds < 1 or validation_seeds < 1:
        raise ValueError(f"need at least one seed, got seeds={seeds}, validation_seeds={validation_seeds}")
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"learning rates must be positive, got {lrs}")
    prepared = prepare(task)
    search, test_seeds = plan(methods, seeds, lrs, validation_seeds)
    results: dict[str, Any] = {
        "task": task.describe(),
        "settings": {
            "methods": methods,
            "seeds": test_seeds,
            "r": r,
            "lrs": lrs,
            "validation_seeds": [VALIDATION_SEED_BASE + i for i in range(validation_seeds)] if search else [],
        },
        "environment": _environment(),
        "picked_lr": {},
        "runs": [],
    }
    bar = tqdm(total=len(search) + len(methods) * seeds, desc=f"compare {task.name}", unit="run", disable=not progress)

    def record(spec: RunSpec) -> None:
        label = f"{spec.split} {spec.method} lr={spec.lr:g} seed={spec.seed}"
        bar.set_postfix_str(label)
        run = train_and_score(prepared, spec, r, callbacks=[_step_on_bar(bar, label)] if progress else [])
        results["runs"].append(run)
        bar.update()
        if on_run is not None:
            on_run(results)

    for spec in search:
        record(spec)
    results["picked_lr"] = pick_lrs(results["runs"], methods, lrs) if search else {m: lrs[0] for m in methods}
    # Seed-major order: if the run is cut short, the finished seeds are complete pairs.
    for seed in test_seeds:
        for method in methods:
            record(RunSpec(method, seed, results["picked_lr"][method], "test"))
    bar.close()
    return results
