"""PEFT's own LoRA is the reference: with ``mixer=None`` moslora must give the same outputs and
gradients as ``peft.LoraConfig`` with the same A and B, and with a mixer the same outputs as PEFT
with A replaced by M·A."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import moslora
from tiny import make_layer, perturb, tiny_gpt2, tiny_llama

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "conv2d": ["0"], "embedding": ["0"]}


def build(name: str):
    if name == "llama":
        return tiny_llama(), torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    if name == "gpt2":
        return tiny_gpt2(), torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    if name == "conv2d":
        # PEFT's conv LoRA ignores the base's dilation, so the reference case has none.
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(6, 10, 3, stride=2, padding=1)), torch.randn(2, 6, 9, 8)
    return make_layer(name)


def output(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def peft_pair(name: str, mixer):
    base, x = build(name)
    ours = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, alpha=8, mixer=mixer, target_modules=TARGETS[name]))
    perturb(ours, std=0.2)
    theirs = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[name], fan_in_fan_out=(name == "gpt2")),
    )
    peft_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for module_name, layer in moslora.adapter_layers(ours):
            peft_layer = peft_modules[module_name]
            A = layer.lora_A if layer.lora_M is None else (layer.lora_M @ layer.lora_A.flatten(1)).view_as(layer.lora_A)
            if layer.kind == "embedding":
                peft_layer.lora_embedding_A["default"].copy_(A)
                peft_layer.lora_embedding_B["default"].copy_(layer.lora_B)
            else:
                peft_layer.lora_A["default"].weight.copy_(A)
                peft_layer.lora_B["default"].weight.copy_(layer.lora_B.view_as(peft_layer.lora_B["default"].weight))
    return ours, theirs, peft_modules, x


@pytest.mark.parametrize("name", list(TARGETS))
def test_plain_lora_matches_peft_in_outputs_and_gradients(name):
    ours, theirs, peft_modules, x = peft_pair(name, mixer=None)
    out_ours, out_theirs = output(ours, x), output(theirs, x)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_ours, output(moslora.unload(copy.deepcopy(ours)), x), atol=1e-3)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for module_name, layer in moslora.adapter_layers(ours):
        peft_layer = peft_modules[module_name]
        if layer.kind == "embedding":
            grads = peft_layer.lora_embedding_A["default"].grad, peft_layer.lora_embedding_B["default"].grad
        else:
            grads = peft_layer.lora_A["default"].weight.grad, peft_layer.lora_B["default"].weight.grad
        torch.testing.assert_close(layer.lora_A.grad, grads[0].view_as(layer.lora_A), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, grads[1].view_as(layer.lora_B), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", list(TARGETS))
def test_moslora_equals_peft_lora_with_the_mixer_folded_into_A(name):
    ours, theirs, _, x = peft_pair(name, mixer="kaiming")
    torch.testing.assert_close(output(ours, x), output(theirs, x), atol=1e-5, rtol=1e-5)
