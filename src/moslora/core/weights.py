r"""Writing ΔW into a base layer's weight: the only place moslora modifies base weights.

A dense floating-point weight gets ``W ← W + sign·ΔW`` in place. A quantized weight goes through a
small table of backends, each a pair of functions::

    W  = dequantize(layer)            fp32, out×in
    W' = W + sign·ΔW
    requantize(layer, W')             a fresh quantized weight from W'

Requantizing rounds, so a merge into a quantized base is approximate; :func:`add_to_weight`
returns the max abs error ``max|dequantize(requantize(W')) − W'|`` for the caller to report.
Supported: bitsandbytes ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt`` (LLM.int8). bitsandbytes is
only imported when such a layer is met.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class QuantizedBackend:
    """How to read and rewrite one kind of quantized weight."""

    name: str
    matches: Callable[[torch.Tensor], bool]
    dequantize: Callable[[nn.Module], torch.Tensor]
    requantize: Callable[[nn.Module, torch.Tensor], None]
    dense_dtype: Callable[[nn.Module], torch.dtype]  # the dtype of a full-precision copy


def _is_bnb(weight: torch.Tensor, cls_name: str) -> bool:
    cls = type(weight)
    return cls.__name__ == cls_name and cls.__module__.startswith("bitsandbytes")


def _dequantize_4bit(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        # An eval-mode forward on a CPU with AVX512-BF16 repacks the weight for its own kernel;
        # restore the standard layout first, as bitsandbytes does itself before saving.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def _requantize_4bit(layer: nn.Module, W: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = layer.weight
    new = bnb.nn.Params4bit(
        W.to("cpu", old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
        quant_type=old.quant_type, quant_storage=old.quant_storage, module=layer,
    )  # fmt: skip
    layer.weight = new.to(old.device)  # moving a not-yet-quantized Params4bit quantizes it


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    # Before the first forward the row scales live on the weight, after it on the layer's state.
    scb = layer.weight.SCB
    return scb if scb is not None else layer.state.SCB


def _dequantize_8bit(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, _int8_scales(layer).to(layer.weight.device)).float()


def _requantize_8bit(layer: nn.Module, W: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = layer.weight
    # LLM.int8 quantizes from fp16, row by row.
    layer.weight = bnb.nn.Int8Params(W.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False).to(old.device)
    layer.state.reset_grads()  # drop the cached int8 weight and scales; the next forward takes the new ones


BACKENDS = (
    QuantizedBackend("bitsandbytes 4-bit", lambda w: _is_bnb(w, "Params4bit"), _dequantize_4bit, _requantize_4bit,
                     lambda layer: layer.weight.quant_state.dtype),
    QuantizedBackend("bitsandbytes 8-bit", lambda w: _is_bnb(w, "Int8Params") and w.dtype == torch.int8, _dequantize_8bit,
                     _requantize_8bit, lambda layer: layer.bias.dtype if layer.bias is not None else torch.float16),
)  # fmt: skip


def quantized_backend(layer: nn.Module) -> QuantizedBackend | None:
    """The backend for ``layer``'s quantized weight, ``None`` if the weight is not one we know."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    return next((b for b in BACKENDS if b.matches(weight)), None)


def is_plain_float_weight(weight: torch.Tensor) -> bool:
    """A dense floating-point tensor we can add to in place (not a quantized tensor subclass)."""
    return type(weight.data) is torch.Tensor and weight.dtype.is_floating_point


def check_mergeable(base_layer: nn.Module) -> None:
    """Raise ``TypeError`` unless ΔW can be written into ``base_layer``'s weight: a dense
    floating-point tensor, or a quantized weight of a backend in :data:`BACKENDS`."""
    weight = base_layer.weight
    if quantized_backend(base_layer) is None and not is_plain_float_weight(weight):
        raise TypeError(
            f"cannot merge into a {type(base_layer).__name__} whose weight is {type(weight.data).__name__} "
            f"of dtype {weight.dtype}: only dense floating-point weights and "
            f"{', '.join(b.name for b in BACKENDS)} weights can be merged"
        )


@torch.no_grad()
def add_to_weight(base_layer: nn.Module, delta: torch.Tensor, sign: int) -> float | None:
    """``W ← W + sign·ΔW``, ΔW given in fp32 (or wider) and in W's layout.

    Returns ``None`` for a dense weight (added in its own dtype, rounded once), and for a quantized
    one the max abs error of the requantized weight against the exact ``W + sign·ΔW``.
    """
    backend = quantized_backend(base_layer)
    if backend is not None:
        W = backend.dequantize(base_layer)
        if delta.shape != W.shape:
            raise ValueError(f"ΔW has shape {tuple(delta.shape)} but the base weight has shape {tuple(W.shape)}")
        target = W + sign * delta.to(device=W.device, dtype=torch.float32)
        backend.requantize(base_layer, target)
        return (backend.dequantize(base_layer) - target).abs().max().item()
    check_mergeable(base_layer)
    weight = base_layer.weight
    if delta.shape != weight.shape:
        raise ValueError(f"ΔW has shape {tuple(delta.shape)} but the base weight has shape {tuple(weight.shape)}")
    if weight.dtype.itemsize >= 4:
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype), alpha=sign)
    else:
        # A half-precision weight: add in fp32 and round once.
        weight.copy_((weight.float() + sign * delta.to(weight.device)).to(weight.dtype))
    return None


@torch.no_grad()
def dense_copy(layer: nn.Module) -> nn.Linear | None:
    """A plain ``nn.Linear`` holding ``layer``'s dequantized weight and its bias, or ``None`` when
    ``layer`` is not quantized."""
    backend = quantized_backend(layer)
    if backend is None:
        return None
    W = backend.dequantize(layer)
    dtype = backend.dense_dtype(layer)
    dense = nn.Linear(W.shape[1], W.shape[0], bias=layer.bias is not None, device=W.device, dtype=dtype)
    dense.weight.copy_(W)
    if layer.bias is not None:
        dense.bias.copy_(layer.bias)
    dense.requires_grad_(False)
    return dense.train(layer.training)
