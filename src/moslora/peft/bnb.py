"""The mixer on PEFT's bitsandbytes LoRA layers (QLoRA): imported only when a model has bitsandbytes layers.

These layers choose their variant in their own ``resolve_lora_variant`` rather than from the
``lora_variants`` registry, so here the mixer is resolved through the registry (where only it is
registered) and everything else is left to theirs. Merging goes through their own dequantize and
requantize, with ΔW from the mixer variant.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lora import LoraLayer
from peft.tuners.lora import bnb as peft_bnb
from peft.tuners.lora.layer import LoraVariant

from moslora.peft.layers import MixerLayer


class _ResolveMixer:
    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> LoraVariant | None:
        if config.mixer is None:
            return super().resolve_lora_variant(config=config, **kwargs)
        return LoraLayer.resolve_lora_variant(self, config=config, **kwargs)


class Linear8bitLt(_ResolveMixer, MixerLayer, peft_bnb.Linear8bitLt):
    """PEFT's 8-bit LoRA layer with the mixer."""


class Linear4bit(_ResolveMixer, MixerLayer, peft_bnb.Linear4bit):
    """PEFT's 4-bit (QLoRA) LoRA layer with the mixer."""
