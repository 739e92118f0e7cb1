"""Classification tasks (``kind: classification``): a sequence-classification model and examples of
``(text, label)``, scored by the accuracy of the classifier.

The model is any Hugging Face model directory that ``AutoModelForSequenceClassification`` and
``AutoTokenizer`` can load; a bare encoder gets a new head, which trains fully. With
``frozen_layers = k`` the embeddings and the bottom k transformer layers get no adapters; they are
then a fixed function of the input, so :class:`EncodedTask` computes their output once per example
(dropout off) and every run trains and scores only the layers above, on those cached states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from moslora.compare.methods import method_config
from moslora.compare.task import Budget, majority_share
from moslora.model.inject import inject

# Adapters on every attention projection and feed-forward linear of a BERT-style encoder
# (not the pooler, not the classifier: the classifier trains fully, as modules_to_save).
BERT_ATTENTION_AND_FFN = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, part: slice) -> "Split":
        return Split(self.texts[part], self.labels[part])


@dataclass(frozen=True)
class ClassificationTask(Budget):
    """Everything a comparison run needs besides the method, the seed and the learning rate.

    Every method trains ``steps`` AdamW steps of ``batch_size`` examples (linear decay after
    ``warmup_steps``), so all methods see exactly the same examples in the same order for a seed.
    ``frozen_layers = k > 0``: the target patterns apply to the layers above the bottom k,
    renumbered from 0.
    """

    name: str
    model: str
    label_names: list[str]
    train: Split
    validation: Split
    test: Split
    steps: int = 100
    batch_size: int = 16
    max_length: int = 64
    warmup_steps: int = 0
    log_every: int = 10
    frozen_layers: int = 0
    alpha_over_r: float = 2.0
    target_modules: list[str] | str = BERT_ATTENTION_AND_FFN
    modules_to_save: list[str] = field(default_factory=lambda: ["classifier"])
    dropout: float = 0.0
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    quick_steps: int | None = None
    quick_sizes: tuple[int, int] | None = None
    quick_learning_rate: float | None = None
    description: str = ""
    kind = "classification"

    def _kind_settings(self) -> dict[str, Any]:
        return {"labels": self.label_names, "max_length": self.max_length, "frozen_layers": self.frozen_layers}

    def chance(self) -> float:
        """The accuracy of always answering the test split's most frequent label."""
        return majority_share(self.test.labels)

    def prepare(self) -> "EncodedTask":
        return EncodedTask(self)


def accuracy(model: torch.nn.Module, examples: Sequence[dict[str, Any]], collate: Callable, batch_size: int = 64) -> float:
    """The share of ``examples`` whose ``labels`` is the argmax of ``model``'s logits (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(list(examples[start : start + batch_size]))
                labels = batch.pop("labels")
                logits = model(**batch)["logits"]
                correct += int((logits.argmax(-1) == labels).sum())
    finally:
        model.train(was_training)
    return correct / len(examples)


class EncodedTask:
    """A task's tokenizer and its three splits tokenized once, shared by every run; with
    ``task.frozen_layers`` also the frozen bottom's output for every example."""

    def __init__(self, task: ClassificationTask) -> None:
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

    def examples(self, indices: list[int]) -> list[dict[str, Any]]:
        """The training examples at ``indices`` (all computed once, when the task is prepared)."""
        return [self.train[i] for i in indices]

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        from transformers import DataCollatorWithPadding

        return pad_states if self.task.frozen_layers else DataCollatorWithPadding(self.tokenizer)

    def build(self, method: str, seed: int, r: int) -> torch.nn.Module:
        return build_model(self.task, method, seed, r)

    def training_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def score(self, model: torch.nn.Module, split: str) -> dict[str, Any]:
        return {"metric": "accuracy", "value": accuracy(model, self.splits[split], self.collator())}


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


def pad_states(batch: list[dict[str, Any]], label_pad: int | None = None) -> dict[str, torch.Tensor]:
    """Cached states (``inputs_embeds``, length × hidden) padded on the right with zeros and masked;
    ``labels`` one per example, or (``label_pad`` given) one per position, padded with ``label_pad``."""
    length = max(e["inputs_embeds"].shape[0] for e in batch)
    hidden = batch[0]["inputs_embeds"].shape[1]
    states = torch.zeros(len(batch), length, hidden, dtype=batch[0]["inputs_embeds"].dtype)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, e in enumerate(batch):
        n = e["inputs_embeds"].shape[0]
        states[i, :n] = e["inputs_embeds"]
        mask[i, :n] = 1
    if label_pad is None:
        labels = torch.tensor([e["labels"] for e in batch])
    else:
        labels = torch.full((len(batch), length), label_pad, dtype=torch.long)
        for i, e in enumerate(batch):
            labels[i, : len(e["labels"])] = torch.as_tensor(e["labels"])
    return {"inputs_embeds": states, "attention_mask": mask, "labels": labels}


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


def _load(task: ClassificationTask) -> torch.nn.Module:
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


def build_model(task: ClassificationTask, method: str, seed: int, r: int) -> torch.nn.Module:
    """The task's model (above its frozen bottom, if any) with a fresh head and adapters for
    ``method``; the head and A depend only on ``seed``, never on the method."""
    torch.manual_seed(seed)
    model = _load(task)
    if task.frozen_layers:
        parent, attr, layers = _encoder_layers(model, task.frozen_layers)
        setattr(parent, attr, layers[task.frozen_layers :])
        model.base_model.embeddings = _PassThrough()
    return inject(model, method_config(task, method, r))
