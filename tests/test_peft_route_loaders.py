"""PEFT's and transformers' own loaders read PEFT-route folders once ``moslora.peft`` is imported, exactly,
and keep refusing them, with the folder's message, in a process that never imported moslora."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import moslora.peft as mp  # noqa: E402
from llm_fixtures import build_tiny_llama  # noqa: E402
from test_peft_route import perturb  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved base model, a PEFT-route adapter on it (mixer, looks trained) saved next to it, and its logits."""
    tmp = tmp_path_factory.mktemp("loaders")
    folder = build_tiny_llama(tmp / "base")
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(0)
    model = get_peft_model(base, mp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], mixer="orthogonal",
                                               task_type="CAUSAL_LM"))
    perturb(model, "default")
    model.eval().save_pretrained(tmp / "adapter")
    ids = torch.randint(4, base.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    return folder, tmp / "adapter", ids, expected


def assert_same(model, trained):
    _, _, ids, expected = trained
    assert sum(".lora_M." in name for name, _ in model.named_parameters()) == 6, "every mixer loaded"
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("auto", [peft.AutoPeftModelForCausalLM, mp.AutoPeftModelForCausalLM], ids=["peft", "moslora.peft"])
def test_auto_peft_model_for_causal_lm_reads_the_folder_exactly(trained, auto):
    assert_same(auto.from_pretrained(trained[1]), trained)


def test_moslora_s_auto_classes_check_every_tensor(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(trained[1], tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "down_proj.lora_M" not in k}, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="down_proj' has no mixer"):
        mp.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert {name for name in mp.__all__ if name.startswith("AutoPeftModel")} == {name for name in peft.__all__ if name.startswith("AutoPeftModel")}


def test_peft_s_load_adapter_adds_the_folder_exactly(trained):
    folder, adapter, _, _ = trained
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), mp.LoraConfig(r=2, target_modules=["q_proj"], mixer=None))
    model.load_adapter(adapter, "loaded")
    model.set_adapter("loaded")
    assert_same(model, trained)


def test_transformers_load_adapter_reads_the_folder_exactly(trained):
    base = AutoModelForCausalLM.from_pretrained(trained[0])
    base.load_adapter(str(trained[1]))
    assert_same(base, trained)


def test_transformers_from_pretrained_and_pipeline_read_an_adapter_folder_exactly(trained):
    assert_same(AutoModelForCausalLM.from_pretrained(trained[1]), trained)
    pipe = transformers.pipeline("text-generation", model=str(trained[1]))
    assert_same(pipe.model, trained)


@pytest.mark.slow
def test_every_loader_refuses_the_folder_in_a_process_without_moslora(trained):
    folder, adapter, _, _ = trained
    script = (
        "import sys, peft, transformers\n"
        "from transformers import AutoModelForCausalLM\n"
        "folder, adapter = sys.argv[1:]\n"
        "attempts = {\n"
        "    'peft AutoPeftModelForCausalLM': lambda: peft.AutoPeftModelForCausalLM.from_pretrained(adapter),\n"
        "    'transformers load_adapter': lambda: AutoModelForCausalLM.from_pretrained(folder).load_adapter(adapter),\n"
        "    'AutoModelForCausalLM adapter folder': lambda: AutoModelForCausalLM.from_pretrained(adapter),\n"
        "    'pipeline': lambda: transformers.pipeline('text-generation', model=adapter),\n"
        "}\n"
        "for what, attempt in attempts.items():\n"
        "    try:\n        attempt()\n        print('LOADED:', what)\n"
        "    except KeyError as e:\n        print('refused:', what, '|', e)\n"
        "assert not any(name.startswith('moslora') for name in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(folder), str(adapter)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("refused:", "LOADED:"))]
    assert len(lines) == 4 and all(line.startswith("refused:") for line in lines), result.stdout
    assert all("moslora.peft.PeftModel.from_pretrained" in line for line in lines)
