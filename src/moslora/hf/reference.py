"""TRL's reference model on the native route: the policy as training started, as with PEFT.

DPO, KTO, GRPO (``beta > 0``) and RLOO score the policy against a reference model. Through PEFT,
TRL's reference is the policy as the trainer got it: a new adapter (``peft_config=``) switched off,
or, for a ``PeftModel`` handed in with a trained adapter, a frozen copy of that adapter. For any
other model, given no ``ref_model``, it loads a second full copy of the base from
``config._name_or_path`` (as much memory again as the base, an ``OSError`` for a model built in
memory, and the wrong reference when the policy starts from a trained adapter). A model injected
with :func:`moslora.inject` is not a PEFT model, so :class:`~moslora.hf.AdapterTrainerMixin` gives
TRL an :class:`InitialPolicyReference` instead: a module without weights of its own which, called,
runs the trainer's own model under ``torch.no_grad()`` and :func:`moslora.model.ops.as_it_started`.
With a fresh adapter (every B zero) that is the model with its adapters off; with a trained one
(SFT, then DPO on the same adapter) every layer runs a frozen copy of the adapter as the trainer
got it (:func:`~moslora.model.ops.keep_starting_adapter`: the adapter's size, never the base's).
Either way step-1 DPO loss is ln 2 with zero rewards, and nothing of the base is loaded or copied.

How a TRL trainer receives it (:func:`reference_route`): DPO and KTO take it as their ``ref_model``;
GRPO and RLOO take no reference, so they are built with ``beta = 0`` (which makes TRL build none)
and given it afterwards, with their ``beta`` put back. Where these semantics cannot hold, the
trainer is refused when it is built, with the alternative:

- ``sync_ref_model=True``: there is no separate reference to move towards the policy (PEFT refuses it too);
- ``modules_to_save`` (a task head, a resized ``lm_head``) train in place, so the reference would move with them;
- TRL trainers that copy the policy themselves (``OnlineDPOTrainer``, ``A2POTrainer``), that move
  their reference's weights (BEMA's ``DPOTrainer``), or any other TRL trainer with a ``ref_model``
  argument whose use moslora does not know.

Engines: DeepSpeed ZeRO-2 and ZeRO-3 wrap the reference in an inference engine and FSDP2 shards it
(it holds one placeholder parameter for them), while its calls run the policy as they shard it;
``precompute_ref_log_probs=True`` under ZeRO-3 and FSDP1 are refused (see :func:`check_reference`).
An explicit ``ref_model=`` is passed through untouched. Separately, TRL trainers that compute
log-probabilities from the output layer's weight (its fused LM head) refuse an adapter on that
layer (:func:`check_output_layer`), as TRL does for a PEFT adapter there.
"""

from __future__ import annotations

import inspect
import os
import weakref
from collections import OrderedDict
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env
from torch import nn

from moslora.core.layers import MoSLoRALayer
from moslora.model.full_state import full_state_expected
from moslora.model.inject import adapter_layers, saved_module_names
from moslora.model.ops import as_it_started, keep_starting_adapter
from moslora.model.sharded import unwrap

ARGUMENT = "ref_model"  # the trainer takes ref_model=; without one it loads a copy of the base
AFTER = "beta"  # it takes no reference and loads a copy of the base when args.beta != 0
# By TRL class name, so a subclass (a user's, or TRL's experimental KTOTrainer or GMPOTrainer) inherits the route.
_ROUTES = {"DPOTrainer": ARGUMENT, "KTOTrainer": ARGUMENT, "GRPOTrainer": AFTER, "RLOOTrainer": AFTER}
_COPIES = {
    "OnlineDPOTrainer": "deep-copies the policy, adapters and all, as its reference when it is given none",
    "A2POTrainer": "always deep-copies the policy, adapters and all, as its reference",
}
# BEMA's trainer is also called DPOTrainer; its module tells it apart.
_BEMA_MODULE = "trl.experimental.bema_for_ref_model"
_BEMA = "moves its reference's weights towards the policy's as it trains (BEMA)"
# TRL trainers that compute log-probabilities from the output layer's weight (add_fused_lm_head).
_FUSED_LM_HEAD = {"SFTTrainer", "DPOTrainer", "KTOTrainer", "GRPOTrainer", "RLOOTrainer", "AsyncGRPOTrainer"}


class InitialPolicyReference(nn.Module):
    """TRL's reference model as PEFT has it: the trainer's own model as training started.

    It holds no weight of the model and no copy of the base; calling it calls ``trainer.model`` (as
    the trainer holds it at that moment, an engine's wrapper included) inside ``torch.no_grad()``
    and :func:`moslora.model.ops.as_it_started`, so on every engine it runs what the policy runs,
    with the adapter it started from (or none, for a fresh one). Made when the trainer is built,
    it takes that starting copy then (on every process: collective on a sharded adapter).
    """

    def __init__(self, trainer: Any, model: nn.Module) -> None:
        super().__init__()
        self._trainer = weakref.ref(trainer)  # the trainer holds this module: no reference cycle
        # DeepSpeed's engine, which TRL wraps a reference in, needs a module with a parameter; this
        # frozen zero is never read.
        self.placeholder = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.keeps_a_copy = keep_starting_adapter(model)

    def policy(self) -> nn.Module:
        """The model being trained, as the trainer holds it now."""
        return self._trainer().model

    @property
    def config(self) -> Any:
        """The policy's config: TRL reads sizes and the text config from its reference."""
        return unwrap(self.policy()).config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self.policy()
        with torch.no_grad(), as_it_started(policy):
            return policy(*args, **kwargs)

    # TRL gives every reference it is handed a fused LM head by replacing that reference's forward
    # on the instance (add_fused_lm_head). The policy has one already, with the same temperature,
    # so a call runs this class's forward whatever the instance holds. The module's own hooks are
    # skipped with it: an engine's, registered on this module, would only fetch the placeholder.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return InitialPolicyReference.forward(self, *args, **kwargs)

    def state_dict(self, *, keep_vars: bool = False) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The reference's weights: the policy's state without the adapter being trained, with the
        starting copy in its place when there is one. TRL keys its cache of precomputed reference
        log-probabilities by a hash of this, so a different base or starting adapter never reuses
        another's."""
        policy = unwrap(self.policy())
        live = {f"{name}.{attr}" for name, layer in adapter_layers(policy) for attr, _ in layer.adapter_parameters()}
        with full_state_expected():
            state = policy.state_dict(keep_vars=keep_vars)
        state = OrderedDict((key, value) for key, value in state.items() if key not in live)
        for name, layer in adapter_layers(policy):
            if layer.starting_copy is not None:
                for attr, tensor in zip(("lora_A", "lora_M", "lora_B"), layer.starting_copy):
                    if tensor is not None:
                        state[f"{name}.starting_{attr}"] = tensor
        return state


def init_signature(trainer_class: type) -> inspect.Signature:
    """The parameters ``trainer_class(...)`` reads its arguments as (``self`` left out): those of the
    first ``__init__`` along its MRO that names them. An ``__init__(*args, **kwargs)`` that passes
    them on (AdapterTrainerMixin's, BEMA's DPOTrainer, many user subclasses) is looked through."""
    for cls in trainer_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())
        if not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
            return inspect.Signature(parameters[1:])
    raise TypeError(f"{trainer_class.__name__} has no __init__ that names its parameters")


def _trl_classes(trainer_class: type) -> list[type]:
    return [c for c in trainer_class.__mro__ if c.__module__.partition(".")[0] == "trl"]


def reference_route(trainer_class: type) -> tuple[str | None, str | None]:
    """``(route, refusal)`` for ``trainer_class``: how it receives the initial-policy reference
    (:data:`ARGUMENT`, :data:`AFTER`, or ``None`` for a trainer without a reference model), or why
    it cannot (a TRL trainer listed in the module docstring; it may still be given a ``ref_model``)."""
    classes = _trl_classes(trainer_class)
    for cls in classes:  # the most derived TRL class decides
        if cls.__module__.startswith(_BEMA_MODULE):
            return None, _BEMA
        if cls.__name__ in _COPIES:
            return None, _COPIES[cls.__name__]
        if cls.__name__ in _ROUTES:
            return _ROUTES[cls.__name__], None
    if classes and ARGUMENT in init_signature(trainer_class).parameters:
        return None, "takes a reference model in a way moslora does not know"
    return None, None


def fsdp_version(args: Any) -> int | None:
    """The FSDP version the trainer will run (``None`` without FSDP), decided as transformers and
    accelerate decide it: ``TrainingArguments(fsdp=...)`` first, else ``accelerate launch``'s environment."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args is not None:
        return int(plugin_args.get("fsdp_version", 1))
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def check_reference(trainer_name: str, model: nn.Module, args: Any) -> None:
    """Refuse what the initial-policy reference cannot be: a reference that ``sync_ref_model`` moves,
    one whose ``modules_to_save`` train in place, and the two engine set-ups it is not tested on."""
    deepspeed = getattr(args, "deepspeed_plugin", None)
    if deepspeed is not None and deepspeed.zero_stage == 3 and getattr(args, "precompute_ref_log_probs", False):
        raise ValueError(
            f"{trainer_name}: precompute_ref_log_probs=True under DeepSpeed ZeRO-3 would run the policy before DeepSpeed "
            "has partitioned it, which TRL's ZeRO-3 log-probabilities cannot read. The initial-policy reference costs no "
            "copy of the base: set precompute_ref_log_probs=False, or use ZeRO-2"
        )
    if fsdp_version(args) == 1:
        raise ValueError(
            f"{trainer_name}: the initial-policy reference is not supported under FSDP1: TRL wraps a reference in FSDP1 by its "
            "decoder layers, which this reference (no weights of its own) does not have, and accelerate runs FSDP1 on GPUs "
            "only, where moslora cannot test it. Use FSDP2 (fsdp_version: 2) or DeepSpeed, or pass a ref_model= of your own"
        )
    if getattr(args, "sync_ref_model", False):
        raise ValueError(
            f"{trainer_name}: sync_ref_model=True moves a separate reference model towards the policy, but the reference "
            "here is the policy itself as training started (as with PEFT, which refuses this too). Set sync_ref_model=False, "
            "or pass a ref_model= of your own to synchronise"
        )
    saved = saved_module_names(unwrap(model))
    if saved:
        raise ValueError(
            f"{trainer_name}: the reference is this model as training started, but modules_to_save {saved} train in place, "
            "so the reference would change with them. Pass a ref_model= of your own, or train without modules_to_save "
            "(moslora.MoSLoRAConfig(modules_to_save=[]))"
        )


def check_output_layer(trainer_class: type, model: nn.Module) -> None:
    """Refuse an adapter on the output layer under a TRL trainer that computes log-probabilities from
    that layer's weight directly (its fused LM head): the adapter would be skipped and never train."""
    if not any(cls.__name__ in _FUSED_LM_HEAD for cls in _trl_classes(trainer_class)):
        return
    model = unwrap(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, MoSLoRALayer):
        name = next(n for n, m in model.named_modules() if m is head)
        raise ValueError(
            f"{trainer_class.__name__} computes log-probabilities from {name}.weight directly (TRL's fused LM head), so the "
            f"adapter on the output layer {name!r} would be skipped and never train. Leave it out of target_modules "
            f"(exclude_modules=[{name!r}])"
        )
