"""The built-in ``cifar10`` task: the CIFAR-10 test set as BIG-bench ships it
(``cifar10_classification/base64``: 10,000 base64 PNGs of 32×32, 1,000 per class) on
EfficientNet-Lite0 with ImageNet weights (:mod:`moslora.compare.image`).

The split is made once and is class-balanced and disjoint: ``random.Random(c)`` shuffles the
images of class c; the first 500 / 100 / 300 of each class are train / validation / test (5,000 /
1,000 / 3,000 images; the other 1,000 are not used), each split's classes interleaved so that any prefix of it stays balanced.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import random
from pathlib import Path

import torch

from moslora.compare.bigbench import task_file
from moslora.compare.image import ImageSplit, ImageTask, weights_file

CIFAR10_FILE = "cifar10_classification/base64/task.json"
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_PER_CLASS = {"train": 500, "validation": 100, "test": 300}


def decode_png(text: str) -> torch.Tensor:
    """A base64 PNG as a uint8 tensor (H, W, 3), RGB."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
        return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))


def read_examples(path: str | Path) -> tuple[torch.Tensor, list[int]]:
    """All images (N, 32, 32, 3) and their labels (indices into :data:`CIFAR10_LABELS`) of BIG-bench's
    file. Its ``target_scores`` is the text of a Python dict (``"{'airplane': 1, ...}"``); exactly one
    class must be scored 1. Errors name the file and the example."""
    examples = json.loads(Path(path).read_text(encoding="utf-8"))["examples"]
    images, labels = [], []
    for i, example in enumerate(examples):
        scores = example["target_scores"]
        if isinstance(scores, str):
            scores = ast.literal_eval(scores)
        gold = [name for name, score in scores.items() if score == 1]
        if len(gold) != 1 or gold[0] not in CIFAR10_LABELS:
            raise ValueError(f"{path}: example {i + 1} must score exactly one CIFAR-10 class 1, got {scores!r}")
        try:
            image = decode_png(example["input"])
        except Exception as e:  # binascii.Error, PIL.UnidentifiedImageError, ...
            raise ValueError(f"{path}: example {i + 1} is not a base64 PNG ({type(e).__name__}: {e})") from None
        images.append(image)
        labels.append(CIFAR10_LABELS.index(gold[0]))
    return torch.stack(images), labels


def balanced_splits(labels: list[int], per_class: dict[str, int], seed: int = 0) -> dict[str, list[int]]:
    """Indices of class-balanced, disjoint splits: class c's indices shuffled once with
    ``random.Random(seed + c)``, then cut into ``per_class`` counts in order; within a split the classes
    are interleaved (0, 1, …, 9, 0, 1, …) so a prefix of it is balanced too."""
    classes = sorted(set(labels))
    by_class = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
    splits: dict[str, list[int]] = {}
    start = 0
    for name, count in per_class.items():
        chosen = {}
        for c in classes:
            indices = list(by_class[c])
            random.Random(seed + c).shuffle(indices)
            if start + count > len(indices):
                raise ValueError(f"class {c} has {len(indices)} examples, fewer than the {start + count} the splits need")
            chosen[c] = indices[start : start + count]
        splits[name] = [chosen[c][k] for k in range(count) for c in classes]
        start += count
    return splits


def cifar10_task() -> ImageTask:
    """CIFAR-10 on EfficientNet-Lite0 (ImageNet weights), images upsampled to 112 px.

    The stem and blocks 0–10 are frozen and computed once per image; adapters go on the 1×1
    expand and project convolutions of blocks 11–15 and on the 1×1 head convolution (11
    convolutions; the depthwise ones are not adapted), and a new 10-way classifier trains fully.

    Budget: 60 AdamW steps of 32 images (1,920 of the 5,000 training images per run, in the seed's
    order), 6 warm-up steps. A LoRA probe on validation (100 steps, 3,200 images) reached 81% at lr
    3e-3 and 78% at 1e-2, and 75% after 20 steps (chance 10%). On the two shared CPU cores of the
    development machine the bottom took about 40 ms an image and a step 4 s under a load of 6.
    """
    images, labels = read_examples(task_file(CIFAR10_FILE))
    splits = balanced_splits(labels, CIFAR10_PER_CLASS)
    split = {name: ImageSplit(images[idx], [labels[i] for i in idx]) for name, idx in splits.items()}
    return ImageTask(
        name="cifar10",
        model=weights_file(),
        label_names=list(CIFAR10_LABELS),
        train=split["train"],
        validation=split["validation"],
        test=split["test"],
        steps=60,
        batch_size=32,
        image_size=112,
        warmup_steps=6,
        log_every=6,
        frozen_blocks=11,
        lrs=(1e-3, 3e-3, 1e-2),
        quick_steps=30,
        quick_sizes=(500, 1000),
        quick_learning_rate=3e-3,
        description="CIFAR-10 (BIG-bench cifar10_classification), EfficientNet-Lite0 (ImageNet) + classifier",
    )
