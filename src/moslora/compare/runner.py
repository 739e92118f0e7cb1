"""Train every method × seed on a task, paired, and collect the results.

Pairing: for a seed, every method starts from the same model and sees the same data.
``torch.manual_seed(seed)`` is set right before the model is loaded, so the new classifier head
and then A (which :func:`moslora.inject` draws for every layer before any mixer) are identical
across methods; the data order comes from its own ``torch.Generator`` seeded with the seed, so it
does not depend on how many random numbers a method's initialisation drew. The only difference
between two runs of a seed is the mixer.

Fairness: the mixer changes the effective step size (a kaiming M scales M·A to about 1/√3 of A), so
each method gets its own learning rate, the best of a grid on the validation split with seeds that
are not test seeds (:data:`VALIDATION_SEED_BASE` + i). Test seeds 0..n−1 then run on the test split.

Training is the Hugging Face ``Trainer`` (AdamW, linear decay after warm-up, no weight decay) with a
sequential sampler over the pre-ordered examples, the same for every kind of task. What a kind
adds is its ``prepare()`` object: ``train`` (the examples), ``examples(indices)`` (those a run
uses, tokenized or cached once), ``collator()``,
``build(method, seed, r)``, ``training_model(model)`` (what the Trainer runs: the model, or the
same model fed cached states) and ``score(model, split)``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterable

import torch

from moslora.compare.methods import BASELINE, method_config
from moslora.model.inject import get_config
from moslora.model.ops import parameter_counts

VALIDATION_SEED_BASE = 1000


def data_order(seed: int, n: int, count: int) -> list[int]:
    """The first ``count`` indices of a stream of shuffled passes over ``n`` examples, drawn from a
    generator of its own so the order depends on the seed only."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < count:
        order.extend(torch.randperm(n, generator=generator).tolist())
    return order[:count]


@dataclass
class RunSpec:
    method: str
    seed: int
    lr: float
    split: str  # "validation" (learning-rate search) or "test"


def train_and_score(prepared: Any, spec: RunSpec, r: int, callbacks: Iterable[Any] = ()) -> dict[str, Any]:
    """One run: build, train with the Trainer (plus ``callbacks``), score on ``spec.split``. Returns
    the run's record for the results file (config, seed, lr, loss curve, metric, time, parameter
    counts)."""
    from transformers import PrinterCallback

    from moslora.train.trainer import AdapterTrainer  # a Trainer that also takes GGUF- or 4-bit-loaded bases

    task = prepared.task
    model = prepared.build(spec.method, spec.seed, r)
    counts = parameter_counts(model)
    order = data_order(spec.seed, len(prepared.train), task.steps * task.batch_size)
    train = prepared.examples(order)
    with tempfile.TemporaryDirectory(prefix="moslora-compare-") as tmp:
        trainer = AdapterTrainer(model=prepared.training_model(model), args=_training_arguments(task, spec, tmp), train_dataset=train,
                                 data_collator=prepared.collator(), callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)  # the log dicts would drown the progress bar
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        scored = prepared.score(model, spec.split)
    curve = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return {
        "method": spec.method,
        "seed": spec.seed,
        "lr": spec.lr,
        "split": spec.split,
        **scored,
        "train_seconds": seconds,
        "curve": {"step": [s for s, _ in curve], "loss": [loss for _, loss in curve]},
        "trainable_params": counts["trainable"],
        "parameter_counts": counts,
        "config": get_config(model).to_dict(),
    }


def _step_on_bar(bar: Any, label: str) -> Any:
    """A callback that shows the current run's step (then "scoring") on the comparison's bar: a run
    of an instruction task on CPU takes minutes."""
    from transformers import TrainerCallback

    class StepOnBar(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bar.set_postfix_str(f"{label} step {state.global_step}/{state.max_steps}")

        def on_train_end(self, args, state, control, **kwargs):
            bar.set_postfix_str(f"{label} scoring")

    return StepOnBar()


def _training_arguments(task: Any, spec: RunSpec, output_dir: str) -> Any:
    from transformers import TrainingArguments

    bf16 = getattr(task, "precision", "fp32") == "bf16"
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=task.steps,
        per_device_train_batch_size=task.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=spec.lr,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=task.warmup_steps,
        logging_steps=task.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec.seed,
        bf16=bf16,  # autocast; weights and adapters stay fp32
        use_cpu=bf16 and not torch.cuda.is_available(),  # Trainer refuses bf16 on CPU unless told
        # The examples are already in the seed's order (data_order); the sampler must keep it.
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def _environment() -> dict[str, Any]:
    import os
    import platform

    import transformers

    return {
        "moslora": _version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _version() -> str:
    try:
        return version("moslora")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def plan(methods: list[str], seeds: int, lrs: list[float], validation_seeds: int) -> tuple[list[RunSpec], list[int]]:
    """The learning-rate search runs (empty for a single learning rate) and the test seeds."""
    search = []
    if len(lrs) > 1:
        search = [
            RunSpec(method, VALIDATION_SEED_BASE + i, lr, "validation")
            for method in methods
            for lr in lrs
            for i in range(validation_seeds)
        ]
    return search, list(range(seeds))


def pick_lrs(runs: Iterable[dict[str, Any]], methods: list[str], lrs: list[float]) -> dict[str, float]:
    """Each method's learning rate with the best mean validation metric (ties: the first in ``lrs``)."""
    picked = {}
    for method in methods:
        scores = {}
        for lr in lrs:
            values = [run["value"] for run in runs if run["method"] == method and run["lr"] == lr and run["split"] == "validation"]
            scores[lr] = sum(values) / len(values) if values else -math.inf
        picked[method] = max(lrs, key=lambda lr: scores[lr])
    return picked


def untrained_scores(task: Any, prepared: Any, r: int, splits: Iterable[str]) -> dict[str, float] | None:
    """The model before training on ``splits`` (B = 0, so every method's adapter is a no-op), for
    tasks without a new head; ``None`` for tasks whose head is new (a random head scores about
    chance: see the task's ``chance``). Each split is scored once per prepared task."""
    if task.modules_to_save:
        return None
    return {split: score["value"] for split, score in _untrained(prepared, r, splits).items()}


def untrained_by_set(task: Any, prepared: Any, r: int, splits: Iterable[str]) -> dict[str, dict[str, float]] | None:
    """The untrained model's accuracy per set (see :func:`untrained_scores`) on ``splits``, for
    tasks whose rows carry their set (scored once with :func:`untrained_scores`); ``None`` otherwise."""
    if task.modules_to_save:
        return None
    scores = _untrained(prepared, r, splits)
    return {split: score["by_set"] for split, score in scores.items() if "by_set" in score} or None


def _untrained(prepared: Any, r: int, splits: Iterable[str]) -> dict[str, dict[str, Any]]:
    known = vars(prepared).setdefault("untrained", {})
    splits = list(splits)
    missing = [split for split in splits if split not in known]
    if missing:
        model = prepared.build(BASELINE, 0, r)
        known.update({split: prepared.score(model, split) for split in missing})
    return {split: known[split] for split in splits}


def run_comparison(
    task: Any,
    *,
    methods: list[str],
    seeds: int,
    r: int,
    lrs: list[float] | dict[str, float],
    validation_seeds: int = 2,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    prepared: Any = None,
    earlier: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Search each method's learning rate on validation (``lrs`` a grid; a dict of one rate per
    method skips the search), then train every method on test seeds 0..seeds−1 at its rate.
    ``on_run(results)`` is called after every run with the results so far (to save them as they come). ``prepared`` is ``task.prepare()``'s result when the caller
    already has it (a rank sweep makes it once). Progress is a bar on a terminal and one line per
    run otherwise (a log file stays readable). ``earlier`` is the results of an earlier (possibly
    cut-short) comparison of the same task and rank: its untrained scores and runs are taken over,
    not trained again (:func:`reusable_runs`). Returns the results: task, settings, the untrained
    model's scores, picked LRs, every run."""
    for method in methods:
        method_config(task, method, r)  # fail on a bad method or rank before any training
    if BASELINE not in methods:
        raise ValueError(f"the comparison is against {BASELINE!r}: include it in the methods")
    if seeds < 1 or validation_seeds < 1:
        raise ValueError(f"need at least one seed, got seeds={seeds}, validation_seeds={validation_seeds}")
    given = dict(lrs) if isinstance(lrs, dict) else None
    if given is not None and set(given) != set(methods):
        raise ValueError(f"per-method learning rates must name each method {methods}, got {sorted(given)}")
    grid = list(given.values()) if given is not None else list(lrs)
    if not grid or any(lr <= 0 for lr in grid):
        raise ValueError(f"learning rates must be positive, got {lrs}")
    search, test_seeds = plan(methods, seeds, [] if given is not None else grid, validation_seeds)
    results: dict[str, Any] = {
        "task": task.describe(),
        "settings": {
            "methods": methods,
            "seeds": test_seeds,
            "r": r,
            "lrs": given if given is not None else grid,
            "validation_seeds": [VALIDATION_SEED_BASE + i for i in range(validation_seeds)] if search else [],
        },
        "environment": _environment(),
        "untrained": None,
        "picked_lr": {},
        "runs": [],
    }
    done = reusable_runs(earlier, results["task"], r) if earlier is not None else {}  # refused before the slow work
    prepared = task.prepare() if prepared is None else prepared
    shown = _Progress(f"compare {task.name} r={r}", len(search) + len(methods) * seeds, progress)
    scored_splits = ["validation", "test"] if search else ["test"]
    if done and set(scored_splits) <= set(earlier.get("untrained") or {}):
        results["untrained"] = {split: earlier["untrained"][split] for split in scored_splits}
        if "untrained_by_set" in earlier:
            results["untrained_by_set"] = {split: v for split, v in earlier["untrained_by_set"].items() if split in scored_splits}
    else:
        results["untrained"] = untrained_scores(task, prepared, r, scored_splits)
        by_set = untrained_by_set(task, prepared, r, scored_splits)
        if by_set is not None:  # a task pooling several sets (only then, so other results files are as they were)
            results["untrained_by_set"] = by_set
    if done:
        shown.line(f"{len(done)} runs taken over from the earlier results")
    if results["untrained"] is not None:
        shown.line("untrained model: " + ", ".join(f"{split} {100 * value:.1f}%" for split, value in results["untrained"].items()))

    def record(spec: RunSpec) -> None:
        label = f"{spec.split} {spec.method} lr={spec.lr:g} seed={spec.seed}"
        run = done.get(_key(spec.split, spec.method, spec.lr, spec.seed))
        if run is None:
            run = train_and_score(prepared, spec, r, callbacks=shown.callbacks(label))
        results["runs"].append(run)
        shown.done(label, run)
        if on_run is not None:
            on_run(results)

    for spec in search:
        record(spec)
    if given is not None:
        results["picked_lr"] = given
    else:
        results["picked_lr"] = pick_lrs(results["runs"], methods, grid) if search else {m: grid[0] for m in methods}
    # Seed-major order: if the run is cut short, the finished seeds are complete pairs.
    for seed in test_seeds:
        for method in methods:
            record(RunSpec(method, seed, results["picked_lr"][method], "test"))
    shown.close()
    return results


def _key(split: str, method: str, lr: float, seed: int) -> tuple[str, str, float, int]:
    return split, method, float(lr), int(seed)


def reusable_runs(earlier: dict[str, Any], task: dict[str, Any], r: int) -> dict[tuple[str, str, float, int], dict[str, Any]]:
    """The runs of ``earlier`` that a comparison of ``task`` (its description) at rank ``r`` would
    train alike, by (split, method, lr, seed).

    Refuses (ValueError) when ``earlier`` compared another task description (data, model, budget)
    or rank: a run's result depends on both. Another number of seeds, more methods or another
    grid are fine: the runs they share are the same runs."""
    task = json.loads(json.dumps(task))  # as the results file holds it (tuples as lists)
    for what, now, before in (("task", task, earlier.get("task")), ("rank", r, earlier.get("settings", {}).get("r"))):
        if now != before:
            raise ValueError(f"--resume: the earlier results are of another {what} ({before!r}, now {now!r}); "
                             "give another --output, or the same settings")
    return {_key(run["split"], run["method"], run["lr"], run["seed"]): run for run in earlier.get("runs", [])}


class _Progress:
    """A tqdm bar showing the current run's step on a terminal; on anything else (a pipe, a log
    file) one line per finished run, so a log holds one line per run instead of one per step."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.enabled, self.desc, self.total, self.count = enabled, desc, total, 0
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit="run", disable=not self.tty)

    def callbacks(self, label: str) -> list[Any]:
        if not self.tty:
            return []
        self.bar.set_postfix_str(label)
        return [_step_on_bar(self.bar, label)]

    def line(self, text: str) -> None:
        if self.tty:
            self.bar.write(f"{self.desc}: {text}", file=sys.stderr)
        elif self.enabled:
            print(f"{self.desc}: {text}", file=sys.stderr, flush=True)

    def done(self, label: str, run: dict[str, Any]) -> None:
        self.count += 1
        if self.tty:
            self.bar.update()
        elif self.enabled:
            print(f"{self.desc} [{self.count}/{self.total}] {label}: {100 * run['value']:.1f}% "
                  f"({run['train_seconds']:.0f} s training)", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
