"""Training state on disk without pickles: tensors in safetensors, the rest in JSON.

A checkpoint folder ``checkpoint-N`` of :class:`moslora.hf.AdapterTrainer` holds the adapter in
moslora's native format, the optimizer state (``optimizer.safetensors`` + ``optimizer.json``), the LR
scheduler (``scheduler.json``), the gradient scaler when there is one (``scaler.json``), the random
generators (``rng_state[_RANK].safetensors`` + ``.json``) and Trainer's own ``trainer_state.json``,
written last, so a folder with it is complete.

The optimizer state is keyed by parameter name, not position, and whole: it comes from
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(full_state_dict=True)``, which
gathers FSDP1/FSDP2 shards (every process takes part; process 0 writes) and is loaded back with
``set_optimizer_state_dict``, each process keeping its own shard. So a checkpoint does not depend on
how many processes wrote it. Only the adapter's parameters are in the optimizer, so this is small.
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
from torch import nn

from moslora.io.atomic import atomic_write, atomic_write_json

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
SCALER_JSON = "scaler.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, *, write: bool) -> None:
    """The whole optimizer state of ``model``'s trainable parameters, keyed ``<parameter name>.<state
    name>`` (tensors) and in JSON (param groups, non-tensor state). A collective under FSDP: call it
    on every process; those with ``write`` write."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not write:
        return
    tensors, scalars = {}, {}
    for name, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{name}.{key}"] = value
    atomic_write(folder / OPTIMIZER_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(folder / OPTIMIZER_JSON, {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load what :func:`save_optimizer` wrote (on every process: each keeps its own shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    meta = json.loads((folder / OPTIMIZER_JSON).read_text(encoding="utf-8"))
    state: dict[str, dict[str, Any]] = {}
    # Read on CPU; loading moves each state to its parameter's device.
    for key, tensor in load_file(str(folder / OPTIMIZER_TENSORS), device="cpu").items():
        name, field = key.rsplit(".", 1)
        state.setdefault(name, {})[field] = tensor
    for key, value in meta["scalars"].items():
        name, field = key.rsplit(".", 1)
        state.setdefault(name, {})[field] = value
    # Not strict: a parameter that never had a gradient (e.g. in a layer whose output is unused) has no state.
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True, strict=False))


def save_json_state(obj: Any, path: Path) -> None:
    """``obj.state_dict()`` (an LR scheduler's or a gradient scaler's: numbers and lists) as JSON."""
    atomic_write_json(path, obj.state_dict())


def load_json_state(obj: Any, path: Path) -> None:
    obj.load_state_dict(json.loads(path.read_text(encoding="utf-8")))


def _rng_stem(rank: int | None) -> str:
    return "rng_state" if rank is None else f"rng_state_{rank}"


def save_rng(folder: Path, rank: int | None) -> None:
    """Python, NumPy, torch CPU and (when present) CUDA generator states of this process."""
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
