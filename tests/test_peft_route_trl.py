"""TRL through the PEFT route: ``peft_config=moslora.peft.LoraConfig(...)`` behaves as PEFT's own.

Each trainer runs on a tiny offline Llama in fp32 (``bf16=False``: TRL's configs default to bf16 even on
a CPU). Without a mixer the run is PEFT's, loss for loss; with one, the reference of DPO, KTO and GRPO is
the adapter turned off (TRL builds no second model), a classification head is trained and saved, and
what the trainer saves loads back exactly with ``moslora.peft`` and is refused by stock PEFT.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed  # noqa: E402

import moslora.peft as mp  # noqa: E402
from llm_fixtures import build_tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
ARGS = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
            bf16=False, seed=0, data_seed=0, disable_tqdm=True, save_strategy="no", dataloader_num_workers=0)
PROMPTS = ["is apple a fruit?", "is stone a fruit?", "is pear a fruit?", "is chair a fruit?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def config(mixer="kaiming", **fields):
    return mp.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, mixer=mixer, **fields)


def causal_lm(tiny):
    set_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny)


def preferences():
    return Dataset.from_dict({"prompt": PROMPTS, "chosen": [" true", " false", " true", " false"],
                              "rejected": [" false", " true", " false", " true"]})


def losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def mixers(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_M." in n}


def assert_saved_and_reloaded(trainer, folder: Path, base, inputs) -> None:
    """The trainer's folder, loaded by moslora.peft and (moslora.peft imported) by PEFT's own loader to the
    trained model's outputs. Without moslora PEFT refuses it (test_peft_route_loaders)."""
    trainer.save_model(str(folder))
    model = trainer.model.eval()
    for load in (peft.PeftModel.from_pretrained, mp.PeftModel.from_pretrained):
        reloaded = load(copy.deepcopy(base), folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


# ----- SFT ------------------------------------------------------------------------------------------
def sft(tiny, tmp_path, peft_config):
    data = Dataset.from_dict({"text": [f"{p} {a}" for p, a in zip(PROMPTS, ["true", "false", "true", "false"])] * 2})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=32, **ARGS)
    trainer = trl.SFTTrainer(model=causal_lm(tiny), args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(tiny),
                             peft_config=peft_config)
    return trainer


@pytest.mark.slow
def test_sft_without_a_mixer_is_peft_s_run_loss_for_loss(tiny, tmp_path):
    ours = sft(tiny, tmp_path / "ours", config(mixer=None))
    ours.train()
    theirs = sft(tiny, tmp_path / "theirs", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    theirs.train()
    assert losses(ours) == losses(theirs) and len(losses(ours)) == 2


@pytest.mark.slow
def test_sft_trains_the_mixer_and_saves_what_moslora_peft_loads(tiny, tmp_path):
    trainer = sft(tiny, tmp_path, config())
    assert isinstance(trainer.model, peft.PeftModel)
    before = mixers(trainer.model)
    assert before
    trainer.train()
    after = mixers(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in before), "every mixer learns"
    inputs = trainer.processing_class(PROMPTS[:2], return_tensors="pt", padding=True)
    assert_saved_and_reloaded(trainer, tmp_path / "adapter", causal_lm(tiny), inputs)


# ----- DPO, KTO, GRPO: the reference is the adapter turned off ------------------------------------
def dpo(tiny, tmp_path, model, peft_config=None):
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=32, **ARGS)
    return trl.DPOTrainer(model=model, args=args, train_dataset=preferences(), processing_class=AutoTokenizer.from_pretrained(tiny),
                          peft_config=peft_config)


def first_step(trainer) -> dict:
    return next(row for row in trainer.state.log_history if "loss" in row)


@pytest.mark.slow
def test_dpo_uses_the_adapter_turned_off_as_its_reference(tiny, tmp_path):
    trainer = dpo(tiny, tmp_path, causal_lm(tiny), config())
    assert trainer.ref_model is None, "no second model"
    trainer.train()
    step = first_step(trainer)
    # B starts at zero, so the policy is the reference at step 1: loss ln 2, no reward margin.
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert step["rewards/chosen"] == pytest.approx(0, abs=1e-6) and step["rewards/rejected"] == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_dpo_from_a_trained_sft_adapter_starts_from_that_adapter_as_its_reference(tiny, tmp_path):
    sft_trainer = sft(tiny, tmp_path / "sft", config())
    sft_trainer.train()
    sft_trainer.save_model(str(tmp_path / "sft-adapter"))
    policy = mp.PeftModel.from_pretrained(causal_lm(tiny), tmp_path / "sft-adapter", is_trainable=True)
    trainer = dpo(tiny, tmp_path / "dpo", policy)
    assert trainer.ref_model is None and set(policy.peft_config) == {"default", "ref"}
    # TRL copies the adapter into a frozen "ref" adapter by parameter name; the mixer is named as A and B are.
    trained = mixers(policy)
    assert all(torch.equal(trained[n], trained[n.replace(".default.", ".ref.")]) for n in trained if ".default." in n)
    trainer.train()
    step = first_step(trainer)
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert step["rewards/chosen"] == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_kto_uses_the_adapter_turned_off_as_its_reference(tiny, tmp_path):
    data = Dataset.from_dict({"prompt": PROMPTS, "completion": [" true", " true", " false", " false"], "label": [True, False, False, True]})
    args = trl.KTOConfig(output_dir=str(tmp_path), max_length=32, **ARGS)
    trainer = trl.KTOTrainer(model=causal_lm(tiny), args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(tiny),
                             peft_config=config())
    assert trainer.ref_model is None
    before = mixers(trainer.model)
    trainer.train()
    assert first_step(trainer)["loss"] == pytest.approx(0.5, abs=1e-6)  # KTO at policy = reference: 1 - σ(0)
    assert any(not torch.equal(before[n], p) for n, p in mixers(trainer.model).items())


@pytest.mark.slow
def test_grpo_uses_the_adapter_turned_off_as_its_reference(tiny, tmp_path):
    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = trl.GRPOConfig(output_dir=str(tmp_path), num_generations=2, max_completion_length=4, beta=0.1, **ARGS)
    trainer = trl.GRPOTrainer(model=causal_lm(tiny), reward_funcs=length_reward, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                              processing_class=AutoTokenizer.from_pretrained(tiny), peft_config=config())
    assert trainer.ref_model is None
    trainer.train()
    kl = [row["kl"] for row in trainer.state.log_history if "kl" in row]
    assert kl and kl[0] == pytest.approx(0, abs=1e-6), "at step 1 the policy is the reference"


# ----- Reward: a classification head, trained and saved ---------------------------------------------
@pytest.mark.slow
def test_reward_trains_and_saves_the_classification_head(tiny, tmp_path):
    def classifier():
        set_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    args = trl.RewardConfig(output_dir=str(tmp_path), max_length=32, **ARGS)
    data = Dataset.from_dict({"chosen": [f"{p} true" for p in PROMPTS], "rejected": [f"{p} false" for p in PROMPTS]})
    trainer = trl.RewardTrainer(model=classifier(), args=args, train_dataset=data, processing_class=tokenizer,
                                peft_config=config(task_type="SEQ_CLS"))
    head = trainer.model.base_model.model.score
    before = head.modules_to_save["default"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(head.modules_to_save["default"].weight, before), "the head learns"
    inputs = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    trainer.save_model(str(tmp_path / "adapter"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.score.weight" in f.keys()
    reloaded = mp.PeftModel.from_pretrained(classifier(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trainer.model.eval()(**inputs).logits, atol=1e-5, rtol=1e-5)
