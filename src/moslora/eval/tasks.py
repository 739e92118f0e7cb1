"""The eight commonsense-reasoning test sets of the paper and how an answer is read from text.

As in LLM-Adapters' ``commonsense_evaluate.py`` (which the MoSLoRA authors reuse): each data set
has a fixed set of answer labels, the model's prediction is the *first* match of the label
pattern anywhere in its response (case-sensitive), and it is correct when it equals the row's
``answer``. No match counts as wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]  # the alternatives of the answer pattern, in order
    n_choices: int  # how many options a row usually offers (when its instruction does not say)

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("|".join(re.escape(label) for label in self.labels))


_ANSWERS = tuple(f"answer{i}" for i in range(1, 6))
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("boolq", ("true", "false"), 2),
        Task("piqa", ("solution1", "solution2"), 2),
        Task("social_i_qa", _ANSWERS, 3),
        Task("ARC-Challenge", _ANSWERS, 4),
        Task("ARC-Easy", _ANSWERS, 4),
        Task("openbookqa", _ANSWERS, 4),
        Task("hellaswag", tuple(f"ending{i}" for i in range(1, 5)), 4),
        Task("winogrande", ("option1", "option2"), 2),
    )
}
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+)")


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; the paper's datasets are {sorted(TASKS)}") from None


def extract_answer(dataset: str, text: str) -> str:
    """The first label of ``dataset`` found in ``text``; ``""`` when there is none."""
    match = get_task(dataset).pattern.search(text.strip())
    return match.group(0) if match else ""


def choices(dataset: str, instruction: str) -> list[str]:
    """The answer options a row offers: those its instruction lists after ``Answer format:``
    (e.g. ``answer1/answer2/answer3``), else the data set's usual ones."""
    task = get_task(dataset)
    found = _ANSWER_FORMAT.search(instruction)
    if found:
        listed = [option.strip().rstrip(".") for option in found.group(1).split("/")]
        listed = [option for option in listed if option in task.labels]
        if len(listed) >= 2:
            return listed
    return list(task.labels[: task.n_choices])
