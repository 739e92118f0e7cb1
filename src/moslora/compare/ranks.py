"""A rank sweep (``moslora compare --r 4,16,64``): one full comparison per rank, then Δ against
LoRA as a function of the rank, as a table and a figure.

Each rank's comparison is complete on its own (its own learning-rate search, the same test seeds)
and is saved in ``r<rank>/``; this module only reads their results. Δ at a rank is the paired
difference of :func:`moslora.compare.stats.paired` (method − LoRA at that rank, same seeds), with
its 95% confidence interval; its half-width is the minimum detectable effect at that rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moslora.compare.report import summarize
from moslora.compare.views import finished_seeds, pyplot, save_figure
from moslora.io.atomic import atomic_write_text

SWEEP_TABLE_FILE = "ranks.md"
SWEEP_FIGURE_FILE = "ranks.png"


def sweep_rows(sweep: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (rank, method): the method's mean metric, its picked learning rate and, for
    every method but LoRA, the paired difference against LoRA at that rank."""
    rows = []
    for results in sorted(sweep, key=lambda res: res["settings"]["r"]):
        r, n = results["settings"]["r"], len(finished_seeds(results))
        for row in summarize(results):
            rows.append({"r": r, "n": n, **row})
    return rows


def _cells(row: dict[str, Any]) -> list[str]:
    pair = row["vs_baseline"]
    mean = "–" if row["metric_mean"] is None else f"{100 * row['metric_mean']:.2f}"
    if pair is None:
        delta, mde, record = "(baseline)", "–", "–"
    elif pair["ci_low"] is None:
        delta, mde, record = f"{100 * pair['mean_diff']:+.2f}", "–", f"{pair['wins']}/{pair['losses']}"
    else:
        delta = f"{100 * pair['mean_diff']:+.2f} [{100 * pair['ci_low']:+.2f}, {100 * pair['ci_high']:+.2f}]"
        mde, record = f"±{100 * pair['half_width']:.2f}", f"{pair['wins']}/{pair['losses']}"
    lr = "–" if row["lr"] is None else f"{row['lr']:g}"
    params = "–" if row["trainable_params"] is None else f"{row['trainable_params']:,}"
    return [str(row["r"]), row["method"], lr, mean, delta, mde, record, str(row["n"]), params]


_HEADER = ["r", "method", "lr", "accuracy %", "Δ vs LoRA, pts [95% CI]", "MDE, pts", "wins/losses", "seeds", "trainable params"]


def sweep_markdown(sweep: list[dict[str, Any]], command: str | None = None) -> str:
    name = sweep[0]["task"]["name"]
    lines = [f"# moslora compare: {name}, Δ vs rank", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| " + " | ".join(_HEADER) + " |", "|" + "|".join("---" for _ in _HEADER) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in sweep_rows(sweep)]
    lines += ["", _caption(sweep), ""]
    return "\n".join(lines)


def sweep_text(sweep: list[dict[str, Any]]) -> str:
    body = [_cells(row) for row in sweep_rows(sweep)]
    widths = [max(len(r[i]) for r in [_HEADER, *body]) for i in range(len(_HEADER))]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [_HEADER, ["-" * w for w in widths], *body]]
    return "\n".join(out + ["", _caption(sweep)])


def _caption(sweep: list[dict[str, Any]]) -> str:
    return (
        "One full comparison per rank (alpha = alpha_over_r · r, each method's learning rate picked on validation "
        "at that rank); Δ = method − LoRA at the same rank and seed, 95% CI from the t-distribution; "
        "MDE = the CI's half-width, the smallest difference these seeds can resolve. "
        "Each rank's own table and figure are in r<rank>/."
    )


def sweep_figure(sweep: list[dict[str, Any]], path: str | Path) -> None:
    """Δ vs LoRA (points, with 95% CI bars) against the rank, one line per method, log-2 rank axis."""
    with pyplot() as plt:
        _draw_sweep(plt, sweep, path)


def _draw_sweep(plt: Any, sweep: list[dict[str, Any]], path: str | Path) -> None:
    rows = [row for row in sweep_rows(sweep) if row["vs_baseline"] is not None]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, method in enumerate(methods, start=1):
        mine = [row for row in rows if row["method"] == method]
        ranks = [row["r"] * (1 + 0.04 * (i - 1)) for row in mine]  # a small offset keeps the bars apart
        delta = [100 * row["vs_baseline"]["mean_diff"] for row in mine]
        err = [100 * (row["vs_baseline"]["half_width"] or 0.0) for row in mine]
        ax.errorbar(ranks, delta, yerr=err, fmt="-o", capsize=4, color=cmap(i % 10), label=method)
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xscale("log", base=2)
    all_ranks = sorted({row["r"] for row in rows})
    ax.set_xticks(all_ranks, [str(r) for r in all_ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("Δ accuracy vs LoRA (points, 95% CI)")
    n = sorted({row["n"] for row in rows})
    ax.set_title(f"{sweep[0]['task']['name']}: Δ vs rank (n = {'/'.join(map(str, n))} paired seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_sweep(sweep: list[dict[str, Any]], output: str | Path, command: str | None = None) -> dict[str, Path]:
    output = Path(output)
    paths = {"markdown": output / SWEEP_TABLE_FILE, "figure": output / SWEEP_FIGURE_FILE}
    atomic_write_text(paths["markdown"], sweep_markdown(sweep, command))
    sweep_figure(sweep, paths["figure"])
    return paths
