"""Your own comparison task, from a YAML file: either kind (classification or instruction), with
relative paths resolved against the file. Every error names the file and the field (or the row)
at fault, before any model is loaded."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from moslora.compare.classification import ClassificationTask, Split
from moslora.compare.instruction import InstructionTask
from moslora.io.yaml_mapping import read_yaml_mapping

_NUMBER = (int, float)
# Fields of a task file: required ones, then the optional ones of each kind with their types.
_REQUIRED = {"classification": ("model", "train", "validation", "test"), "instruction": ("model", "train", "validation", "test")}
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
    "instruction": {**_COMMON, "dataset": str, "scoring": str, "max_new_tokens": int, "eval_batch_size": int, "frozen_layers": int, "precision": str},
}
_POSITIVE = ("steps", "batch_size", "max_length", "log_every", "max_new_tokens", "eval_batch_size")
_FILE_ONLY = ("kind", "name", "dataset", "text_column", "label_column")  # read here, not passed on as options


def load_task_yaml(path: str | Path) -> ClassificationTask | InstructionTask:
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

    Errors name the file and the field (or the row) at fault.
    """
    path = Path(path)

    def allowed(data: dict[str, Any]) -> list[str]:
        kind = data.get("kind", "classification")
        if kind not in _REQUIRED:
            raise ValueError(f"task file {path}: field 'kind' must be one of {sorted(_REQUIRED)}, got {kind!r}")
        return [*_REQUIRED[kind], *_OPTIONAL[kind]]

    data = read_yaml_mapping(path, allowed, what="task file")
    kind = data.get("kind", "classification")
    required, optional = _REQUIRED[kind], _OPTIONAL[kind]
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

    return ClassificationTask(
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
        return InstructionTask(name=data.get("name", path.stem), model=str(model), dataset=data.get("dataset"), **splits, **options)
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
