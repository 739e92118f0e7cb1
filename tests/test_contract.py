"""The contract every MoSLoRA layer keeps, for every layer kind and every mixer kind."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moslora
from tiny import LAYER_KINDS, MIXERS, make_layer, perturb

CASES = [(kind, mixer) for kind in LAYER_KINDS for mixer in MIXERS]


def injected(kind: str, mixer: str | None, **config):
    base, x = make_layer(kind)
    model = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, alpha=8, mixer=mixer, target_modules=["0"], **config))
    return base, model, x


@pytest.mark.parametrize("kind,mixer", CASES)
def test_injection_is_a_no_op_at_init(kind, mixer):
    base, model, x = injected(kind, mixer)
    assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("kind,mixer", CASES)
def test_merged_equals_unmerged_and_unmerge_restores(kind, mixer):
    base, model, x = injected(kind, mixer)
    perturb(model)
    unmerged = model(x)
    assert not torch.allclose(unmerged, base(x), atol=1e-3), "the perturbed adapter should change the output"
    moslora.merge(model, safe=True)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    moslora.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, base[0].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,mixer", CASES)
def test_as_it_started_runs_a_frozen_copy_of_the_starting_adapter(kind, mixer):
    from moslora.model.ops import as_it_started, keep_starting_adapter

    base, model, x = injected(kind, mixer)
    assert not keep_starting_adapter(model)  # fresh (B = 0): nothing to copy, as it started = adapters off
    perturb(model)
    with as_it_started(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    started = model(x).detach()
    assert keep_starting_adapter(model)
    perturb(model, std=0.5)  # training moves the live adapter
    assert not torch.allclose(model(x), started, atol=1e-3)
    with as_it_started(model):
        torch.testing.assert_close(model(x), started, rtol=0, atol=0)
    assert not model[0].run_starting_copy and not torch.allclose(model(x), started, atol=1e-3)  # and back


@pytest.mark.parametrize("kind,mixer", CASES)
def test_merge_and_unload_gives_the_plain_base_module(kind, mixer):
    base, model, x = injected(kind, mixer)
    perturb(model)
    expected = model(x)
    plain = moslora.merge_and_unload(model)
    assert type(plain[0]) is type(base[0])
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,mixer", CASES)
def test_only_adapter_parameters_learn_and_their_count(kind, mixer):
    _, model, x = injected(kind, mixer)
    perturb(model)
    model(x).square().mean().backward()
    layer = model[0]
    for name, param in model.named_parameters():
        is_adapter = name.split(".")[-1] in ("lora_A", "lora_M", "lora_B")
        assert param.requires_grad == is_adapter, name
        assert (param.grad is not None) == is_adapter, name
    r, n_in, n_out = 4, layer.in_features, layer.out_features
    a_size = layer.lora_A.numel()  # r·in, times the kernel size for a conv
    assert a_size == r * n_in * (layer.lora_A[0, 0].numel())
    expected = a_size + (r * r if mixer else 0) + n_out * r
    assert moslora.parameter_counts(model)["trainable"] == expected


@pytest.mark.parametrize("kind,mixer", CASES)
def test_save_and_load_round_trip_exactly(kind, mixer, tmp_path):
    base, model, x = injected(kind, mixer)
    perturb(model)
    moslora.save_adapter(model, tmp_path / "adapter")
    loaded = moslora.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    for (_, a), (_, b) in zip(moslora.adapter_state_dict(model).items(), moslora.adapter_state_dict(loaded).items()):
        assert torch.equal(a, b)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_weight_and_bias_read_as_the_frozen_base_layers(kind):
    """Code outside moslora reads a layer's weight directly (TRL's fused LM head, transformers'
    embedding getters); the wrapper answers with its base layer's own tensors, as PEFT's does."""
    base, model, _ = injected(kind, "kaiming")
    perturb(model)
    layer = model[0]
    assert layer.weight is layer.base_layer.weight and torch.equal(layer.weight, base[0].weight)
    if kind == "embedding":
        with pytest.raises(AttributeError):
            layer.bias
    else:
        assert layer.bias is layer.base_layer.bias


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_disabled_gives_the_base_output_even_when_merged(kind):
    base, model, x = injected(kind, "kaiming")
    perturb(model)
    adapted = model(x)
    for merge_first in (False, True):
        if merge_first:
            moslora.merge(model)
        with moslora.disabled(model):
            torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    assert model[0].merged


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_no_mixer_equals_a_frozen_identity_mixer_in_outputs_and_gradients(kind):
    _, plain, x = injected(kind, None)
    _, ident, _ = injected(kind, "identity", train_mixer=False)
    perturb(plain)
    with torch.no_grad():
        ident[0].lora_A.copy_(plain[0].lora_A)
        ident[0].lora_B.copy_(plain[0].lora_B)
    out_plain, out_ident = plain(x), ident(x)
    assert torch.equal(out_plain, out_ident)
    out_plain.square().mean().backward()
    out_ident.square().mean().backward()
    assert ident[0].lora_M.grad is None
    for attr in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(plain[0], attr).grad, getattr(ident[0], attr).grad, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
@pytest.mark.parametrize("adapter_dtype", ["float32", "base"])
def test_half_precision_bases_run_and_match_fp32(kind, dtype, adapter_dtype):
    base, model32, x = injected(kind, "kaiming")
    perturb(model32)
    model = copy.deepcopy(model32)
    model[0].base_layer.to(dtype)
    if adapter_dtype == "base":
        model = moslora.inject(copy.deepcopy(base).to(dtype), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["0"], adapter_dtype="base"))
        with torch.no_grad():
            for attr, param in model[0].adapter_parameters():
                param.copy_(getattr(model32[0], attr))
    expected_adapter_dtype = torch.float32 if adapter_dtype == "float32" else dtype
    assert model[0].lora_A.dtype == expected_adapter_dtype
    x_in = x if kind == "embedding" else x.to(dtype)
    out = model(x_in)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), model32(x), atol=0.05, rtol=0.02)
    out.float().square().mean().backward()
    assert model[0].lora_B.grad is not None and torch.isfinite(model[0].lora_B.grad).all()
    moslora.merge(model)  # ΔW is built in fp32 and rounded once into the half weight
    torch.testing.assert_close(model(x_in).float(), model32(x), atol=0.05, rtol=0.02)


def test_golden_linear_output_by_hand():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 2))
    model = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=2, alpha=3, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        layer.lora_M.copy_(torch.tensor([[2.0, 1.0], [0.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0, 0.5], [-1.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # A·x = [7, 1]; M·(A·x) = [15, 1]; B·(M·A·x) = [15.5, -15]; s = 3/2.
    expected = base(x) + 1.5 * torch.tensor([[15.5, -15.0]])
    assert torch.equal(model(x), expected)
    # ΔW = s·B·M·A, written out.
    assert torch.equal(layer.get_delta_weight(), 1.5 * torch.tensor([[2.0, -1.5, 5.5], [-2.0, 1.0, -5.0]]))


def test_two_subspace_mixer_is_the_papers_two_subspace_mixing():
    torch.manual_seed(0)
    config = moslora.MoSLoRAConfig(r=6, alpha=6, mixer="two-subspace", train_mixer=False, target_modules=["0"])
    layer = moslora.inject(nn.Sequential(nn.Linear(9, 7)), config)[0]
    perturb(nn.Sequential(layer))
    A, B = layer.lora_A, layer.lora_B
    A1, A2, B1, B2 = A[:3], A[3:], B[:, :3], B[:, 3:]
    # With M = [[I, I], [I, I]]: B·M·A = (B1 + B2)·(A1 + A2), the two halves mixed.
    torch.testing.assert_close(layer.get_delta_weight(), (B1 + B2) @ (A1 + A2), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(layer.get_delta_weight(), B1 @ A1 + B2 @ A2, atol=1e-3)


def test_rslora_scaling():
    assert moslora.MoSLoRAConfig(r=16, alpha=32).scaling == 2.0
    assert moslora.MoSLoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_a_is_the_same_with_or_without_a_mixer_for_a_given_seed():
    def adapter_As(mixer):
        torch.manual_seed(5)
        model = moslora.inject(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), moslora.MoSLoRAConfig(r=4, mixer=mixer))
        return [layer.lora_A.detach().clone() for _, layer in moslora.adapter_layers(model)]

    for a, b, c in zip(adapter_As(None), adapter_As("kaiming"), adapter_As("orthogonal")):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_frozen_mixer_does_not_learn():
    _, model, x = injected("linear", "kaiming", train_mixer=False)
    perturb(model)
    model(x).sum().backward()
    assert model[0].lora_M.grad is None
    assert moslora.parameter_counts(model)["M"] == 0


@pytest.mark.parametrize("training", [True, False])
def test_injected_layers_take_the_train_or_eval_mode_of_the_layer_they_wrap(training):
    base, x = make_layer("linear")
    base.train(training)
    model = moslora.inject(base, moslora.MoSLoRAConfig(r=4, dropout=0.5, target_modules=["0"]))
    perturb(model)
    assert model[0].training == training and model[0].dropout.training == training
    assert torch.equal(model(x), model(x)) != training  # dropout is random only in training mode
