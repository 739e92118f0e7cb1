"""Model surgery: find the target layers of a model and wrap them in MoSLoRA layers."""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from moslora.config import ALL_LINEAR, MoSLoRAConfig
from moslora.core.layers import SUPPORTED_KINDS, MoSLoRALayer, is_linear_kind, layer_class_for
from moslora.model.full_state import watch_full_state

CONFIG_ATTR = "_moslora_config"
# PEFT's task_type by the model class's name: it picks the PeftModel class (and lets
# AutoPeftModelFor… load an exported adapter).
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS"}
# The heads PEFT trains fully and saves with the adapter for a task (its SEQ_CLS and TOKEN_CLS
# modules_to_save): a classification model made from a base checkpoint gets them newly initialised.
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def matches(name: str, patterns: list[str] | str) -> bool:
    """A list entry matches the full name or its dotted suffix; a string is a full-name regex."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, MoSLoRALayer]]:
    """Every MoSLoRA layer in ``model`` with its module name (the name of the layer it wraps)."""
    for name, module in model.named_modules():
        if isinstance(module, MoSLoRALayer):
            yield name, module


def get_config(model: nn.Module) -> MoSLoRAConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("this model has no MoSLoRA adapters; call moslora.inject(model, config) first")
    return config


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` of a transformers model, from its class name (``None`` when unknown)."""
    return next((t for suffix, t in TASK_TYPES.items() if type(model).__name__.endswith(suffix)), None)


def task_heads(model: nn.Module) -> list[str]:
    """The task heads of a classification model that PEFT trains and saves whole (``classifier``,
    ``score``: the top-level ones it has); ``[]`` for any other model."""
    children = dict(model.named_children())
    return [name for name in _TASK_HEADS.get(peft_task_type(model), ()) if name in children]


def find_targets(model: nn.Module, config: MoSLoRAConfig) -> list[str]:
    """Names of the modules ``config`` targets, in model order. Raises ``ValueError`` if none match."""
    output_heads = {id(m) for m in [_output_head(model), *(model.get_submodule(n) for n in task_heads(model))] if m is not None}
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, MoSLoRALayer):
            continue
        if config.exclude_modules is not None and matches(name, config.exclude_modules):
            continue
        if config.target_modules == ALL_LINEAR:
            if id(module) in output_heads or not is_linear_kind(module):
                continue
        elif not matches(name, config.target_modules):
            continue
        if layer_class_for(module, name) is None:
            raise TypeError(
                f"target_modules {config.target_modules!r} matched module {name!r} of type "
                f"{type(module).__name__}, which MoSLoRA cannot wrap; supported kinds: {SUPPORTED_KINDS}"
            )
        names.append(name)
    if not names:
        existing = [n for n, m in model.named_modules() if n and not list(m.children())]
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of this "
            f"{type(model).__name__}; some of its layers are: {existing[:12]}"
        )
    return names


def inject(model: nn.Module, config: MoSLoRAConfig) -> nn.Module:
    """Wrap the target layers of ``model`` in MoSLoRA layers, in place, and freeze everything else.

    A is drawn for every layer before any mixer, so for a given seed A is the same with or without
    a mixer: runs that differ only in the mixer start from the same subspaces.

    With ``config.modules_to_save=None`` a classification model's task head (``score`` or
    ``classifier``, see :func:`task_heads`) trains fully and is saved with the adapter, as with
    PEFT's ``SEQ_CLS``; the model's config (:func:`get_config`) then names it. ``modules_to_save=[]``
    keeps it frozen.

    Returns ``model`` (now with adapters) for chaining.
    """
    if not isinstance(config, MoSLoRAConfig):
        raise TypeError(f"config must be a MoSLoRAConfig, got {type(config).__name__}")
    existing = next(adapter_layers(model), None)
    if existing is not None:
        raise ValueError(
            f"this model already has MoSLoRA adapters (e.g. at {existing[0]!r}); "
            "call moslora.unload or moslora.merge_and_unload before injecting again"
        )
    targets = find_targets(model, config)
    if config.modules_to_save is None:
        heads = [h for h in task_heads(model) if not any(h == t or h.startswith(t + ".") for t in targets)]
        if heads:
            config = config.replace(modules_to_save=heads)
    saved = _modules_to_save(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    layers = []
    for name in targets:
        parent, attr = parent_of(model, name)
        base = getattr(parent, attr)
        layer = layer_class_for(base, name)(base, config, init_mixer=False)
        layer.train(base.training)  # a model injected in eval mode must not start dropping out
        setattr(parent, attr, layer)
        layers.append(layer)
    for layer in layers:
        layer.reset_mixer()
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    watch_full_state(model)  # its full state_dict is no checkpoint of the trained model: say so when one is taken
    return model


def saved_module_names(model: nn.Module) -> list[str]:
    """Names of the fully trained modules (``config.modules_to_save``) of an injected model, or of
    every injected submodule of a model with adapter groups (see :mod:`moslora.model.groups`)."""
    configs = {prefix: vars(module)[CONFIG_ATTR] for prefix, module in model.named_modules() if CONFIG_ATTR in vars(module)}
    if not configs:
        get_config(model)  # raises: no adapters
    return [f"{prefix}.{name}" if prefix else name
            for prefix, config in configs.items() for name in _modules_to_save(model.get_submodule(prefix), config)]


def _modules_to_save(model: nn.Module, config: MoSLoRAConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n and matches(n, config.modules_to_save)]
    names = [n for n in names if not any(n.startswith(other + ".") for other in names)]
    if not names:
        raise ValueError(f"modules_to_save {config.modules_to_save!r} matched no module of this {type(model).__name__}")
    return names


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds submodule ``name`` as an attribute, and that attribute's name."""
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


@torch.no_grad()
def unload(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Replace every MoSLoRA layer by its base layer (merging ΔW in first when ``merge``)."""
    for name, layer in list(adapter_layers(model)):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        parent, attr = parent_of(model, name)
        setattr(parent, attr, layer.base_layer)
    # Adapter groups (moslora.model.groups) keep their config on the submodule they were injected into.
    for module in model.modules():
        if CONFIG_ATTR in vars(module):
            delattr(module, CONFIG_ATTR)
    return model
