"""Adapter groups: different MoSLoRA settings for different parts of one model.

A vision-language model such as LLaVA is tuned with one setting for its language model and another
for its vision tower (the paper: LLM r=64, alpha=128; vision r=64, alpha=16). A group is a
submodule injected on its own, ``inject(model.get_submodule(prefix), config)``, so each group is an
ordinary injected model with its own config, and nothing in the core changes:

- every adapter layer carries its own r and scaling, so :func:`moslora.merge`, :func:`moslora.unmerge`,
  :func:`moslora.merge_and_unload`, :func:`moslora.disabled` and :func:`moslora.adapter_layers` work
  on the whole model as they are;
- which submodules are groups is found structurally (the submodules that :func:`moslora.inject`
  gave a config), so a plain injected model is the one-group case with prefix ``""``;
- saving and loading go through :mod:`moslora.io.groups`, one native adapter per group.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

from torch import nn

from moslora.config import MoSLoRAConfig
from moslora.model.inject import CONFIG_ATTR, adapter_layers, inject, unload


def inject_groups(model: nn.Module, groups: Mapping[str, MoSLoRAConfig]) -> nn.Module:
    """Inject ``groups[prefix]`` into the submodule ``prefix`` of ``model``, for every prefix.

    Prefixes must name distinct submodules, none inside another. A is drawn group by group, in
    the order given, so a seed fixes the whole init. Everything outside the adapters (and each
    config's ``modules_to_save``) is frozen. Returns ``model``.
    """
    if not groups:
        raise ValueError("inject_groups needs at least one group: a mapping of submodule name to MoSLoRAConfig")
    prefixes = list(groups)
    for prefix in prefixes:
        if not isinstance(groups[prefix], MoSLoRAConfig):
            raise TypeError(f"group {prefix!r}: config must be a MoSLoRAConfig, got {type(groups[prefix]).__name__}")
        try:
            model.get_submodule(prefix)
        except AttributeError:
            raise ValueError(f"group {prefix!r}: this {type(model).__name__} has no such submodule") from None
        for other in prefixes:
            if other != prefix and (prefix == "" or other.startswith(prefix + ".")):
                raise ValueError(f"groups {prefix!r} and {other!r} overlap: one is inside the other")
    existing = next(adapter_layers(model), None)
    if existing is not None:
        raise ValueError(f"this model already has MoSLoRA adapters (e.g. at {existing[0]!r}); unload them first")
    with frozen_outside_adapters(model):  # inject unfreezes each group's adapters
        for prefix in prefixes:
            inject(model.get_submodule(prefix), groups[prefix])
    return model


def adapter_groups(model: nn.Module) -> dict[str, MoSLoRAConfig]:
    """``{prefix: config}`` of every injected submodule, in model order (``{"": config}`` for a
    model injected as a whole; ``{}`` for one without adapters)."""
    return {name: getattr(module, CONFIG_ATTR) for name, module in model.named_modules() if hasattr(module, CONFIG_ATTR)}



@contextlib.contextmanager
def frozen_outside_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """For adding adapters group by group: a model without adapters is frozen first (what lies
    outside every group stays frozen), and if the block fails, every adapter added in it is
    removed again, so the model is left without adapters, as it came."""
    had_adapters = next(adapter_layers(model), None) is not None
    if not had_adapters:
        for param in model.parameters():
            param.requires_grad_(False)
    try:
        yield model
    except BaseException:
        if not had_adapters:
            unload(model)
        raise
