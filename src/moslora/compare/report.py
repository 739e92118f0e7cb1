"""Turn a comparison's results into a summary table (terminal and Markdown, with the convergence and
learning-rate views of :mod:`moslora.compare.views`) and figures, and save them with the results
JSON, each written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moslora.compare import views
from moslora.compare.methods import BASELINE
from moslora.compare.stats import describe, paired, seeds_for_half_width
from moslora.compare.views import finished_seeds, pyplot, save_figure, test_values
from moslora.io.atomic import atomic_write_json, atomic_write_text

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
FIGURE_FILE = "results.png"
CONVERGENCE_FILE = "convergence.png"
LR_FILE = "lr.png"


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method: picked LR, metric over test seeds, paired difference against LoRA on
    the seeds both have, mean training time per run, trainable parameters."""
    baseline = test_values(results, BASELINE)
    rows = []
    for method in results["settings"]["methods"]:
        values = test_values(results, method)
        runs = [run for run in results["runs"] if run["split"] == "test" and run["method"] == method]
        seeds = sorted(set(values) & set(baseline))
        row = {
            "method": method,
            "lr": results["picked_lr"].get(method),
            **{f"metric_{k}": v for k, v in describe([values[s] for s in sorted(values)]).items()},
            "vs_baseline": None
            if method == BASELINE
            else paired([values[s] for s in seeds], [baseline[s] for s in seeds]),
            "train_seconds": sum(run["train_seconds"] for run in runs) / len(runs) if runs else None,
            "trainable_params": runs[0]["trainable_params"] if runs else None,
            "mixer_params": runs[0]["parameter_counts"]["M"] if runs else None,
        }
        rows.append(row)
    return rows


AVERAGE = "average"
RESOLUTION = 0.01  # the per-set table says how many seeds the average would need for a CI of ±1 point


def with_average(by_set: dict[str, float]) -> dict[str, float]:
    """``by_set`` with :data:`AVERAGE`, the mean of the sets' accuracies (the paper's Table 1
    average: every set weighs the same, whatever its size)."""
    return {**by_set, AVERAGE: sum(by_set.values()) / len(by_set)}


def set_values(results: dict[str, Any], method: str) -> dict[int, dict[str, float]]:
    """seed → set → test accuracy of ``method``, with :data:`AVERAGE` (:func:`with_average`)."""
    out = {}
    for run in results["runs"]:
        if run["split"] == "test" and run["method"] == method and run.get("by_set"):
            out[run["seed"]] = with_average(run["by_set"])
    return out


def per_set(results: dict[str, Any]) -> dict[str, Any] | None:
    """The paper's table, for a task whose test rows carry their set (``None`` otherwise): the
    columns (the sets, then :data:`AVERAGE`), the untrained model's accuracy on each, and per
    method its mean over its test seeds on each; for every method but LoRA the paired difference
    against LoRA on the seeds both have (:func:`~moslora.compare.stats.paired`) on each column, and
    the seeds the average's spread would need for a CI of ±1 point."""
    scored = [run for run in results["runs"] if run["split"] == "test" and run.get("by_set")]
    if not scored:
        return None
    columns = [*scored[0]["by_set"], AVERAGE]
    base = set_values(results, BASELINE)
    rows = []
    for method in results["settings"]["methods"]:
        values = set_values(results, method)
        if not values:
            continue
        row: dict[str, Any] = {"method": method, "n": len(values), "vs_baseline": None, "seeds_for_1pt": None,
                               "mean": {c: describe([values[s][c] for s in sorted(values)])["mean"] for c in columns}}
        if method != BASELINE:
            seeds = sorted(set(values) & set(base))
            row["vs_baseline"] = {c: paired([values[s][c] for s in seeds], [base[s][c] for s in seeds]) for c in columns}
            spread = row["vs_baseline"][AVERAGE]["std_diff"]
            row["seeds_for_1pt"] = None if spread is None else seeds_for_half_width(spread, RESOLUTION)
        rows.append(row)
    untrained = (results.get("untrained_by_set") or {}).get("test")
    if untrained:
        untrained = with_average(untrained)
    return {"columns": columns, "sizes": results["task"].get("test_sets", {}), "untrained": untrained, "rows": rows}


def _per_set_columns(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    columns = table["columns"]
    body = []
    if table["untrained"]:
        body.append(["untrained model"] + [f"{100 * table['untrained'][c]:.1f}" for c in columns])
    body += [[row["method"]] + [f"{100 * row['mean'][c]:.1f}" for c in columns] for row in table["rows"]]
    body += [[f"{row['method']} − LoRA"] + [views.signed(row["vs_baseline"][c], 1, 100) for c in columns]
             for row in table["rows"] if row["vs_baseline"] is not None]
    return ["method", *columns], body


def _per_set_caption(table: dict[str, Any]) -> str:
    sizes = table["sizes"]
    counts = set(sizes.values())
    per = (f"{next(iter(counts))} test question{'s' if counts != {1} else ''} per set" if len(counts) == 1
           else "test questions per set: " + ", ".join(f"{name} {n}" for name, n in sizes.items()))
    seeds = sorted({row["n"] for row in table["rows"]})
    text = (f"Test accuracy (%) per set, mean over each method's {'/'.join(map(str, seeds))} test seed(s); {per} "
            f"({sum(sizes.values())} in all), the same rows for every method and seed; {AVERAGE} = the mean of the "
            f"{len(table['columns']) - 1} per-set accuracies, as in the paper's Table 1. "
            "Rows \"method − LoRA\": the paired difference on the same seeds, points [95% CI from the t-distribution].")
    on_average = []
    for row in table["rows"]:
        pair = row["vs_baseline"]
        if pair is None:
            continue
        mde = "–" if pair[AVERAGE]["half_width"] is None else f"±{100 * pair[AVERAGE]['half_width']:.2f} points"
        need = "–" if row["seeds_for_1pt"] is None else str(row["seeds_for_1pt"])
        on_average.append(f"{row['method']}: MDE {mde} on {pair[AVERAGE]['n']} paired seeds, {need} seeds for ±1 point")
    if on_average:
        text += " On the average: " + "; ".join(on_average) + " (the same spread of differences; `seeds_for_half_width`)."
    return text


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _columns(rows: list[dict[str, Any]], trainable_mixer: dict[str, bool]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "lr", "accuracy % (mean ± std)", "Δ vs LoRA, pts [95% CI]", "MDE, pts", "t-test p", "Wilcoxon p",
              "wins/losses", "s/run", "trainable params"]
    body = []
    for row in rows:
        pair = row["vs_baseline"]
        if pair is None:
            delta, mde, t_p, w_p, record = "(baseline)", "–", "–", "–", "–"
        else:
            ci = "" if pair["ci_low"] is None else f" [{_pct(pair['ci_low'], True)}, {_pct(pair['ci_high'], True)}]"
            delta = _pct(pair["mean_diff"], True) + ci
            mde = "–" if pair["half_width"] is None else "±" + _pct(pair["half_width"])
            t_p, w_p = _p(pair["t_pvalue"]), _p(pair["wilcoxon_pvalue"])
            record = f"{pair['wins']}/{pair['losses']}"
        std = "" if row["metric_std"] is None else f" ± {_pct(row['metric_std'])}"
        params = "–" if row["trainable_params"] is None else f"{row['trainable_params']:,}"
        if row["mixer_params"] and not trainable_mixer.get(row["method"], True):
            params += " (mixer frozen)"
        body.append(
            [
                row["method"],
                "–" if row["lr"] is None else f"{row['lr']:g}",
                _pct(row["metric_mean"]) + std,
                delta,
                mde,
                t_p,
                w_p,
                record,
                "–" if row["train_seconds"] is None else f"{row['train_seconds']:.1f}",
                params,
            ]
        )
    return header, body


def _trainable_mixer(results: dict[str, Any]) -> dict[str, bool]:
    return {run["method"]: run["config"]["train_mixer"] for run in results["runs"]}


def _caption(results: dict[str, Any]) -> list[str]:
    task, settings = results["task"], results["settings"]
    sizes = task["sizes"]
    seeds = finished_seeds(results)
    planned = len(settings["seeds"])
    if task.get("kind") == "image":
        inputs = f"images at {task['image_size']} px"
    else:
        inputs = f"max {task['max_length']} tokens"
    lines = [
        f"Task `{task['name']}`: {task['description'] or task['model']}; "
        f"train/validation/test = {sizes['train']}/{sizes['validation']}/{sizes['test']} examples; "
        f"{task['steps']} steps × batch {task['batch_size']}, {inputs}; "
        f"r = {settings['r']}, alpha = {task['alpha_over_r'] * settings['r']:g}"
        + (f", dropout {task['dropout']:g}" if task.get("dropout") else "")
        + ".",
    ]
    if task.get("kind") == "instruction":
        extraction = task.get("extraction", task["dataset"])  # older results files name it "dataset"
        how = {
            "generate": f"greedy answers of up to {task['max_new_tokens']} tokens, read by the paper's `{extraction}` extraction "
            "(first answer label in the text; none counts as wrong)",
            "loglik": f"the most likely of each row's `{extraction}` options (log-likelihood)",
            "choice": "the option text with the highest log-probability per " + (task.get("choice_normalization") or "token") + " after the prompt",
        }[task["scoring"]]
        lines.append(f"Instruction-tuned in the LLM-Adapters format (Alpaca prompt, loss on the response only); accuracy of {how}.")
    before = reference(results)
    if before:
        lines.append("Before training: " + "; ".join(f"{name} {100 * value:.2f}%" for name, value in before.items()) + " (test).")
    if settings["validation_seeds"]:
        lines.append(
            f"Learning rate per method: best mean validation accuracy over the grid {settings['lrs']} "
            f"(validation seeds {settings['validation_seeds']}, not used for testing); the `lr` column is the pick."
        )
    elif isinstance(settings["lrs"], dict):
        lines.append("Learning rate per method given (" + ", ".join(f"{m} {lr:g}" for m, lr in settings["lrs"].items())
                     + "), picked by an earlier search; no search here.")
    else:
        lines.append(f"One learning rate for every method ({settings['lrs'][0]:g}); no search.")
    lines.append(
        f"Test accuracy over n = {len(seeds)} paired seeds ({', '.join(map(str, seeds))})"
        + ("" if len(seeds) == planned else f" of the {planned} planned (the run was cut short; the table uses every finished run)")
        + (": same initial weights (head included), same A, same data order per seed. " if task.get("modules_to_save")
           else ": same initial weights, same A, same data order per seed. ")
        + "Δ = method − LoRA on the same seed, 95% CI from the t-distribution (n − 1 d.o.f.); "
        "MDE (minimum detectable effect) = the CI's half-width: differences smaller than it are not resolved by these seeds; "
        "two-sided paired t-test and Wilcoxon signed-rank test; wins/losses = seeds where the method is above/below LoRA."
    )
    if results.get("wall_seconds"):
        lines.append(f"Wall time of the whole comparison: {results['wall_seconds'] / 60:.1f} min for {len(results['runs'])} runs.")
    env = results.get("environment")
    if env:
        lines.append(
            f"s/run = mean training wall time per run on {env['device']} ({env['torch_threads']} torch threads; "
            "on a shared machine it varies with the load)"
            + ("; trainable params include the fully trained " + ", ".join(task["modules_to_save"]) if task.get("modules_to_save") else "")
            + "."
        )
    return lines


def reference(results: dict[str, Any]) -> dict[str, float]:
    """What the test accuracy is to be read against: chance (the task's) and, for tasks without a
    new head, the untrained model."""
    out = {}
    if results["task"].get("chance") is not None:
        out["chance"] = results["task"]["chance"]
    if results.get("untrained"):
        out["untrained model"] = results["untrained"]["test"]
    return out


def verdict(results: dict[str, Any]) -> list[str]:
    """The summary in plain sentences: whether LoRA learnt the task (against the untrained model, or
    chance), then for each other method what its paired difference does and does not show."""
    rows = {row["method"]: row for row in summarize(results)}
    base = rows.get(BASELINE)
    if base is None or base["metric_mean"] is None:
        return ["No finished test run of LoRA yet: nothing to summarize."]
    ref = reference(results)
    name, level = ("the untrained model", ref["untrained model"]) if "untrained model" in ref else ("chance", ref.get("chance"))
    lines = []
    if level is not None:
        gain = 100 * (base["metric_mean"] - level)
        how = ("clearly learns the task" if gain >= 5 else "barely learns the task, so the comparison below means little"
               if gain > 0 else "does not learn the task, so the comparison below means nothing")
        lines.append(f"LoRA reaches {100 * base['metric_mean']:.1f}% against {100 * level:.1f}% for {name}: at this budget it {how}.")
    for method, row in rows.items():
        pair = row["vs_baseline"]
        if pair is None or pair["mean_diff"] is None:
            continue
        n, delta = pair["n"], 100 * pair["mean_diff"]
        if pair["ci_low"] is None and n >= 2 and pair["std_diff"] == 0:
            lines.append(f"{method} − LoRA = {delta:+.2f} points on each of the {n} paired seeds (no spread, so no interval).")
        elif pair["ci_low"] is None:
            lines.append(f"{method} − LoRA = {delta:+.2f} points on {n} seed(s): too few paired seeds for a confidence interval, so this shows nothing yet.")
        elif pair["ci_low"] > 0 or pair["ci_high"] < 0:
            side = "above" if delta > 0 else "below"
            lines.append(
                f"{method} is {side} LoRA by {abs(delta):.2f} points (95% CI [{100 * pair['ci_low']:+.2f}, {100 * pair['ci_high']:+.2f}], "
                f"{n} paired seeds): a real difference on this task, model and budget, which says nothing about other settings."
            )
        else:
            lines.append(
                f"{method} − LoRA = {delta:+.2f} points (95% CI [{100 * pair['ci_low']:+.2f}, {100 * pair['ci_high']:+.2f}], {n} paired seeds): "
                f"no difference is detectable at this resolution, so the numbers neither show the mixer helping or hurting "
                f"nor rule out an effect smaller than about {100 * pair['half_width']:.1f} points."
            )
    return lines


def markdown_table(results: dict[str, Any], command: str | None = None) -> str:
    header, body = _columns(summarize(results), _trainable_mixer(results))
    lines = [f"# moslora compare: {results['task']['name']}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += ["", "**In short:** " + " ".join(verdict(results)), ""] + _caption(results) + [""]
    sets = per_set(results)
    if sets:
        header, body = _per_set_columns(sets)
        lines += ["## Per set", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body] + ["", _per_set_caption(sets), ""]
    convergence = views.convergence_markdown(results)
    if convergence:
        lines += ["## Convergence", "", f"![convergence]({CONVERGENCE_FILE})", ""] + convergence + [""]
    by_lr = views.lr_markdown(results)
    if by_lr:
        lines += ["## Learning rate", "", f"![learning rate]({LR_FILE})", ""] + by_lr + [""]
    return "\n".join(lines)


def text_table(results: dict[str, Any]) -> str:
    out = _aligned(*_columns(summarize(results), _trainable_mixer(results))) + [""] + _caption(results)
    sets = per_set(results)
    if sets:
        out += ["", "Per set:"] + _aligned(*_per_set_columns(sets)) + ["", _per_set_caption(sets)]
    return "\n".join(out + ["", "In short:"] + [f"  {sentence}" for sentence in verdict(results)])


def _aligned(header: list[str], body: list[list[str]]) -> list[str]:
    """A table's lines for a terminal: columns padded to their widest cell, a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body]


LEGEND_SEEDS = 8  # the per-seed legend is drawn up to this many seeds


def figure(results: dict[str, Any], path: str | Path) -> None:
    """Left: test accuracy of every seed under every method, one line per seed joining its runs (the
    pairs). Right: mean training-loss curve of each method over the test seeds."""
    with pyplot() as plt:
        _draw(plt, results, path)


def _draw(plt: Any, results: dict[str, Any], path: str | Path) -> None:
    methods = results["settings"]["methods"]
    seeds = finished_seeds(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab10")
    for k, seed in enumerate(seeds):
        xs, ys = [], []
        for i, method in enumerate(methods):
            value = test_values(results, method).get(seed)
            if value is not None:
                xs.append(i)
                ys.append(100 * value)
        left.plot(xs, ys, "-o", color=cmap(k % 10), alpha=0.7, label=f"seed {seed}")
    for i, method in enumerate(methods):
        values = list(test_values(results, method).values())
        if values:
            left.hlines(100 * sum(values) / len(values), i - 0.25, i + 0.25, color="black", linewidth=2)
    left.set_xticks(range(len(methods)), methods, rotation=15)
    left.set_ylabel("test accuracy (%)")
    left.set_title("per seed (lines join a seed's paired runs; bars: means)")
    if len(seeds) <= LEGEND_SEEDS:  # beyond that a legend would cover the points it names
        left.legend(fontsize=7, loc="best")
    for i, method in enumerate(methods):
        curves = [run["curve"] for run in results["runs"] if run["split"] == "test" and run["method"] == method]
        if not curves or not curves[0]["step"]:
            continue
        steps = curves[0]["step"]
        mean = [sum(c["loss"][j] for c in curves) / len(curves) for j in range(len(steps))]
        right.plot(steps, mean, label=method, color=cmap(i % 10))
    right.set_xlabel("step")
    right.set_ylabel("training loss (mean over test seeds)")
    right.set_title("learning curves")
    right.legend(fontsize=8)
    fig.suptitle(f"moslora compare: {results['task']['name']}, r = {results['settings']['r']}, n = {len(seeds)} seeds")
    fig.tight_layout()
    save_figure(fig, path)


def save(results: dict[str, Any], output: str | Path, command: str | None = None, *, final: bool = True) -> dict[str, Path]:
    """Write the results JSON (always) and, when ``final``, the Markdown table and the figures
    (results, convergence, and the learning-rate search when there was one)."""
    output = Path(output)
    paths = {"json": output / RESULTS_FILE}
    atomic_write_json(paths["json"], {**results, "command": command})
    if final:
        paths["markdown"] = output / TABLE_FILE
        paths["figure"] = output / FIGURE_FILE
        atomic_write_text(paths["markdown"], markdown_table(results, command))
        figure(results, paths["figure"])
        if views.convergence(results):
            paths["convergence"] = output / CONVERGENCE_FILE
            views.convergence_figure([results], paths["convergence"])
        if views.lr_curves(results):
            paths["lr"] = output / LR_FILE
            views.lr_figure([results], paths["lr"])
    return paths


VIEWS_FILE = "views.md"


def save_views(many: list[dict[str, Any]], output: str | Path) -> dict[str, Path]:
    """Several comparisons' convergence and learning-rate views side by side: one figure of each
    (a column per comparison) and a Markdown file with each comparison's two tables."""
    output = Path(output)
    paths = {"markdown": output / VIEWS_FILE}
    lines = ["# moslora compare: convergence and learning rate across tasks", ""]
    paired = [results for results in many if len(finished_seeds(results)) >= 2]  # a paired band needs two seeds
    if paired:
        paths["convergence"] = output / CONVERGENCE_FILE
        views.convergence_figure(paired, paths["convergence"])
        lines += [f"![convergence]({CONVERGENCE_FILE})", "", "Comparisons with fewer than two finished seeds are left out of it.", ""]
    if views.merged_lr_curves(many):
        paths["lr"] = output / LR_FILE
        views.lr_figure(many, paths["lr"])
        lines += [f"![learning rate]({LR_FILE})", "", "Comparisons of the same task and rank share one panel of the figure "
                  "(a search extended by a later run over more rates).", ""]
    for results in many:
        title = f"## {results['task']['name']}, r = {results['settings']['r']}"
        lines += [title, "", *(results.get("command") and ["```", results["command"], "```", ""] or [])]
        lines += views.convergence_markdown(results) + [""] + views.lr_markdown(results) + [""]
    atomic_write_text(paths["markdown"], "\n".join(lines))
    return paths
