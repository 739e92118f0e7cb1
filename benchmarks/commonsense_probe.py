"""Does SmolLM2-135M learn the commonsense mix at a CPU budget? The learnability probe of
``moslora compare --task commonsense``: plain LoRA (seed 0) at several budgets against the untrained
model, on the task's own test rows (200 a set, 1,600 in all), per set and on the average.

Every budget is a separate run of the task as ``moslora compare`` trains it (the same data, prompt,
schedule, frozen bottom and scoring), so a row here is what a comparison at that budget would see
for LoRA's seed 0. The task is prepared once (model, tokenized rows, the frozen bottom's states of
the test rows), so each budget costs only its training and one scoring.

    python benchmarks/commonsense_probe.py --output docs/results/commonsense-probe   # the published probe, r = 16
    python benchmarks/commonsense_probe.py --budgets 400:1e-3,800:1e-3 --output runs/probe
    python benchmarks/commonsense_probe.py --smoke --model DIR --output /tmp/probe   # a tiny model, 2 rows a set

A budget is ``STEPS:LR`` (batch 8). Results go to ``--output/probe.json`` after every run, and a
run already there is not trained again (a cut-short probe goes on where it stopped). It prints one
table: per budget, the accuracy per set and the average, and the average's gain over the untrained
model, with the minutes each run took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

DEFAULT_BUDGETS = "400:1e-3,400:3e-3"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated STEPS:LR, one LoRA run each (default: %(default)s)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank; alpha = 2r as in the task (default: %(default)s)")
    p.add_argument("--model", help="base model instead of the task's SmolLM2-135M-Instruct (a .gguf or a transformers folder)")
    p.add_argument("--output", default="runs/commonsense-probe", help="folder for probe.json (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="2 test rows a set, budgets of 2 steps: checks the script runs")
    return p


def budgets(text: str) -> list[tuple[int, float]]:
    out = []
    for item in text.split(","):
        steps, _, lr = item.partition(":")
        try:
            out.append((int(steps), float(lr)))
        except ValueError:
            raise SystemExit(f"--budgets: {item!r} is not STEPS:LR (e.g. 400:1e-3)") from None
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    plan = budgets("2:1e-3,2:3e-3" if args.smoke else args.budgets)
    from moslora.compare.report import with_average
    from moslora.compare.runner import RunSpec, train_and_score, untrained_by_set, untrained_scores
    from moslora.compare.tasks import load_task

    task = load_task("commonsense")
    if args.model:
        task = replace(task, model=args.model)
    if args.smoke:
        per_set = len(task.test) // 200 * 2  # the test rows interleave the sets: a prefix holds them equally
        task = replace(task, train=task.train[:32], test=task.test[:per_set], validation=[], frozen_layers=1, eval_batch_size=4)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "probe.json"
    results = json.loads(path.read_text()) if path.is_file() else {"task": task.name, "r": args.r, "runs": []}
    if results.get("r") != args.r or results.get("test_rows") not in (None, len(task.test)):
        raise SystemExit(f"{path} holds a probe at another rank or test size; give another --output")

    missing = [(steps, lr) for steps, lr in plan if not any(run["steps"] == steps and run["lr"] == lr for run in results["runs"])]
    if "untrained" in results and not missing:  # all there: nothing to prepare
        print(table(results))
        return 0
    start = time.perf_counter()
    prepared = task.prepare()
    print(f"prepared in {(time.perf_counter() - start) / 60:.1f} min", file=sys.stderr, flush=True)
    if "untrained" not in results:
        by_set = untrained_by_set(task, prepared, args.r, ["test"])["test"]
        pooled = untrained_scores(task, prepared, args.r, ["test"])["test"]  # scored once with by_set
        results.update(test_rows=len(task.test), untrained={"pooled": pooled, **with_average(by_set)})
        path.write_text(json.dumps(results, indent=1))
    for steps, lr in missing:
        prepared.task = task.with_steps(steps)  # the same prepared rows and caches; another step budget
        begun = time.perf_counter()
        run = train_and_score(prepared, RunSpec("lora", 0, lr, "test"), args.r)
        results["runs"].append({"steps": steps, "lr": lr, "minutes": (time.perf_counter() - begun) / 60,
                                "pooled": run["value"], **with_average(run["by_set"]), "loss": run["curve"]["loss"]})
        path.write_text(json.dumps(results, indent=1))
        print(f"{steps} steps at {lr:g}: average {100 * results['runs'][-1]['average']:.1f}%", file=sys.stderr, flush=True)
    print(table(results))
    return 0


def table(results: dict) -> str:
    untrained = results["untrained"]
    sets = [name for name in untrained if name not in ("average", "pooled")]
    lines = [f"### commonsense probe: LoRA r = {results['r']}, seed 0, {results['test_rows']} test rows "
             f"({results['test_rows'] // len(sets)} a set)", "",
             "| budget | " + " | ".join(sets) + " | average | gain | minutes |",
             "|---" * (len(sets) + 4) + "|",
             "| untrained | " + " | ".join(f"{100 * untrained[s]:.1f}" for s in sets) + f" | {100 * untrained['average']:.1f} | – | – |"]
    for run in sorted(results["runs"], key=lambda run: (run["steps"], run["lr"])):
        gain = 100 * (run["average"] - untrained["average"])
        lines.append(f"| {run['steps']} steps × 8 at {run['lr']:g} | " + " | ".join(f"{100 * run[s]:.1f}" for s in sets)
                     + f" | {100 * run['average']:.1f} | {gain:+.1f} | {run['minutes']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
