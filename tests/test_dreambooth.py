"""DreamBooth with MoSLoRA on a tiny Stable Diffusion pipeline built offline (UNet, VAE, CLIP text
encoder and a word-level tokenizer, all from configs), and image generation through diffusers'
own LoRA loader and through the merged UNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import moslora
from moslora.eval.generate import adapted_pipeline, generate, write_images
from moslora.train.dreambooth import DIFFUSERS_DIR, DreamBoothRecipe, instance_images, train_dreambooth
from moslora.train.recipe import load_recipe
from tiny import tiny_unet, unet_inputs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PROMPT = "a photo of sks dog"


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate("<unk> <s> </s> <pad> a photo of sks dog on the beach in snow".split())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=8)


def text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=15, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=3, **extra)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, sample_size=16)


def build_tiny_sd(folder: Path) -> Path:
    """A Stable Diffusion pipeline: 16×16 images, 8×8 latents, the tiny UNet of tests/tiny.py."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(text_config()), tokenizer=word_tokenizer(), unet=tiny_unet(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder: Path) -> Path:
    """An SDXL pipeline: two text encoders, a UNet with pooled-text and size/crop ("text_time") conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(text_config()), text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=16)),
        tokenizer=word_tokenizer(), tokenizer_2=word_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
    )
    pipe.save_pretrained(folder)
    return folder


def write_subject(folder: Path, n: int = 3) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # a brown blob on green, at a few sizes (cropped and resized to 16×16)
        pixels = np.full((20 + 4 * i, 24, 3), (40, 160, 40), dtype=np.uint8)
        pixels[6:14, 8:16] = (140, 90, 40)
        Image.fromarray(np.clip(pixels + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    subject = write_subject(tmp_path_factory.mktemp("subject"))
    recipe = DreamBoothRecipe(model=str(tiny), instance_prompt=PROMPT, resolution=16, max_steps=4, save_steps=2, logging_steps=2,
                              batch_size=2, learning_rate=1e-2, precision="fp32")
    return train_dreambooth(data=subject, output=tmp_path_factory.mktemp("db") / "run", recipe=recipe)


def test_defaults_and_recipe_are_the_papers_setting():
    for r in (DreamBoothRecipe(), load_recipe(RECIPES / "dreambooth-sdxl-moslora.yaml", cls=DreamBoothRecipe)):
        assert r.model == "stabilityai/stable-diffusion-xl-base-1.0"
        assert (r.r, r.target_modules, r.learning_rate, r.lr_scheduler) == (4, ["to_q", "to_k", "to_v", "to_out.0"], 1e-4, "constant")
        assert (r.micro_batch_size, r.gradient_accumulation_steps(1), r.max_steps, r.seed, r.mixer) == (1, 4, 500, 0, "kaiming")


def test_an_empty_or_broken_image_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        instance_images(tmp_path)
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"x\.png: not a readable image"):
        instance_images(tmp_path)


@pytest.mark.slow
def test_training_changes_the_unet_adapter_and_writes_both_formats(trained):
    out = trained.output_dir
    assert trained.metrics["steps"] == 4 and [e["step"] for e in trained.metrics["log"]] == [2, 4]
    assert all(np.isfinite(e["loss"]) for e in trained.metrics["log"])
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert (out / DIFFUSERS_DIR / "pytorch_lora_weights.safetensors").is_file() and (out / "loss_curve.png").is_file()
    _, tensors = moslora.read_adapter(out)
    names = {k.rsplit(".", 1)[0] for k in tensors}
    assert names and all(n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) for n in names)
    assert max(t.abs().max().item() for k, t in tensors.items() if k.endswith("lora_B")) > 0  # B starts at zero
    assert json.loads((out / "metrics.json").read_text())["mixed_precision"] == "no"  # CPU: fp32


@pytest.mark.slow
def test_the_diffusers_export_reproduces_the_moslora_unet(trained):
    base = tiny_unet()
    moslora.load_adapter(base, trained.output_dir, trainable=False)
    exported = tiny_unet()
    exported.load_lora_adapter(str(trained.diffusers_dir), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    sample, t, context = unet_inputs()
    with torch.no_grad():
        ours = base(sample, t, context).sample
        theirs = exported(sample, t, context).sample
        with moslora.disabled(base):
            plain = base(sample, t, context).sample
    assert (ours - plain).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_generate_through_load_lora_weights_equals_the_merged_pipeline(tiny, trained, tmp_path):
    kwargs = dict(steps=2, guidance_scale=2.0, seed=0, num_images=2, output_type="np")
    pipe = adapted_pipeline(str(tiny), trained.output_dir, mode="lora")
    lora = generate(pipe, [PROMPT], **kwargs)
    merged = generate(adapted_pipeline(str(tiny), trained.output_dir, mode="merged"), [PROMPT], **kwargs)
    pipe.disable_lora()
    plain = generate(pipe, [PROMPT], **kwargs)
    np.testing.assert_allclose(np.stack(lora), np.stack(merged), atol=1e-4, rtol=0)
    assert np.abs(np.stack(lora) - np.stack(plain)).max() > 1e-3  # and the adapter changed the images
    paths = write_images(generate(pipe, [PROMPT, PROMPT], steps=2), tmp_path / "img")
    assert [p.name for p in paths] == ["000.png", "001.png"]


@pytest.mark.slow
def test_cli_train_and_generate(tiny, tmp_path, capsys):
    from PIL import Image

    from moslora.cli.main import main

    subject = write_subject(tmp_path / "subject", n=2)
    assert main(["train", "--task", "dreambooth", "--model", str(tiny), "--data", str(subject), "--output", str(tmp_path / "run"),
                 "--instance-prompt", PROMPT, "--resolution", "16", "--max-steps", "1", "--batch-size", "2", "--rank", "2",
                 "--precision", "fp32"]) == 0
    assert main(["train", "--task", "dreambooth", "--model", str(tiny), "--data", str(subject), "--output", str(tmp_path / "x"),
                 "--instance-prompt", PROMPT, "--val-set-size", "3"]) == 2
    assert "--val-set-size does not apply to --task dreambooth" in capsys.readouterr().err
    for mode in ("lora", "merged"):
        assert main(["generate", "--model", str(tiny), "--adapter", str(tmp_path / "run"), "--prompt", PROMPT, "--output",
                     str(tmp_path / mode), "--steps", "2", "--mode", mode]) == 0
    lora, merged = (np.asarray(Image.open(tmp_path / m / "000.png"), dtype=int) for m in ("lora", "merged"))
    assert lora.shape == (16, 16, 3) and np.abs(lora - merged).max() <= 1  # PNG rounding of equal images


@pytest.mark.slow
def test_sdxl_pipeline_trains_with_its_extra_conditioning_and_both_generate_paths_agree(tmp_path):
    tiny = build_tiny_sdxl(tmp_path / "sdxl")
    recipe = DreamBoothRecipe(model=str(tiny), instance_prompt=PROMPT, resolution=16, max_steps=2, batch_size=2, learning_rate=1e-2,
                              precision="fp32")
    result = train_dreambooth(data=write_subject(tmp_path / "subject", n=2), output=tmp_path / "run", recipe=recipe)
    assert result.metrics["steps"] == 2 and np.isfinite(result.metrics["train_loss"])
    kwargs = dict(steps=2, guidance_scale=2.0, seed=0, output_type="np")
    lora = generate(adapted_pipeline(str(tiny), result.output_dir, mode="lora"), [PROMPT], **kwargs)
    merged = generate(adapted_pipeline(str(tiny), result.output_dir, mode="merged"), [PROMPT], **kwargs)
    np.testing.assert_allclose(np.stack(lora), np.stack(merged), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_training_after_a_bf16_trainer_in_the_same_process_gets_the_recipes_precision(tiny, tmp_path):
    # A transformers Trainer with bf16 on CPU (moslora compare's siqa, a user's notebook) leaves
    # accelerate's process-wide state at bf16; DreamBooth in fp32 must still train, in fp32.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # as in a fresh process whose first Accelerator is a bf16 Trainer's
    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    recipe = DreamBoothRecipe(model=str(tiny), instance_prompt=PROMPT, resolution=16, max_steps=1, batch_size=2, precision="fp32")
    result = train_dreambooth(data=write_subject(tmp_path / "subject", n=2), output=tmp_path / "run", recipe=recipe)
    assert result.metrics["steps"] == 1 and np.isfinite(result.metrics["train_loss"])
    assert Accelerator().mixed_precision == "no"
