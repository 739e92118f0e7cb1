"""moslora's native adapter format.

A directory with two files:

- ``adapter_model.safetensors``: the tensors, keyed ``<module>.lora_A``, ``<module>.lora_M``,
  ``<module>.lora_B`` (and ``<module>.<param>`` for ``modules_to_save``). Its metadata carries the
  whole description too, so the tensor file alone is a complete, self-consistent adapter.
- ``adapter_config.json``: ``format: "moslora"``, the format version, every config field, each
  wrapped module with its kind and shapes, and the base model's name when known.

The config deliberately has no ``peft_type``: a tool that only knows plain LoRA must refuse the
directory rather than load A and B and silently drop the mixer. Use :func:`moslora.export_lora`
to get a plain LoRA adapter that is exactly equal.

Each file is written atomically, the tensor file first. Loading takes the description from the
tensor file, so an interrupted save leaves the previous adapter or the new one, never a mix.

:func:`description_to_json` and :func:`description_from_json` are the one place an
:class:`~moslora.model.description.AdapterDescription` is turned into JSON and back (with every
field checked); the other formats reuse them where they store a description.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from moslora.config import MoSLoRAConfig
from moslora.core.layers import LAYER_KINDS
from moslora.io.atomic import atomic_write, atomic_write_json
from moslora.io.validate import check_adapter_tensors
from moslora.model.description import AdapterDescription, AdapterFormatError, LayerDescription, describe_adapter
from moslora.model.sharded import adapter_entries, gather_adapter, is_writer, same_outcome, sharding, unwrap
from moslora.version import __version__

FORMAT = "moslora"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
_METADATA_KEY = "moslora_adapter_config"


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter (only the adapter) of an injected model to ``directory``. Returns the path.

    Every tensor is checked before anything is written (see :mod:`moslora.io.validate`). In a
    distributed run only process 0 writes. On a model whose adapter an engine shards (FSDP,
    DeepSpeed ZeRO-3), call it on every process with the model as the engine wrapped it: the
    adapter is gathered collectively, and if process 0 fails every process raises.
    """
    directory = Path(directory)
    with same_outcome(collective=sharding(model) is not None):
        description, tensors = adapter_contents(model, base_model_name_or_path=base_model_name_or_path)
        if is_writer():
            write_adapter(directory, description, tensors)
    return directory


def adapter_contents(model: nn.Module, *, base_model_name_or_path: str | None = None) -> tuple[AdapterDescription, dict[str, torch.Tensor]]:
    """What :func:`save_adapter` writes, in memory: the description and the tensors (whole, on
    CPU), checked. Collective on a sharded model (see :func:`save_adapter`)."""
    tensors = gather_adapter(model)
    check_adapter_tensors(f"the adapter of this {type(model).__name__}", tensors, {e.key: e.shape for e in adapter_entries(model)})
    return describe_adapter(unwrap(model), base_model_name_or_path=base_model_name_or_path), tensors


def write_adapter(directory: str | os.PathLike, description: AdapterDescription, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``description`` and ``tensors`` as a native adapter directory (tensors first, each file atomically)."""
    directory = Path(directory)
    data = description_to_json(description)
    metadata = {"format": FORMAT, _METADATA_KEY: json.dumps(data)}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write_json(directory / CONFIG_NAME, data)
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterDescription, dict[str, torch.Tensor]]:
    """Read and validate a native adapter directory: its description and its tensors (on CPU).

    Raises :class:`AdapterFormatError` naming the file and the field at fault.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    if not weights.is_file():
        pickles = [name for name in PICKLE_NAMES if (directory / name).is_file()]
        if pickles:
            raise AdapterFormatError(
                f"{directory / pickles[0]} is a pickle file, which can run arbitrary code when loaded; native moslora "
                "adapters are safetensors only. A PEFT-style checkpoint (with its adapter_config.json) whose source you "
                "trust loads with allow_pickle=True."
            )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in adapter directory {str(directory)!r}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{weights} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e
    return _description_in(directory, metadata), tensors


def description_to_json(description: AdapterDescription) -> dict[str, Any]:
    """The JSON object of ``adapter_config.json`` (and of the tensor file's metadata)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moslora_version": __version__,
        "base_model_name_or_path": description.base_model_name_or_path,
        "config": description.config.to_dict(),
        "modules": {
            name: {"kind": layer.kind, "in_features": layer.in_features, "out_features": layer.out_features,
                   "shapes": {attr: list(shape) for attr, shape in layer.shapes.items()}}
            for name, layer in description.modules.items()
        },
        "modules_to_save": list(description.modules_to_save),
        "task_type": description.task_type,
    }


def description_from_json(data: Any, where: str | os.PathLike) -> AdapterDescription:
    """Check every field of a native description read from ``where`` and build it; an error names
    ``where`` and the field at fault."""
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{where}: the adapter config must be a JSON object")
    if "peft_type" in data or data.get("format") != FORMAT:
        raise AdapterFormatError(
            f"{where}: not a moslora adapter (format={data.get('format')!r}, peft_type={data.get('peft_type')!r}); "
            "an authors'-format MoSLoRA checkpoint loads with moslora.load_adapter, a plain LoRA one with moslora.import_lora"
        )
    if data.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{where}: format_version {data.get('format_version')!r} is not supported (this moslora reads {FORMAT_VERSION})")
    for key, kind in (("config", dict), ("modules", dict), ("modules_to_save", list)):
        if not isinstance(data.get(key), kind):
            raise AdapterFormatError(f"{where}: field {key!r} must be a JSON {kind.__name__.replace('dict', 'object')}")
    try:
        config = MoSLoRAConfig.from_dict(data["config"])
    except (TypeError, ValueError) as e:
        raise AdapterFormatError(f"{where}: field 'config' is invalid: {e}") from e
    try:
        modules = {name: _layer_from_json(name, info) for name, info in data["modules"].items()}
        return AdapterDescription(
            config=config, modules=modules, modules_to_save=tuple(data["modules_to_save"]),
            base_model_name_or_path=_optional_str(data, "base_model_name_or_path"), task_type=_optional_str(data, "task_type"),
        )  # fmt: skip
    except AdapterFormatError as e:
        raise AdapterFormatError(f"{where}: {e}") from None


def _layer_from_json(name: Any, info: Any) -> LayerDescription:
    where = f"field 'modules.{name}'"
    if not isinstance(info, dict):
        raise AdapterFormatError(f"{where} must be a JSON object")
    if info.get("kind") not in LAYER_KINDS:
        raise AdapterFormatError(f"{where}: kind {info.get('kind')!r} is not one of {LAYER_KINDS}")
    for key in ("in_features", "out_features"):
        if isinstance(info.get(key), bool) or not isinstance(info.get(key), int):
            raise AdapterFormatError(f"{where}: {key} must be an integer, got {info.get(key)!r}")
    shapes = info.get("shapes")
    if not isinstance(shapes, dict) or not all(isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in s)
                                               for s in shapes.values()):
        raise AdapterFormatError(f"{where}: shapes must map lora_A, lora_M, lora_B to lists of integers")
    return LayerDescription(info["kind"], info["in_features"], info["out_features"], {k: tuple(v) for k, v in shapes.items()})


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise AdapterFormatError(f"field {key!r} must be a string or null, got {value!r}")
    return value


def _description_in(directory: Path, metadata: dict[str, str]) -> AdapterDescription:
    """The description embedded in the tensor file (which always matches the tensors), else the
    one in ``adapter_config.json``; a disagreement between the two is warned about."""
    config_path = directory / CONFIG_NAME
    on_disk = None
    if config_path.is_file():
        try:
            on_disk = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterFormatError(f"{config_path} is not valid JSON: {e}") from e
    if _METADATA_KEY in metadata:
        try:
            data = json.loads(metadata[_METADATA_KEY])
        except json.JSONDecodeError as e:
            raise AdapterFormatError(f"{directory / WEIGHTS_NAME}: its embedded adapter config is not valid JSON: {e}") from e
        if on_disk is not None and on_disk != data:
            warnings.warn(
                f"{config_path} differs from the config embedded in {WEIGHTS_NAME} (an interrupted save, or a "
                "hand edit); using the embedded one, which always matches the tensors",
                stacklevel=3,
            )
    elif on_disk is not None:
        data = on_disk
    else:
        raise AdapterFormatError(f"no {CONFIG_NAME} in {str(directory)!r} and no config embedded in {WEIGHTS_NAME}")
    return description_from_json(data, config_path)
