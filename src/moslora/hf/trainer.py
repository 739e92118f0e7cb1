"""The transformers ``Trainer`` for a model with MoSLoRA adapters, on every engine it runs on.

:class:`AdapterTrainerMixin` overrides only Trainer's save/load/loss hooks, so it goes in front of any
Trainer subclass: :class:`AdapterTrainer` is ``AdapterTrainerMixin + transformers.Trainer``, and
:func:`adapter_trainer` builds the same for another one (``adapter_trainer(trl.SFTTrainer)``). The loop,
mixed precision and distribution (DDP, FSDP, DeepSpeed) stay Trainer's and accelerate's.

What it changes, under one process, DDP, FSDP1/FSDP2 and DeepSpeed ZeRO-1/2/3 alike:

- ``save_model`` and every checkpoint write the adapter (moslora's native format; adapter groups as
  a groups directory), gathered whole where the engine shards it (every process takes part,
  process 0 writes), never the frozen base;
- the optimizer, scheduler, scaler and RNG states go to safetensors + JSON (:mod:`moslora.hf.state`),
  except under DeepSpeed, whose ZeRO optimizer partitions only the engine can write: there the
  engine's own checkpoint is kept, of the trainable parameters only (``exclude_frozen_parameters``);
- ``resume_from_checkpoint`` puts the adapter back into each process's shard and ends where an
  uninterrupted run ends;
- a non-finite loss stops training before it reaches the weights, on every process at the same
  step (the loss is checked before backward, because DeepSpeed steps inside backward and keeps the
  gradients to itself; where gradients are visible they are checked before the optimizer step too),
  raising :class:`NonFiniteLossError` that names the step and the last good checkpoint;
- parameter counts are taken when the trainer is made, before an engine shards the model;
- a quantized base (bitsandbytes, GGUF-dequantized) is accepted;
- TRL's DPO, KTO, GRPO and RLOO trainers, given no ``ref_model``, get the policy as training
  started as their reference, as with PEFT, instead of loading a second copy of the base; what
  cannot have that reference is refused when the trainer is built (:mod:`moslora.hf.reference`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from moslora.hf import state as ckpt
from moslora.hf.reference import (AFTER, ARGUMENT, InitialPolicyReference, check_output_layer, check_reference, init_signature,
                                  reference_route)
from moslora.io.atomic import atomic_write_json
from moslora.io.groups import MANIFEST_NAME, read_adapter_groups, save_adapter_groups
from moslora.io.native import read_adapter, save_adapter
from moslora.io.validate import check_adapter_tensors
from moslora.model.full_state import full_state_expected
from moslora.model.groups import adapter_groups
from moslora.model.ops import parameter_counts
from moslora.model.sharded import adapter_entries, place_adapter_tensors, sharding, unwrap

logger = logging.getLogger(__name__)

TRAINING_ARGS_JSON = "training_args.json"


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or Inf loss (or gradient) and stopped before it changed any weight."""


class AdapterTrainerMixin:
    """Put in front of a ``transformers.Trainer`` subclass to train a model injected with
    :func:`moslora.inject` (or :func:`moslora.inject_groups`) on any engine; see the module
    docstring. ``parameter_counts`` holds the model's counts (:func:`moslora.parameter_counts`);
    ``base_model_name_or_path`` (keyword only) is recorded in the saved adapters instead of the
    model's ``config.name_or_path``. A TRL trainer that takes or builds a reference model and is
    given no ``ref_model`` gets :class:`~moslora.hf.reference.InitialPolicyReference` as its
    ``ref_model`` (``self.ref_model``)."""

    def __init__(self, model: torch.nn.Module, *args: Any, base_model_name_or_path: str | None = None, **kwargs: Any) -> None:
        self.base_model_name_or_path = base_model_name_or_path
        if not isinstance(model, torch.nn.Module) or not adapter_groups(unwrap(model)):
            raise TypeError(f"{type(self).__name__} trains a model with MoSLoRA adapters: call moslora.inject(model, config) "
                            f"and pass the model itself (got {type(model).__name__})")
        self.parameter_counts = parameter_counts(unwrap(model))
        check_output_layer(type(self), model)
        call = init_signature(type(self)).bind_partial(model, *args, **kwargs)
        reference, beta = self._initial_policy_reference(model, call.arguments)
        # Trainer refuses a quantized model unless transformers' PEFT flag says adapters are
        # attached. Ours are; raise the flag for that check only.
        flag = getattr(model, "is_quantized", False) and "_hf_peft_config_loaded" not in vars(model)
        if flag:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(*call.args, **call.kwargs)
        finally:
            if flag:
                del model._hf_peft_config_loaded
            if beta is not None:
                call.arguments["args"].beta = beta
        if beta is not None:
            self.beta, self.ref_model, self.args.beta = beta, reference, beta
        self.add_callback(_GradientGuard(self))

    def _initial_policy_reference(self, model: torch.nn.Module, arguments: dict[str, Any]) -> tuple[InitialPolicyReference | None, float | None]:
        """Give a TRL trainer the initial-policy reference where it would otherwise build a copy of the
        base (see :mod:`moslora.hf.reference`), changing ``arguments`` in place. Returns the reference
        (``None`` when there is none to give) and, for a trainer that takes no reference (GRPO, RLOO),
        its ``beta``: ``arguments["args"].beta`` is 0 for its construction and is then put back."""
        name = type(self).__name__
        route, refusal = reference_route(type(self))
        if arguments.get(ARGUMENT) is not None:  # the caller's own reference
            return None, None
        if refusal is not None:
            takes_one = ARGUMENT in init_signature(type(self)).parameters
            raise ValueError(f"{name} {refusal}, so moslora cannot give it the policy as training started as its reference. "
                             + ("Pass a ref_model= of your own, or use" if takes_one else "Use")
                             + " trl.DPOTrainer, KTOTrainer, GRPOTrainer or RLOOTrainer, which moslora gives that reference")
        args = arguments.get("args")
        if route == ARGUMENT:
            check_reference(name, model, args)
            arguments[ARGUMENT] = InitialPolicyReference(self, model)
            return arguments[ARGUMENT], None
        if route == AFTER:
            if args is None:
                raise TypeError(f"{name}: pass args= (its config) so that moslora can give it the initial-policy reference; "
                                "with args=None TRL builds a config whose beta may load a second copy of the base")
            if args.beta == 0:
                return None, None
            check_reference(name, model, args)
            beta, args.beta = args.beta, 0.0  # TRL builds no reference with beta = 0
            return InitialPolicyReference(self, model), beta
        return None, None

    # ----- the guard ------------------------------------------------------------------------------
    def _guarded(self) -> bool:
        # fp16 loss scaling skips non-finite steps on purpose.
        return not (self.args.fp16 or self.accelerator.mixed_precision == "fp16")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training and self._guarded():
            loss = result[0] if return_outputs else result
            self._stop_if(not torch.isfinite(loss.detach()).all(), "the loss")
        return result

    def _stop_if(self, bad: bool, what: str) -> None:
        """Raise on every process when ``bad`` on any (a tiny all-reduce, so all stop at the same step)."""
        if dist.is_available() and dist.is_initialized() and self.args.world_size > 1:
            flag = torch.tensor([float(bad)], device=self.args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        if bad:
            step = self.state.global_step + 1
            last = ckpt.last_checkpoint(self.args.output_dir)
            raise NonFiniteLossError(
                f"{what} became non-finite (NaN or Inf) at step {step}; training stopped before that step changed any weight. "
                f"Last good checkpoint: {last if last else 'none (no checkpoint was saved yet)'}. Try a lower learning rate, "
                "fp32/bf16 instead of fp16, or check the data around that step."
            )

    # ----- saving ---------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the adapter (every process must call this; Trainer does), the arguments and the
        tokenizer or processor to ``output_dir``."""
        folder = Path(output_dir or self.args.output_dir)
        inner = unwrap(self.model_wrapped)
        if self.args.should_save or sharding(self.model_wrapped) is not None:  # gathering takes every process
            if "" in adapter_groups(inner):
                save_adapter(self.model_wrapped, folder, base_model_name_or_path=self.base_model_name_or_path)
            else:
                save_adapter_groups(inner, folder, base_model_name_or_path=self.base_model_name_or_path)
        if self.args.should_save:
            atomic_write_json(folder / TRAINING_ARGS_JSON, self.args.to_dict())
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(folder))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self.save_model(output_dir)

    def _deepspeed(self) -> bool:
        return bool(self.is_deepspeed_enabled)

    @property
    def engine(self) -> str:
        """What trains: ``"deepspeed"``, ``"fsdp"``, ``"ddp"`` or ``"single"`` (one process)."""
        if self._deepspeed():
            return "deepspeed"
        if self.is_fsdp_enabled:
            return "fsdp"
        return "ddp" if self.args.world_size > 1 else "single"

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        folder = Path(output_dir)
        if self._deepspeed():
            with full_state_expected():
                self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        else:
            ckpt.save_optimizer(self.model_wrapped, self.optimizer, folder, write=self.args.should_save)
        if self.args.should_save:
            ckpt.save_json_state(self.lr_scheduler, folder / ckpt.SCHEDULER_JSON)

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            ckpt.save_json_state(scaler, Path(output_dir) / ckpt.SCALER_JSON)

    def _rank(self) -> int | None:
        return None if self.args.world_size <= 1 else self.args.process_index

    def _save_rng_state(self, output_dir: str) -> None:
        ckpt.save_rng(Path(output_dir), self._rank())

    # ----- resuming -------------------------------------------------------------------------------
    def train(self, *args: Any, **kwargs: Any):
        # Engines take the model's full state while wrapping and checkpointing; that is expected here.
        with full_state_expected(), self._frozen_keys_may_be_missing():
            return super().train(*args, **kwargs)

    @contextlib.contextmanager
    def _frozen_keys_may_be_missing(self) -> Iterator[None]:
        """DeepSpeed loads its checkpoint's module state strictly unless the model is a PEFT model;
        ours holds the trainable parameters only, so the frozen base is missing on purpose."""
        if not self._deepspeed():
            yield
            return
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}

        def forgive(module, incompatible):
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]

        handle = self.model.register_load_state_dict_post_hook(forgive)
        try:
            yield
        finally:
            handle.remove()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Read the checkpoint's adapter, check it against the model, and put it into every process's
        shard (a collective where the adapter is sharded)."""
        model = model if model is not None else self.model_wrapped
        folder = Path(resume_from_checkpoint)
        if (folder / MANIFEST_NAME).is_file():
            tensors = {f"{prefix}.{key}": t for prefix, _, group in read_adapter_groups(folder) for key, t in group.items()}
        else:
            tensors = read_adapter(folder)[1]
        check_adapter_tensors(folder, tensors, {e.key: e.shape for e in adapter_entries(model)})
        place_adapter_tensors(model, tensors)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        if not self._deepspeed():  # DeepSpeed loaded its optimizer (and any scheduler of its own) with the module
            ckpt.load_optimizer(self.model_wrapped, self.optimizer, folder)
        if type(self.lr_scheduler).__name__ != "DeepSpeedSchedulerWrapper":
            ckpt.load_json_state(self.lr_scheduler, folder / ckpt.SCHEDULER_JSON)

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and (Path(checkpoint) / ckpt.SCALER_JSON).is_file():
            ckpt.load_json_state(scaler, Path(checkpoint) / ckpt.SCALER_JSON)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and not ckpt.load_rng(Path(checkpoint), self._rank()):
            logger.warning("checkpoint %s has no RNG state for process %s (written by another number of processes?); "
                           "the resumed run is not bit-identical", checkpoint, self._rank() or 0)


class _GradientGuard(TrainerCallback):
    """Before each optimizer step, where gradients are visible (not under DeepSpeed, which keeps
    them in its own buffers and has already stepped by then), stop if any is non-finite."""

    def __init__(self, trainer: AdapterTrainerMixin) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        if trainer._deepspeed() or not trainer._guarded():
            return control
        bad = False
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                if not torch.isfinite(grad).all():
                    bad = True
                    break
        trainer._stop_if(bad, "a gradient")
        return control


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """A drop-in ``transformers.Trainer`` for a model with MoSLoRA adapters (see :mod:`moslora.hf.trainer`)."""


@functools.cache
def adapter_trainer(trainer_class: type) -> type:
    """``trainer_class`` (a ``transformers.Trainer`` subclass, e.g. ``trl.SFTTrainer``) with
    :class:`AdapterTrainerMixin` in front: the same trainer, saving and resuming the adapter on every
    engine. The class is made once per ``trainer_class``."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"adapter_trainer needs a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, AdapterTrainerMixin):
        return trainer_class
    return type(f"Adapter{trainer_class.__name__}", (AdapterTrainerMixin, trainer_class),
                {"__module__": __name__, "__doc__": f"{trainer_class.__name__} with moslora's AdapterTrainerMixin in front."})
