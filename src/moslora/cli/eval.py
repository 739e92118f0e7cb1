"""``moslora eval``: accuracy of a model (with a MoSLoRA adapter) on one of the paper's eight
commonsense test sets, scored as the paper did (first answer label in a greedy response) or by
ranking the answer options by log-likelihood (``--scoring loglik``, faster)."""

from __future__ import annotations

import argparse

from moslora.cli.extras import require
from moslora.cli.inputs import check_inputs
from moslora.eval.tasks import TASKS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score a model + adapter on a commonsense test set", description=__doc__)
    p.add_argument("--model", required=True, help="base model: hub id, local folder, or a .gguf file")
    p.add_argument("--adapter", help="native moslora adapter folder (omit to score the base model)")
    p.add_argument("--data", required=True, help="JSON or JSONL rows with instruction and answer")
    p.add_argument("--dataset", required=True, choices=sorted(TASKS), help="which answer labels to look for")
    p.add_argument("--output", help="results JSON (other datasets already in it are kept)")
    p.add_argument("--scoring", choices=("generate", "loglik"), default="generate", help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length (default: %(default)s)")
    p.add_argument("--answer-prefix", default="the correct answer is", help="loglik: text before each option (default: %(default)r)")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--quantize", choices=("4bit",), help="load the base model in 4 bits")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require("train", "transformers", "datasets")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    check_inputs(args.model, args.quantize, data=args.data, adapter=args.adapter)
    from moslora.eval import evaluate_adapter

    result = evaluate_adapter(
        args.model, args.data, args.dataset, adapter=args.adapter, output=args.output, quantize=args.quantize,
        precision=args.precision, scoring=args.scoring, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        answer_prefix=args.answer_prefix, limit=args.limit,
    )
    print(f"{args.dataset}: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']}, "
          f"{result['no_answer']} without an answer, scoring={args.scoring})" + (f" -> {args.output}" if args.output else ""))
    return 0
