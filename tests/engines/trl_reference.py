"""Test-only script: one DPO step at learning rate 0 of the tiny Llama with a trained adapter, the
reference being the one ``adapter_trainer(trl.DPOTrainer)`` gives (the policy as training started),
with and without precomputed reference log-probabilities, under whatever engine launched it.

``python tests/engines/trl_reference.py TINY_DIR DATA_DIR OUT``: process 0 writes what TRL logged
(or the refusal), the engine and how it sharded the adapter to ``OUT/result.json``.
:func:`dpo_step` is also what the single-process reference run calls.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

LOGGED = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def dpo_step(tiny: str, data: str, out: str, precompute: bool):
    """The trainer after one step, and TRL's logged numbers (or the ValueError that refused the set-up)."""
    import trl
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moslora
    from moslora.hf import adapter_trainer
    from tiny import perturb

    torch.manual_seed(0)  # the same A on every process
    model = moslora.inject(AutoModelForCausalLM.from_pretrained(tiny), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb(model, std=0.3)
    args = trl.DPOConfig(output_dir=out, max_steps=1, per_device_train_batch_size=2, learning_rate=0.0, report_to="none", use_cpu=True,
                         bf16=False, logging_steps=1, disable_tqdm=True, save_strategy="no", seed=0, precompute_ref_log_probs=precompute)
    try:
        trainer = adapter_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=load_from_disk(data),
                                                  processing_class=AutoTokenizer.from_pretrained(tiny))
    except ValueError as e:
        return None, {"refused": str(e)}
    trainer.train()
    return trainer, {k: v for k, v in trainer.state.log_history[0].items() if k in LOGGED}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny.py
    import torch.distributed as dist

    from moslora.hf.reference import InitialPolicyReference
    from moslora.model.sharded import exit_process, sharding

    tiny, data, out = sys.argv[1:4]
    result = {}
    for name, precompute in (("plain", False), ("precompute", True)):
        trainer, result[name] = dpo_step(tiny, data, out, precompute)
        if trainer is not None:
            reference = getattr(trainer.ref_model, "module", trainer.ref_model)  # inside DeepSpeed's engine
            result.update(engine=trainer.engine, sharding=sharding(trainer.model_wrapped),
                          initial_policy_reference=isinstance(reference, InitialPolicyReference))
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps(result))
    exit_process(0)
