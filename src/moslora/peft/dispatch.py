"""Which LoRA layer a target gets: :func:`mixer_layer`, registered by :class:`moslora.peft.LoraConfig`
with PEFT's ``LoraConfig._register_custom_module`` for every module type, so every target comes here
before PEFT's own dispatch."""

from __future__ import annotations

import sys
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from moslora.core.layers import is_multihead_out_proj, transformers_conv1d_class
from moslora.peft.layers import Linear

MIXER_TARGETS = "nn.Linear, bitsandbytes' Linear8bitLt and Linear4bit, and transformers' Conv1D"


def mixer_layer(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
    """The LoRA layer for ``target`` (registered with ``_register_custom_module`` for every module type).

    With a mixer, a target that cannot get one is an error naming it. Without a mixer, targets other
    than the layers here are left to PEFT's own dispatch (``None``)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    cls = _layer_class(base)
    if cls is None:
        if config.mixer is None:
            return None
        raise ValueError(
            f"moslora.peft: target module {kwargs.get('target_name')!r} is a {type(base).__module__}.{type(base).__name__}, "
            f"which gets no mixer on the PEFT route ({MIXER_TARGETS} do). Leave it out (target_modules, exclude_modules), "
            "or use the native route (moslora.inject), which also gives mixers to convolutions, embeddings, quanto and torchao layers"
        )
    if cls is Linear:
        # PEFT's own dispatch sets fan_in_fan_out by the target's kind; it skips that for custom modules.
        config.fan_in_fan_out = _is_conv1d(base)
    return cls(target, adapter_name, config=config, **kwargs)


def _layer_class(base: nn.Module) -> type | None:
    bnb = sys.modules.get("bitsandbytes")  # a model with bitsandbytes layers has imported it
    if bnb is not None and isinstance(base, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
        from moslora.peft import bnb as mixer_bnb

        return mixer_bnb.Linear8bitLt if isinstance(base, bnb.nn.Linear8bitLt) else mixer_bnb.Linear4bit
    if _is_conv1d(base):
        return Linear
    # A plain weight only: a tensor subclass (torchao) needs its own merge, which PEFT's layers for it have.
    plain = isinstance(base, nn.Linear) and type(base.weight.data) is torch.Tensor and base.weight.dtype.is_floating_point
    return Linear if plain and not is_multihead_out_proj(base) else None


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = transformers_conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)
