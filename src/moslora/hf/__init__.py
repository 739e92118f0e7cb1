"""moslora in the transformers / TRL training stack.

``AdapterTrainer`` is a drop-in ``transformers.Trainer`` for a model injected with
:func:`moslora.inject`; ``adapter_trainer(trl.SFTTrainer)`` (or any other Trainer subclass) gives
that subclass the same behaviour, and ``AdapterTrainerMixin`` is the piece both are made of. On one
process, DDP, FSDP and DeepSpeed ZeRO-1/2/3 they save and resume the adapter only, whole, pickle-free
where the engine allows, and stop at the first non-finite loss (:class:`NonFiniteLossError`).
TRL's DPO, KTO, GRPO and RLOO trainers get the policy as training started as their reference
(:class:`InitialPolicyReference`), as with PEFT, never a second copy of the base.
See :mod:`moslora.hf.trainer`, :mod:`moslora.hf.reference` and ``docs/distributed.md``.
"""

from moslora.hf.reference import InitialPolicyReference
from moslora.hf.state import last_checkpoint
from moslora.hf.trainer import AdapterTrainer, AdapterTrainerMixin, NonFiniteLossError, adapter_trainer

__all__ = ["AdapterTrainer", "AdapterTrainerMixin", "InitialPolicyReference", "NonFiniteLossError", "adapter_trainer", "last_checkpoint"]
