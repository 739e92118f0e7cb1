"""LLaVA visual instruction tuning with MoSLoRA adapter groups, on a tiny LLaVA built offline:
a 2-layer CLIP vision tower and a 2-layer Llama, a word-level tokenizer and a CLIP image
processor made in code, tiny generated images."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import moslora
from moslora.io.groups import MANIFEST_NAME, save_adapter_groups
from moslora.io.load import load_adapter_groups
from moslora.model.groups import adapter_groups, inject_groups
from moslora.train.data import IGNORE_INDEX
from moslora.train.llava import (
    LANGUAGE_MODEL,
    LLAVA_SYSTEM,
    VISION_TOWER,
    ConversationCollator,
    ConversationDataset,
    LlavaRecipe,
    export_merged_llava,
    load_llava,
    read_conversations,
    train_llava,
)
from moslora.train.recipe import load_recipe
from tiny import perturb

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
WORDS = "USER ASSISTANT: what colour is the picture ? it is red green blue describe image a square"


def build_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """Save a tiny LlavaForConditionalGeneration and its processor to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in (WORDS, LLAVA_SYSTEM) for w, _ in splitter.pre_tokenize_str(text)})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no torchvision here: the PIL image processor is used
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8, projection_dim=32),
        # sizes multiple of 32: bitsandbytes' 4-bit CPU kernels need it
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                bos_token_id=1, eos_token_id=2, pad_token_id=3),
        image_token_index=vocab["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_images_and_rows(folder: Path, n: int = 12) -> tuple[Path, Path]:
    """Solid-colour images (with a little noise) and questions about their colour."""
    import numpy as np
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 15, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the picture ?"},
            {"from": "gpt", "value": f"it is {colour}"},
            {"from": "human", "value": "describe the image"},
            {"from": "gpt", "value": f"a {colour} square"},
        ]})
    data = folder / "llava.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    return data, images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_images_and_rows(tmp_path_factory.mktemp("llava-data"))


def quick(**changes):
    """A short run of the paper's recipe on the tiny model (bigger lr: 4 steps must move the adapter)."""
    settings = dict(r=4, alpha=8, vision_r=4, vision_alpha=1, batch_size=4, micro_batch_size=2, max_steps=4,
                    learning_rate=1e-2, logging_steps=1, save_steps=2, precision="fp32")
    return LlavaRecipe(**{**settings, **changes})


def test_defaults_are_the_papers_llava_setting():
    r = LlavaRecipe()
    groups = r.adapter_groups()
    llm, vision = groups[LANGUAGE_MODEL], groups[VISION_TOWER]
    assert (llm.r, llm.alpha, llm.dropout, llm.mixer) == (64, 128.0, 0.05, "kaiming")
    assert (vision.r, vision.alpha, vision.dropout) == (64, 16.0, 0.05)
    assert (r.learning_rate, r.num_epochs, r.warmup_ratio, r.lr_scheduler) == (2e-5, 1.0, 0.03, "cosine")
    assert LlavaRecipe(method="lora").adapter_groups()[VISION_TOWER].mixer is None
    assert list(LlavaRecipe(vision_r=0).adapter_groups()) == [LANGUAGE_MODEL]


@pytest.mark.parametrize("name, quantize", [("llava-llama3-8b-moslora.yaml", None), ("llava-llama3-8b-qmoslora.yaml", "4bit")])
def test_shipped_recipes_are_the_papers_two_settings(name, quantize):
    r = load_recipe(RECIPES / name, cls=LlavaRecipe)
    assert (r.r, r.alpha, r.vision_r, r.vision_alpha, r.dropout, r.vision_dropout) == (64, 128.0, 64, 16.0, 0.05, 0.05)
    assert (r.learning_rate, r.num_epochs, r.warmup_ratio, r.lr_scheduler, r.method, r.quantize) == (2e-5, 1.0, 0.03, "cosine", "moslora", quantize)


def test_loss_sees_only_the_answers_and_images_are_processed(tiny, data):
    _, processor = load_llava(str(tiny), precision="fp32")
    rows = read_conversations(*data, image_token=processor.image_token)
    ds = ConversationDataset(processor, rows.rows[:2], system_prompt="", cutoff_len=256)
    example = ds[0]
    ids, labels = example["input_ids"], example["labels"]
    assert ids.count(processor.image_token_id) == 16  # (32/8)² patches, CLS dropped by the "default" strategy
    learned = processor.tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert learned.split() == ["it", "is", "red", "</s>", "a", "red", "square", "</s>"]
    assert all(l == IGNORE_INDEX for t, l in zip(ids, labels) if t == processor.image_token_id)
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["input_ids"].shape == batch["labels"].shape


def test_the_processors_chat_template_can_format_the_rows(tiny, data):
    _, processor = load_llava(str(tiny), precision="fp32")
    processor.chat_template = (
        "{% for m in messages %}{{ m['role'] }} :{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>"
        "{% else %} {{ c['text'] }}{% endif %}{% endfor %} </s>{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
    )
    rows = read_conversations(*data, image_token=processor.image_token)
    example = ConversationDataset(processor, rows.rows[1:2], system_prompt="", cutoff_len=256, template="chat")[0]
    ids, labels = example["input_ids"], example["labels"]
    assert ids.count(processor.image_token_id) == 16
    learned = processor.tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert learned.split() == ["it", "is", "green", "</s>", "a", "green", "square", "</s>"]
    with pytest.raises(ValueError, match="template must be one of"):
        LlavaRecipe(template="vicuna")


def test_bad_rows_are_named_or_skipped_and_counted(tiny, data, tmp_path):
    path, images = data
    rows = json.loads(path.read_text())
    bad = [dict(rows[0]), dict(rows[1]), dict(rows[2]), rows[3]]
    bad[0]["image"] = "missing.png"
    del bad[1]["conversations"]
    bad[2]["conversations"] = [{"from": "gpt", "value": "hi"}]
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json: row 1: image .*missing\.png.* does not exist"):
        read_conversations(bad_file, images)
    read = read_conversations(bad_file, images, skip_bad_rows=True)
    assert read.skipped == [1, 2, 3] and len(read.rows) == 1
    (images / "broken.png").write_bytes(b"not an image")
    bad_file.write_text(json.dumps([{**rows[0], "image": "broken.png"}]))
    with pytest.raises(ValueError, match=r"row 1: image .*broken\.png.* cannot be read"):
        read_conversations(bad_file, images)


def test_groups_have_their_own_settings_and_save_load_merge_work_on_the_whole_model(tiny, tmp_path):
    model, _ = load_llava(str(tiny), precision="fp32")
    groups = {LANGUAGE_MODEL: moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
              VISION_TOWER: moslora.MoSLoRAConfig(r=2, alpha=1, target_modules="all-linear")}
    inject_groups(model, groups)
    assert adapter_groups(model) == groups
    layers = dict(moslora.adapter_layers(model))
    assert {n.split(".layers")[0] for n in layers} == {"model.language_model", "model.vision_tower.encoder"}
    assert {l.scaling for n, l in layers.items() if n.startswith(LANGUAGE_MODEL)} == {2.0}
    assert {l.scaling for n, l in layers.items() if n.startswith(VISION_TOWER)} == {0.5}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # projector, embeddings, head: frozen
    with pytest.raises(ValueError, match="already has MoSLoRA adapters"):
        inject_groups(model, groups)

    perturb(model)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.tensor([[1] + [4] * 16 + [5, 6, 7]]), "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        with moslora.disabled(model):
            base = model(**inputs).logits
    assert (adapted - base).abs().max() > 1e-3

    save_adapter_groups(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / MANIFEST_NAME).read_text())["groups"] == [VISION_TOWER, LANGUAGE_MODEL]
    fresh, _ = load_llava(str(tiny), precision="fp32")
    load_adapter_groups(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, adapted, atol=1e-5, rtol=0)
        merged = moslora.merge_and_unload(fresh)
        assert not list(moslora.adapter_layers(merged)) and adapter_groups(merged) == {}
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-4, rtol=0)


def test_groups_must_be_distinct_existing_submodules_of_a_model_without_adapters(tmp_path):
    from tiny import tiny_llama

    model = tiny_llama()
    config = moslora.MoSLoRAConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="overlap"):
        inject_groups(model, {"model": config, "model.layers.0": config})
    with pytest.raises(ValueError, match="no such submodule"):
        inject_groups(model, {"model.vision_tower": config})
    with pytest.raises(ValueError, match="matched no module"):  # a failed group leaves nothing behind
        inject_groups(model, {"model.layers.0": config, "model.layers.1": config.replace(target_modules=["nope"])})
    assert not list(moslora.adapter_layers(model)) and adapter_groups(model) == {}
    moslora.inject(model, config)
    assert adapter_groups(model) == {"": config}  # a model injected as a whole is the one-group case
    with pytest.raises(ValueError, match="save it with moslora.save_adapter"):
        save_adapter_groups(model, tmp_path)


def test_loading_a_mismatched_group_leaves_the_base_model_untouched(tiny, tmp_path):
    model, _ = load_llava(str(tiny), precision="fp32")
    inject_groups(model, {LANGUAGE_MODEL: moslora.MoSLoRAConfig(r=4), VISION_TOWER: moslora.MoSLoRAConfig(r=2)})
    save_adapter_groups(model, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    manifest["groups"] = [LANGUAGE_MODEL, "model.multi_modal_projector"]
    (tmp_path / "a" / MANIFEST_NAME).write_text(json.dumps(manifest))
    fresh, _ = load_llava(str(tiny), precision="fp32")
    with pytest.raises(FileNotFoundError):
        load_adapter_groups(fresh, tmp_path / "a")
    assert not list(moslora.adapter_layers(fresh))


@pytest.fixture(scope="module")
def run4(tiny, data, tmp_path_factory):
    """Four optimizer steps of two micro-batches, checkpoints at steps 2 and 4."""
    path, images = data
    return train_llava(str(tiny), path, images, tmp_path_factory.mktemp("llava-run") / "run", recipe=quick())


@pytest.mark.slow
def test_training_changes_both_groups_and_the_merged_export_is_the_adapted_model(tiny, data, run4, tmp_path):
    path, images = data
    result = run4
    out = result.output_dir
    assert result.metrics["steps"] == 4 and result.metrics["train_rows"] == 12
    assert (out / MANIFEST_NAME).is_file() and (out / "checkpoint-4" / MANIFEST_NAME).is_file()
    assert (out / "loss_curve.png").is_file() and json.loads((out / "metrics.json").read_text())["task"] == "llava"
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # adapter-only, pickle-free

    model, processor = load_llava(str(tiny), precision="fp32")
    load_adapter_groups(model, out, trainable=False)
    for prefix in (LANGUAGE_MODEL, VISION_TOWER):
        moved = [l.lora_B.abs().max().item() for n, l in moslora.adapter_layers(model) if n.startswith(prefix)]
        assert max(moved) > 0, f"no adapter of {prefix} learned"  # B starts at zero

    merged_dir = export_merged_llava(str(tiny), out, tmp_path / "merged", precision="fp32")
    from transformers import LlavaForConditionalGeneration

    plain = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert not list(moslora.adapter_layers(plain))
    ds = ConversationDataset(processor, read_conversations(path, images).rows[:1], system_prompt="", cutoff_len=256)
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([ds[0]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(tiny, data, run4, tmp_path):
    """Interrupted after step 3 (last checkpoint: 2), resumed: equal to 4 uninterrupted steps.
    Adapter dropout is on, so this also checks that the RNG state is restored."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from moslora.hf.state import last_checkpoint

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    path, images = data
    with pytest.raises(KeyboardInterrupt):
        train_llava(str(tiny), path, images, tmp_path / "resumed", recipe=quick(), callbacks=[Crash()])
    assert last_checkpoint(tmp_path / "resumed").name == "checkpoint-2"
    train_llava(str(tiny), path, images, tmp_path / "resumed", recipe=quick(), resume=True)
    for group in (LANGUAGE_MODEL, VISION_TOWER):
        straight = load_file(run4.output_dir / group / "adapter_model.safetensors")
        resumed = load_file(tmp_path / "resumed" / group / "adapter_model.safetensors")
        assert straight.keys() == resumed.keys()
        for k in straight:
            torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=f"{group}: {k}")


def test_cli_task_llava_runs_and_names_a_bad_row(tiny, data, tmp_path, capsys):
    from moslora.cli.main import main

    path, images = data
    common = ["train", "--task", "llava", "--model", str(tiny), "--image-folder", str(images), "--r", "4", "--alpha", "8",
              "--vision-r", "2", "--vision-alpha", "1", "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "1",
              "--precision", "fp32"]
    assert main(common + ["--data", str(path), "--output", str(tmp_path / "cli"), "--merged-output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "cli" / VISION_TOWER / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "processor_config.json").is_file()
    rows = json.loads(path.read_text())
    rows[1] = {"image": "1.png"}
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    assert main(common + ["--data", str(tmp_path / "bad.json"), "--output", str(tmp_path / "bad")]) == 2
    assert "bad.json: row 2: missing field 'conversations'" in capsys.readouterr().err


@pytest.mark.slow
def test_qlora_4bit_step_trains_the_adapters(tiny, data, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    path, images = data
    result = train_llava(str(tiny), path, images, tmp_path / "q", recipe=quick(quantize="4bit", max_steps=2, save_steps=10))
    assert result.metrics["steps"] == 2
    model, _ = load_llava(str(tiny), precision="fp32", quantize="4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.language_model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.vision_tower.modules())
    load_adapter_groups(model, result.output_dir, trainable=False)
    for prefix in (LANGUAGE_MODEL, VISION_TOWER):
        assert max(l.lora_B.abs().max().item() for n, l in moslora.adapter_layers(model) if n.startswith(prefix)) > 0


def test_peft_export_of_the_groups_is_the_adapted_model(tiny, tmp_path):
    """One PEFT adapter for the whole model, each group's alpha/r kept through alpha_pattern."""
    from peft import PeftModel

    model, _ = load_llava(str(tiny), precision="fp32")
    inject_groups(model, {LANGUAGE_MODEL: moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                          VISION_TOWER: moslora.MoSLoRAConfig(r=2, alpha=1, target_modules=["q_proj", "fc1"])})
    perturb(model)
    save_adapter_groups(model, tmp_path / "groups")
    moslora.export_lora(tmp_path / "groups", tmp_path / "peft")  # a groups directory: the whole model's adapter
    with pytest.raises(ValueError, match="format='peft' only"):
        moslora.export_lora(model, tmp_path / "d", format="diffusers")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 1)  # the first group in model order: the vision tower
    assert set(config["rank_pattern"].values()) == {4} and set(config["alpha_pattern"].values()) == {8}
    base, _ = load_llava(str(tiny), precision="fp32")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.tensor([[1] + [4] * 16 + [5, 6, 7]]), "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    model.eval()
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, peft_model(**inputs).logits
        with moslora.disabled(model):
            plain = model(**inputs).logits
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
