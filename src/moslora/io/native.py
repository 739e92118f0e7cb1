"""moslora's native adapter format.

A directory with two files:

- ``adapter_model.safetensors``: the tensors, keyed ``<module>.lora_A``, ``<module>.lora_M``,
  ``<module>.lora_B`` (and ``<module>.<param>`` for ``modules_to_save``). Its metadata carries the
  whole adapter config too, so the tensor file alone is a complete, self-consistent adapter.
- ``adapter_config.json``: ``format: "moslora"``, the format version, every config field, each
  wrapped module with its kind and shapes, and the base model's name when known.

The config deliberately has no ``peft_type``: a tool that only knows plain LoRA must refuse the
directory rather than load A and B and silently drop the mixer. Use :func:`moslora.export_lora`
to get a plain LoRA adapter that is exactly equal.

Each file is written atomically, the tensor file first. Loading takes the config from the tensor
file, so an interrupted save leaves the previous adapter or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from moslora import __version__
from moslora.config import MoSLoRAConfig
from moslora.core.layers import MoSLoRALayer, layer_class_for
from moslora.io.atomic import atomic_write, atomic_write_json
from moslora.io.validate import AdapterFormatError, check_adapter_tensors
from moslora.model.inject import adapter_layers, get_config, inject, saved_module_names
from moslora.model.sharded import adapter_entries, clean_name, gather_adapter, is_writer, layer_shapes, same_outcome, sharding, unwrap

FORMAT = "moslora"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
_METADATA_KEY = "moslora_adapter_config"
# Refuse configs whose rank could only be a mistake or an attack, before anything is allocated.
MAX_RANK = 65536
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


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
            metadata = {"format": FORMAT, _METADATA_KEY: json.dumps(description)}
            atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
            atomic_write_json(directory / CONFIG_NAME, description)
    return directory


def adapter_contents(model: nn.Module, *, base_model_name_or_path: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What :func:`save_adapter` writes, in memory: the description and the tensors (on CPU),
    checked. Collective on a sharded model (see :func:`save_adapter`)."""
    tensors = gather_adapter(model)
    check_adapter_tensors(f"the adapter of this {type(model).__name__}", tensors, {e.key: e.shape for e in adapter_entries(model)})
    model = unwrap(model)
    config = get_config(model)
    layers = [(clean_name(name), layer) for name, layer in adapter_layers(model)]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moslora_version": __version__,
        "base_model_name_or_path": base_model_name_or_path,
        "config": config.to_dict(),
        "modules": {name: _describe(layer) for name, layer in layers},
        "modules_to_save": [clean_name(name) for name in saved_module_names(model)],
    }
    return description, tensors


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
    description = _description_from(directory, metadata)
    return description, tensors


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, *, trainable: bool = True, allow_pickle: bool = False
) -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model`` (a base model, or one already injected
    with the same layers, whose adapter values are then replaced).

    ``directory`` is a native adapter or one of the authors' MoSLoRA checkpoints (PEFT style, with
    ``lora_AB`` or ``lora_mixer`` tensors; see :mod:`moslora.io.peft_format`). Their pickled
    ``adapter_model.bin`` is read only with ``allow_pickle=True``. A plain LoRA adapter has no
    mixer to load: start from one with :func:`moslora.import_lora`.

    Everything is checked before the model is touched: module names, kinds and every tensor's
    shape. On any error the model is left as it was.
    """
    directory = Path(directory)
    # Imported here: peft_format builds on this module.
    from moslora.io.peft_format import is_peft_dir, read_mixer_checkpoint

    if is_peft_dir(directory):
        description, tensors = read_mixer_checkpoint(directory, allow_pickle=allow_pickle)
    else:
        description, tensors = read_adapter(directory)
    return place_adapter(model, directory, description, tensors, trainable=trainable)


def place_adapter(
    model: nn.Module, directory: Path, description: dict[str, Any], tensors: dict[str, torch.Tensor], *, trainable: bool = True
) -> nn.Module:
    """Put an adapter read from ``directory`` (native description and tensors) into ``model``,
    checking every name and shape first; ``directory`` only names the source in errors."""
    config = MoSLoRAConfig.from_dict(description["config"])
    modules = description["modules"]
    already = dict(adapter_layers(model))
    if already:
        _check_same_layers(directory, already, modules)
    expected = _expected_shapes(model, directory, config, modules, already)
    saved = description["modules_to_save"]
    for name in saved:
        _check_module_name(directory, "modules_to_save", name)
        try:
            state = model.get_submodule(name).state_dict()
        except AttributeError:
            raise AdapterFormatError(f"{directory / CONFIG_NAME}: modules_to_save names {name!r}, which this model does not have") from None
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in state.items()})
    _check_tensors(directory / WEIGHTS_NAME, tensors, expected)

    if not already:
        # Exact names: the adapter lands on the very layers it was trained on.
        inject(model, config.replace(target_modules=list(modules), exclude_modules=None, modules_to_save=saved or None))
    layers = dict(adapter_layers(model))
    with torch.no_grad():
        for name, layer in layers.items():
            for attr, param in layer.adapter_parameters():
                param.copy_(tensors[f"{name}.{attr}"])
                param.requires_grad_(trainable and (attr != "lora_M" or config.train_mixer))
        for name in saved:
            module = model.get_submodule(name)
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
            module.requires_grad_(trainable)
    return model


def _describe(layer: MoSLoRALayer) -> dict[str, Any]:
    return {
        "kind": layer.kind,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "shapes": {attr: list(shape) for attr, shape in layer_shapes(layer).items()},
    }


def _description_from(directory: Path, metadata: dict[str, str]) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    on_disk = None
    if config_path.is_file():
        try:
            on_disk = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterFormatError(f"{config_path} is not valid JSON: {e}") from e
    if _METADATA_KEY in metadata:
        try:
            description = json.loads(metadata[_METADATA_KEY])
        except json.JSONDecodeError as e:
            raise AdapterFormatError(f"{directory / WEIGHTS_NAME}: its embedded adapter config is not valid JSON: {e}") from e
        if on_disk is not None and on_disk != description:
            warnings.warn(
                f"{config_path} differs from the config embedded in {WEIGHTS_NAME} (an interrupted save, or a "
                "hand edit); using the embedded one, which always matches the tensors",
                stacklevel=3,
            )
    elif on_disk is not None:
        description = on_disk
    else:
        raise AdapterFormatError(f"no {CONFIG_NAME} in {str(directory)!r} and no config embedded in {WEIGHTS_NAME}")
    _validate_description(config_path, description)
    return description


def _validate_description(where: Path, d: Any) -> None:
    if not isinstance(d, dict):
        raise AdapterFormatError(f"{where}: the adapter config must be a JSON object")
    if "peft_type" in d or d.get("format") != FORMAT:
        raise AdapterFormatError(
            f"{where}: not a moslora adapter (format={d.get('format')!r}, peft_type={d.get('peft_type')!r}); "
            "an authors'-format MoSLoRA checkpoint loads with moslora.load_adapter, a plain LoRA one with moslora.import_lora"
        )
    if d.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{where}: format_version {d.get('format_version')!r} is not supported (this moslora reads {FORMAT_VERSION})")
    for key, kind in (("config", dict), ("modules", dict), ("modules_to_save", list)):
        if not isinstance(d.get(key), kind):
            raise AdapterFormatError(f"{where}: field {key!r} must be a JSON {kind.__name__.replace('dict', 'object')}")
    try:
        config = MoSLoRAConfig.from_dict(d["config"])
    except (TypeError, ValueError) as e:
        raise AdapterFormatError(f"{where}: field 'config' is invalid: {e}") from e
    if config.r > MAX_RANK:
        raise AdapterFormatError(f"{where}: field 'config.r': r={config.r} is larger than any real adapter (at most {MAX_RANK})")
    if not d["modules"]:
        raise AdapterFormatError(f"{where}: field 'modules' is empty")
    for name in d["modules"]:
        _check_module_name(where, "modules", name)


def _check_module_name(where: Path, field: str, name: Any) -> None:
    if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
        raise AdapterFormatError(f"{where}: field {field!r} has an invalid module name {name!r} (expected a dotted module path)")


def _expected_shapes(
    model: nn.Module, directory: Path, config: MoSLoRAConfig, modules: dict[str, Any], already: dict[str, MoSLoRALayer]
) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name in modules:
        if name in already:
            layer_shapes = {attr: tuple(p.shape) for attr, p in already[name].adapter_parameters()}
        else:
            try:
                base = model.get_submodule(name)
            except AttributeError:
                raise AdapterFormatError(
                    f"{directory / CONFIG_NAME}: the adapter has a layer {name!r} that this {type(model).__name__} does not have"
                ) from None
            cls = layer_class_for(base, name)
            if cls is None:
                raise AdapterFormatError(f"{directory}: layer {name!r} of this model is a {type(base).__name__}, which MoSLoRA cannot wrap")
            layer_shapes = cls.adapter_shapes(base, config)
        shapes.update({f"{name}.{attr}": shape for attr, shape in layer_shapes.items()})
    return shapes


def _check_same_layers(directory: Path, already: dict[str, MoSLoRALayer], modules: dict[str, Any]) -> None:
    if set(already) != set(modules):
        missing = sorted(set(modules) - set(already)) or sorted(set(already) - set(modules))
        raise AdapterFormatError(
            f"{directory}: the model already has MoSLoRA adapters on other layers than the saved adapter "
            f"(first difference: {missing[0]!r}); load it into the base model instead"
        )


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    for key, shape in expected.items():
        if key not in tensors:
            raise AdapterFormatError(f"{path}: tensor {key!r} is missing")
        if tuple(tensors[key].shape) != shape:
            raise AdapterFormatError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)} but this model needs {shape}; "
                "was the adapter trained on a different base model?"
            )
        if not tensors[key].dtype.is_floating_point:
            raise AdapterFormatError(f"{path}: tensor {key!r} has dtype {tensors[key].dtype}; adapters are floating point")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        # Never drop a tensor silently: an unplaced lora_M would be a silently dropped mixer.
        raise AdapterFormatError(f"{path}: tensor {unexpected[0]!r} does not belong to any layer of the adapter config")

