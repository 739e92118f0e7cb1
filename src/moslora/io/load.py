"""The public loaders: read an adapter from any format moslora knows, then place it in a model.

Reading is :mod:`moslora.io` (each format has its own reader that returns an
:class:`~moslora.model.description.AdapterDescription` and tensors); placing is
:mod:`moslora.model.place`, which checks everything against the model before changing it. This
module only chooses the reader:

- a directory whose ``adapter_config.json`` has a ``peft_type`` is PEFT-style: one of the authors'
  MoSLoRA checkpoints for :func:`load_adapter` (:mod:`moslora.io.peft_format`), a plain LoRA
  adapter for :func:`import_lora`;
- any other directory is a native moslora adapter (:mod:`moslora.io.native`);
- a directory with ``adapter_groups.json`` holds adapter groups (:mod:`moslora.io.groups`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moslora.io.groups import read_adapter_groups
from moslora.io.native import read_adapter
from moslora.io.peft_format import is_peft_dir, read_mixer_checkpoint, read_peft_dir, with_new_mixer
from moslora.model.description import AdapterFormatError
from moslora.model.place import place_adapter, place_adapter_groups


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = True, allow_pickle: bool = False) -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model`` (a base model, or one already injected
    with the same layers, whose adapter values are then replaced).

    ``directory`` is a native adapter or one of the authors' MoSLoRA checkpoints (PEFT style, with
    ``lora_AB`` or ``lora_mixer`` tensors). Their pickled ``adapter_model.bin`` is read only with
    ``allow_pickle=True``. A plain LoRA adapter has no mixer to load: start from one with
    :func:`import_lora`.

    Everything is checked before the model is touched: module names, kinds and every tensor's
    shape. On any error the model is left as it was.
    """
    if is_peft_dir(directory):
        description, tensors = read_mixer_checkpoint(directory, allow_pickle=allow_pickle)
    else:
        description, tensors = read_adapter(directory)
    return place_adapter(model, description, tensors, trainable=trainable, source=str(directory))


def import_lora(
    model: nn.Module, directory: str | os.PathLike, mixer: str | None = "identity", *, trainable: bool = True, allow_pickle: bool = False
) -> nn.Module:
    """Start MoSLoRA from a plain PEFT LoRA adapter: its A and B, with a new mixer M between them.

    The outputs at import equal those of the LoRA adapter: with ``mixer="identity"`` exactly, with
    an invertible random mixer (``"kaiming"``, ``"orthogonal"``) up to rounding, since A is set to
    M⁻¹·A. ``mixer=None`` loads it as plain LoRA. ``"two-subspace"`` is singular and refused.
    A checkpoint that already has a mixer loads with :func:`load_adapter` instead.
    """
    directory = Path(directory)
    description, tensors, base_weights = read_peft_dir(directory, allow_pickle=allow_pickle)
    if description.has_mixer:
        raise AdapterFormatError(f"{directory} already has a mixer (a MoSLoRA checkpoint); load it with moslora.load_adapter")
    description, tensors = with_new_mixer(description, tensors, mixer)
    _check_base_weights(model, directory, base_weights)
    return place_adapter(model, description, tensors, trainable=trainable, source=str(directory))


def load_adapter_groups(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = True) -> nn.Module:
    """Add every group's adapter saved in ``directory`` to ``model`` (a base model, or one already
    injected with the same groups, whose adapter values are then replaced).

    All groups are read and checked before any is placed; if placing one still fails (a shape
    that does not fit), the adapters placed by this call are removed again, so a base model is
    left as it was.
    """
    parts = read_adapter_groups(directory)
    return place_adapter_groups(model, parts, trainable=trainable, source=str(directory))


def _check_base_weights(model: nn.Module, directory: Path, base_weights: dict[str, torch.Tensor]) -> None:
    # PEFT stores an adapted embedding's base weight too; it must be this model's, or the adapter
    # was trained on a different (e.g. resized) embedding and would not fit.
    for key, saved in base_weights.items():
        module, _, param = key.rpartition(".")
        current = None
        for candidate in (key, f"{module}.base_layer.{param}"):  # the model may be injected already
            try:
                current = model.get_parameter(candidate)
                break
            except AttributeError:
                continue
        if current is None:
            raise AdapterFormatError(f"{directory}: the adapter stores base weight {key!r}, which this model does not have")
        if current.shape != saved.shape or not torch.equal(current.detach().cpu().to(saved.dtype), saved):
            raise AdapterFormatError(
                f"{directory}: the adapter's copy of base weight {key!r} differs from this model's; "
                "it was trained on a different (resized?) base, so apply that base first"
            )
