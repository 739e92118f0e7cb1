"""Saving and loading a model whose adapter is split in groups (:mod:`moslora.model.groups`).

A groups directory holds one native adapter per group, in a subfolder named after the group's
submodule, and a manifest written last::

    adapter_groups.json                  {"format": "moslora-groups", "format_version": 1,
                                          "groups": ["model.language_model", "model.vision_tower"],
                                          "base_model_name_or_path": ...}
    model.language_model/adapter_config.json, adapter_model.safetensors
    model.vision_tower/adapter_config.json, adapter_model.safetensors

Each subfolder is an ordinary native adapter, so ``moslora.load_adapter(model.get_submodule(g), dir/g)``
works on one group alone. :func:`export_groups_peft` writes the whole model's adapter as one PEFT
LoRA adapter: the groups' own ranks and alphas go in PEFT's ``rank_pattern`` and ``alpha_pattern``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from moslora.io.atomic import atomic_write_json
from moslora.config import MoSLoRAConfig
from moslora.io.native import (
    CONFIG_NAME,
    AdapterFormatError,
    _check_module_name,
    adapter_contents,
    place_adapter,
    read_adapter,
    save_adapter,
)
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


def export_groups_peft(src: nn.Module | str | os.PathLike, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter groups of ``src`` (a model with groups, or a groups directory) as ONE PEFT
    LoRA adapter of the whole model, exactly equal: each mixer folded into A (A' = M·A), module
    names prefixed with their group, and the first group's r and alpha as PEFT's ``r`` and
    ``lora_alpha`` with the other groups' in ``rank_pattern`` / ``alpha_pattern`` (so PEFT's
    scaling is each group's own alpha/r). Loads with ``PeftModel.from_pretrained(base, out_dir)``.
    """
    from moslora.io.peft_format import write_peft

    if isinstance(src, nn.Module):
        groups = adapter_groups(src)
        if not groups or "" in groups:
            raise ValueError("this model has no adapter groups; export a model injected as a whole with moslora.export_lora")
        parts = [(prefix, *adapter_contents(src.get_submodule(prefix))) for prefix in groups]
    else:
        parts = [(prefix, *read_adapter(Path(src) / prefix)) for prefix in read_manifest(src)["groups"]]
    first = MoSLoRAConfig.from_dict(parts[0][1]["config"])
    modules, tensors, saved, rank_pattern, alpha_pattern = {}, {}, [], {}, {}
    for prefix, description, group_tensors in parts:
        config = MoSLoRAConfig.from_dict(description["config"])
        if config.use_rslora != first.use_rslora:
            raise ValueError("PEFT has one use_rslora for the whole adapter; these groups differ in it")
        for name, info in description["modules"].items():
            modules[f"{prefix}.{name}"] = info
            if config.r != first.r:
                rank_pattern[f"{prefix}.{name}"] = config.r
            if config.alpha != first.alpha:
                alpha_pattern[f"{prefix}.{name}"] = config.alpha
        tensors.update({f"{prefix}.{key}": tensor for key, tensor in group_tensors.items()})
        saved += [f"{prefix}.{name}" for name in description["modules_to_save"]]
    combined = {**parts[0][1], "modules": modules, "modules_to_save": saved}
    if base_model_name_or_path is not None:
        combined["base_model_name_or_path"] = base_model_name_or_path
    out_dir = write_peft(out_dir, combined, tensors)
    config_path = out_dir / CONFIG_NAME
    peft_config = json.loads(config_path.read_text(encoding="utf-8"))
    atomic_write_json(config_path, {**peft_config, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern})
    return out_dir
