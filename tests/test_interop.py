"""Interop: exact export to plain LoRA (PEFT, diffusers), import of PEFT LoRA, the authors'
checkpoints, and merging into bitsandbytes-quantized bases. Every check compares against the real
library (PEFT, diffusers) or ΔW computed by hand, on tiny models built from configs."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import moslora
from moslora.io.native import AdapterFormatError
from tiny import MIXERS, make_layer, perturb, tiny_gpt2, tiny_llama, tiny_unet, unet_inputs

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 2, 33, 7], [4, 4, 60, 12, 0, 3]])
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
GPT2_TARGETS = ["c_attn", "c_proj"]


def keys_of(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def trained(make, targets, **config):
    """A tiny model with a perturbed (trained-like: B ≠ 0, M ≠ I) MoSLoRA adapter, and its base."""
    base = make()
    model = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(**{"r": 4, "alpha": 8, "target_modules": targets, **config}))
    perturb(model, std=0.2)
    return base, model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# ----- export to PEFT ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,targets,config",
    [
        (tiny_llama, LLAMA_TARGETS, {}),
        (tiny_llama, ["q_proj", "o_proj"], {"use_rslora": True, "alpha": 5.5}),
        (tiny_gpt2, GPT2_TARGETS, {}),
    ],
    ids=["llama", "llama-rslora", "gpt2-conv1d"],
)
def test_peft_loads_the_export_and_gives_the_same_logits(tmp_path, make, targets, config):
    base, model = trained(make, targets, **config)
    expected = logits(model)
    assert not torch.allclose(expected, logits(base), atol=1e-3), "the adapter must change the logits"
    moslora.export_lora(model, tmp_path / "peft")

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)], ids=["llama", "gpt2"])
def test_export_has_exactly_the_keys_and_config_peft_writes(tmp_path, make, targets):
    base, model = trained(make, targets)
    moslora.export_lora(model, tmp_path / "ours")
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    reference.save_pretrained(tmp_path / "peft", save_embedding_layers=False)

    assert keys_of(tmp_path / "ours" / "adapter_model.safetensors") == keys_of(tmp_path / "peft" / "adapter_model.safetensors")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out"):
        assert ours[field] == theirs[field], field
    assert ours["task_type"] == "CAUSAL_LM"


def test_auto_peft_model_loads_the_export(tmp_path):
    base, model = trained(tiny_llama, ["q_proj", "v_proj"])
    base.save_pretrained(tmp_path / "base")
    moslora.export_lora(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded.eval()), logits(model), atol=1e-5, rtol=1e-5)


def test_auto_peft_model_loads_an_export_made_from_the_saved_directory(tmp_path):
    # The native directory records the task type, so an export made without the model still tells
    # AutoPeftModelFor… which class to build.
    base, model = trained(tiny_llama, ["q_proj", "v_proj"])
    base.save_pretrained(tmp_path / "base")
    moslora.save_adapter(model, tmp_path / "native", base_model_name_or_path=str(tmp_path / "base"))
    assert moslora.read_adapter(tmp_path / "native")[0].task_type == "CAUSAL_LM"
    moslora.export_lora(tmp_path / "native", tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded.eval()), logits(model), atol=1e-5, rtol=1e-5)


def test_export_from_a_directory_needs_no_model_and_equals_export_from_the_model(tmp_path):
    _, model = trained(tiny_llama, LLAMA_TARGETS, modules_to_save=["lm_head"])
    moslora.save_adapter(model, tmp_path / "native")
    moslora.export_lora(model, tmp_path / "from-model")
    moslora.export_lora(tmp_path / "native", tmp_path / "from-dir")

    with safe_open(str(tmp_path / "from-model" / "adapter_model.safetensors"), "pt") as a, safe_open(
        str(tmp_path / "from-dir" / "adapter_model.safetensors"), "pt"
    ) as b:
        assert set(a.keys()) == set(b.keys())
        assert "base_model.model.lm_head.weight" in set(a.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_exported_A_is_the_mixer_folded_into_A_by_hand(tmp_path):
    _, model = trained(tiny_llama, ["q_proj"])
    moslora.export_lora(model, tmp_path)
    layer = model.model.layers[1].self_attn.q_proj
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        A = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        B = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight")
    torch.testing.assert_close(A, layer.lora_M.detach() @ layer.lora_A.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(B, layer.lora_B.detach())
    # and ΔW from the export, with PEFT's s = alpha/r, is the layer's ΔW
    torch.testing.assert_close(2.0 * B @ A, layer.get_delta_weight(), atol=1e-6, rtol=1e-6)


# tiny.make_layer's conv2d is dilated and its conv3d pads by reflection: see the test after this one.
PEFT_RUNS_ALIKE = ["linear", "conv1d-transformers", "conv1d", "embedding"]


@pytest.mark.parametrize("kind,mixer", [(kind, mixer) for kind in PEFT_RUNS_ALIKE for mixer in MIXERS])
def test_every_layer_kind_exports_exactly_and_imports_back(tmp_path, kind, mixer):
    base, x = make_layer(kind)
    model = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, alpha=8, mixer=mixer, target_modules=["0"]))
    perturb(model, std=0.3)
    with torch.no_grad():
        expected = model(x)
        moslora.export_lora(model, tmp_path)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
        back = moslora.import_lora(copy.deepcopy(base), tmp_path, mixer=None)
        torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["conv2d", "conv3d"])
def test_export_refuses_convs_that_peft_would_run_differently(tmp_path, kind):
    base, _ = make_layer(kind)  # dilation=(1, 2) / padding_mode="reflect": PEFT's conv LoRA ignores both
    model = moslora.inject(base, moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["0"]))
    with pytest.raises(ValueError, match="would not be equal"):
        moslora.export_lora(model, tmp_path)


# ----- export to diffusers -------------------------------------------------------------------------
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"]


def unet_out(unet):
    sample, t, context = unet_inputs()
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=context).sample


@pytest.mark.slow
def test_diffusers_loads_the_export_and_gives_the_same_unet_output(tmp_path):
    pytest.importorskip("diffusers")
    base, model = trained(tiny_unet, UNET_TARGETS, alpha=6)
    assert any(layer.kind == "conv" for _, layer in moslora.adapter_layers(model))
    expected = unet_out(model)
    assert not torch.allclose(expected, unet_out(base), atol=1e-3)
    moslora.export_lora(model, tmp_path, format="diffusers")

    unet = copy.deepcopy(base)
    unet.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    torch.testing.assert_close(unet_out(unet), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_stable_diffusion_pipeline_loads_the_export_with_load_lora_weights(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel

    base, model = trained(tiny_unet, ["to_q", "to_v", "conv1"], alpha=6)
    moslora.export_lora(model, tmp_path, format="diffusers")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, projection_dim=16))  # fmt: skip
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  latent_channels=4, norm_num_groups=8)  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=None, unet=copy.deepcopy(base), scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(model), atol=1e-5, rtol=1e-5)


# ----- PEFT never silently drops a mixer -----------------------------------------------------------
def test_peft_refuses_the_native_directory(tmp_path):
    base, model = trained(tiny_llama, ["q_proj"])
    moslora.save_adapter(model, tmp_path)
    try:
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    except (KeyError, ValueError, TypeError):  # today: KeyError('peft_type'), the config has none on purpose
        return
    # Should a PEFT version ever load it, it must not have dropped the mixer.
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


# ----- the authors' checkpoints --------------------------------------------------------------------
def write_authors_checkpoint(directory, model, mixer_name="lora_AB", pickle=False, seed=3):
    """An authors'-format directory (PEFT 0.10 + lora_use_mixer) from random tensors, and ΔW by hand."""
    g = torch.Generator().manual_seed(seed)
    r, alpha = 4, 8
    tensors, deltas = {}, {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        weight = model.get_submodule(name).weight
        out_f, in_f = weight.shape
        A, M, B = torch.randn(r, in_f, generator=g), torch.randn(r, r, generator=g), torch.randn(out_f, r, generator=g) * 0.2
        tensors |= {f"base_model.model.{name}.lora_A.weight": A, f"base_model.model.{name}.{mixer_name}.weight": M,
                    f"base_model.model.{name}.lora_B.weight": B}  # fmt: skip
        deltas[name] = (alpha / r) * B @ M @ A
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05, "lora_use_mixer": True, "fan_in_fan_out": False,
              "target_modules": ["q_proj", "down_proj"], "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "yahma/llama-7b-hf"}  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if pickle:
        torch.save(tensors, directory / "adapter_model.bin")
    else:
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    return deltas


def with_deltas(base, deltas):
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in deltas.items():
            merged.get_submodule(name).weight += delta
    return merged


@pytest.mark.parametrize("mixer_name", ["lora_AB", "lora_mixer"])
def test_authors_checkpoint_loads_and_exports_to_the_hand_computed_delta(tmp_path, mixer_name):
    base = tiny_llama()
    deltas = write_authors_checkpoint(tmp_path / "authors", base, mixer_name)
    expected = logits(with_deltas(base, deltas))

    model = moslora.load_adapter(copy.deepcopy(base), tmp_path / "authors").eval()  # the checkpoint has dropout
    for name, delta in deltas.items():
        torch.testing.assert_close(model.get_submodule(name).get_delta_weight(), delta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)

    moslora.export_lora(tmp_path / "authors", tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["base_model_name_or_path"] == "yahma/llama-7b-hf"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)


def test_authors_pickle_is_read_only_with_allow_pickle(tmp_path):
    base = tiny_llama()
    deltas = write_authors_checkpoint(tmp_path, base, pickle=True)
    with pytest.raises(AdapterFormatError, match="allow_pickle=True"):
        moslora.load_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(AdapterFormatError, match="allow_pickle=True"):
        moslora.export_lora(tmp_path, tmp_path / "out")
    model = moslora.load_adapter(copy.deepcopy(base), tmp_path, allow_pickle=True).eval()
    torch.testing.assert_close(logits(model), logits(with_deltas(base, deltas)), atol=1e-5, rtol=1e-5)


def test_a_mixer_that_cannot_be_placed_is_an_error(tmp_path):
    base = tiny_llama()
    write_authors_checkpoint(tmp_path, base)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # A mixer on one layer only: no single MoSLoRA config can hold it.
    del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_AB.weight"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    for action in (lambda: moslora.load_adapter(copy.deepcopy(base), tmp_path), lambda: moslora.export_lora(tmp_path, tmp_path / "o")):
        with pytest.raises(AdapterFormatError, match="mixer"):
            action()
    # The LoRA importer, given a checkpoint with mixers, points to load_adapter rather than drop them.
    write_authors_checkpoint(tmp_path, base)
    with pytest.raises(AdapterFormatError, match="load_adapter"):
        moslora.import_lora(copy.deepcopy(base), tmp_path)


# ----- import of plain PEFT LoRA -------------------------------------------------------------------
def peft_lora(tmp_path, make, targets):
    base = make()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.2)
    reference.save_pretrained(tmp_path / "lora")
    return base, reference


@pytest.mark.parametrize("make,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)], ids=["llama", "gpt2"])
def test_import_lora_with_identity_mixer_gives_identical_outputs(tmp_path, make, targets):
    base, reference = peft_lora(tmp_path, make, targets)
    model = moslora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    assert all(torch.equal(layer.lora_M, torch.eye(4)) for _, layer in moslora.adapter_layers(model))
    assert all(layer.lora_M.requires_grad for _, layer in moslora.adapter_layers(model))
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=1e-6)


def test_import_lora_with_a_random_mixer_keeps_the_outputs(tmp_path):
    base, reference = peft_lora(tmp_path, tiny_llama, ["q_proj", "v_proj"])
    torch.manual_seed(0)
    model = moslora.import_lora(copy.deepcopy(base), tmp_path / "lora", mixer="orthogonal")
    assert not any(torch.allclose(layer.lora_M, torch.eye(4)) for _, layer in moslora.adapter_layers(model))
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="singular"):
        moslora.import_lora(copy.deepcopy(base), tmp_path / "lora", mixer="two-subspace")


def test_import_then_export_round_trips(tmp_path):
    base, reference = peft_lora(tmp_path, tiny_llama, LLAMA_TARGETS)
    model = moslora.import_lora(copy.deepcopy(base), tmp_path / "lora")
    moslora.export_lora(model, tmp_path / "back")
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as a, safe_open(
        str(tmp_path / "back" / "adapter_model.safetensors"), "pt"
    ) as b:
        lora_keys = {k for k in a.keys() if "lora_" in k}
        assert lora_keys == {k for k in b.keys() if "lora_" in k}
        for key in lora_keys:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda cfg, t: cfg.update(use_dora=True), "use_dora"),
        (lambda cfg, t: cfg.update(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (lambda cfg, t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}), "refusing to drop"),
        (lambda cfg, t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"), "no lora_B"),
    ],
    ids=["dora", "rank-pattern", "unknown-tensor", "missing-B"],
)
def test_import_refuses_what_it_cannot_place_exactly(tmp_path, change, message):
    base, _ = peft_lora(tmp_path, tiny_llama, ["q_proj"])
    config_path, weights = tmp_path / "lora" / "adapter_config.json", tmp_path / "lora" / "adapter_model.safetensors"
    cfg = json.loads(config_path.read_text())
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(cfg, tensors)
    config_path.write_text(json.dumps(cfg))
    save_file(tensors, str(weights))
    model = copy.deepcopy(base)
    with pytest.raises(AdapterFormatError, match=message):
        moslora.import_lora(model, tmp_path / "lora")
    assert not list(moslora.adapter_layers(model)) and not hasattr(model, "_moslora_config"), "the model is left as it was"


def test_load_adapter_sends_plain_lora_to_import_lora(tmp_path):
    base, _ = peft_lora(tmp_path, tiny_llama, ["q_proj"])
    with pytest.raises(AdapterFormatError, match="import_lora"):
        moslora.load_adapter(copy.deepcopy(base), tmp_path / "lora")


# ----- command line --------------------------------------------------------------------------------
def test_cli_export_writes_what_export_lora_writes(tmp_path, capsys):
    from moslora.cli.main import main

    base, model = trained(tiny_llama, ["q_proj"])
    moslora.save_adapter(model, tmp_path / "native")
    assert main(["export", str(tmp_path / "native"), str(tmp_path / "out")]) == 0
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----- merging into bitsandbytes-quantized bases ---------------------------------------------------
def quantized_mlp(bits):
    """A tiny MLP of bitsandbytes layers (output sizes divisible by 32, as bitsandbytes' CPU kernel
    for eval-mode 4-bit needs) and its full-precision original."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    if bits == 4:
        make = lambda i, o: bnb.nn.Linear4bit(i, o, quant_type="nf4", compute_dtype=torch.float32)  # noqa: E731
    else:
        make = lambda i, o: bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False)  # noqa: E731
    quantized = nn.Sequential(make(64, 64), nn.ReLU(), make(64, 32))
    quantized.load_state_dict(dense.state_dict())
    return quantized.to("cpu")  # moving to a device is what quantizes bitsandbytes weights


def dequantized_by_hand(layer):
    import bitsandbytes as bnb

    if type(layer.weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.data.float() * layer.weight.SCB.float()[:, None] / 127


def adapted_quantized_mlp(bits, std=0.05):
    model = moslora.inject(quantized_mlp(bits), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["0", "2"]))
    perturb(model, std=std)
    return model


def hand_delta(layer):
    return layer.scaling * layer.lora_B.detach() @ layer.lora_M.detach() @ layer.lora_A.detach()


def reported_error(record) -> float:
    messages = [str(w.message) for w in record if "quantized weight" in str(w.message)]
    assert len(messages) == 1, messages
    return float(re.search(r"max abs error ([0-9.e+-]+)", messages[0]).group(1))


def test_merge_into_4bit_requantizes_and_reports_the_rounding_error():
    bnb = pytest.importorskip("bitsandbytes")
    model = adapted_quantized_mlp(4)
    exact_errors = []
    for i in (0, 2):
        target = dequantized_by_hand(model[i].base_layer) + hand_delta(model[i])
        q, state = bnb.functional.quantize_4bit(target, blocksize=64, compress_statistics=True, quant_type="nf4")
        exact_errors.append((bnb.functional.dequantize_4bit(q, state) - target).abs().max().item())
    with pytest.warns(UserWarning, match="approximate") as record:
        moslora.merge(model)
    assert type(model[0].base_layer.weight).__name__ == "Params4bit", "the base stays 4-bit"
    assert reported_error(record) == pytest.approx(max(exact_errors), rel=1e-2)
    assert 0 < reported_error(record) < 0.1
    assert record[0].filename == __file__, "the warning points at the line that called merge"


def test_merge_after_an_eval_forward_of_a_4bit_model():
    # On CPUs with AVX512-BF16 an eval-mode forward repacks 4-bit weights into another layout.
    model = adapted_quantized_mlp(4).eval()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(x)
    with pytest.warns(UserWarning, match="approximate") as record:
        moslora.merge(model)
    assert 0 < reported_error(record) < 0.1
    with torch.no_grad():
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_with_dequantize_is_an_exact_full_precision_merge(bits):
    model = adapted_quantized_mlp(bits, std=0.2)
    weights = {i: dequantized_by_hand(model[i].base_layer) + hand_delta(model[i]) for i in (0, 2)}
    biases = {i: model[i].base_layer.bias.detach().float() for i in (0, 2)}
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    expected = torch.relu(x @ weights[0].T + biases[0]) @ weights[2].T + biases[2]

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*quantized weight")  # no requantization on this path
        full = moslora.merge_and_unload(model, dequantize=True)
    assert all(type(full[i]) is nn.Linear for i in (0, 2))
    with torch.no_grad():
        torch.testing.assert_close(full(x).float(), expected, atol=1e-5, rtol=1e-5)

