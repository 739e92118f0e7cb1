"""The PEFT route, ``moslora.peft``, with PEFT as the oracle.

A MoSLoRA adapter (A, M, B) equals the plain LoRA adapter (M·A, B), so every check compares against
PEFT's own LoRA with A replaced by M·A (and, with ``mixer=None``, with the same A): outputs and
gradients, saving and loading, named adapters, mixed batches, merging, ``add_weighted_adapter``, on
tiny models built from configs. What cannot be done exactly is refused by name, and a saved folder is
either loaded exactly or refused, by moslora's tools and by stock PEFT alike.
"""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from packaging.version import Version
from torch import nn

peft = pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import moslora  # noqa: E402
import moslora.peft as mp  # noqa: E402
from moslora.io.peft_format import PEFT_ROUTE_TYPE  # noqa: E402
from tiny import tiny_gpt2, tiny_llama  # noqa: E402

PEFT_BEFORE_0_21 = Version(peft.__version__) < Version("0.21")
IDS = torch.tensor([[1, 5, 9, 2, 33, 7], [4, 4, 60, 12, 0, 3], [8, 21, 3, 3, 50, 1]])
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
MAKE = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def ours(base, mixer="kaiming", *, seed=0, adapter="default", std=0.2, **fields):
    """``base`` (a copy) with a PEFT-route adapter, made to look trained (B ≠ 0, M away from its init)."""
    fields = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS["gpt2" if hasattr(base, "transformer") else "llama"], **fields}
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), mp.LoraConfig(mixer=mixer, **fields), adapter_name=adapter)
    perturb(model, adapter, std, seed)
    return model.eval()


def perturb(model, adapter, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}." in name and (".lora_B." in name or ".lora_M." in name):
                p.add_(torch.randn(p.shape, generator=g) * std)


def layers_of(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def folded_A(layer, adapter):
    A = layer.lora_A[adapter].weight.detach()
    return layer.lora_M[adapter].weight.detach() @ A if adapter in getattr(layer, "lora_M", {}) else A


def plain_twin(model, base):
    """The oracle: PEFT's own LoRA on a copy of ``base`` with, for every adapter of ``model``, the same
    r, alpha and targets, A replaced by M·A and the same B."""
    twin = None
    for adapter, cfg in model.peft_config.items():
        plain = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                                lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora, fan_in_fan_out=cfg.fan_in_fan_out)
        if twin is None:
            twin = get_peft_model(copy.deepcopy(base), plain, adapter_name=adapter)
        else:
            twin.add_adapter(adapter, plain)
    theirs = layers_of(twin)
    with torch.no_grad():
        for name, layer in layers_of(model).items():
            for adapter in layer.lora_A:
                theirs[name].lora_A[adapter].weight.copy_(folded_A(layer, adapter))
                theirs[name].lora_B[adapter].weight.copy_(layer.lora_B[adapter].weight)
    twin.set_adapter(model.active_adapter)
    return twin.eval()


def logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# ----- the oracle: outputs and gradients ------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mixer", [None, "kaiming", "orthogonal", "identity"])
def test_outputs_and_gradients_equal_peft_lora_with_A_replaced_by_M_A(arch, mixer):
    base = MAKE[arch]()
    model = ours(base, mixer)
    twin = plain_twin(model, base)
    out, expected = model(input_ids=IDS).logits, twin(input_ids=IDS).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, logits(base), atol=1e-3), "the adapter must change the outputs"
    out.square().mean().backward()
    expected.square().mean().backward()
    theirs = layers_of(twin)
    for name, layer in layers_of(model).items():
        grad_A_folded = theirs[name].lora_A["default"].weight.grad  # dL/d(M·A)
        torch.testing.assert_close(layer.lora_B["default"].weight.grad, theirs[name].lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)
        if mixer is None:
            assert type(layer).__name__ == "Linear" and "default" not in layer.lora_M
            torch.testing.assert_close(layer.lora_A["default"].weight.grad, grad_A_folded, atol=1e-6, rtol=1e-4)
        else:
            M, A = layer.lora_M["default"].weight, layer.lora_A["default"].weight
            torch.testing.assert_close(A.grad, M.detach().T @ grad_A_folded, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(M.grad, grad_A_folded @ A.detach().T, atol=1e-6, rtol=1e-4)


def test_a_new_adapter_starts_as_the_base_model_and_its_mixer_as_configured():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), mp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], mixer="identity"))
    torch.testing.assert_close(logits(model), logits(base))
    layer = next(iter(layers_of(model).values()))
    torch.testing.assert_close(layer.lora_M["default"].weight, torch.eye(4))
    assert layer.lora_M["default"].weight.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_gpt2_conv1d_gets_fan_in_fan_out_as_peft_s_own_dispatch_gives_it(tmp_path):
    model = ours(tiny_gpt2())
    assert all(layer.fan_in_fan_out for layer in layers_of(model).values())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True


# ----- saving and loading ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_round_trip_exactly(tmp_path, arch):
    base = MAKE[arch]()
    model = ours(base, "orthogonal")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_ROUTE_TYPE and config["mixer"] == "orthogonal"
    loaded = mp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(loaded.peft_config["default"], mp.LoraConfig) and loaded.peft_config["default"].mixer == "orthogonal"
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference by default, as PEFT"
    trainable = mp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert any(".lora_M." in n for n, p in trainable.named_parameters() if p.requires_grad)


def test_without_a_mixer_the_folder_is_peft_s_own_plain_lora(tmp_path):
    base = tiny_llama()
    model = ours(base, None)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "mixer" not in config
    stock = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(stock), logits(model), atol=0, rtol=0)
    assert mp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).peft_config["default"].mixer is None


def test_with_moslora_peft_imported_stock_peft_s_entry_points_read_the_folder_exactly(tmp_path):
    # Without moslora.peft they refuse it (test_stock_peft_refuses_it_in_a_process_that_never_imported_moslora,
    # and test_peft_route_loaders for AutoPeftModel, transformers and pipeline).
    from peft.utils.hotswap import hotswap_adapter

    base = tiny_llama()
    model = ours(base)
    model.save_pretrained(tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(config) is mp.LoraConfig and config.mixer == "kaiming"
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)), logits(model), atol=0, rtol=0)
    other = ours(base, None)
    other.load_adapter(tmp_path, "other")
    other.set_adapter("other")
    torch.testing.assert_close(logits(other), logits(model), atol=0, rtol=0)
    swapped = ours(base, seed=5)
    hotswap_adapter(swapped, str(tmp_path), "default", torch_device="cpu")
    torch.testing.assert_close(logits(swapped), logits(model), atol=0, rtol=0)


@pytest.mark.slow
def test_stock_peft_refuses_it_in_a_process_that_never_imported_moslora(tmp_path):
    import subprocess
    import sys

    ours(tiny_llama()).save_pretrained(tmp_path / "adapter")
    script = (
        "import sys, torch, peft, transformers\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,"
        " num_attention_heads=4, num_key_value_heads=2))\n"
        "try:\n    peft.PeftModel.from_pretrained(base, sys.argv[1])\n"
        "except KeyError as e:\n    print('refused:', e)\n"
        "assert not any(name.startswith('moslora') for name in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "adapter")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "moslora.peft.PeftModel.from_pretrained" in result.stdout


def test_a_file_that_lacks_the_mixer_its_config_promises_is_refused_by_name(tmp_path):
    base = tiny_llama()
    ours(base).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    dropped = next(k for k in sorted(weights) if k.endswith(".lora_M.weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "adapter_model.safetensors")
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match="has no mixer") as error:
        mp.PeftModel.from_pretrained(target, tmp_path)
    assert dropped.rpartition(".lora_M")[0] in str(error.value) and str(tmp_path) in str(error.value)
    assert not any(".lora_" in n for n, _ in target.named_parameters()), "nothing was loaded"


def test_mixer_tensors_without_a_mixer_in_the_config_are_refused(tmp_path):
    base = tiny_llama()
    ours(base).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(peft_type="LORA", mixer=None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has a mixer .* but the config has none"):
        mp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_a_tensor_of_the_file_that_nothing_loads_is_an_error_and_the_model_is_handed_back(tmp_path):
    base = tiny_llama()
    ours(base).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj"]  # the file also has down_proj's tensors
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match="down_proj.lora_.* belongs to no layer"):
        mp.PeftModel.from_pretrained(target, tmp_path)
    assert not any(".lora_" in n for n, _ in target.named_parameters())


def test_loading_with_low_cpu_mem_usage_is_exact(tmp_path):
    base = tiny_llama()
    model = ours(base)
    model.save_pretrained(tmp_path)
    loaded = mp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


# ----- named adapters, mixed batches, disabling ------------------------------------------------------
def two_adapters(tmp_path):
    """A model with adapters "first" (a mixer) and "second" (another mixer, of another rank, added with
    moslora.peft.load_adapter), the same two alone, and the base."""
    base = tiny_llama()
    first, second = ours(base, "kaiming", seed=1, adapter="first"), ours(base, "orthogonal", seed=2, r=2, lora_alpha=6)
    second.save_pretrained(tmp_path)
    model = mp.load_adapter(copy.deepcopy(first), tmp_path, "second")
    return base, model, first, second


def test_named_adapters_load_switch_and_each_equals_itself_alone(tmp_path):
    base, model, first, second = two_adapters(tmp_path)
    assert set(model.peft_config) == {"first", "second"} and model.active_adapter == "first"
    torch.testing.assert_close(logits(model), logits(first), atol=0, rtol=0)
    model.set_adapter("second")
    torch.testing.assert_close(logits(model), logits(second), atol=1e-6, rtol=1e-6)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(base), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(plain_twin(model, base)), logits(second), atol=1e-5, rtol=1e-5)
    model.delete_adapter("second")
    assert not any(".second." in n for n, _ in model.named_parameters())


def test_mixed_batches_give_each_row_its_own_adapter(tmp_path):
    base, model, first, second = two_adapters(tmp_path)
    rows = ["first", "__base__", "second"]
    mixed = logits(model, adapter_names=rows)
    for i, expected in enumerate([logits(first), logits(base), logits(second)]):
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed, logits(plain_twin(model, base), adapter_names=rows), atol=1e-5, rtol=1e-5)


def test_load_adapter_refuses_what_it_cannot_load_and_leaves_the_model_as_it_was(tmp_path):
    base = tiny_llama()
    model = ours(base)
    ours(base).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "q_proj.lora_B" not in k}, tmp_path / "adapter_model.safetensors")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"q_proj\.lora_B.* is not in the file"):
        mp.load_adapter(model, tmp_path, "second")
    assert set(model.peft_config) == {"default"}
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        mp.load_adapter(model, tmp_path, "default")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_stock_peft_config_on_moslora_layers_is_refused_by_name():
    model = ours(tiny_llama())
    with pytest.raises(TypeError, match="adapter 'other' on .*q_proj.*moslora.peft.LoraConfig"):
        model.add_adapter("other", peft.LoraConfig(r=4, target_modules=["q_proj"]))


# ----- merging ------------------------------------------------------------------------------------
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_and_merge_and_unload_are_exact(safe_merge):
    base = tiny_llama()
    model = ours(base)
    unmerged = logits(model)
    model.merge_adapter(safe_merge=safe_merge)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    restored = copy.deepcopy(model).unload().state_dict()
    for name, weight in base.state_dict().items():
        torch.testing.assert_close(restored[name], weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-6, rtol=1e-6)
    plain = model.merge_and_unload(safe_merge=safe_merge)
    assert type(plain) is type(base) and plain.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(logits(plain), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(plain), logits(plain_twin(ours(base), base).merge_and_unload()), atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_a_broken_adapter():
    model = ours(tiny_llama())
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".lora_M." in n)[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)


# ----- add_weighted_adapter ----------------------------------------------------------------------
COMBINATIONS = [
    ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3}), ("linear", {}), ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.5}),
    ("ties_svd", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.5}),
]


def three_adapters():
    """Adapters "m1" and "m2" with different mixers and "p" without one, same rank (for the linear family)."""
    base = tiny_llama()
    model = ours(base, "kaiming", seed=1, adapter="m1")
    for seed, (name, mixer) in enumerate([("m2", "orthogonal"), ("p", None)], start=2):
        torch.manual_seed(seed)
        model.add_adapter(name, mp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], mixer=mixer))
        perturb(model, name, seed=seed)
    return base, model


@pytest.mark.parametrize("combination,options", COMBINATIONS, ids=[c + "".join(f"-{k}" for k in o) for c, o in COMBINATIONS])
def test_add_weighted_adapter_equals_peft_s_combination_of_the_equivalent_plain_adapters(combination, options):
    base, model = three_adapters()
    twin = plain_twin(model, base)
    sources = ["m1", "p", "m2"]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    torch.manual_seed(5)  # the dare family drops entries at random
    mp.add_weighted_adapter(model, sources, [0.7, -0.4, 1.3], "mix", combination_type=combination, **options)
    torch.manual_seed(5)
    twin.add_weighted_adapter(sources, [0.7, -0.4, 1.3], "mix", combination_type=combination, **options)
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0)
    assert model.peft_config["mix"].mixer is None and model.peft_config["m1"].mixer == "kaiming"
    model.set_adapter("mix"), twin.set_adapter("mix")
    torch.testing.assert_close(logits(model), logits(twin), atol=1e-5, rtol=1e-5)


def test_cat_is_the_block_diagonal_mixer_and_svd_the_truncated_sum_of_the_deltas():
    base, model = three_adapters()
    weights = [0.7, -0.4, 1.3]
    mp.add_weighted_adapter(model, ["m1", "p", "m2"], weights, "cat", combination_type="cat")
    mp.add_weighted_adapter(model, ["m1", "p", "m2"], weights, "svd", combination_type="svd", svd_rank=12)
    for layer in layers_of(model).values():
        A = [layer.lora_A[a].weight.detach() * w * layer.scaling[a] for a, w in zip(["m1", "p", "m2"], weights)]
        M = torch.block_diag(layer.lora_M["m1"].weight.detach(), torch.eye(4), layer.lora_M["m2"].weight.detach())
        B = torch.cat([layer.lora_B[a].weight.detach() for a in ["m1", "p", "m2"]], dim=1)
        torch.testing.assert_close(layer.get_delta_weight("cat"), B @ M @ torch.cat(A), atol=1e-6, rtol=1e-5)
        # PEFT before 0.21 weighs each ΔWᵢ by its scaling once more (its own svd does; the oracle test covers it).
        again = {a: layer.scaling[a] if PEFT_BEFORE_0_21 else 1.0 for a in ["m1", "p", "m2"]}
        total = sum(w * again[a] * layer.get_delta_weight(a) for a, w in zip(["m1", "p", "m2"], weights))
        torch.testing.assert_close(layer.get_delta_weight("svd"), total, atol=1e-5, rtol=1e-4)  # rank 12 = the sum's rank


def test_peft_s_own_add_weighted_adapter_is_refused_on_a_model_with_mixers():
    base, model = three_adapters()
    for sources in (["m1", "m2"], ["p", "m1"]):
        with pytest.raises(ValueError, match="moslora.peft.add_weighted_adapter"):
            model.add_weighted_adapter(sources, [1.0, 1.0], "mix-" + sources[0], combination_type="cat")
    plain = ours(base, None, adapter="x")
    plain.add_adapter("y", mp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], mixer=None))
    plain.add_weighted_adapter(["x", "y"], [1.0, 1.0], "xy", combination_type="cat")  # no mixers: PEFT's own, allowed


def test_a_new_adapter_from_the_same_config_object_is_allowed_and_gets_its_own_mixer():
    import dataclasses

    config = mp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"])
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("second", config)  # as TRL does for its "ref" adapter
    layer = next(iter(layers_of(model).values()))
    assert not torch.equal(layer.lora_M["default"].weight, layer.lora_M["second"].weight)
    # A shallow copy of a config in use on a model with mixers is what PEFT's add_weighted_adapter makes, refused
    # when it is made (test_peft_route_refusals); a copy of an unused config, or of a deep copy, is a config like any.
    with pytest.raises(ValueError, match="copy .* of the config of an adapter in a model with MoSLoRA mixers"):
        dataclasses.replace(config, r=2)
    get_peft_model(tiny_llama(), dataclasses.replace(copy.deepcopy(config), r=2))
    get_peft_model(tiny_llama(), dataclasses.replace(mp.LoraConfig(r=4, target_modules=TARGETS["llama"]), r=2))


# ----- what cannot get a mixer --------------------------------------------------------------------
def test_a_target_that_cannot_get_a_mixer_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'model.embed_tokens' is a torch.nn.modules.sparse.Embedding"):
        get_peft_model(tiny_llama(), mp.LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="'0' is a torch.nn.modules.conv.Conv2d.*native route"):
        get_peft_model(convs, mp.LoraConfig(target_modules=["0", "2"]))
    attention = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="'0.out_proj' is a .*NonDynamicallyQuantizableLinear"):
        get_peft_model(attention, mp.LoraConfig(target_modules=["out_proj"]))
    plain = get_peft_model(copy.deepcopy(convs), mp.LoraConfig(target_modules=["0", "2"], mixer=None))
    assert type(plain.base_model.model[0]).__module__ == "peft.tuners.lora.layer", "without a mixer, PEFT's own layer"


@pytest.mark.parametrize("fields,name", [
    ({"use_dora": True}, "use_dora"), ({"init_lora_weights": "pissa"}, "init_lora_weights"), ({"lora_bias": True}, "lora_bias"),
    ({"target_parameters": ["weight"]}, "target_parameters"), ({"mixer": "random"}, "mixer"),
])  # fmt: skip
def test_what_does_not_combine_with_the_mixer_is_refused_by_name(fields, name):
    with pytest.raises(ValueError, match=name):
        mp.LoraConfig(target_modules=["q_proj"], **fields)
    if name != "mixer":
        mp.LoraConfig(target_modules=["q_proj"], mixer=None, **fields)  # PEFT's own, without the mixer


def test_a_peft_outside_the_tested_range_is_refused_in_one_line(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.19.1" if name == "peft" else real(name))
    try:
        with pytest.raises(ImportError, match=r"moslora.peft needs peft>=0.20.0,<0.22 .*found peft 0.19.1") as error:
            importlib.reload(mp)
        assert "\n" not in str(error.value)
    finally:
        monkeypatch.undo()
        importlib.reload(mp)


# ----- bitsandbytes (QLoRA) -----------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_layers_get_the_mixer_and_equal_peft_s_bitsandbytes_lora(bits):
    from test_interop import quantized_mlp

    base = quantized_mlp(bits)
    setattr(base, f"is_loaded_in_{bits}bit", True)  # PEFT's own dispatch picks its bitsandbytes layers by this flag
    torch.manual_seed(0)
    model = get_peft_model(base, mp.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    perturb(model, "default")
    assert type(model.base_model.model[0]).__name__ == f"Linear{'4bit' if bits == 4 else '8bitLt'}"
    assert type(model.base_model.model[0]).__module__ == "moslora.peft.bnb"
    twin_base = quantized_mlp(bits)
    setattr(twin_base, f"is_loaded_in_{bits}bit", True)
    twin = get_peft_model(twin_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    assert type(twin.base_model.model[0]).__module__ == "peft.tuners.lora.bnb"
    with torch.no_grad():
        for i in (0, 2):
            ours_layer, theirs = model.base_model.model[i], twin.base_model.model[i]
            theirs.lora_A["default"].weight.copy_(folded_A(ours_layer, "default"))
            theirs.lora_B["default"].weight.copy_(ours_layer.lora_B["default"].weight)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    model.train(), twin.train()  # bitsandbytes' CPU eval path repacks 4-bit weights (see moslora.train.model)
    out, expected = model(x), twin(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    assert model.base_model.model[0].lora_M["default"].weight.grad.abs().sum() > 0
    with torch.no_grad(), pytest.warns(UserWarning):
        model.merge_adapter()
        twin.merge_adapter()
        torch.testing.assert_close(model(x), twin(x), atol=1e-4, rtol=1e-4)


# ----- moslora's own tools read the PEFT route's folders; conversions are exact ----------------------
def native_tensors(model):
    return {name: p.detach() for name, p in moslora.adapter_state_dict(model).items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_route_and_native_formats_convert_exactly_both_ways(tmp_path, arch):
    base = MAKE[arch]()
    route = ours(base, "orthogonal")
    route.save_pretrained(tmp_path / "route")
    # PEFT route → native: moslora.load_adapter places A, M, B bit for bit
    native = moslora.load_adapter(copy.deepcopy(base), tmp_path / "route")
    assert moslora.get_config(native).mixer == "orthogonal"
    for name, layer in layers_of(route).items():
        mine = dict(moslora.adapter_layers(native))[name]
        for attr in ("lora_A", "lora_M", "lora_B"):
            assert torch.equal(getattr(mine, attr), getattr(layer, attr)["default"].weight), (name, attr)
    torch.testing.assert_close(logits(native), logits(route), atol=1e-5, rtol=1e-5)
    # native → PEFT route: the folder PEFT wrote, tensor for tensor
    moslora.save_adapter(native, tmp_path / "native")
    moslora.export_lora(tmp_path / "native", tmp_path / "back", format="peft-mixer")
    written, original = load_file(tmp_path / "back" / "adapter_model.safetensors"), load_file(tmp_path / "route" / "adapter_model.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_ROUTE_TYPE and config["mixer"] == "orthogonal"
    reloaded = mp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    torch.testing.assert_close(logits(reloaded), logits(route), atol=0, rtol=0)


def test_a_native_model_exports_to_the_peft_route_and_trains_on_there(tmp_path):
    base = tiny_llama()
    native = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], mixer="identity"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in moslora.adapter_state_dict(native).items():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    moslora.export_lora(native, tmp_path, format="peft-mixer")
    route = mp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    torch.testing.assert_close(logits(route), logits(native), atol=1e-5, rtol=1e-5)
    assert route.peft_config["default"].mixer == "identity"
    expected = native_tensors(native)
    for name, layer in layers_of(route).items():
        assert torch.equal(layer.lora_M["default"].weight, expected[f"{name}.lora_M"])


def test_the_peft_route_keeps_mixers_on_linear_layers_only():
    from moslora.model.description import AdapterFormatError

    native = moslora.inject(tiny_llama(), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(AdapterFormatError, match="'model.embed_tokens' is of kind 'embedding'.*format 'peft'"):
        moslora.export_lora(native, "unused", format="peft-mixer")


def test_moslora_export_writes_a_plain_lora_copy_that_stock_peft_loads_exactly(tmp_path):
    from moslora.cli.main import main

    base = tiny_llama()
    route = ours(base)
    route.save_pretrained(tmp_path / "route")
    assert main(["export", str(tmp_path / "route"), str(tmp_path / "plain")]) == 0
    stock = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain")
    torch.testing.assert_close(logits(stock), logits(route), atol=1e-5, rtol=1e-5)


def test_moslora_export_merged_reads_a_peft_route_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from llm_fixtures import build_tiny_llama
    from moslora.cli.main import main

    folder = build_tiny_llama(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    route = ours(base, target_modules=["q_proj", "v_proj"])
    route.save_pretrained(tmp_path / "route")
    assert main(["export", str(tmp_path / "route"), str(tmp_path / "merged"), "--merged"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(merged, ids), logits(route, ids), atol=1e-5, rtol=1e-5)
