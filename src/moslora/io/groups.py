"""Saving and loading a model whose adapter is split in groups (:mod:`moslora.model.groups`).

A groups directory holds one native adapter per group, in a subfolder named after the group's
submodule, and a manifest written last::

    adapter_groups.json                  {"format": "moslora-groups", "format_version": 1,
                                          "groups": ["model.language_model", "model.vision_tower"],
                                          "base_model_name_or_path": ...}
    model.language_model/adapter_config.json, adapter_model.safetensors
    model.vision_tower/adapter_config.json, adapter_model.safetensors

Each subfolder is an ordinary native adapter, so ``moslora.load_adapter(model.get_submodule(g), dir/g)``
and ``moslora.export_lora(dir/g, ...)`` work on one group alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from moslora.io.atomic import atomic_write_json
from moslora.io.native import AdapterFormatError, _check_module_name, place_adapter, read_adapter, save_adapter
from moslora.model.groups import adapter_groups
from moslora.model.inject import adapter_layers, unload

FORMAT = "moslora-groups"
FORMAT_VERSION = 1
MANIFEST_NAME = "adapter_groups.json"


def save_adapter_groups(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write every group's adapter of ``model`` under ``directory`` and the manifest last. Returns the path."""
    groups = adapter_groups(model)
    if not groups:
        raise ValueError("this model has no MoSLoRA adapters; call moslora.inject or inject_groups first")
    if "" in groups:
        raise ValueError("this model was injected as a whole; save it with moslora.save_adapter")
    directory = Path(directory)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    for prefix in groups:
        save_adapter(model.get_submodule(prefix), directory / prefix, base_model_name_or_path=base_model_name_or_path)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "groups": list(groups), "base_model_name_or_path": base_model_name_or_path}
    atomic_write_json(directory / MANIFEST_NAME, manifest)
    return directory


def is_groups_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST_NAME).is_file()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of a groups directory."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {str(directory)!r}: not an adapter-groups directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterFormatError(f"{path}: not a moslora adapter-groups manifest (format must be {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{path}: format_version {manifest.get('format_version')!r} is not supported (this moslora reads {FORMAT_VERSION})")
    groups = manifest.get("groups")
    if not isinstance(groups, list) or not groups:
        raise AdapterFormatError(f"{path}: field 'groups' must be a non-empty list of submodule names")
    for prefix in groups:
        _check_module_name(path, "groups", prefix)
    return manifest


def load_adapter_groups(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = True) -> nn.Module:
    """Add every group's adapter saved in ``directory`` to ``model`` (a base model, or one already
    injected with the same groups, whose adapter values are then replaced).

    All groups are read and checked before any is placed; if placing one still fails (a shape
    that does not fit), the adapters placed by this call are removed again, so a base model is
    left as it was.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    present = adapter_groups(model)
    if present and set(present) != set(manifest["groups"]):
        raise AdapterFormatError(f"{directory}: the model has adapter groups {sorted(present)}, the directory {manifest['groups']}")
    read = []
    for prefix in manifest["groups"]:
        try:
            submodule = model.get_submodule(prefix)
        except AttributeError:
            raise AdapterFormatError(f"{directory / MANIFEST_NAME}: group {prefix!r} is not a submodule of this {type(model).__name__}") from None
        read.append((submodule, directory / prefix, *read_adapter(directory / prefix)))
    had_adapters = next(adapter_layers(model), None) is not None
    if not had_adapters:  # as inject_groups: what lies outside every group is frozen
        for param in model.parameters():
            param.requires_grad_(False)
    try:
        for submodule, folder, description, tensors in read:
            place_adapter(submodule, folder, description, tensors, trainable=trainable)
    except Exception:
        if not had_adapters:
            unload(model)
        raise
    return model
