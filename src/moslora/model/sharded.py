"""Adapter tensors of a model that a distributed engine has sharded: gathered whole, and put back.

Engines keep only a piece of each parameter on each process:

- FSDP2 (``torch.distributed.fsdp.fully_shard``) turns parameters into ``DTensor`` shards;
- FSDP1 (``FullyShardedDataParallel``) flattens each unit's parameters into one flat parameter and
  keeps 1/N of it, so a module's ``lora_A`` is a 1-D slice (or empty) outside a forward;
- DeepSpeed ZeRO-3 keeps a partition in ``param.ds_tensor`` and leaves the parameter empty.

Reading such a parameter gives a piece, not the adapter. Each engine documents one collective way
to see the whole, and every process must take part: ``DTensor.full_tensor()``,
``FullyShardedDataParallel.summon_full_params``, ``deepspeed.zero.GatheredParameters``.
:func:`gather_adapter` does that for the adapter's tensors only (not the frozen base), and
:func:`place_adapter_tensors` is its inverse (every process writes its own piece).

Names are the injected model's own module paths: the path segments the wrappers add
(``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``, torch.compile's ``_orig_mod``) are
dropped, and DDP / DeepSpeed / FSDP1 root wrappers are looked through.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Iterator, NoReturn

import torch
from torch import nn

if torch.distributed.is_available():
    # Imported now, before any process group exists, on purpose. This module binds the default group
    # into its functions' default arguments when it is first imported (``group=group.WORLD``); if
    # that happens after ``init_process_group`` (FSDP imports it lazily), ``destroy_process_group``
    # cannot free the group, gloo's worker threads outlive it into interpreter shutdown, and a
    # worker that drops the last reference to a Python-owned tensor there aborts the process
    # ("terminate called without an active exception"). Imported before, the default is ``None``.
    import torch.distributed.nn.functional  # noqa: F401

from moslora.core.layers import MoSLoRAConv, MoSLoRALayer
from moslora.model.inject import adapter_layers, saved_module_names

# Path segments that wrappers insert between a model and its modules.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """``name`` without the wrappers' path segments: the module path in the unwrapped model."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def unwrap(model: nn.Module) -> nn.Module:
    """The injected model inside DDP, a DeepSpeed engine, an FSDP1 root or ``torch.compile``."""
    while True:
        if _is_fsdp1(model) or type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine"):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def layer_shapes(layer: MoSLoRALayer) -> dict[str, tuple[int, ...]]:
    """The shapes of a layer's A, M and B as built (``lora_A`` is r×in, a conv kernel r×in×k… for
    convolutions; M r×r; B out×r), from what the layer recorded: its parameters may be sharded now."""
    kernel = tuple(layer.base_layer.kernel_size) if isinstance(layer, MoSLoRAConv) else ()
    shapes = {"lora_A": (layer.r, layer.in_features, *kernel)}
    if layer.mixer_init is not None:
        shapes["lora_M"] = (layer.r, layer.r)
    shapes["lora_B"] = (layer.out_features, layer.r)
    return shapes


@dataclass
class AdapterEntry:
    """One tensor of the adapter: its key in the saved file, the live tensor (a parameter, maybe
    sharded, or a buffer), and the shape it must have when whole (``None`` for ``modules_to_save``,
    whose state is whatever the module holds)."""

    key: str
    tensor: torch.Tensor
    shape: tuple[int, ...] | None


def adapter_entries(model: nn.Module) -> list[AdapterEntry]:
    """Every tensor of the adapter of ``model`` (possibly wrapped), in model order: each layer's
    ``lora_A``, ``lora_M``, ``lora_B``, then the state of ``modules_to_save``."""
    inner = unwrap(model)
    entries = []
    for name, layer in adapter_layers(inner):
        shapes = layer_shapes(layer)
        for attr in shapes:
            entries.append(AdapterEntry(f"{clean_name(name)}.{attr}", getattr(layer, attr), shapes[attr]))
    for name in saved_module_names(inner):
        for key, tensor in inner.get_submodule(name).state_dict(keep_vars=True).items():
            entries.append(AdapterEntry(clean_name(f"{name}.{key}"), tensor, None))
    return entries


def sharding(model: nn.Module) -> str | None:
    """How the adapter of ``model`` is sharded: ``"fsdp2"``, ``"fsdp1"``, ``"zero3"``, or ``None``
    when every process holds it whole (one process, DDP, ZeRO-1/2)."""
    from torch.distributed.tensor import DTensor

    tensors = [e.tensor for e in adapter_entries(model)]
    if any(isinstance(t, DTensor) for t in tensors):
        return "fsdp2"
    if any(hasattr(t, "ds_id") for t in tensors):
        return "zero3"
    if any(_is_fsdp1(m) for m in model.modules()):
        return "fsdp1"
    return None


def gather_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter of ``model`` as whole tensors on CPU, keyed like the native format.

    On a sharded model this is a collective: call it on every process, in the same order as any
    other collective (each process gets the whole adapter). Nothing of the model changes.
    """
    kind = sharding(model)
    entries = adapter_entries(model)
    if kind == "fsdp2":
        from torch.distributed.tensor import DTensor

        return {e.key: _cpu(e.tensor.full_tensor() if isinstance(e.tensor, DTensor) else e.tensor) for e in entries}
    if kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([e.tensor for e in entries if hasattr(e.tensor, "ds_id")], modifier_rank=None):
            return {e.key: _cpu(e.tensor) for e in entries}
    if kind == "fsdp1":
        return _gather_fsdp1(model)
    return {e.key: _cpu(e.tensor) for e in entries}


@torch.no_grad()
def place_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole adapter tensors (as :func:`gather_adapter` returns them, checked by the caller)
    into the adapter of ``model``, each process keeping its own piece. Collective on a sharded
    model: call it on every process with the same tensors."""
    kind = sharding(model)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with contextlib.ExitStack() as stack:
            for unit in _outermost_fsdp1(model):
                stack.enter_context(FSDP.summon_full_params(unit, writeback=True))
            for e in adapter_entries(model):
                e.tensor.copy_(tensors[e.key])
        return
    entries = adapter_entries(model)
    if kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([e.tensor for e in entries if hasattr(e.tensor, "ds_id")], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                for e in entries:
                    e.tensor.copy_(tensors[e.key])
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    for e in entries:
        value = tensors[e.key].to(device=e.tensor.device, dtype=e.tensor.dtype)
        if isinstance(e.tensor, DTensor):  # every process has the whole tensor: each takes its shard, no communication
            value = distribute_tensor(value, e.tensor.device_mesh, e.tensor.placements, src_data_rank=None)
        e.tensor.copy_(value)


def numel(param: torch.Tensor) -> int:
    """The number of elements of ``param`` when whole (a ZeRO-3 parameter is empty in place; a
    DTensor counts its global shape already)."""
    return int(getattr(param, "ds_numel", param.numel()))


def _gather_fsdp1(model: nn.Module) -> dict[str, torch.Tensor]:
    # Process 0 unshards into CPU memory (the whole model, FSDP1 has no finer unit) and
    # broadcasts the adapter, which is small, to the others.
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with contextlib.ExitStack() as stack:
        for unit in _outermost_fsdp1(model):
            # Offloading is for accelerator memory (and crashes when the parameters are on CPU already).
            on_cpu = all(p.device.type == "cpu" for p in unit.parameters())
            stack.enter_context(FSDP.summon_full_params(unit, writeback=False, rank0_only=True, offload_to_cpu=not on_cpu))
        found = [{e.key: _cpu(e.tensor) for e in adapter_entries(model)} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(found, src=0)
    return found[0]


def _outermost_fsdp1(model: nn.Module) -> list[nn.Module]:
    if _is_fsdp1(model):
        return [model]
    units = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if _is_fsdp1(child):
                units.append(child)
            else:
                visit(child)

    visit(model)
    return units


def _is_fsdp1(module: nn.Module) -> bool:
    return type(module).__name__ == "FullyShardedDataParallel"


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def is_writer() -> bool:
    """Whether this process writes files that every process would write alike: process 0 of a
    distributed run, or the only process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def same_outcome(collective: bool) -> Iterator[None]:
    """Every process leaves the block the way process 0 did: when process 0 raised, every other
    process raises too (with its message), so none goes on to wait in the next collective."""
    import torch.distributed as dist

    if not (collective and dist.is_available() and dist.is_initialized()):
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, on every process
        error = e
    outcome = [f"{type(error).__name__}: {error}" if error is not None else None]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"process 0 failed: {outcome[0]}")


def exit_process(code: int) -> NoReturn:
    """Exit with ``code``; a process in a process group destroys the group and leaves without the
    interpreter's finalization.

    Engines keep references to their process groups (DeepSpeed's group registry, FSDP2's state),
    so destroying the default group does not free them, and gloo's worker threads live on into
    the interpreter's shutdown. There, rarely, one of them aborts the process after the work is
    done ("terminate called without an active exception", SIGABRT): a finished run exits
    non-zero and its launcher kills the other ranks. Seen under FSDP2 and DeepSpeed ZeRO-2 on CPU.
    The registered ``atexit`` functions (logging's flush, trackers' final uploads) still run;
    only the module teardown that the threads would outlive is skipped.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    dist.destroy_process_group()
    atexit._run_exitfuncs()  # what finalization would run first; CPython has no public spelling
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
