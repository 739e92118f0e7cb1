"""Scoring a causal LM (with or without a MoSLoRA adapter) on a commonsense test set.

Two ways to get a prediction for each row's Alpaca prompt (the one training used):

- ``generate`` (the paper's): greedy decoding, batched with left padding, then the first answer
  label found in the response (see :mod:`moslora.eval.tasks`). The authors decoded one row at a
  time with beam search; greedy batches give the same kind of number much faster.
- ``loglik``: no decoding. Each option is appended as ``<prompt><answer_prefix> <option>`` and
  the option with the highest total log-probability of its own tokens wins. One forward pass per
  option, and never "no answer".
- ``choice``: for rows that carry their options as text (``options``, a list of strings, with
  ``answer`` one of them; the response trained on is the answer's text). Each option is the
  response ``<prompt><option>`` and the option with the highest log-probability **per character**,
  (1/len(option))·Σ_t log p(x_t | prompt, x_<t), wins (:func:`per_character`): the
  length-normalised multiple-choice score of lm-evaluation-harness's ``acc_norm``, so a longer
  option is not penalised for its length alone. Per character rather than per token: a per-token
  mean rewards options that the tokenizer splits into many easy pieces, and costs a small model
  several points of accuracy on BIG-bench's bbq_lite (see docs/compare.md, "checking the pipeline").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from moslora.eval.tasks import choices, extract_answer, get_task
from moslora.io.atomic import atomic_write_json
from moslora.train.data import prompt, read_rows

SCORINGS = ("generate", "loglik", "choice")
ANSWER_PREFIX = "the correct answer is"  # how the commonsense_170k responses begin


def load_rows(data: str | os.PathLike | Sequence[dict[str, Any]], *, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows with at least ``instruction`` and ``answer``, from a JSON/JSONL file or a list."""
    if isinstance(data, (str, os.PathLike)):
        rows = read_rows(data, required=("instruction", "answer")).dataset.to_list()
    else:
        rows = list(data)
    return rows[:limit] if limit is not None else rows


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 8, max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without the prompt."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


@torch.inference_mode()
def continuation_logprobs(
    model, tokenizer, contexts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 8, mean: bool = False
) -> list[float]:
    """log p(continuation | context) summed over the continuation's tokens (``mean``: divided by
    their number), for each pair.

    The continuation's tokens are those of ``context + continuation`` past the longest prefix it
    shares with the tokens of ``context`` alone (so a merge across the boundary counts as part of
    the continuation).
    """
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(contexts), batch_size):
        pairs = [continuation_tokens(tokenizer, c, x) for c, x in zip(contexts[start : start + batch_size], continuations[start : start + batch_size])]
        length = max(len(ids) for ids, _ in pairs)
        ids = torch.tensor([ids + [tokenizer.pad_token_id or 0] * (length - len(ids)) for ids, _ in pairs], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in pairs], device=device)
        logp = next_token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)
        scores += span_logprobs(logp, [s for _, s in pairs], [len(i) for i, _ in pairs], mean=mean)
    return scores


def continuation_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """The token ids of ``context + continuation`` and where the continuation's tokens start: past
    the longest prefix they share with the tokens of ``context`` alone (at least one context token)."""
    full = tokenizer(context + continuation)["input_ids"]
    return full, _shared_prefix(tokenizer(context)["input_ids"], full)


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, length − 1): entry t is log p(input_ids[t + 1] | input_ids[≤ t]) under ``logits``."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]


def span_logprobs(logp: torch.Tensor, starts: Sequence[int], ends: Sequence[int], *, mean: bool = False) -> list[float]:
    """Σ log p of tokens starts[i] .. ends[i] − 1 of sequence i (``logp`` from
    :func:`next_token_logprobs`: token j is predicted at position j − 1); ``mean``: divided by their number."""
    out = []
    for row, start, end in zip(logp, starts, ends):
        span = row[start - 1 : end - 1]
        total = float(span.sum())
        out.append(total / max(1, len(span)) if mean else total)
    return out


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share (at least 1: a continuation needs a context token before it)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return max(1, min(n, len(b) - 1))


def choice_pairs(rows: Sequence[dict[str, Any]], prompts: Sequence[str]) -> list[tuple[str, str]]:
    """``(prompt, option)`` for every option of every row, in order (``choice`` scoring)."""
    pairs = []
    for i, (row, text) in enumerate(zip(rows, prompts)):
        options = row.get("options")
        if not isinstance(options, (list, tuple)) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            raise ValueError(f"row {i + 1}: choice scoring needs 'options', a list of at least two non-empty strings, got {options!r}")
        if row["answer"] not in options:
            raise ValueError(f"row {i + 1}: its answer {row['answer']!r} is not one of its options {list(options)}")
        pairs += [(text, option) for option in options]
    return pairs


def per_character(scores: Sequence[float], options: Sequence[str]) -> list[float]:
    """Each option's summed log-probability divided by its length in characters (``choice`` scoring)."""
    return [score / max(1, len(option)) for score, option in zip(scores, options, strict=True)]


def pick_options(options: Sequence[Sequence[str]], flat_scores: Sequence[float]) -> list[dict[str, Any]]:
    """Each row's option scores (``flat_scores`` holds every row's options in order) and its best
    option (the first of equal best)."""
    predictions, at = [], 0
    for opts in options:
        scores = list(flat_scores[at : at + len(opts)])
        at += len(opts)
        best = max(range(len(opts)), key=scores.__getitem__)
        predictions.append({"prediction": dict(zip(opts, scores)), "extracted": opts[best]})
    return predictions


def evaluate(
    model,
    tokenizer,
    data: str | os.PathLike | Sequence[dict[str, Any]],
    dataset: str | None,
    *,
    scoring: str = "generate",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    answer_prefix: str = ANSWER_PREFIX,
    limit: int | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` on the rows of ``data`` for the paper's data set ``dataset``.

    Returns ``{"dataset", "scoring", "accuracy", "correct", "total", "no_answer", "examples"}``,
    each example with its prediction (the response, or the option scores), the extracted answer
    and the gold one.
    """
    if scoring != "choice" or dataset is not None:  # choice scoring reads the options, not a data set's labels
        get_task(dataset)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    rows = load_rows(data, limit=limit)
    prompts = [prompt(r["instruction"], r.get("input")) for r in rows]
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    try:
        if scoring == "generate":
            responses = generate_responses(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
            predictions = [{"prediction": text, "extracted": extract_answer(dataset, text)} for text in responses]
        elif scoring == "loglik":
            options = [choices(dataset, r["instruction"]) for r in rows]
            pairs = [(p + answer_prefix, " " + o) for p, opts in zip(prompts, options) for o in opts]
            flat = continuation_logprobs(model, tokenizer, [c for c, _ in pairs], [x for _, x in pairs], batch_size=batch_size)
            predictions = pick_options(options, flat)
        else:
            pairs = choice_pairs(rows, prompts)
            flat = continuation_logprobs(model, tokenizer, [c for c, _ in pairs], [x for _, x in pairs], batch_size=batch_size)
            flat = per_character(flat, [x for _, x in pairs])
            predictions = pick_options([r["options"] for r in rows], flat)
    finally:  # the caller's model and tokenizer are left as they were (a training collator pads right)
        model.train(was_training)
        tokenizer.padding_side = padding_side
    examples = []
    for i, (row, pred) in enumerate(zip(rows, predictions)):
        examples.append({"index": i, "instruction": row["instruction"], **pred, "answer": row["answer"],
                         "correct": pred["extracted"] == row["answer"]})
    correct = sum(e["correct"] for e in examples)
    return {
        "dataset": dataset,
        "scoring": scoring,
        "accuracy": correct / len(examples) if examples else 0.0,
        "correct": correct,
        "total": len(examples),
        "no_answer": sum(e["extracted"] == "" for e in examples),
        "examples": examples,
    }


def evaluate_adapter(
    model: str,
    data: str | os.PathLike,
    dataset: str,
    *,
    adapter: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    quantize: str | None = None,
    precision: str = "auto",
    **options: Any,
) -> dict[str, Any]:
    """Load ``model`` (plus the native adapter in ``adapter`` when given), :func:`evaluate` it,
    and, with ``output``, write the results there. An existing results file for the same model
    and adapter keeps its other data sets, so one file can collect all eight."""
    from moslora.io.load import load_adapter
    from moslora.train.model import load_model

    lm, tokenizer = load_model(model, precision=precision, quantize=quantize, for_training=False)
    if torch.cuda.is_available() and quantize is None:
        lm = lm.to("cuda")
    if adapter is not None:
        load_adapter(lm, adapter, trainable=False)
    result = evaluate(lm, tokenizer, data, dataset, **options)
    result["data"] = str(data)
    if output is not None:
        _write_results(Path(output), model, adapter, result)
    return result


def _write_results(path: Path, model: str, adapter: Any, result: dict[str, Any]) -> None:
    header = {"model": model, "adapter": str(adapter) if adapter is not None else None}
    merged = {**header, "datasets": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if isinstance(old, dict) and {k: old.get(k) for k in header} == header and isinstance(old.get("datasets"), dict):
            merged["datasets"] = old["datasets"]
    merged["datasets"][result["dataset"]] = result
    accuracies = [d["accuracy"] for d in merged["datasets"].values()]
    merged["average_accuracy"] = sum(accuracies) / len(accuracies)
    atomic_write_json(path, merged)
