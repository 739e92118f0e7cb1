"""``moslora demo``: a one-minute, dependency-free look at LoRA vs MoSLoRA on a toy task.

A frozen random MLP is the "pretrained" base; the target is the same MLP with a hidden rank-r
change in each layer. LoRA and MoSLoRA adapters of that rank are fit to it from the same seed (same
data, same A), and the training losses are printed side by side. It is a smoke test of the
library on a toy problem, not evidence about real tasks: that is what ``moslora compare`` is for.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from moslora.config import MoSLoRAConfig
from moslora.model.inject import inject


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="fit LoRA and MoSLoRA to a toy task and print both losses", description=__doc__)
    p.add_argument("--steps", type=int, default=300, help="training steps per method (default: %(default)s)")
    p.add_argument("--r", type=int, default=4, help="adapter rank (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the task, the data and A (default: %(default)s)")
    p.set_defaults(func=run)


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 8))


def run(args: argparse.Namespace) -> int:
    if args.steps <= 0:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    torch.manual_seed(args.seed)
    base = _mlp(64)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for layer in teacher:
            if isinstance(layer, nn.Linear):
                out_f, in_f = layer.weight.shape
                layer.weight += 0.3 * torch.randn(out_f, args.r) @ torch.randn(args.r, in_f) / in_f**0.5
    x = torch.randn(2048, 32)
    with torch.no_grad():
        y = teacher(x)

    methods = {"lora": None, "moslora": "kaiming"}
    curves = {}
    for method, mixer in methods.items():
        torch.manual_seed(args.seed + 1)  # same A for both methods (A is drawn before any mixer)
        batches = torch.Generator().manual_seed(args.seed + 2)  # same batches too
        model = inject(copy.deepcopy(base), MoSLoRAConfig(r=args.r, alpha=2 * args.r, mixer=mixer))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        start, losses = time.perf_counter(), []
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (64,), generator=batches)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            final = nn.functional.mse_loss(model(x), y).item()
        curves[method] = (losses, final, sum(p.numel() for p in params), time.perf_counter() - start)

    print(f"toy task: fit a rank-{args.r} change of a frozen 3-layer MLP, {args.steps} steps, seed {args.seed}\n")
    checkpoints = sorted({0, args.steps // 10, args.steps // 3, args.steps - 1})
    header = f"{'step':>6} " + " ".join(f"{m:>12}" for m in methods)
    print(header)
    for step in checkpoints:
        print(f"{step + 1:>6} " + " ".join(f"{curves[m][0][step]:>12.5f}" for m in methods))
    print(f"{'final':>6} " + " ".join(f"{curves[m][1]:>12.5f}" for m in methods) + "   (MSE on all data)")
    print(f"{'params':>6} " + " ".join(f"{curves[m][2]:>12,}" for m in methods))
    print(f"{'secs':>6} " + " ".join(f"{curves[m][3]:>12.2f}" for m in methods))
    print("\nOne seed on a toy task says little; `moslora compare` measures real tasks over paired seeds.")
    return 0
