"""Writing ΔW into a base layer's weight: the only place moslora modifies base weights."""

from __future__ import annotations

import torch
from torch import nn


def is_plain_float_weight(weight: torch.Tensor) -> bool:
    """A dense floating-point tensor we can add to in place (not a quantized tensor subclass)."""
    return type(weight.data) is torch.Tensor and weight.dtype.is_floating_point


@torch.no_grad()
def add_to_weight(base_layer: nn.Module, delta: torch.Tensor, sign: int) -> None:
    """``W ← W + sign·ΔW`` in the weight's own dtype, ΔW given in fp32 and in W's layout."""
    weight = base_layer.weight
    if not is_plain_float_weight(weight):
        raise TypeError(
            f"cannot merge into a {type(base_layer).__name__} whose weight is {type(weight.data).__name__} "
            f"of dtype {weight.dtype}: only dense floating-point weights can be merged in place"
        )
    if delta.shape != weight.shape:
        raise ValueError(f"ΔW has shape {tuple(delta.shape)} but the base weight has shape {tuple(weight.shape)}")
    if weight.dtype.itemsize >= 4:
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype), alpha=sign)
    else:
        # A half-precision weight: add in fp32 and round once.
        weight.copy_((weight.float() + sign * delta.to(weight.device)).to(weight.dtype))
