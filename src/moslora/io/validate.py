"""The check every adapter writer makes before a byte is written.

A file is either exactly the adapter the model's layers imply or it is not written: every tensor
that the layers and ``modules_to_save`` hold is there, under the model's own module path, whole
(the shape the layer was built with, never the empty or 1-D piece a sharded engine keeps on one
process), and floating point.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moslora.model.description import AdapterFormatError
from moslora.model.sharded import WRAPPER_SEGMENTS


def check_adapter_tensors(where: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...] | None]) -> None:
    """Raise :class:`AdapterFormatError` naming ``where`` and the first tensor at fault unless
    ``tensors`` has exactly the keys of ``expected``, each non-empty, floating point, and of the
    expected shape (``None``: any shape)."""
    for key in tensors:
        wrapper = next((part for part in key.split(".") if part in WRAPPER_SEGMENTS), None)
        if wrapper is not None:
            raise AdapterFormatError(
                f"{where}: tensor {key!r} is named through the wrapper segment {wrapper!r}, not the model's own module "
                "path; it would not load into the model. Nothing was written"
            )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterFormatError(f"{where}: tensor {missing[0]!r} of the adapter is missing. Nothing was written")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise AdapterFormatError(f"{where}: tensor {unexpected[0]!r} belongs to no adapter layer. Nothing was written")
    for key, shape in expected.items():
        tensor = tensors[key]
        if tensor.numel() == 0 or (shape is not None and tuple(tensor.shape) != shape):
            raise AdapterFormatError(
                f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, but the adapter layer needs "
                f"{shape if shape is not None else 'a non-empty tensor'}. This is what a sharded engine keeps on one "
                "process (FSDP, DeepSpeed ZeRO-3): call save_adapter on every process with the model the engine "
                "wrapped, so the adapter is gathered whole. Nothing was written"
            )
        if not tensor.dtype.is_floating_point:
            raise AdapterFormatError(f"{where}: tensor {key!r} has dtype {tensor.dtype}; adapters are floating point. Nothing was written")
