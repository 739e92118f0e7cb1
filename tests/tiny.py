"""Tiny layers and models for the tests, built from configs (never downloaded), and helpers to
make adapters look trained."""

from __future__ import annotations

import torch
from torch import nn

import moslora

MIXERS = [None, "kaiming", "orthogonal", "identity", "two-subspace"]


def make_layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """One tiny base layer of ``kind`` (in a container so it has a name) and an input for it."""
    torch.manual_seed(123)  # the layer's own init
    g = torch.Generator().manual_seed(123)
    if kind == "linear":
        layer, x = nn.Linear(12, 10), torch.randn(3, 5, 12, generator=g)
    elif kind == "conv1d-transformers":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(10, 12)  # nf=out, nx=in: weight stored 12×10
        nn.init.normal_(layer.weight, std=0.2, generator=g)
        x = torch.randn(3, 5, 12, generator=g)
    elif kind == "conv1d":
        layer, x = nn.Conv1d(6, 10, 3, padding=1), torch.randn(2, 6, 9, generator=g)
    elif kind == "conv2d":
        layer, x = nn.Conv2d(6, 10, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2)), torch.randn(2, 6, 9, 8, generator=g)
    elif kind == "conv3d":
        layer, x = nn.Conv3d(4, 10, 2, padding_mode="reflect", padding=1), torch.randn(2, 4, 5, 5, 4, generator=g)
    elif kind == "embedding":
        layer, x = nn.Embedding(20, 10, padding_idx=0), torch.randint(0, 20, (3, 7), generator=g)
    else:
        raise ValueError(kind)
    return nn.Sequential(layer), x


LAYER_KINDS = ["linear", "conv1d-transformers", "conv1d", "conv2d", "conv3d", "embedding"]


def perturb(model: nn.Module, std: float = 0.1, seed: int = 7) -> None:
    """Make the adapters nonzero, as after training (B starts at zero, so ΔW would be 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moslora.adapter_layers(model):
            for _, param in layer.adapter_parameters():
                if param.requires_grad:  # a frozen mixer stays as it was
                    param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * std)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(config).eval()


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g)
