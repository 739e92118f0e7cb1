"""Which LoRA layer a target gets: :func:`mixer_layer`, registered by :class:`moslora.peft.LoraConfig`
with PEFT's ``LoraConfig._register_custom_module`` for every module type, so every target comes here
before PEFT's own dispatch."""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn

from moslora.core.layers import is_multihead_out_proj, transformers_conv1d_class
from moslora.peft.layers import Linear, MixerLayer, check_mixer_field

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
        raise ValueError(_no_mixer_for(kwargs.get("target_name"), base))
    if cls is Linear:
        # PEFT's own dispatch sets fan_in_fan_out by the target's kind; it skips that for custom modules.
        config.fan_in_fan_out = _is_conv1d(base)
    return cls(target, adapter_name, config=config, **kwargs)


def check_targets(model: nn.Module, config: Any, adapter_name: str) -> None:
    """Before PEFT changes anything: every module ``config`` targets in ``model`` (a ``PeftModel`` or a
    plain model) can carry adapter ``adapter_name`` as configured. PEFT's own ``get_peft_model`` and
    ``add_adapter`` meet these refusals target by target, after the earlier targets are wrapped.

    Refused, naming the module: a mixer config on a module that cannot get a mixer, or on a LoRA layer
    stock PEFT built (its own layers, bitsandbytes' among them, run a mixer config as plain LoRA: they
    choose their variant without asking moslora); a config without a ``mixer`` field (PEFT's own
    ``LoraConfig``) on a layer of moslora.peft."""
    root = model.base_model.model if isinstance(getattr(model, "base_model", None), BaseTuner) else model
    probe = copy.deepcopy(config)
    if probe.target_modules is None:  # PEFT's default targets for the model type, as its _prepare_adapter_config picks them
        probe.target_modules = LoraModel.target_module_mapping.get(BaseTuner.get_model_config(root)["model_type"])
        if probe.target_modules is None:
            return  # PEFT refuses it before changing anything
    probe = _maybe_include_all_linear_layers(probe, root)
    mixer = getattr(config, "mixer", None)
    inside = ()  # the modules of a LoRA layer (its base layer, lora_A, …) are not targets
    for key, module in root.named_modules():
        if not key or key.startswith(inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside = key + "."
        found = check_target_module_exists(probe, key)
        if not found or isinstance(found, _ExcludedModule):
            continue
        if isinstance(module, MixerLayer):
            check_mixer_field(module, adapter_name, config, key)
        elif isinstance(module, LoraLayer):
            if mixer is not None:
                raise ValueError(
                    f"moslora.peft: layer {key!r} is PEFT's own {type(module).__module__}.{type(module).__name__} (built from a "
                    f"peft.LoraConfig), which runs adapter {adapter_name!r} without its mixer (mixer={mixer!r}). Build the "
                    "model's adapters with moslora.peft.LoraConfig (mixer=None for plain LoRA) so its layers carry mixers; "
                    "nothing was changed"
                )
        elif mixer is not None and _layer_class(module) is None:
            raise ValueError(_no_mixer_for(key, module))


def _no_mixer_for(name: str | None, base: nn.Module) -> str:
    return (f"moslora.peft: target module {name!r} is a {type(base).__module__}.{type(base).__name__}, "
            f"which gets no mixer on the PEFT route ({MIXER_TARGETS} do). Leave it out (target_modules, exclude_modules), "
            "or use the native route (moslora.inject), which also gives mixers to convolutions, embeddings, quanto and torchao layers")


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
