"""Every refusal of the PEFT route leaves the model exactly as it was, and what the refusal suggests then works.

"Exactly as it was": ``peft_config`` (classes and saved dicts), the modules and their classes, every
layer's adapter dicts and active adapters, the model's active adapter, and every parameter and buffer,
bit for bit, with its ``requires_grad``. Tiny models built from configs; PEFT is the oracle.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils.hotswap import hotswap_adapter  # noqa: E402

import moslora.peft as mp  # noqa: E402
from test_peft_route import TARGETS, layers_of, logits, ours, perturb, plain_twin  # noqa: E402
from tiny import tiny_llama  # noqa: E402


def state(model):
    """Everything a refusal must leave alone."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            dicts = {attr: sorted(getattr(module, attr)) for attr in module.adapter_layer_names + module.other_param_names
                     if hasattr(getattr(module, attr, None), "keys")}
            layers[name] = {**dicts, "active": list(module.active_adapters), "merged": list(module.merged_adapters),
                            "variants": sorted(getattr(module, "lora_variant", {}))}
    configs = {name: (type(c), json.dumps(c.to_dict(), sort_keys=True, default=str)) for name, c in getattr(model, "peft_config", {}).items()}
    tensors = {name: (t.detach().clone(), t.requires_grad) for name, t in model.state_dict(keep_vars=True).items()}
    return {"configs": configs, "active": getattr(model, "active_adapters", None), "layers": layers,
            "modules": [(name, type(m)) for name, m in model.named_modules()], "tensors": tensors}


def assert_unchanged(before, model):
    after = state(model)
    for key in ("configs", "active", "layers", "modules"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, grad) in before["tensors"].items():
        assert torch.equal(after["tensors"][name][0], tensor) and after["tensors"][name][1] == grad, name


def two_mixers(targets_one=None, targets_two=None, mixer_two="orthogonal"):
    base = tiny_llama()
    model = ours(base, "kaiming", seed=1, adapter="one", target_modules=targets_one or TARGETS["llama"])
    torch.manual_seed(2)
    model.add_adapter("two", mp.LoraConfig(r=4, lora_alpha=8, target_modules=targets_two or TARGETS["llama"], mixer=mixer_two))
    perturb(model, "two", seed=2)
    return base, model.eval()


def both_active(model):
    model.base_model.set_adapter(["one", "two"])
    try:
        return logits(model)
    finally:
        model.base_model.set_adapter("one")


# ----- PEFT's add_weighted_adapter -----------------------------------------------------------------
@pytest.mark.parametrize("sources", [["one", "two"], ["two", "one"]])
def test_peft_s_add_weighted_adapter_is_refused_unchanged_and_moslora_s_then_is_exact(sources):
    base, model = two_mixers()
    expected = both_active(model)
    before = state(model)
    with pytest.raises(ValueError, match=r"moslora.peft.add_weighted_adapter\(model, ...\)"):
        model.add_weighted_adapter(sources, [1.0, 1.0], "cat", combination_type="cat")
    assert_unchanged(before, model)
    mp.add_weighted_adapter(model, sources, [1.0, 1.0], "cat", combination_type="cat")  # the route the message names
    model.set_adapter("cat")
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.xfail(strict=True, reason="not yet: the copy is told from the layers the first source shares with others; "
                   "a first source that shares no layer with a mixer adapter is refused by the layer backstop, "
                   "after PEFT stored its config and gave earlier layers the new adapter")
def test_a_plain_first_source_on_other_layers_than_the_mixers_is_refused_unchanged_too():
    # "one" is plain LoRA on the attention only, "two" has a mixer on the MLP only: no layer holds both,
    # and PEFT copies the config of "one", which never saw a mixer.
    base, model = two_mixers(targets_one=["q_proj", "v_proj"], targets_two=["down_proj"])
    model.delete_adapter("one")
    torch.manual_seed(1)
    model.add_adapter("one", mp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], mixer=None))
    perturb(model, "one", seed=1)
    expected = both_active(model)
    before = state(model)
    with pytest.raises(ValueError, match="down_proj"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "cat", combination_type="cat")
    assert_unchanged(before, model)
    mp.add_weighted_adapter(model, ["one", "two"], [1.0, 1.0], "cat", combination_type="cat")
    model.set_adapter("cat")
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def test_moslora_s_add_weighted_adapter_refuses_a_name_the_model_has_unchanged():
    _, model = two_mixers()
    before = state(model)
    with pytest.raises(ValueError, match="already has an adapter 'two'"):
        mp.add_weighted_adapter(model, ["one", "two"], [1.0, 1.0], "two", combination_type="cat")
    assert_unchanged(before, model)
    model.add_adapter("r2", mp.LoraConfig(r=2, target_modules=TARGETS["llama"]))
    before = state(model)
    with pytest.raises(ValueError, match="same r"):  # PEFT's own refusal, inside the folded mixers
        mp.add_weighted_adapter(model, ["one", "r2"], [1.0, 1.0], "lin", combination_type="linear")
    assert_unchanged(before, model)


# ----- configs and targets the layers refuse ---------------------------------------------------------
def test_a_stock_peft_config_on_moslora_layers_is_refused_unchanged_and_a_plain_moslora_config_then_works():
    base, model = two_mixers()
    before = state(model)
    with pytest.raises(TypeError, match=r"moslora.peft.LoraConfig \(mixer=None for plain LoRA\)"):
        model.add_adapter("plain", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert_unchanged(before, model)
    torch.manual_seed(3)
    model.add_adapter("plain", mp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], mixer=None))
    perturb(model, "plain", seed=3)
    model.set_adapter("plain")
    torch.testing.assert_close(logits(model), logits(plain_twin(model, base)), atol=1e-5, rtol=1e-5)


def test_a_target_that_cannot_get_a_mixer_is_refused_unchanged():
    base, model = two_mixers()
    before = state(model)
    with pytest.raises(ValueError, match="'model.embed_tokens' is a .*Embedding"):
        model.add_adapter("emb", mp.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    assert_unchanged(before, model)
    fresh = tiny_llama()
    fresh_before = state(fresh)
    with pytest.raises(ValueError, match="'model.embed_tokens' is a .*Embedding"):
        get_peft_model(fresh, mp.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    assert_unchanged(fresh_before, fresh)


def test_a_mixer_config_on_stock_peft_layers_is_refused_unchanged(tmp_path):
    base = tiny_llama()
    stock = get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"]))
    ours(base).save_pretrained(tmp_path)
    before = state(stock)
    with pytest.raises(ValueError, match="mixer"):
        stock.add_adapter("m", mp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"]))
    assert_unchanged(before, stock)
    with pytest.raises(ValueError, match="mixer"):
        stock.load_adapter(tmp_path, "m")  # PEFT's own load_adapter now reads the folder's config
    assert_unchanged(before, stock)


# ----- loading -----------------------------------------------------------------------------------
def test_load_adapter_refusals_leave_the_model_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    base, model = two_mixers()
    ours(base, seed=4).save_pretrained(tmp_path)
    before = state(model)
    with pytest.raises(ValueError, match="already has an adapter 'two'"):
        mp.load_adapter(model, tmp_path, "two")
    assert_unchanged(before, model)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "v_proj.lora_B" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"v_proj\.lora_B.* is not in the file"):
        mp.load_adapter(model, tmp_path, "three", is_trainable=True)
    assert_unchanged(before, model)


# ----- hotswap -----------------------------------------------------------------------------------
def test_hotswap_between_mixer_adapters_is_exact_and_a_mixer_into_a_plain_adapter_is_refused_unchanged(tmp_path):
    base = tiny_llama()
    ours(base, "kaiming", seed=1).save_pretrained(tmp_path / "one")
    two = ours(base, "orthogonal", seed=2)
    two.save_pretrained(tmp_path / "two")
    model = mp.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one")
    hotswap_adapter(model, str(tmp_path / "two"), "default", torch_device="cpu")
    torch.testing.assert_close(logits(model), logits(two), atol=0, rtol=0)
    plain = ours(base, None, seed=3)
    before = state(plain)
    with pytest.raises(RuntimeError, match="unexpected keys found: .*lora_M"):
        hotswap_adapter(plain, str(tmp_path / "two"), "default", torch_device="cpu")
    assert_unchanged(before, plain)


# ----- refusals met after earlier targets: moslora.peft's get_peft_model and add_adapter check every target first
NO_MIXER_LAST = ["q_proj", "input_layernorm"]  # in module order, q_proj of layer 0 comes before the layer norm that is refused


def test_a_target_that_cannot_get_a_mixer_after_others_is_refused_unchanged_by_moslora_s_get_peft_model_and_add_adapter():
    fresh = tiny_llama()
    before = state(fresh)
    with pytest.raises(ValueError, match="'model.layers.0.input_layernorm' is a .*LlamaRMSNorm"):
        mp.get_peft_model(fresh, mp.LoraConfig(r=4, target_modules=NO_MIXER_LAST))
    assert_unchanged(before, fresh)
    _, model = two_mixers()
    before = state(model)
    with pytest.raises(ValueError, match="'model.layers.0.input_layernorm' is a .*LlamaRMSNorm"):
        mp.add_adapter(model, "norm", mp.LoraConfig(r=4, target_modules=NO_MIXER_LAST))
    assert_unchanged(before, model)
    mp.add_adapter(model, "q", mp.LoraConfig(r=4, target_modules=["q_proj"]))  # what the message suggests: leave it out
    assert all("q" in layer.lora_M for name, layer in layers_of(model).items() if name.endswith("q_proj"))


@pytest.mark.xfail(strict=True, reason="PEFT's get_peft_model meets the refused target after wrapping q_proj of layer 0, and "
                   "calls nothing of moslora's with the whole model before: use moslora.peft.get_peft_model")
def test_peft_s_own_get_peft_model_refuses_a_target_after_others_unchanged():
    fresh = tiny_llama()
    before = state(fresh)
    with pytest.raises(ValueError, match="input_layernorm"):
        get_peft_model(fresh, mp.LoraConfig(r=4, target_modules=NO_MIXER_LAST))
    assert_unchanged(before, fresh)


def test_a_stock_peft_config_reaching_moslora_layers_after_others_is_refused_unchanged_by_moslora_s_add_adapter():
    base, model = two_mixers(targets_one=["v_proj"], targets_two=["v_proj"])  # q_proj, before v_proj, is not a LoRA layer
    before = state(model)
    with pytest.raises(TypeError, match=r"v_proj'.*moslora.peft.LoraConfig \(mixer=None for plain LoRA\)"):
        mp.add_adapter(model, "plain", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert_unchanged(before, model)


@pytest.mark.xfail(strict=True, reason="PEFT's add_adapter wraps q_proj with its own layer before a moslora layer refuses the "
                   "stock config; it rolls back peft_config only: use moslora.peft.add_adapter")
def test_peft_s_own_add_adapter_of_a_stock_config_reaching_moslora_layers_after_others_is_refused_unchanged():
    _, model = two_mixers(targets_one=["v_proj"], targets_two=["v_proj"])
    before = state(model)
    with pytest.raises(TypeError):
        model.add_adapter("plain", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert_unchanged(before, model)


# ----- bitsandbytes layers stock PEFT built ------------------------------------------------------------
def stock_bnb(bits, config):
    from test_interop import quantized_mlp

    base = quantized_mlp(bits)
    setattr(base, f"is_loaded_in_{bits}bit", True)  # PEFT's own dispatch picks its bitsandbytes layers by this flag
    torch.manual_seed(0)
    return get_peft_model(base, config).train()  # train mode: bitsandbytes' CPU eval path repacks 4-bit weights


BNB_TARGETS = ["0", "2"]


@pytest.mark.parametrize("bits", [4, 8])
def test_a_mixer_adapter_on_bitsandbytes_layers_stock_peft_built_is_refused_naming_the_layer_unchanged(bits, tmp_path):
    saved = stock_bnb(bits, mp.LoraConfig(r=4, lora_alpha=8, target_modules=BNB_TARGETS))  # moslora's bitsandbytes layers
    perturb(saved, "default", seed=5)
    saved.save_pretrained(tmp_path)
    stock = stock_bnb(bits, peft.LoraConfig(r=4, lora_alpha=8, target_modules=BNB_TARGETS))
    assert type(stock.base_model.model[0]).__module__ == "peft.tuners.lora.bnb"
    before = state(stock)
    layer = rf"layer '0' is PEFT's own peft\.tuners\.lora\.bnb\.Linear{'4bit' if bits == 4 else '8bitLt'}"
    with pytest.raises(ValueError, match=layer + r".*without its mixer"):
        mp.add_adapter(stock, "m", mp.LoraConfig(r=4, lora_alpha=8, target_modules=BNB_TARGETS))
    assert_unchanged(before, stock)
    with pytest.raises(ValueError, match=layer):
        mp.load_adapter(stock, tmp_path, "m")
    assert_unchanged(before, stock)
    # What the message suggests: the model's adapters from moslora.peft.LoraConfig; the mixer adapter then loads exactly.
    ours_bnb = stock_bnb(bits, mp.LoraConfig(r=4, lora_alpha=8, target_modules=BNB_TARGETS, mixer=None))
    mp.load_adapter(ours_bnb, tmp_path, "m").set_adapter("m")
    ours_bnb.train()  # PEFT's load_adapter of a frozen adapter puts the model in eval mode
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours_bnb(x), saved(x), atol=1e-6, rtol=1e-6)


@pytest.mark.xfail(strict=True, reason="PEFT's add_adapter hands the config to its own bitsandbytes layers' update_layer, whose "
                   "resolve_lora_variant never asks the lora_variants registry or moslora: the adapter runs without its mixer. "
                   "Use moslora.peft.add_adapter / load_adapter, which refuse it")
def test_peft_s_own_add_adapter_of_a_mixer_config_on_stock_bitsandbytes_layers_is_refused():
    stock = stock_bnb(8, peft.LoraConfig(r=4, lora_alpha=8, target_modules=BNB_TARGETS))
    with pytest.raises(ValueError, match="mixer"):
        stock.add_adapter("m", mp.LoraConfig(r=4, lora_alpha=8, target_modules=BNB_TARGETS))
