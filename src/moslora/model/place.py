"""Putting an adapter that was read from a file into a model: the model surgery of loading.

The readers in :mod:`moslora.io` turn a file into an :class:`AdapterDescription` and tensors and
never touch a model; :func:`place_adapter` checks every name and shape against the model first,
and only then injects (into a base model) or overwrites (a model already injected with the same
layers). On any error the model is left as it was.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from moslora.core.layers import MoSLoRALayer, layer_class_for
from moslora.model.description import AdapterDescription, AdapterFormatError
from moslora.model.groups import adapter_groups, frozen_outside_adapters
from moslora.model.inject import adapter_layers, inject


def place_adapter(
    model: nn.Module, description: AdapterDescription, tensors: dict[str, torch.Tensor], *, trainable: bool = True, source: str = "adapter"
) -> nn.Module:
    """Put the adapter (``description`` and its ``tensors``) into ``model``, checking every name
    and shape first; ``source`` names where it came from in errors. Returns ``model``."""
    config = description.config
    already = dict(adapter_layers(model))
    if already:
        _check_same_layers(source, already, description)
    expected = _expected_shapes(model, source, description, already)
    for name in description.modules_to_save:
        try:
            state = model.get_submodule(name).state_dict()
        except AttributeError:
            raise AdapterFormatError(f"{source}: modules_to_save names {name!r}, which this model does not have") from None
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in state.items()})
    _check_tensors(source, tensors, expected)

    saved = list(description.modules_to_save)
    if not already:
        # Exact names: the adapter lands on the very layers it was trained on, and exactly the modules
        # it carries whole train fully ([] when none: a classification model's head stays as it is).
        inject(model, config.replace(target_modules=list(description.modules), exclude_modules=None, modules_to_save=saved))
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            for attr, param in layer.adapter_parameters():
                param.copy_(tensors[f"{name}.{attr}"])
                param.requires_grad_(trainable and (attr != "lora_M" or config.train_mixer))
        for name in saved:
            module = model.get_submodule(name)
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
            module.requires_grad_(trainable)
    return model


def place_adapter_groups(
    model: nn.Module, parts: Iterable[tuple[str, AdapterDescription, dict[str, torch.Tensor]]], *, trainable: bool = True,
    source: str = "adapter groups",
) -> nn.Module:
    """Place one adapter per group: ``parts`` holds ``(prefix, description, tensors)``; ``source``
    names where they came from in errors (a group's own source is ``source/prefix``).

    A model that already has adapters must have exactly these groups (their values are replaced).
    Everything outside the groups is frozen, as :func:`moslora.inject_groups` does. If placing a
    group fails, the adapters placed by this call are removed again, so a base model is left as it was.
    """
    parts = list(parts)
    present = adapter_groups(model)
    if present and set(present) != {prefix for prefix, _, _ in parts}:
        raise AdapterFormatError(f"{source}: the model has adapter groups {sorted(present)}, the adapter {[p for p, _, _ in parts]}")
    for prefix, _, _ in parts:
        try:
            model.get_submodule(prefix)
        except AttributeError:
            raise AdapterFormatError(f"{source}: group {prefix!r} is not a submodule of this {type(model).__name__}") from None
    with frozen_outside_adapters(model):
        for prefix, description, tensors in parts:
            place_adapter(model.get_submodule(prefix), description, tensors, trainable=trainable, source=f"{source}/{prefix}")
    return model


def _expected_shapes(
    model: nn.Module, source: str, description: AdapterDescription, already: dict[str, MoSLoRALayer]
) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name in description.modules:
        if name in already:
            layer_shapes = {attr: tuple(p.shape) for attr, p in already[name].adapter_parameters()}
        else:
            try:
                base = model.get_submodule(name)
            except AttributeError:
                raise AdapterFormatError(f"{source}: the adapter has a layer {name!r} that this {type(model).__name__} does not have") from None
            cls = layer_class_for(base, name)
            if cls is None:
                raise AdapterFormatError(f"{source}: layer {name!r} of this model is a {type(base).__name__}, which MoSLoRA cannot wrap")
            layer_shapes = cls.adapter_shapes(base, description.config)
        shapes.update({f"{name}.{attr}": shape for attr, shape in layer_shapes.items()})
    return shapes


def _check_same_layers(source: str, already: dict[str, MoSLoRALayer], description: AdapterDescription) -> None:
    modules = set(description.modules)
    if set(already) != modules:
        missing = sorted(modules - set(already)) or sorted(set(already) - modules)
        raise AdapterFormatError(
            f"{source}: the model already has MoSLoRA adapters on other layers than the saved adapter "
            f"(first difference: {missing[0]!r}); load it into the base model instead"
        )


def _check_tensors(source: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    for key, shape in expected.items():
        if key not in tensors:
            raise AdapterFormatError(f"{source}: tensor {key!r} is missing")
        if tuple(tensors[key].shape) != shape:
            raise AdapterFormatError(
                f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)} but this model needs {shape}; "
                "was the adapter trained on a different base model?"
            )
        if not tensors[key].dtype.is_floating_point:
            raise AdapterFormatError(f"{source}: tensor {key!r} has dtype {tensors[key].dtype}; adapters are floating point")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        # Never drop a tensor silently: an unplaced lora_M would be a silently dropped mixer.
        raise AdapterFormatError(f"{source}: tensor {unexpected[0]!r} does not belong to any layer of the adapter config")
