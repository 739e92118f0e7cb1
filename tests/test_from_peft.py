"""A PEFT script switches with ``MoSLoRAConfig.from_peft(lora_config)``: the same layers get adapters,
with the same rank, scaling and dropout, and (without a mixer, with the same A and B) the same
outputs as PEFT's LoRA. What moslora does not implement is refused by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import moslora
from moslora import MoSLoRAConfig
from tiny import tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

CONFIGS = {
    "list": dict(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM"),
    "regex": dict(r=2, lora_alpha=4, target_modules=r".*\.mlp\.(up|down)_proj"),
    "all-linear-exclude-rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["o_proj"], use_rslora=True),
    "gaussian-init": dict(r=4, lora_alpha=8, target_modules={"k_proj", "gate_proj"}, init_lora_weights="gaussian"),
}


def lora_layers(peft_model) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("fields", CONFIGS.values(), ids=CONFIGS.keys())
def test_from_peft_adapts_the_same_layers_alike_and_without_a_mixer_gives_peft_s_outputs(fields):
    base = tiny_llama()
    lora_config = LoraConfig(**fields)
    theirs = get_peft_model(copy.deepcopy(base), lora_config)
    ours = moslora.inject(copy.deepcopy(base), MoSLoRAConfig.from_peft(lora_config, mixer=None))
    peft_layers = lora_layers(theirs)
    assert dict(moslora.adapter_layers(ours)).keys() == peft_layers.keys()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, layer in moslora.adapter_layers(ours):
            theirs_layer = peft_layers[name]
            assert layer.scaling == pytest.approx(theirs_layer.scaling["default"])
            assert layer.lora_A.shape == theirs_layer.lora_A["default"].weight.shape
            dropout = theirs_layer.lora_dropout["default"]
            assert getattr(layer.dropout, "p", 0.0) == getattr(dropout, "p", 0.0)
            layer.lora_B.normal_(std=0.2)
            theirs_layer.lora_A["default"].weight.copy_(layer.lora_A)
            theirs_layer.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours(x).logits, base(x).logits, atol=1e-3)


def test_from_peft_reads_a_saved_adapter_config_and_keeps_the_mixer_by_default(tmp_path):
    lora_config = LoraConfig(**CONFIGS["list"])
    get_peft_model(tiny_llama(), lora_config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    config = MoSLoRAConfig.from_peft(saved)
    assert config == MoSLoRAConfig.from_peft(lora_config)
    assert (config.r, config.alpha, config.dropout, config.mixer) == (4, 16.0, 0.1, "kaiming")
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert MoSLoRAConfig.from_peft(lora_config, r=8).r == 8


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(use_dora=True), "use_dora=True, which moslora does not implement"),
        (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(bias="lora_only"), "moslora trains no biases"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' is not available"),
        (dict(target_modules=None), "target_modules=None"),
    ],
)
def test_what_moslora_does_not_implement_is_refused_by_name(fields, words):
    with pytest.raises(ValueError, match=words):
        MoSLoRAConfig.from_peft(LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **fields}))


def test_from_peft_refuses_what_is_not_a_lora_config():
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        MoSLoRAConfig.from_peft({"peft_type": "IA3", "target_modules": ["q_proj"]})
    with pytest.raises(TypeError, match="peft.LoraConfig or a dict"):
        MoSLoRAConfig.from_peft("lora")
