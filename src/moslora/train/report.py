"""What a finished run leaves for people: a loss-curve PNG and a short printed summary."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from moslora.io.atomic import atomic_write


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Training loss (and validation loss when logged) against optimizer step. ``None`` if nothing was
    logged, or if matplotlib is not installed: a missing plot never fails a finished run, it is
    skipped with one line saying how to get it."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not val:
        return None
    if importlib.util.find_spec("matplotlib") is None:
        print(f'{path.name} skipped: matplotlib is not installed (pip install "moslora[train]" draws it)')
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if val:
        ax.plot(*zip(*val), label="validation loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def summary(metrics: dict[str, Any], written: dict[str, Path | None]) -> str:
    lines = [
        f"done: {metrics['steps']} steps in {metrics['train_seconds']:.1f} s "
        f"({metrics['tokens_per_second']:.0f} tokens/s, {metrics['tokens_seen']:,} tokens this run)",
        f"trainable parameters: {metrics['trainable_params']:,} of {metrics['total_params']:,} "
        f"({100.0 * metrics['trainable_params'] / max(metrics['total_params'], 1):.3f}%)",
        f"final train loss: {metrics['train_loss']:.4f}"
        + (f", validation loss: {metrics['eval_loss']:.4f}" if metrics.get("eval_loss") is not None else ""),
    ]
    lines += [f"  {name:<14} {path}" for name, path in written.items() if path is not None]
    return "\n".join(lines)
