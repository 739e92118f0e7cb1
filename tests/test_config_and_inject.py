"""Configuration validation, target matching, and the errors of model surgery."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import moslora
from tiny import make_layer, perturb, tiny_gpt2, tiny_llama


@pytest.mark.parametrize(
    "field,value,error,words",
    [
        ("r", 0, ValueError, "r must be a positive integer"),
        ("r", -3, ValueError, "r must be a positive integer"),
        ("r", 2.5, TypeError, "MoSLoRAConfig.r"),
        ("r", True, TypeError, "MoSLoRAConfig.r"),
        ("alpha", 0, ValueError, "alpha must be a positive finite"),
        ("alpha", float("nan"), ValueError, "alpha"),
        ("dropout", 1.0, ValueError, "dropout must be in [0, 1)"),
        ("dropout", -0.1, ValueError, "dropout"),
        ("mixer", "butterfly", ValueError, "mixer must be one of"),
        ("init_A", "xavier", ValueError, "init_A"),
        ("adapter_dtype", "float16", ValueError, "adapter_dtype"),
        ("target_modules", [], ValueError, "target_modules is empty"),
        ("target_modules", [3], TypeError, "target_modules"),
        ("modules_to_save", "head", TypeError, "modules_to_save"),
        ("train_mixer", "yes", TypeError, "train_mixer"),
    ],
)
def test_bad_config_values_are_named(field, value, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        moslora.MoSLoRAConfig(**{field: value})


def test_two_subspace_needs_an_even_rank():
    with pytest.raises(ValueError, match="even r"):
        moslora.MoSLoRAConfig(r=5, mixer="two-subspace")


def test_config_round_trips_through_json_and_refuses_unknown_keys():
    config = moslora.MoSLoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"], mixer=None)
    assert moslora.MoSLoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown MoSLoRAConfig field\(s\) \['rank'\]"):
        moslora.MoSLoRAConfig.from_dict({"rank": 4})


def test_target_forms_suffix_regex_all_linear_and_exclude():
    model = tiny_llama()
    names = moslora.find_targets(model, moslora.MoSLoRAConfig(target_modules=["q_proj", "mlp.down_proj"]))
    assert names == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    ]
    regex = moslora.find_targets(model, moslora.MoSLoRAConfig(target_modules=r".*layers\.1\.self_attn\.(k|v)_proj"))
    assert regex == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    every = moslora.find_targets(model, moslora.MoSLoRAConfig(target_modules="all-linear"))
    assert len(every) == 2 * 7 and "lm_head" not in every
    fewer = moslora.find_targets(model, moslora.MoSLoRAConfig(target_modules="all-linear", exclude_modules=["mlp.gate_proj", "o_proj"]))
    assert len(fewer) == 2 * 5 and not any("gate_proj" in n or "o_proj" in n for n in fewer)


def test_all_linear_on_gpt2_takes_conv1d_layers_but_not_the_head():
    names = moslora.find_targets(tiny_gpt2(), moslora.MoSLoRAConfig(target_modules="all-linear"))
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert len(names) == 8


def test_a_target_list_that_matches_nothing_names_the_patterns_and_some_modules():
    with pytest.raises(ValueError, match=r"\['query'\] matched no module.*self_attn\.q_proj"):
        moslora.inject(tiny_llama(), moslora.MoSLoRAConfig(target_modules=["query"]))


def test_a_target_of_an_unsupported_kind_is_a_type_error():
    with pytest.raises(TypeError, match=r"'model.norm' of type LlamaRMSNorm, which MoSLoRA cannot wrap"):
        moslora.inject(tiny_llama(), moslora.MoSLoRAConfig(target_modules=["norm"]))
    with pytest.raises(TypeError, match="grouped convolution"):
        moslora.inject(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), moslora.MoSLoRAConfig(target_modules=["0"]))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        moslora.inject(nn.MultiheadAttention(8, 2), moslora.MoSLoRAConfig(target_modules=["out_proj"]))


def test_multihead_attention_out_proj_is_skipped_by_all_linear():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    assert moslora.find_targets(model, moslora.MoSLoRAConfig()) == ["1"]


def test_injecting_twice_merging_twice_and_unmerging_unmerged_are_errors():
    model, _ = make_layer("linear")
    moslora.inject(model, moslora.MoSLoRAConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="already has MoSLoRA adapters"):
        moslora.inject(model, moslora.MoSLoRAConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="not merged"):
        moslora.unmerge(model)
    moslora.merge(model)
    with pytest.raises(ValueError, match="already merged"):
        moslora.merge(model)
    with pytest.raises(ValueError, match="no MoSLoRA adapters"):
        moslora.merge(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a MoSLoRAConfig"):
        moslora.inject(nn.Linear(2, 2), {"r": 4})


def test_safe_merge_refuses_a_non_finite_delta_and_touches_nothing():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    moslora.inject(model, moslora.MoSLoRAConfig(r=2))
    perturb(model)
    before = [layer.base_layer.weight.clone() for _, layer in moslora.adapter_layers(model)]
    with torch.no_grad():
        model[1].lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"ΔW of layer '1' has NaN or Inf"):
        moslora.merge(model, safe=True)
    for (_, layer), weight in zip(moslora.adapter_layers(model), before):
        assert torch.equal(layer.base_layer.weight, weight) and not layer.merged


def test_modules_to_save_train_fully_and_round_trip(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model = moslora.inject(
        copy.deepcopy(base), moslora.MoSLoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"])
    )
    assert all(p.requires_grad for p in model[2].parameters())
    counts = moslora.parameter_counts(model)
    assert counts["saved"] == 6 * 3 + 3 and counts["trainable"] == counts["saved"] + 2 * 6 + 4 + 6 * 2
    with torch.no_grad():
        model[2].weight.add_(1.0)
    perturb(model)
    moslora.save_adapter(model, tmp_path / "a")
    loaded = moslora.load_adapter(copy.deepcopy(base), tmp_path / "a")
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), model(x))


def test_print_trainable_parameters_shows_the_mixer_share(capsys):
    model = moslora.inject(nn.Sequential(nn.Linear(10, 10)), moslora.MoSLoRAConfig(r=2, target_modules=["0"]))
    counts = moslora.print_trainable_parameters(model)
    out = capsys.readouterr().out
    assert counts == {"A": 20, "M": 4, "B": 20, "saved": 0, "trainable": 44, "total": 154}
    assert "trainable params: 44 || all params: 154" in out and "M 4" in out and "mixer 9.09%" in out


def test_unload_without_merging_restores_the_base_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    expected = model(x)
    moslora.inject(model, moslora.MoSLoRAConfig(r=2))
    perturb(model)
    moslora.merge(model)
    restored = moslora.unload(model)
    assert type(restored[0]) is nn.Linear
    torch.testing.assert_close(restored(x), expected, atol=1e-6, rtol=0)
