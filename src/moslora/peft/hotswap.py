r"""Hot-swapping a PEFT-route adapter: A, M and B swapped together, padded as PEFT pads ranks, or refused.

PEFT's ``hotswap_adapter`` copies the file's tensors into the adapter's, in place (so a compiled model
is not recompiled). It pads a smaller rank with zeros along the rank axis of A and B, and fills every
adapter tensor the file lacks with zeros. Run on a MoSLoRA adapter with a plain LoRA folder it zeroes
every mixer (ΔW = 0, silently), and with a folder of a smaller rank it stops at the first mixer with a
shape error, half swapped. :func:`hotswap_adapter` checks the whole file first and hands PEFT a state
dict it swaps exactly:

- a mixer from the file of rank r' ≤ r goes in as the block ``[[M', 0], [0, 0]]`` of the adapter's r×r
  mixer; with A padded by zero rows and B by zero columns, B·M·A is the file's adapter exactly;
- a plain LoRA adapter from the file into a layer with a mixer gets M = I (the mixer-less case);
- refused before anything changes: a larger rank than the adapter's tensors (PEFT would grow them,
  which a compiled model cannot take), a file with mixers into an adapter without them (that needs new
  modules: load it with :func:`moslora.peft.load_adapter`), and whatever PEFT's own checks refuse.
"""

from __future__ import annotations

import os
from typing import Any

import peft
import torch
from peft.utils.hotswap import check_hotswap_configs_compatible, hotswap_adapter_from_state_dict
from peft.utils.other import infer_device
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

from moslora.peft.model import _hub_kwargs, check_file, load_peft_weights, read_config

_PREFIX = "lora_"


def hotswap_adapter(model: peft.PeftModel, model_id: str | os.PathLike, adapter_name: str,
                    torch_device: str | None = None, **kwargs: Any) -> None:
    """PEFT's ``peft.utils.hotswap.hotswap_adapter`` (same arguments) for MoSLoRA and plain LoRA folders
    into MoSLoRA or plain LoRA adapters: exact, or an error before anything changes (module docstring)."""
    config = read_config(model_id, **kwargs)
    check_hotswap_configs_compatible(model.peft_config[adapter_name], config)
    saved = load_peft_weights(str(model_id), device=torch_device or infer_device(), **_hub_kwargs(kwargs))
    check_file(config, saved, model_id)
    state = _insert_adapter_name_into_state_dict(saved, adapter_name=adapter_name, parameter_prefix=_PREFIX)
    root = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    layers = {key.rpartition(f".lora_A.{adapter_name}.")[0] for key in state if f".lora_A.{adapter_name}." in key}
    for name in sorted(layers):
        _fit_mixer(root, name, adapter_name, state, model_id)
    hotswap_adapter_from_state_dict(model, state, adapter_name, config=config, parameter_prefix=_PREFIX)


def _fit_mixer(root: torch.nn.Module, name: str, adapter: str, state: dict[str, torch.Tensor], model_id: Any) -> None:
    """Check one layer's tensors from the file against the adapter's, and put the mixer PEFT will copy
    (padded to the adapter's r×r, or the identity for a plain adapter) into ``state``."""
    try:
        layer = root.get_submodule(name)
        A = layer.lora_A[adapter].weight
    except (AttributeError, KeyError):
        raise ValueError(f"{model_id}: layer {name!r} has no adapter {adapter!r} to swap into; the folder targets "
                         "other layers than the adapter (load it with moslora.peft.load_adapter)") from None
    key_M = f"{name}.lora_M.{adapter}.weight"
    r, new_r = A.shape[0], state[f"{name}.lora_A.{adapter}.weight"].shape[0]
    B = layer.lora_B[adapter].weight
    new = {"lora_A": (r, *A.shape[1:]), "lora_B": (B.shape[0], r, *B.shape[2:])}
    for part, shape in new.items():
        got = state.get(f"{name}.{part}.{adapter}.weight")
        fits = got is not None and got.shape == ((new_r, *shape[1:]) if part == "lora_A" else (shape[0], new_r, *shape[2:]))
        if new_r > r or not fits:
            raise ValueError(f"{model_id}: layer {name!r}: the folder's {part} is {tuple(got.shape) if got is not None else None}, "
                             f"adapter {adapter!r} holds {shape}; hot-swapping takes the same features and a rank up to the "
                             "adapter's (a smaller one is padded with zeros). Nothing was swapped")
    mixers = getattr(layer, "lora_M", {})
    if adapter not in mixers:
        if key_M in state:
            raise ValueError(f"{model_id}: the folder's adapter has a mixer (lora_M) on layer {name!r} but adapter {adapter!r} "
                             "has none there, and hot-swapping cannot add one. Load it as another adapter with "
                             "moslora.peft.load_adapter. Nothing was swapped")
        return
    M = mixers[adapter].weight
    new_M = state.get(key_M)
    if new_M is None:  # a plain LoRA adapter: B·I·A
        new_M = torch.eye(new_r, dtype=M.dtype)
    elif new_M.shape != (new_r, new_r):
        raise ValueError(f"{model_id}: layer {name!r}: the folder's lora_M is {tuple(new_M.shape)}, its rank is {new_r}. Nothing was swapped")
    padded = torch.zeros(r, r, dtype=new_M.dtype, device=new_M.device)
    padded[:new_r, :new_r] = new_M
    state[key_M] = padded
