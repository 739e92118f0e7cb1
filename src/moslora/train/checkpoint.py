"""Training state on disk without pickles: tensors in safetensors, the rest in JSON.

A checkpoint folder ``checkpoint-N`` holds the adapter in moslora's native format, the
optimizer state (``optimizer.safetensors`` + ``optimizer.json``), the LR scheduler
(``scheduler.json``), the random generators (``rng_state[_RANK].safetensors`` + ``.json``) and
Trainer's own ``trainer_state.json``, written last, so a folder with it is complete.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moslora.io.atomic import atomic_write, atomic_write_json

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """``state_dict()`` of the optimizer: per-parameter tensors keyed ``<param index>.<name>``,
    everything else (hyper-parameters, non-tensor state) as JSON."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    atomic_write(folder / OPTIMIZER_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(folder / OPTIMIZER_JSON, {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path, device: torch.device | str = "cpu") -> None:
    meta = json.loads((folder / OPTIMIZER_JSON).read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(folder / OPTIMIZER_TENSORS), device=str(device)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_scheduler(scheduler: Any, folder: Path) -> None:
    # LambdaLR's state is numbers and lists (its lambdas are rebuilt by Trainer, not saved).
    atomic_write_json(folder / SCHEDULER_JSON, scheduler.state_dict())


def load_scheduler(scheduler: Any, folder: Path) -> None:
    scheduler.load_state_dict(json.loads((folder / SCHEDULER_JSON).read_text(encoding="utf-8")))


def _rng_stem(rank: int | None) -> str:
    return "rng_state" if rank is None else f"rng_state_{rank}"


def save_rng(folder: Path, rank: int | None) -> None:
    """Python, NumPy, torch CPU and (when present) CUDA generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    tensors = {"torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.random.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    folder.mkdir(parents=True, exist_ok=True)
    stem = _rng_stem(rank)
    atomic_write(folder / f"{stem}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(
        folder / f"{stem}.json",
        {
            "python": [version, list(py_state), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        },
    )


def load_rng(folder: Path, rank: int | None) -> bool:
    """Restore the states saved by :func:`save_rng`; ``False`` when the checkpoint has none."""
    stem = _rng_stem(rank)
    if not (folder / f"{stem}.safetensors").is_file():
        return False
    meta = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(folder / f"{stem}.safetensors"))
    torch.random.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return True


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The highest-numbered complete ``checkpoint-N`` folder (one with ``trainer_state.json``,
    which is written last): a save cut short by a crash is never resumed from."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        m = _CHECKPOINT.fullmatch(child.name)
        if m and child.is_dir() and read_trainer_state(child):
            found.append((int(m.group(1)), child))
    return max(found)[1] if found else None


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """Trainer's ``trainer_state.json`` of a checkpoint; ``{}`` if it is missing or half-written
    (Trainer does not write it atomically)."""
    try:
        state = json.loads((Path(folder) / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) else {}
