"""What a comparison's runs say beyond final accuracy: how fast each method's training loss falls
(the paper's "converges faster", paired per seed) and how its accuracy depends on the learning
rate (the validation search), as tables and figures. One task, or several side by side.

Also the shared pieces of :mod:`moslora.compare.report` and :mod:`moslora.compare.ranks`: a
method's test values per seed, the seeds every method finished, and matplotlib set up for files.

Convergence, per test seed and paired against LoRA on the same seed (same A, same data order):

- the training loss at 25%, 50% and 100% of the budget (the logged point nearest to that step; the
  Trainer logs the mean loss of the steps since its last log);
- the steps each method takes to reach LoRA's own loss at half the budget on that seed (the first
  logged step at or below it; seeds where a method never gets there are counted, not averaged).

Differences are :func:`moslora.compare.stats.paired`: mean, 95% CI from the t-distribution, MDE.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from moslora.compare.methods import BASELINE, METHODS
from moslora.compare.stats import describe, paired
from moslora.io.atomic import atomic_path

FRACTIONS = (0.25, 0.5, 1.0)
LEVEL_FRACTION = 0.5  # steps to reach LoRA's loss at this share of the budget


def test_values(results: dict[str, Any], method: str) -> dict[int, float]:
    """seed → test metric of ``method``."""
    return {run["seed"]: run["value"] for run in results["runs"] if run["split"] == "test" and run["method"] == method}


def finished_seeds(results: dict[str, Any]) -> list[int]:
    """Test seeds on which every method has run (all of them, unless the run was cut short)."""
    done = [set(test_values(results, method)) for method in results["settings"]["methods"]]
    return sorted(set.intersection(*done)) if done else []


@contextmanager
def pyplot() -> Iterator[Any]:
    """matplotlib's pyplot drawing to files (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt


def method_color(plt: Any, method: str) -> Any:
    """The same colour for a method in every panel and figure."""
    return plt.get_cmap("tab10")(list(METHODS).index(method) % 10)


def save_figure(fig: Any, path: str | Path) -> None:
    """Write ``fig`` as a PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ----- convergence ------------------------------------------------------------------------------

def _curves(results: dict[str, Any], method: str) -> dict[int, dict[str, list[float]]]:
    """seed → the test run's logged training-loss curve, on the finished seeds."""
    seeds = set(finished_seeds(results))
    return {run["seed"]: run["curve"] for run in results["runs"]
            if run["split"] == "test" and run["method"] == method and run["seed"] in seeds and run["curve"]["step"]}


def _nearest_step(curve: dict[str, list[float]], step: float) -> int:
    """The logged step nearest to ``step`` (the later of two equally near)."""
    return min(curve["step"], key=lambda s: (abs(s - step), -s))


def _at(curve: dict[str, list[float]], step: float) -> float:
    """The logged loss at :func:`_nearest_step`."""
    return curve["loss"][curve["step"].index(_nearest_step(curve, step))]


def _steps_to(curve: dict[str, list[float]], level: float) -> int | None:
    """The first logged step whose loss is at or below ``level``; ``None`` if none is."""
    return next((s for s, loss in zip(curve["step"], curve["loss"]) if loss <= level), None)


def convergence(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method other than LoRA: for each of :data:`FRACTIONS`, the logged step used and
    the paired loss difference (method − LoRA); then the paired difference in steps to reach LoRA's
    loss at :data:`LEVEL_FRACTION` of the budget, and on how many seeds each got there."""
    budget = results["task"]["steps"]
    base = _curves(results, BASELINE)
    rows = []
    for method in results["settings"]["methods"]:
        if method == BASELINE:
            continue
        mine = _curves(results, method)
        seeds = sorted(set(mine) & set(base))
        if not seeds:
            continue
        row: dict[str, Any] = {"method": method, "n": len(seeds), "loss": {}}
        for fraction in FRACTIONS:
            step = fraction * budget
            row["loss"][fraction] = {
                "step": _nearest_step(base[seeds[0]], step),
                "lora": describe([_at(base[s], step) for s in seeds])["mean"],
                "method": describe([_at(mine[s], step) for s in seeds])["mean"],
                "diff": paired([_at(mine[s], step) for s in seeds], [_at(base[s], step) for s in seeds]),
            }
        levels = {s: _at(base[s], LEVEL_FRACTION * budget) for s in seeds}
        reached = {s: (_steps_to(mine[s], levels[s]), _steps_to(base[s], levels[s])) for s in seeds}
        both = [s for s in seeds if None not in reached[s]]
        row["steps_to_level"] = {
            "lora_reached": sum(reached[s][1] is not None for s in seeds),
            "method_reached": sum(reached[s][0] is not None for s in seeds),
            "lora": describe([reached[s][1] for s in both])["mean"],
            "method": describe([reached[s][0] for s in both])["mean"],
            "diff": paired([reached[s][0] for s in both], [reached[s][1] for s in both]) if both else None,
        }
        rows.append(row)
    return rows


def signed(pair: dict[str, Any] | None, digits: int, scale: float = 1.0) -> str:
    """A paired difference as ``+1.2 [-0.3, +2.7]`` (its mean and 95% CI, times ``scale``); "–" when there is none."""
    if pair is None or pair["mean_diff"] is None:
        return "–"
    text = f"{scale * pair['mean_diff']:+.{digits}f}"
    if pair["ci_low"] is not None:
        text += f" [{scale * pair['ci_low']:+.{digits}f}, {scale * pair['ci_high']:+.{digits}f}]"
    return text


def convergence_markdown(results: dict[str, Any]) -> list[str]:
    """The convergence table (Markdown lines), or nothing when no curve is paired yet."""
    rows = convergence(results)
    if not rows:
        return []
    budget = results["task"]["steps"]
    first = rows[0]["loss"]
    header = ["method"] + [f"Δ loss at {int(100 * f)}% (step {first[f]['step']})" for f in FRACTIONS] + [
        f"Δ steps to LoRA's {int(100 * LEVEL_FRACTION)}% loss", "reached (method/LoRA)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        level = row["steps_to_level"]
        lines.append("| " + " | ".join(
            [row["method"]] + [signed(row["loss"][f]["diff"], 4) for f in FRACTIONS]
            + [signed(level["diff"], 1), f"{level['method_reached']}/{level['lora_reached']} of {row['n']}"]) + " |")
    lora = {f: first[f]["lora"] for f in FRACTIONS}
    lines += ["", f"Training loss, paired per test seed against LoRA (n = {rows[0]['n']}); LoRA's mean loss at 25/50/100% of the "
              f"{budget} steps: " + " / ".join(f"{lora[f]:.4f}" for f in FRACTIONS) + ". Δ loss < 0: the method's loss is lower "
              "at that point. Steps to LoRA's loss at half the budget (first logged step at or below it, on each seed): "
              "Δ < 0 means the method gets there sooner; only seeds where both get there are averaged. "
              "[95% CI] from the t-distribution; loss is the mean over the steps between two logs."]
    return lines


def convergence_figure(many: list[dict[str, Any]], path: str | Path) -> None:
    """One column per comparison: top, each method's mean training loss over the test seeds; bottom,
    the paired difference method − LoRA per logged step with its 95% CI band."""
    with pyplot() as plt:
        fig, axes = plt.subplots(2, len(many), figsize=(4.6 * len(many), 6.4), squeeze=False, sharex="col")
        for col, results in enumerate(many):
            top, bottom = axes[0][col], axes[1][col]
            base = _curves(results, BASELINE)
            for method in results["settings"]["methods"]:
                mine = _curves(results, method)
                seeds = sorted(set(mine) & set(base))
                if not seeds:
                    continue
                steps = base[seeds[0]]["step"]
                top.plot(steps, [describe([mine[s]["loss"][j] for s in seeds])["mean"] for j in range(len(steps))],
                         color=method_color(plt, method), label=method)
                if method == BASELINE or len(seeds) < 2:
                    continue
                pairs = [paired([mine[s]["loss"][j] for s in seeds], [base[s]["loss"][j] for s in seeds]) for j in range(len(steps))]
                mean = [p["mean_diff"] for p in pairs]
                bottom.plot(steps, mean, color=method_color(plt, method), label=method)
                low = [p["ci_low"] if p["ci_low"] is not None else p["mean_diff"] for p in pairs]
                high = [p["ci_high"] if p["ci_high"] is not None else p["mean_diff"] for p in pairs]
                bottom.fill_between(steps, low, high, color=method_color(plt, method), alpha=0.2)
            n = len(finished_seeds(results))
            top.set_title(f"{results['task']['name']}, r = {results['settings']['r']} (n = {n} seeds)")
            top.set_ylabel("training loss (mean over seeds)")
            top.legend(fontsize=7)
            bottom.axhline(0, color="black", linewidth=1)
            bottom.set_xlabel("step")
            bottom.set_ylabel("Δ loss vs LoRA (paired, 95% CI)")
        fig.tight_layout()
        save_figure(fig, path)


# ----- learning rate ----------------------------------------------------------------------------

def lr_curves(results: dict[str, Any]) -> dict[str, dict[float, list[float]]]:
    """method → learning rate → the validation metric of each validation seed at that rate."""
    out: dict[str, dict[float, list[float]]] = {}
    for run in results["runs"]:
        if run["split"] == "validation":
            out.setdefault(run["method"], {}).setdefault(run["lr"], []).append(run["value"])
    return {method: dict(sorted(by_lr.items())) for method, by_lr in out.items()}


def lr_markdown(results: dict[str, Any]) -> list[str]:
    """The learning-rate table (Markdown lines): mean validation accuracy per method and rate, the
    pick in bold; nothing when there was no search."""
    curves = lr_curves(results)
    if not curves:
        return []
    rates = sorted({lr for by_lr in curves.values() for lr in by_lr})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|" + "|".join("---" for _ in range(len(rates) + 1)) + "|"]
    for method, by_lr in curves.items():
        cells = []
        for lr in rates:
            values = by_lr.get(lr)
            if not values:
                cells.append("–")
                continue
            cell = f"{100 * describe(values)['mean']:.1f}"
            cells.append(f"**{cell}**" if results["picked_lr"].get(method) == lr else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    n = sorted({len(v) for by_lr in curves.values() for v in by_lr.values()})
    lines += ["", f"Validation accuracy (%), mean over {'/'.join(map(str, n))} validation seed(s) per cell; "
              "bold: the rate picked for the test seeds. A method whose good rates span more of the grid is the less "
              "sensitive one; a peak at the grid's edge means the grid cuts the curve off."]
    return lines


def merged_lr_curves(many: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, dict[float, list[float]]]]:
    """:func:`lr_curves` of comparisons of the same task and rank pooled, per (task, r): a search
    extended by a later run over more rates reads as one curve."""
    out: dict[tuple[str, int], dict[str, dict[float, list[float]]]] = {}
    for results in many:
        pooled = out.setdefault((results["task"]["name"], results["settings"]["r"]), {})
        for method, by_lr in lr_curves(results).items():
            for lr, values in by_lr.items():
                pooled.setdefault(method, {}).setdefault(lr, []).extend(values)
    return {key: {m: dict(sorted(by_lr.items())) for m, by_lr in curves.items()} for key, curves in out.items() if curves}


def lr_figure(many: list[dict[str, Any]], path: str | Path) -> None:
    """One panel per task and rank (comparisons of the same pooled): validation accuracy against the
    learning rate (log axis), each seed a dot and each method's mean a line."""
    panels = merged_lr_curves(many)
    with pyplot() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
        for col, ((name, r), curves) in enumerate(panels.items()):
            ax = axes[0][col]
            for method, by_lr in curves.items():
                color = method_color(plt, method)
                rates = list(by_lr)
                ax.plot(rates, [100 * describe(by_lr[lr])["mean"] for lr in rates], "-", color=color, label=method)
                for lr in rates:
                    ax.plot([lr] * len(by_lr[lr]), [100 * v for v in by_lr[lr]], "o", color=color, alpha=0.5, markersize=4)
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("validation accuracy (%)")
            ax.set_title(f"{name}, r = {r}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, path)
