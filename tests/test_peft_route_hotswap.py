"""Hot-swapping PEFT-route adapters: moslora.peft.hotswap_adapter swaps A, M and B together and equals the
model loaded fresh from the same folder, or refuses before anything changes. Tiny Llama from a config."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter  # noqa: E402

import moslora.peft as mp  # noqa: E402
from test_peft_route import logits, ours  # noqa: E402
from test_peft_route_refusals import assert_unchanged, state  # noqa: E402
from tiny import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folders of adapters on the same layers: mixers at rank 4, 2 and 8, and plain LoRA at rank 4 and 2."""
    base, root = tiny_llama(), tmp_path_factory.mktemp("hotswap")
    made = {"mixer": ("kaiming", 4, 1), "mixer-r2": ("orthogonal", 2, 2), "mixer-r8": ("kaiming", 8, 3),
            "plain": (None, 4, 4), "plain-r2": (None, 2, 5)}
    for name, (mixer, r, seed) in made.items():
        ours(base, mixer, seed=seed, r=r, lora_alpha=8).save_pretrained(root / name)
    return base, root


def loaded(base, folder):
    return mp.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


@pytest.mark.parametrize("into", ["mixer", "plain"])
@pytest.mark.parametrize("swapped", ["mixer", "mixer-r2", "plain", "plain-r2"])
def test_hotswap_equals_the_model_loaded_fresh_from_the_folder(folders, into, swapped):
    base, root = folders
    if into == "plain" and swapped.startswith("mixer"):
        pytest.skip("refused: test_a_mixer_folder_into_a_plain_adapter_is_refused_unchanged")
    model = loaded(base, root / into)
    mp.hotswap_adapter(model, root / swapped, "default", torch_device="cpu")
    torch.testing.assert_close(logits(model), logits(loaded(base, root / swapped)), atol=1e-6, rtol=1e-6)
    if swapped.endswith("r2") and into == "mixer":  # padded as PEFT pads ranks: M as the top-left block
        M = next(m for m in model.modules() if hasattr(m, "lora_M")).lora_M["default"].weight
        assert M.shape == (4, 4) and not M[2:].any() and not M[:, 2:].any()


def test_a_larger_rank_is_refused_unchanged(folders):
    base, root = folders
    model = loaded(base, root / "mixer")
    before = state(model)
    with pytest.raises(ValueError, match=r"lora_A is \(8, \d+\), adapter .default. holds \(4, \d+\).*Nothing was swapped"):
        mp.hotswap_adapter(model, root / "mixer-r8", "default", torch_device="cpu")
    assert_unchanged(before, model)


def test_a_mixer_folder_into_a_plain_adapter_is_refused_unchanged(folders):
    base, root = folders
    model = loaded(base, root / "plain")
    before = state(model)
    with pytest.raises(ValueError, match="has a mixer .* moslora.peft.load_adapter"):
        mp.hotswap_adapter(model, root / "mixer", "default", torch_device="cpu")
    assert_unchanged(before, model)


def test_a_folder_lacking_a_mixer_its_config_promises_is_refused_unchanged(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    base, root = folders
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((root / "mixer" / "adapter_config.json").read_text())
    weights = load_file(root / "mixer" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if not ("layers.1.mlp.down_proj.lora_M" in k)}, broken / "adapter_model.safetensors")
    model = loaded(base, root / "mixer")
    before = state(model)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj' has no mixer"):
        mp.hotswap_adapter(model, broken, "default", torch_device="cpu")
    assert_unchanged(before, model)


@pytest.mark.xfail(strict=True, reason="PEFT's own hotswap_adapter reads a plain folder with peft.LoraConfig and zero-fills "
                   "every adapter tensor the file lacks; nothing of moslora runs before it writes (short of editing "
                   "PEFT's CONFIG_KEYS_TO_CHECK global), so the mixer is zeroed: use moslora.peft.hotswap_adapter")
def test_peft_s_own_hotswap_of_a_plain_folder_into_a_mixer_adapter_is_refused_unchanged(folders):
    base, root = folders
    model = loaded(base, root / "mixer")
    before = state(model)
    with pytest.raises(ValueError):
        peft_hotswap_adapter(model, str(root / "plain"), "default", torch_device="cpu")
    assert_unchanged(before, model)
