"""Model-level operations on an injected model: merge, unmerge, disable, count, collect."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from moslora.core.layers import MoSLoRALayer
from moslora.core.weights import check_mergeable, dense_copy
from moslora.model.inject import adapter_layers, parent_of, saved_module_names, unload
from moslora.model.sharded import clean_name, gather_adapter, numel, unwrap


def _layers_or_raise(model: nn.Module):
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("this model has no MoSLoRA adapters; call moslora.inject(model, config) first")
    return layers


@torch.no_grad()
def merge(model: nn.Module, *, safe: bool = False) -> nn.Module:
    """Add every layer's ΔW into its base weight, so forward costs exactly what the base costs.

    With ``safe=True`` every ΔW is checked to be finite before any base weight is touched; a
    non-finite one raises ``ValueError`` naming the layer, and the model is left as it was.

    A quantized base weight (bitsandbytes 4-bit, 8-bit) is dequantized, ΔW added, and requantized;
    the rounding makes that approximate, and a warning reports the max abs error. For an exact
    merge into a full-precision model use ``merge_and_unload(model, dequantize=True)``.
    """
    layers = _layers_or_raise(model)
    already = [name for name, layer in layers if layer.merged]
    if already:
        raise ValueError(f"the adapters are already merged (e.g. at {already[0]!r}); call moslora.unmerge first")
    for _, layer in layers:  # every layer must take its ΔW before the first one is changed
        check_mergeable(layer.base_layer)
    if safe:
        for name, layer in layers:
            if not torch.isfinite(layer.get_delta_weight()).all():
                raise ValueError(f"refusing to merge: ΔW of layer {name!r} has NaN or Inf values; no weight was changed")
    _warn_requantized("merge", {name: layer.merge() for name, layer in layers})
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every layer's ΔW from its base weight again (exact up to the weight's rounding)."""
    layers = _layers_or_raise(model)
    if not any(layer.merged for _, layer in layers):
        raise ValueError("the adapters are not merged, so there is nothing to unmerge")
    _warn_requantized("unmerge", {name: layer.unmerge() for name, layer in layers if layer.merged})
    return model


def merge_and_unload(model: nn.Module, *, safe: bool = True, dequantize: bool = False) -> nn.Module:
    """Merge every adapter into its base weight and put the plain base layers back.

    The result has the base model's modules and state-dict keys and no adapter overhead. With
    ``dequantize=True`` every quantized linear layer of the model (adapted or not) is first replaced
    by a full-precision ``nn.Linear``, so the merge is exact and the result is a full-precision model.
    """
    layers = _layers_or_raise(model)
    if dequantize:
        if any(layer.merged for _, layer in layers):
            unmerge(model)
        _dequantize_layers(model)
    if not all(layer.merged for _, layer in layers):
        if any(layer.merged for _, layer in layers):
            unmerge(model)
        merge(model, safe=safe)
    return unload(model, merge=True)


def _dequantize_layers(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, MoSLoRALayer):  # its weight is its base layer's, which is visited next
            continue
        dense = dense_copy(module)
        if dense is not None:
            parent, attr = parent_of(model, name)
            setattr(parent, attr, dense)
    # A transformers model also records that it is quantized; it no longer is.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)


def _warn_requantized(action: str, errors: dict[str, float | None]) -> None:
    errors = {name: e for name, e in errors.items() if e is not None}
    if errors:
        worst = max(errors, key=errors.get)
        warnings.warn(
            f"{action} rewrote {len(errors)} quantized weight(s) (dequantize, add, requantize); rounding makes this "
            f"approximate: max abs error {errors[worst]:.3g} against the exact weights, at {worst!r}. "
            "merge_and_unload(model, dequantize=True) merges exactly into a full-precision model",
            stacklevel=_stacklevel_outside_moslora(),
        )


_MOSLORA_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
# torch.no_grad() as a decorator adds a frame of its own between a function and its caller.
_NO_GRAD_WRAPPER = os.path.join("torch", "utils", "_contextlib.py")


def _stacklevel_outside_moslora() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside moslora, whichever
    public function (``merge``, ``merge_and_unload``, …) it came through."""
    level, frame = 1, sys._getframe(1)  # level 1: the function that calls warnings.warn
    while frame is not None and (frame.f_code.co_filename.startswith(_MOSLORA_DIR) or frame.f_code.co_filename.endswith(_NO_GRAD_WRAPPER)):
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the block every adapter is skipped (merged ones are unmerged
    for its duration and merged back after)."""
    layers = [layer for _, layer in _layers_or_raise(model)]
    was_merged = [layer.merged for layer in layers]
    for layer, merged in zip(layers, was_merged):
        if merged:
            layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged):
            layer.disabled = False
            if merged:
                layer.merge()


def keep_starting_adapter(model: nn.Module) -> bool:
    """Keep in every adapter layer a frozen copy of its adapter (A, M, B) as it is now, for
    :func:`as_it_started`: a trainer's reference model is the policy as training started, also when
    it starts from a trained adapter. Collective where an engine shards the adapter (call it on
    every process). Returns ``False`` and keeps nothing when every B is zero: the model with its
    adapters off is then that same model, without a copy."""
    tensors = gather_adapter(model)
    if not any(t.any() for key, t in tensors.items() if key.endswith(".lora_B")):
        return False
    for name, layer in adapter_layers(unwrap(model)):
        key, device = clean_name(name), layer.lora_B.device
        A, M, B = (tensors.get(f"{key}.{attr}") for attr in ("lora_A", "lora_M", "lora_B"))
        layer.starting_copy = (A.to(device), None if M is None else M.to(device), B.to(device))
    return True


@contextlib.contextmanager
def as_it_started(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model as it was when :func:`keep_starting_adapter` was called: inside the block
    every layer runs its frozen starting copy, or, with none (a fresh adapter), is skipped."""
    layers = [layer for _, layer in _layers_or_raise(model)]
    if all(layer.starting_copy is None for layer in layers):
        with disabled(model):
            yield model
        return
    if any(layer.merged for layer in layers):
        raise ValueError("the adapters are merged: unmerge them before running the model as it started")
    for layer in layers:
        layer.run_starting_copy = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.run_starting_copy = False


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed ``<module>.lora_A|lora_M|lora_B`` (and the full state of
    ``modules_to_save`` keyed ``<module>.<param>``), detached, in the model's naming."""
    state = {}
    for name, layer in _layers_or_raise(model):
        for attr, param in layer.adapter_parameters():
            state[f"{name}.{attr}"] = param.detach()
    for name in saved_module_names(model):
        for pname, tensor in model.get_submodule(name).state_dict().items():
            state[f"{name}.{pname}"] = tensor.detach()
    return state


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts: ``A``, ``M``, ``B`` (adapter), ``saved`` (modules_to_save),
    ``trainable`` (all that requires grad), ``total`` (every parameter of the model)."""
    counts = {"A": 0, "M": 0, "B": 0}
    for _, layer in adapter_layers(model):
        for attr, param in layer.adapter_parameters():
            if param.requires_grad:
                counts[attr[-1]] += _numel(param)
    saved = {id(p) for n in saved_module_names(model) for p in model.get_submodule(n).parameters()}
    counts["saved"] = sum(_numel(p) for p in model.parameters() if id(p) in saved and p.requires_grad)
    counts["trainable"] = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    counts["total"] = sum(_numel(p) for p in model.parameters())
    return counts


def print_trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Print (and return) trainable parameters as PEFT does, with the mixer's share shown."""
    c = parameter_counts(model)
    adapter = c["A"] + c["M"] + c["B"]
    mixer_share = 100.0 * c["M"] / adapter if adapter else 0.0
    print(
        f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
        f"trainable%: {100.0 * c['trainable'] / max(c['total'], 1):.4f}\n"
        f"  adapter: A {c['A']:,} + M {c['M']:,} + B {c['B']:,} (mixer {mixer_share:.2f}% of the adapter)"
        + (f"; modules_to_save {c['saved']:,}" if c["saved"] else "")
    )
    return c


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte; count the logical weights. A sharded
    # parameter counts whole.
    shape = getattr(param, "quant_state", None)
    if shape is not None and getattr(shape, "shape", None) is not None:
        return int(torch.Size(shape.shape).numel())
    return numel(param)
