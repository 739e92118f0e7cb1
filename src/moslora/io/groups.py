"""Saving and loading a model whose adapter is split in groups (:mod:`moslora.model.groups`).

A groups directory holds one native adapter per group, in a subfolder named after the group's
submodule, and a manifest written last::

    adapter_groups.json                  {"format": "moslora-groups", "format_version": 1,
                                          "groups": ["model.language_model", "model.vision_tower"],
                                          "base_model_name_or_path": ...}
    model.language_model/adapter_config.json, adapter_model.safetensors
    model.vision_tower/adapter_config.json, adapter_model.safetensors

Each subfolder is an ordinary native adapter, so ``moslora.load_adapter(model.get_submodule(g), dir/g)``
works on one group alone; :func:`moslora.load_adapter_groups` loads them all (:mod:`moslora.io.load`). :func:`export_groups_peft` writes the whole model's adapter as one PEFT
LoRA adapter: the groups' own ranks and alphas go in PEFT's ``rank_pattern`` and ``alpha_pattern``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moslora.io.atomic import atomic_write_json
from moslora.io.native import adapter_contents, read_adapter, save_adapter
from moslora.io.peft_format import peft_config, peft_tensors, write_peft
from moslora.model.description import AdapterDescription, AdapterFormatError, check_module_name
from moslora.model.groups import adapter_groups

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
        try:
            check_module_name("groups", prefix)
        except AdapterFormatError as e:
            raise AdapterFormatError(f"{path}: {e}") from None
    return manifest


def read_adapter_groups(directory: str | os.PathLike) -> list[tuple[str, AdapterDescription, dict[str, torch.Tensor]]]:
    """Every group of a groups directory, read and checked: ``(prefix, description, tensors)`` in manifest order."""
    directory = Path(directory)
    return [(prefix, *read_adapter(directory / prefix)) for prefix in read_manifest(directory)["groups"]]


def export_groups_peft(src: nn.Module | str | os.PathLike, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter groups of ``src`` (a model with groups, or a groups directory) as ONE PEFT
    LoRA adapter of the whole model, exactly equal: each mixer folded into A (A' = M·A), module
    names prefixed with their group, and the first group's r and alpha as PEFT's ``r`` and
    ``lora_alpha`` with the other groups' in ``rank_pattern`` / ``alpha_pattern`` (so PEFT's
    scaling is each group's own alpha/r). Loads with ``PeftModel.from_pretrained(base, out_dir)``.
    """
    if isinstance(src, nn.Module):
        groups = adapter_groups(src)
        if not groups or "" in groups:
            raise ValueError("this model has no adapter groups; export a model injected as a whole with moslora.export_lora")
        parts = [(prefix, *adapter_contents(src.get_submodule(prefix))) for prefix in groups]
    else:
        parts = read_adapter_groups(src)
    first = parts[0][1].config
    tensors: dict[str, torch.Tensor] = {}
    targets, saved, rank_pattern, alpha_pattern = [], [], {}, {}
    for prefix, description, group_tensors in parts:
        config = description.config
        if config.use_rslora != first.use_rslora:
            raise ValueError("PEFT has one use_rslora for the whole adapter; these groups differ in it")
        for name in description.modules:
            targets.append(f"{prefix}.{name}")
            if config.r != first.r:
                rank_pattern[f"{prefix}.{name}"] = config.r
            if config.alpha != first.alpha:
                alpha_pattern[f"{prefix}.{name}"] = config.alpha
        tensors.update(peft_tensors(description, group_tensors, prefix=prefix))
        saved += [f"{prefix}.{name}" for name in description.modules_to_save]
    head = parts[0][1]
    if base_model_name_or_path is not None:
        head = head.replace(base_model_name_or_path=base_model_name_or_path)
    config = peft_config(head, target_modules=sorted(targets), modules_to_save=saved or None, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                         fan_in_fan_out=any(layer.kind == "conv1d-transformers" for _, d, _ in parts for layer in d.modules.values()))
    return write_peft(out_dir, tensors, config)
