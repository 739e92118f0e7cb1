r"""The MoSLoRA layer: a wrapper that adds a mixed low-rank update to a frozen layer.

For a frozen layer with weight W0 (out×in)::

    y = W0·x + s · B · M · A · dropout(x)          ΔW = s · B · M · A
          \___/   \__________________________/
          base     adapter: A (r×in) projects down, M (r×r) mixes the r subspaces,
                            B (out×r) projects up; s = alpha/r

MoSLoRA (Wu et al., "Mixture-of-Subspaces in Low-Rank Adaptation", EMNLP 2024, arXiv:2406.11909)
learns M; LoRA (Hu et al., 2021) is the case without M. The adapter is computed through activations
(x → A → M → B), never by forming ΔW, and ΔW is built in exactly one place, :func:`delta_weight`,
which merge, unmerge and export all use (here and in the PEFT route, :mod:`moslora.peft`).

The wrapper keeps the original module as ``base_layer`` and calls it, so quantized layers
(bitsandbytes, torchao, optimum-quanto) work unchanged; only merging needs their weights.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moslora.config import MoSLoRAConfig
from moslora.core.init import init_A_, init_mixer_
from moslora.core.weights import add_to_weight

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def fold_mixer(A: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """A' = M·A in fp32 (or wider), along A's rank axis (A: r×in, or a conv kernel r×in×k…); A itself without
    a mixer. B·A' = B·M·A, so (A', B) is a plain LoRA adapter of the same rank that is exactly the
    MoSLoRA adapter: ΔW and export are both built from this."""
    A = A.to(torch.promote_types(A.dtype, torch.float32))  # fp32 at least; fp64 stays fp64
    return A if M is None else (M.to(A.dtype) @ A.flatten(1)).view(A.shape)


def delta_weight(A: torch.Tensor, M: torch.Tensor | None, B: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """ΔW = s·B·(M·A) in fp32 (or wider), laid out (out, in, k…) like A's kernel: the one formula for ΔW,
    used by :meth:`MoSLoRALayer.get_delta_weight` and by the PEFT route's layers (:mod:`moslora.peft`)."""
    A = fold_mixer(A, M)
    B = B.to(A.dtype)
    return (B @ A.flatten(1)).view(B.shape[0], *A.shape[1:]) * scaling


class MoSLoRALayer(nn.Module):
    """Base class of the wrappers. Subclasses say only how A, M and B act on their layer's inputs
    and how ΔW is laid out in their base weight; the formula itself lives here, once.

    Attributes:
        base_layer: the wrapped (frozen) module.
        lora_A: r×in (a conv kernel r×in×k… for convolutions).
        lora_M: r×r mixer, or ``None`` for plain LoRA.
        lora_B: out×r, zero at start.
        scaling: s.
        merged: ΔW is currently added into ``base_layer``'s weight.
        disabled: the adapter is skipped (see :func:`moslora.disabled`).
        starting_copy: a frozen copy ``(A, M, B)`` of the adapter as it was when training started,
            or ``None`` (see :func:`moslora.model.ops.keep_starting_adapter`).
        run_starting_copy: forward runs ``starting_copy`` instead of the adapter being trained.
    """

    kind: str = ""
    features_last: bool = True  # activations are (..., features); convolutions are (N, C, ...)

    def __init__(self, base_layer: nn.Module, config: MoSLoRAConfig, *, init_mixer: bool = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = config.r
        self.scaling = config.scaling
        self.mixer_init = config.mixer
        self.in_features, self.out_features = self.features(base_layer)
        factory = _adapter_factory_kwargs(base_layer, config)
        self.lora_A = nn.Parameter(torch.empty(self.a_shape(base_layer, config.r), **factory))
        init_A_(self.lora_A.data, config.init_A)
        if config.mixer is None:
            self.register_parameter("lora_M", None)
        else:
            self.lora_M = nn.Parameter(torch.empty(config.r, config.r, **factory), requires_grad=config.train_mixer)
            if init_mixer:
                self.reset_mixer()
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.merged = False
        self.disabled = False
        # Plain attributes, not parameters or buffers: no engine shards, broadcasts or saves them.
        self.starting_copy: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None
        self.run_starting_copy = False

    # ----- what a layer kind must say ------------------------------------------------------------
    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of the wrapped layer."""
        raise NotImplementedError

    @classmethod
    def a_shape(cls, base_layer: nn.Module, r: int) -> tuple[int, ...]:
        return (r, cls.features(base_layer)[0])

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, config: MoSLoRAConfig) -> dict[str, tuple[int, ...]]:
        """The shapes of A, M (when present) and B that wrapping ``base_layer`` gives, without building it."""
        shapes = {"lora_A": cls.a_shape(base_layer, config.r)}
        if config.mixer is not None:
            shapes["lora_M"] = (config.r, config.r)
        shapes["lora_B"] = (cls.features(base_layer)[1], config.r)
        return shapes

    def _down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """A applied to the (dropped-out) input: the r-dimensional activations."""
        return F.linear(x, A)

    def _mix(self, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """A matrix (M or B) applied along the feature axis of the activations."""
        return F.linear(h, W)

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW as (out, in, …) rearranged to the base weight's own layout."""
        return delta

    # ----- the wrapped layer's own tensors -------------------------------------------------------
    # Code outside moslora reads a layer's weight directly (TRL's fused LM head reads
    # ``lm_head.weight``, transformers reads ``get_input_embeddings().weight``); as PEFT's
    # BaseTunerLayer does, the wrapper answers with the frozen base layer's tensors.
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's (frozen) weight, without ΔW."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    # ----- the formula, once ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        A, M, B = self.starting_copy if self.run_starting_copy else (self.lora_A, self.lora_M, self.lora_B)
        h = self._down(self._adapter_input(x), A)
        if M is not None:
            h = self._mix(h, M)
        return self._add_update(result, h, B)

    def _add_update(self, result: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``result + s·B·h``. With features last and matching dtypes this is one ``addmm`` (s as
        its alpha), which never materializes B·h on its own; otherwise s is applied on the r-sized side."""
        if self.features_last and result.dtype == h.dtype:
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), B.T, alpha=self.scaling)
            return flat.view(result.shape)
        return result + self._mix(h * self.scaling, B).to(result.dtype)

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        return self.dropout(x) if self.dropout is not None else x

    def get_delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·(M·A) in fp32 (or wider), laid out like ``base_layer.weight`` (:func:`delta_weight`, the one formula)."""
        return self._to_weight_layout(delta_weight(self.lora_A, self.lora_M, self.lora_B, self.scaling))

    # ----- state --------------------------------------------------------------------------------
    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The adapter's own parameters (A, M when present, B), by attribute name."""
        yield "lora_A", self.lora_A
        if self.lora_M is not None:
            yield "lora_M", self.lora_M
        yield "lora_B", self.lora_B

    def reset_mixer(self) -> None:
        if self.lora_M is not None:
            init_mixer_(self.lora_M.data, self.mixer_init)

    @torch.no_grad()
    def merge(self, delta: torch.Tensor | None = None) -> float | None:
        """Add ΔW into the base weight; the adapter is then skipped in forward. Returns the
        requantization error for a quantized base (see :func:`moslora.core.weights.add_to_weight`)."""
        if self.merged:
            raise ValueError("this MoSLoRA layer is already merged; unmerge it first")
        error = add_to_weight(self.base_layer, self.get_delta_weight() if delta is None else delta, sign=1)
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self) -> float | None:
        """Subtract ΔW from the base weight again (returns the requantization error, as merge)."""
        if not self.merged:
            raise ValueError("this MoSLoRA layer is not merged, so there is nothing to unmerge")
        error = add_to_weight(self.base_layer, self.get_delta_weight(), sign=-1)
        self.merged = False
        return error

    def extra_repr(self) -> str:
        mixer = "none" if self.lora_M is None else f"{self.mixer_init}{'' if self.lora_M.requires_grad else ', frozen'}"
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, mixer={mixer}, merged={self.merged}"


class MoSLoRALinear(MoSLoRALayer):
    """``nn.Linear`` and its subclasses, quantized linears included (the base layer is only called)."""

    kind = "linear"

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features


class MoSLoRAConv1D(MoSLoRALayer):
    """transformers' GPT-2 style ``Conv1D``: a linear layer whose weight is stored in×out."""

    kind = "conv1d-transformers"

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.weight.shape[0], base_layer.weight.shape[1]

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T


class MoSLoRAConv(MoSLoRALayer):
    """``nn.Conv1d/2d/3d``: A is a conv with the base kernel, stride, padding and dilation;
    M and B are 1×1 convs. A 1×1 conv after a conv is a conv, so ΔW = s·(B·M)·A per kernel tap."""

    kind = "conv"
    features_last = False

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_channels, base_layer.out_channels

    @classmethod
    def a_shape(cls, base_layer: nn.Module, r: int) -> tuple[int, ...]:
        return (r, base_layer.in_channels, *base_layer.kernel_size)

    def _down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        # The base's own _conv_forward applies its stride, padding, padding_mode and dilation.
        return self.base_layer._conv_forward(x, A, None)

    def _mix(self, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        n = len(self.base_layer.kernel_size)
        return _CONV_FNS[n](h, W.view(*W.shape, *([1] * n)))


class MoSLoRAEmbedding(MoSLoRALayer):
    """``nn.Embedding``: A (r×num_embeddings) is a lookup table; the weight is stored num×dim,
    so ΔW is laid out transposed."""

    kind = "embedding"

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.num_embeddings, base_layer.embedding_dim

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        return x  # token ids: no dropout, no cast

    def _down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, A.T, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T


def transformers_conv1d_class() -> type | None:
    """transformers' ``Conv1D`` class if transformers is already imported (the core never imports it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_multihead_out_proj(module: nn.Module) -> bool:
    """The ``out_proj`` of an ``nn.MultiheadAttention``, which reads its weight directly and never
    calls it, so an adapter there would never run."""
    return isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def is_linear_kind(module: nn.Module) -> bool:
    """A linear layer an adapter can wrap and run: ``nn.Linear`` (not an MHA out_proj) or transformers' ``Conv1D``."""
    conv1d = transformers_conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return True
    return isinstance(module, nn.Linear) and not is_multihead_out_proj(module)


def layer_class_for(module: nn.Module, name: str = "") -> type[MoSLoRALayer] | None:
    """The wrapper class for ``module``, ``None`` if its kind is not supported.

    Raises ``TypeError`` for kinds that look supported but where an adapter could not work.
    """
    conv1d = transformers_conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return MoSLoRAConv1D
    if is_multihead_out_proj(module):
        raise TypeError(
            f"module {name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight directly "
            "and never calls it, so an adapter there would never run"
        )
    if isinstance(module, nn.Linear):
        return MoSLoRALinear
    if isinstance(module, nn.Embedding):
        return MoSLoRAEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            raise TypeError(f"module {name!r} is a grouped convolution (groups={module.groups}); MoSLoRA supports groups=1")
        return MoSLoRAConv
    return None


SUPPORTED_KINDS = "nn.Linear (and quantized linears), transformers Conv1D, nn.Conv1d/2d/3d, nn.Embedding"
LAYER_KINDS = tuple(cls.kind for cls in (MoSLoRALinear, MoSLoRAConv1D, MoSLoRAConv, MoSLoRAEmbedding))


def _adapter_factory_kwargs(base_layer: nn.Module, config: MoSLoRAConfig) -> dict[str, Any]:
    weight = base_layer.weight
    dtype = torch.float32
    if config.adapter_dtype == "base" and weight.dtype.is_floating_point:
        dtype = weight.dtype
    return {"device": weight.device, "dtype": dtype}
