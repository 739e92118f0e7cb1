r"""MoSLoRA as a PEFT LoRA variant: the mixer M between PEFT's own ``lora_A`` and ``lora_B``.

For an adapter with a mixer, a layer computes ``y = W0·x + s·B(M(A(dropout(x))))``; ΔW = s·B·(M·A) comes
from :func:`moslora.core.layers.delta_weight`, the one formula moslora has. M is an r×r ``nn.Linear``
without bias in the ``lora_M`` ModuleDict, next to PEFT's ``lora_A`` and ``lora_B``, so its parameter
is named ``…lora_M.<adapter>.weight`` as theirs are: PEFT saves, loads, casts, moves, freezes and deletes
it with them, and TRL's copy of an adapter into a frozen ``ref`` adapter (``.default.`` → ``.ref.``)
copies it too.

How it plugs in, where PEFT plugs its own variants:

- :class:`MixerVariant` is a ``LoraVariant`` (as DoRA and KaSA are): init, forward, merge, unmerge.
- Each layer class here registers it under the ``mixer`` field of :class:`moslora.peft.LoraConfig`
  (tagged ``is_lora_variant``) in its ``lora_variants`` registry; bitsandbytes' layers choose their
  variant themselves, so theirs override ``resolve_lora_variant`` for the mixer only.
- :func:`moslora.peft.dispatch.mixer_layer`, which the config registers with
  ``LoraConfig._register_custom_module`` for every module type, picks the layer class for a target, or
  refuses a target that cannot get a mixer (naming it), so no target silently becomes plain LoRA.
- ``get_delta_weight`` folds the mixer, so every PEFT path that asks a layer for ΔW (merging into
  bitsandbytes weights, ``add_weighted_adapter``'s SVD) sees s·B·M·A.

Adapters without a mixer on these layers run PEFT's own code unchanged.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from peft.tuners.lora import Linear as PeftLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from moslora.core.init import init_mixer_
from moslora.core.layers import delta_weight


class MixerVariant(LoraVariant):
    """The mixer as a PEFT LoRA variant. PEFT calls these with the layer as ``module``."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: Any, **kwargs: Any) -> None:
        A = module.lora_A[adapter_name].weight
        r = module.r[adapter_name]
        mixer = nn.Linear(r, r, bias=False, device=A.device, dtype=A.dtype)
        init_mixer_(mixer.weight.data, config.mixer)
        module.lora_M[adapter_name] = mixer

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        lora_A, lora_M, lora_B = module.lora_A[active_adapter], module.lora_M[active_adapter], module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        return result + lora_B(lora_M(lora_A(dropout(x)))) * module.scaling[active_adapter]

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


class MixerLayer:
    """What every layer class here adds to its PEFT LoRA layer (it comes first in their bases)."""

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_M",)

    @property
    def lora_variants(self) -> dict:
        # PEFT resolves a layer's variant from this registry, keyed by the config fields tagged is_lora_variant.
        return {**super().lora_variants, ("mixer",): MixerVariant}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any) -> None:
        if "lora_M" not in self._modules:
            self.lora_M = nn.ModuleDict()
            self.moslora_lineages = _Lineages()
        check_adapter_config(self, adapter_name, config, kwargs.get("target_name"))
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if adapter not in self.lora_M:
            return super().get_delta_weight(adapter)
        B = self.lora_B[adapter].weight
        delta = delta_weight(self.lora_A[adapter].weight, self.lora_M[adapter].weight, B, self.scaling[adapter])
        return (delta.T if self.fan_in_fan_out else delta).to(B.dtype)


class _Lineages(dict):
    """Adapter name → a weak reference to the lineage of the config it was made with. Copies and pickles
    of a layer start empty (weak references cannot be pickled; a deep copy's configs have new lineages)."""

    def __reduce__(self) -> tuple:
        return _Lineages, ()


class Linear(MixerLayer, PeftLinear):
    """PEFT's ``lora.Linear`` (``nn.Linear``, and transformers' ``Conv1D`` with ``fan_in_fan_out``) with the mixer."""


def check_mixer_field(layer: LoraLayer, adapter_name: str, config: Any, target_name: str | None) -> None:
    """A config without a ``mixer`` field (PEFT's own ``LoraConfig``) has nothing to choose by on these layers."""
    if not hasattr(config, "mixer"):
        raise TypeError(
            f"adapter {adapter_name!r} on {target_name or type(layer.get_base_layer()).__name__!r}: this layer carries "
            "moslora.peft adapters, so further adapters need a moslora.peft.LoraConfig "
            f"(mixer=None for plain LoRA), not {type(config).__module__}.{type(config).__name__}; "
            "moslora.peft.load_adapter loads a saved one"
        )


def check_adapter_config(layer: LoraLayer, adapter_name: str, config: Any, target_name: str | None) -> None:
    """Refuse, before the layer changes, an adapter config these layers would run wrongly: a config
    without a ``mixer`` field to choose by (PEFT's own ``LoraConfig``), or a shallow copy of the config
    another adapter was made with, on a layer that holds a mixer. PEFT's ``add_weighted_adapter`` makes
    its new adapter from such a copy (``dataclasses.replace``) and then writes its A and B from the
    other adapters' A and B, which without their mixers would be a different adapter, silently."""
    where = f"adapter {adapter_name!r} on {target_name or type(layer.get_base_layer()).__name__!r}"
    check_mixer_field(layer, adapter_name, config, target_name)
    lineage = config._lineage
    if lineage.owner is None or lineage.owner() is None:
        lineage.owner = weakref.ref(config)
    elif lineage.copied(config) and len(layer.lora_M):
        raise ValueError(
            f"{where}: its LoraConfig is a copy (dataclasses.replace, copy.copy) of the config another adapter was made "
            "with, on a layer with MoSLoRA adapters. PEFT's add_weighted_adapter makes its adapter that way and then "
            "combines the adapters' A and B without their mixers, which is not the combination you asked for: use "
            "moslora.peft.add_weighted_adapter(model, ...), which is exact. For a new adapter, make a new moslora.peft.LoraConfig"
        )
    # What LoraConfig.__post_init__ walks to tell whether a copy is made on a model with mixers.
    lineage.layers.add(layer)
    layer.moslora_target_name = target_name or type(layer.get_base_layer()).__name__
    layer.moslora_lineages[adapter_name] = weakref.ref(lineage)
