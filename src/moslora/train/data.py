"""Instruction data in the LLM-Adapters commonsense format, as the paper trained on it.

A file is a JSON list or JSON Lines of rows ``{"instruction", "input", "output", "answer"}``
(``input`` may be empty or absent; ``answer`` is what evaluation compares against). Each row
becomes an Alpaca-style prompt followed by the response ``output``; with ``train_on_inputs=False``
(the paper's setting) the loss sees only the response tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # label value the causal-LM loss skips

_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt (LLM-Adapters' ``generate_prompt``) up to and including ``### Response:``."""
    if input:
        return f"{_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"{_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class Rows:
    """Rows read from a file: the good ones as a ``datasets.Dataset``, and the (1-based) row numbers skipped."""

    dataset: Any
    path: Path
    skipped: list[int] = field(default_factory=list)


def read_rows(path: str | os.PathLike, required: tuple[str, ...] = ("instruction", "output"), *, skip_bad_rows: bool = False) -> Rows:
    """Read a JSON/JSONL file of rows with ``datasets`` and check every row.

    A row that lacks a required field, or has a non-string field, is an error naming the file and
    the row number; with ``skip_bad_rows`` it is dropped and its number recorded instead.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in many types; name the line when we can
        raise ValueError(_explain_unreadable(path, e)) from None
    if len(ds) == 0:
        raise ValueError(f"{path}: no rows")
    good, skipped = [], []
    for i, row in enumerate(ds):
        problem = _row_problem(row, required)
        if problem is None:
            good.append(i)
        elif skip_bad_rows:
            skipped.append(i + 1)
        else:
            raise ValueError(f"{path}: row {i + 1}: {problem} (use --skip-bad-rows to skip such rows)")
    if not good:
        raise ValueError(f"{path}: all {len(ds)} rows are bad (e.g. row {skipped[0]}: {_row_problem(ds[skipped[0] - 1], required)})")
    if skipped:
        ds = ds.select(good)
    return Rows(ds, path, skipped)


def _row_problem(row: dict[str, Any], required: tuple[str, ...]) -> str | None:
    for name in required:
        if row.get(name) is None:
            return f"missing field {name!r}"
    for name in ("instruction", "input", "output", "answer"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            return f"field {name!r} must be a string, got {type(value).__name__} {value!r}"
    if not row["instruction"].strip():
        return "field 'instruction' is empty"
    return None


def _explain_unreadable(path: Path, error: Exception) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}: line {number} is not valid JSON ({e.msg}); expected a JSON list or one JSON object per line"
    if data is not None and not isinstance(data, list):
        return f"{path}: expected a JSON list of rows or JSON Lines, got a JSON {type(data).__name__}"
    if isinstance(data, list):
        for number, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                return f"{path}: row {number} is a {type(row).__name__}, not an object"
    return f"{path}: could not be read as rows ({type(error).__name__}: {error}); is a field's type mixed across rows?"


def tokenize_row(tokenizer, row: dict[str, Any], *, cutoff_len: int, train_on_inputs: bool = False, add_eos_token: bool = True) -> dict[str, list[int]]:
    """Prompt + response as token ids, cut at ``cutoff_len``; labels are the ids with the prompt
    masked (``IGNORE_INDEX``) unless ``train_on_inputs``. An EOS token ends the response when it fits."""
    user = prompt(row["instruction"], row.get("input"))
    ids = tokenizer(user + row["output"], truncation=True, max_length=cutoff_len)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos_token and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = len(tokenizer(user, truncation=True, max_length=cutoff_len)["input_ids"])
        labels[:n_prompt] = [IGNORE_INDEX] * min(n_prompt, len(labels))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def has_response(example: dict[str, Any]) -> bool:
    """Whether a tokenized row keeps any response token to learn from (``cutoff_len`` may cut it all away)."""
    return any(label != IGNORE_INDEX for label in example["labels"])


@dataclass
class TrainData:
    train: Any
    val: Any | None
    rows_read: int
    skipped_rows: list[int]
    dropped_no_response: int


def build_datasets(tokenizer, path: str | os.PathLike, *, cutoff_len: int, val_set_size: int, seed: int,
                   train_on_inputs: bool = False, add_eos_token: bool = True, skip_bad_rows: bool = False) -> TrainData:
    """Read, check, split (``val_set_size`` rows held out, shuffled with ``seed`` as LLM-Adapters
    does) and tokenize. Rows whose response is cut away entirely by ``cutoff_len`` teach nothing
    and would make a batch's loss 0/0, so they are dropped and counted."""
    rows = read_rows(path, skip_bad_rows=skip_bad_rows)
    ds = rows.dataset
    if val_set_size >= len(ds):
        raise ValueError(f"{rows.path}: val_set_size {val_set_size} leaves no training rows out of {len(ds)}")

    def tokenize(row):
        return tokenize_row(tokenizer, row, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs, add_eos_token=add_eos_token)

    splits = {"train": ds, "val": None}
    if val_set_size > 0:
        split = ds.train_test_split(test_size=val_set_size, shuffle=True, seed=seed)
        splits = {"train": split["train"], "val": split["test"]}
    dropped = 0
    for name, part in splits.items():
        if part is None:
            continue
        part = part.map(tokenize, remove_columns=part.column_names, desc=f"tokenizing {name}")
        kept = part.filter(has_response)
        dropped += len(part) - len(kept)
        splits[name] = kept
    if len(splits["train"]) == 0:
        raise ValueError(f"{rows.path}: every training row's response is cut away by cutoff_len={cutoff_len}")
    return TrainData(splits["train"], splits["val"], len(ds) + len(rows.skipped), rows.skipped, dropped)
