"""Real models from transformers and diffusers (tiny, from configs), quantized bases, torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moslora
from tiny import tiny_gpt2, tiny_llama, tiny_unet, unet_inputs

LLM_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "gpt2": "all-linear"}


def train_steps(model, loss_fn, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("mixer", [None, "kaiming"])
def test_causal_lm_trains_merges_saves_and_loads(name, mixer, tmp_path):
    base = tiny_llama() if name == "llama" else tiny_gpt2()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    model = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=LLM_TARGETS[name], mixer=mixer))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    model.train()
    losses = train_steps(model, lambda m: m(input_ids=ids, labels=ids).loss, steps=5)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items()), "the base must stay frozen"
    model.eval()
    logits = model(ids).logits
    moslora.save_adapter(model, tmp_path / "adapter")
    loaded = moslora.load_adapter(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert torch.equal(loaded(ids).logits, logits)
    merged = moslora.merge_and_unload(loaded)
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged(ids).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_unet_attention_targets_train_and_merge():
    base = tiny_unet()
    sample, t, context = unet_inputs()
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    model = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, alpha=4, target_modules=targets))
    # Attention blocks: 1 down + 1 mid + 2 up, each with self- and cross-attention, × 4 targets.
    assert len(list(moslora.adapter_layers(model))) == 4 * 2 * 4
    torch.testing.assert_close(model(sample, t, context).sample, base(sample, t, context).sample, atol=0, rtol=0)
    losses = train_steps(model, lambda m: m(sample, t, context).sample.square().mean(), steps=3)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        out = model(sample, t, context).sample
        moslora.merge(model, safe=True)
        torch.testing.assert_close(model(sample, t, context).sample, out, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_unet_convolutions_can_be_adapted_too():
    base = tiny_unet()
    sample, t, context = unet_inputs()
    model = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=2, target_modules=["conv1", "conv2", "conv_in"]))
    kinds = {layer.kind for _, layer in moslora.adapter_layers(model)}
    assert kinds == {"conv"}
    train_steps(model, lambda m: m(sample, t, context).sample.square().mean(), steps=1)
    with torch.no_grad():
        out = model(sample, t, context).sample
        moslora.merge(model)
        torch.testing.assert_close(model(sample, t, context).sample, out, atol=1e-5, rtol=1e-5)


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.q, self.k, self.v, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, ids):
        h = self.embed(ids)
        attn = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4.0, dim=-1)
        return self.out(attn @ self.v(h))


@pytest.mark.parametrize("mixer", [None, "kaiming"])
def test_torch_compile_fullgraph_has_no_graph_break(mixer):
    torch.manual_seed(0)
    model = moslora.inject(TinyBlock(), moslora.MoSLoRAConfig(r=4, dropout=0.1, target_modules=["embed", "q", "k", "v", "out"], mixer=mixer))
    ids = torch.randint(0, 32, (2, 7))
    model.eval()
    expected = model(ids)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids), expected)
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.slow
def test_adapters_add_no_graph_breaks_to_a_transformers_model():
    base = tiny_llama()
    ids = torch.randint(0, 64, (1, 8))
    before = torch._dynamo.explain(base)(ids).graph_break_count
    model = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, target_modules="all-linear"))
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(ids).graph_break_count == before


def test_bitsandbytes_4bit_base_trains_in_train_mode():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    quant = nn.Sequential(
        bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4"), nn.ReLU(),
        bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4"),
    )
    quant.load_state_dict(base.state_dict())
    quant = quant.to("cpu")  # quantizes the weights
    assert quant[0].weight.dtype == torch.uint8
    model = moslora.inject(quant, moslora.MoSLoRAConfig(r=4, target_modules=["0", "2"]))
    assert model[0].lora_A.dtype == torch.float32 and model[0].base_layer.weight.dtype == torch.uint8
    # Train mode only: an eval-mode forward on CPU repacks 4-bit weights (see the README's notes).
    model.train()
    x = torch.randn(8, 64)
    model(x).square().mean().backward()
    assert model[0].lora_A.grad is not None and model[2].lora_B.grad is not None
    assert model[0].base_layer.weight.grad is None


def test_optimum_quanto_int8_base_is_wrapped_trains_and_refuses_an_in_place_merge():
    quanto = pytest.importorskip("optimum.quanto")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    x = torch.randn(4, 32)
    before = model(x)
    moslora.inject(model, moslora.MoSLoRAConfig(r=4, target_modules=["0", "2"]))
    assert type(model[0].base_layer).__name__ == "QLinear"
    assert torch.equal(model(x), before)
    model(x).square().mean().backward()
    assert model[0].lora_A.grad is not None and model[2].lora_B.grad is not None
    # A quantized tensor subclass has no in-place merge: refused by name, before any layer changes,
    # even when another layer could have taken its ΔW.
    model[0].base_layer = nn.Linear(32, 32)
    with pytest.raises(TypeError, match="cannot merge into a QLinear whose weight is WeightQBytesTensor"):
        moslora.merge(model)
    assert not model[0].merged and not model[2].merged


def test_torchao_int8_weight_only_base_is_wrapped_trains_and_refuses_an_in_place_merge():
    torchao_quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig())
    x = torch.randn(4, 32)
    before = model(x)
    moslora.inject(model, moslora.MoSLoRAConfig(r=4, target_modules=["0", "2"]))
    assert type(model[0].base_layer) is nn.Linear and model[0].lora_A.dtype == torch.float32
    assert torch.equal(model(x), before)
    model(x).square().mean().backward()
    assert model[0].lora_A.grad is not None and model[2].lora_B.grad is not None
    with pytest.raises(TypeError, match="cannot merge into a Linear whose weight is Int8Tensor"):
        moslora.merge(model)
    assert not model[0].merged and not model[2].merged
