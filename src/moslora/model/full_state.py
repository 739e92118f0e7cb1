"""An injected model's full ``state_dict()`` is not a checkpoint of the trained model.

Its keys are the wrapper's (``q_proj.base_layer.weight``, ``q_proj.lora_A``, …). A folder that
``save_pretrained`` or a stock ``transformers.Trainer.save_model`` writes from it loads with
``from_pretrained`` as a *different* model: the adapted layers' weights are reported missing and
initialised at random, with only a log line. So :func:`moslora.inject` registers a hook that warns,
once per model, whenever the full state of an injected model is taken outside moslora's own
savers, and says what to use instead. It warns rather than refuses: loading such a state back into
an injected model (``model.load_state_dict``) is a legitimate use.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
import weakref
from typing import Iterator

from torch import nn

from moslora.core.layers import MoSLoRALayer

_EXPECTED = contextvars.ContextVar("moslora_full_state_expected", default=False)
_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

ADVICE = (
    "the full state_dict of a model with MoSLoRA adapters has the wrapper's keys (…base_layer.weight, …lora_A), "
    "so a folder saved from it with save_pretrained or transformers.Trainer.save_model does NOT load back with "
    "from_pretrained as this model: the adapted layers come back missing and randomly initialised. Train with "
    "moslora.hf.AdapterTrainer (or moslora.hf.adapter_trainer(YourTrainer), e.g. for trl.SFTTrainer), save with "
    "moslora.save_adapter, or call moslora.merge_and_unload before save_pretrained"
)


@contextlib.contextmanager
def full_state_expected() -> Iterator[None]:
    """Inside this block the full state of an injected model is taken on purpose (an engine's own
    checkpoint or wrapping), so no warning is given."""
    token = _EXPECTED.set(True)
    try:
        yield
    finally:
        _EXPECTED.reset(token)


def watch_full_state(model: nn.Module) -> None:
    """Warn (once) when the full state of ``model``, just injected, is taken outside moslora."""
    if model not in _WATCHED:
        _WATCHED.add(model)
        model.register_state_dict_post_hook(_warn)


def _warn(module: nn.Module, state_dict, prefix, local_metadata) -> None:
    if _EXPECTED.get() or module in _WARNED or not any(isinstance(m, MoSLoRALayer) for m in module.modules()):
        return
    _WARNED.add(module)
    warnings.warn(ADVICE, UserWarning, stacklevel=3)
