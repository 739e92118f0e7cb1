"""TRL's trainers on the native route (``moslora.inject`` + ``adapter_trainer``) with PEFT's semantics.

The reference of DPO, KTO, GRPO and RLOO is the policy as training started (a fresh adapter off, a
trained one frozen as it was): checked against PEFT itself (TRL handed a PEFT model with the same
trained A and B gives the same step-1 loss, rewards and log-probabilities), against ln 2 / 0.5 and
zero rewards after SFT (continued or merged in), and against the log-probabilities of the starting
policy, computed directly, while the policy moves away from it; never a second model. RewardTrainer trains and saves the new
``score`` head, which reloads exactly and exports to a PEFT adapter that stock PEFT loads. What
cannot have these semantics is refused when the trainer is built, naming the module or trainer.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import moslora
from llm_fixtures import build_tiny_llama
from moslora.hf import adapter_trainer
from moslora.hf.reference import InitialPolicyReference
from tiny import perturb

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
PROMPT = "Please answer the following question with true or false, question: is apple a fruit?"
# Step-1 numbers TRL logs, compared between runs (lr = 0, so the logged step is the starting model).
LOGGED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")  # kl: KTO's


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny)


def in_memory(tiny: Path, cls=AutoModelForCausalLM, **kwargs):
    """The tiny base as a model built in memory: TRL cannot load it again from ``_name_or_path``."""
    model = cls.from_pretrained(tiny, **kwargs)
    model.config._name_or_path = ""
    return model


def no_second_model(monkeypatch) -> None:
    """Make any attempt by TRL to load a reference model (a copy of the base) fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("TRL loaded a second model")

    for module in ("dpo_trainer", "kto_trainer", "grpo_trainer", "rloo_trainer"):
        monkeypatch.setattr(f"trl.trainer.{module}.create_model_from_path", refuse)


def preference_data(kind: str) -> Dataset:
    if kind == "dpo":
        return Dataset.from_dict({"prompt": [PROMPT] * 4, "chosen": [" the correct answer is true"] * 4,
                                  "rejected": [" the correct answer is false"] * 4})
    return Dataset.from_dict({"prompt": [PROMPT] * 4, "completion": [" the correct answer is true", " the correct answer is false"] * 2,
                              "label": [True, False] * 2})


def step_one(kind: str, model, tokenizer, out: Path, trainer_class=None, learning_rate: float = 0.0, **config):
    """One step (at learning rate 0 the logged numbers are the starting model's); returns the trainer and its log."""
    trainer_class = trainer_class or adapter_trainer(trl.DPOTrainer if kind == "dpo" else trl.KTOTrainer)
    config_class = trl.DPOConfig if kind == "dpo" else trl.KTOConfig
    args = config_class(output_dir=str(out), max_steps=1, per_device_train_batch_size=4, learning_rate=learning_rate, report_to="none",
                        use_cpu=True, bf16=False, logging_steps=1, disable_tqdm=True, save_strategy="no", seed=0, **config)
    trainer = trainer_class(model=model, args=args, train_dataset=preference_data(kind), processing_class=tokenizer)
    trainer.train()
    return trainer, trainer.state.log_history[0]


def copy_adapter_into_peft(theirs, ours) -> None:
    """Set the PEFT LoRA model ``theirs`` to ``ours``'s A and B (``ours`` has no mixer)."""
    with torch.no_grad():
        for name, layer in moslora.adapter_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)


# ----- the reference: PEFT as the oracle ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_from_a_trained_adapter_the_reference_is_the_starting_policy_as_peft_gives_it(kind, tiny, tokenizer, tmp_path, monkeypatch):
    """A trained (non-zero) adapter on a model built in memory: moslora's step-1 numbers equal TRL's
    for a PEFT model handed in with the same trained A and B (TRL then keeps a frozen copy of that
    adapter as the reference): loss ln 2 (KTO 0.5), zero rewards, the same log-probabilities; with
    and without precomputed reference log-probs; no second model is loaded."""
    base = in_memory(tiny)
    torch.manual_seed(0)
    ours = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, alpha=8, mixer=None, target_modules=TARGETS))
    perturb(ours, std=0.3)
    theirs_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    copy_adapter_into_peft(theirs_model, ours)
    theirs_class = trl.DPOTrainer if kind == "dpo" else trl.KTOTrainer
    _, theirs = step_one(kind, theirs_model, tokenizer, tmp_path / "peft", trainer_class=theirs_class)

    no_second_model(monkeypatch)
    trainer, got = step_one(kind, ours, tokenizer, tmp_path / "ours")
    reference = trainer.ref_model
    assert isinstance(reference, InitialPolicyReference) and reference.policy() is trainer.model and reference.keeps_a_copy
    assert sum(p.numel() for p in reference.parameters()) == 1  # DeepSpeed's placeholder; no weight of the base
    _, precomputed = step_one(kind, ours, tokenizer, tmp_path / "pre", precompute_ref_log_probs=True)

    keys = [k for k in theirs if k.startswith(LOGGED)]
    assert len(keys) >= 4 and all(k in got for k in keys)
    for key in keys:
        assert got[key] == pytest.approx(theirs[key], abs=2e-5), key
        assert precomputed[key] == pytest.approx(got[key], abs=2e-6), key
    assert got["loss"] == pytest.approx(math.log(2) if kind == "dpo" else 0.5, abs=1e-6)
    assert all(v == 0 for k, v in got.items() if k.startswith("rewards/") and not k.endswith(("accuracies", "count")))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_after_sft_merged_in_a_fresh_adapter_starts_at_the_neutral_loss_with_zero_rewards(kind, tiny, tokenizer, tmp_path):
    """SFT, merge the SFT adapter in, inject a fresh one: the reference is the SFT model, which is
    the policy at step 1, so DPO's loss is ln 2 (KTO's 1 - sigmoid(0) = 0.5) and every reward 0."""
    model = moslora.inject(in_memory(tiny), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                         report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no", max_length=64)
    sft = adapter_trainer(trl.SFTTrainer)(model=model, args=args, processing_class=tokenizer,
                                          train_dataset=Dataset.from_dict({"text": [PROMPT + " the correct answer is true"] * 8}))
    sft.train()
    sft_model = moslora.merge_and_unload(sft.model)
    model = moslora.inject(sft_model, moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    _, log = step_one(kind, model, tokenizer, tmp_path / kind)
    neutral = math.log(2) if kind == "dpo" else 0.5
    assert log["loss"] == torch.tensor(neutral, dtype=torch.float32).item()
    rewards = [v for k, v in log.items() if k.startswith("rewards/") and not k.endswith(("accuracies", "count"))]
    assert rewards and all(v == 0 for v in rewards)


def test_an_explicit_ref_model_is_honoured_also_through_a_pass_through_subclass(tiny, tokenizer, tmp_path):
    class MyDPOTrainer(trl.DPOTrainer):  # a user's subclass: its arguments are read as DPOTrainer's
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    model = moslora.inject(in_memory(tiny), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    mine = in_memory(tiny)
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    data = preference_data("dpo")
    trainer = adapter_trainer(MyDPOTrainer)(model, mine, args, train_dataset=data, processing_class=tokenizer)
    assert trainer.ref_model is mine
    trainer = adapter_trainer(MyDPOTrainer)(model, args=args, train_dataset=data, processing_class=tokenizer)
    assert isinstance(trainer.ref_model, InitialPolicyReference) and trainer.ref_model.policy() is model


def base_log_probs(base, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """log p(token) of the last ``n`` tokens of ``ids`` under ``base``, computed directly."""
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask).logits[:, -n - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, -n:, None])[..., 0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["GRPOTrainer", "RLOOTrainer"])
def test_grpo_and_rloo_with_a_kl_term_score_against_the_starting_policy_without_a_copy(name, tiny, tokenizer, tmp_path, monkeypatch):
    """GRPO and RLOO take no reference model: with beta > 0 they get the policy as training started.
    From a trained adapter, the reference log-probabilities of the second step are the starting
    policy's own, token for token, though the policy has moved by then."""
    model = moslora.inject(in_memory(tiny), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    perturb(model, std=0.3)
    start = copy.deepcopy(model)
    no_second_model(monkeypatch)
    captured = {}

    class Capture(adapter_trainer(getattr(trl, name))):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            captured.clear()
            captured.update(output)
            if "ref_per_token_logps" not in output:  # RLOO folds the reference into the rewards: recompute it as it does
                ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
                mask = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
                n = output["completion_ids"].shape[1]
                captured["ref_per_token_logps"] = self._get_per_token_logps_and_entropies(self.ref_model, ids, mask, n)[0]
            return output

    config_class = getattr(trl, name.replace("Trainer", "Config"))
    args = config_class(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                        beta=0.1, learning_rate=5e-2, report_to="none", use_cpu=True, bf16=False, logging_steps=1, disable_tqdm=True,
                        save_strategy="no", seed=0)
    trainer = Capture(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions], args=args,
                      train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 8}), processing_class=tokenizer)
    assert args.beta == trainer.args.beta == trainer.beta == 0.1 and isinstance(trainer.ref_model, InitialPolicyReference)
    trainer.train()
    ids = torch.cat([captured["prompt_ids"], captured["completion_ids"]], 1)
    mask = torch.cat([captured["prompt_mask"], captured["completion_mask"]], 1)
    n = captured["completion_ids"].shape[1]
    keep = captured["completion_mask"].bool()
    expected = base_log_probs(start, ids, mask, n)
    torch.testing.assert_close(captured["ref_per_token_logps"][keep], expected[keep], rtol=0, atol=1e-5)
    policy = base_log_probs(trainer.model, ids, mask, n)
    assert (policy - expected)[keep].abs().max() > 1e-3  # the policy has moved away from its reference
    with moslora.disabled(start):
        assert (base_log_probs(start, ids, mask, n) - expected)[keep].abs().max() > 1e-3  # and the reference is not the base


# ----- refused when the trainer is built ---------------------------------------------------------------------
def test_sync_ref_model_and_modules_to_save_are_refused_with_the_initial_policy_reference(tiny, tokenizer, tmp_path):
    model = moslora.inject(in_memory(tiny), moslora.MoSLoRAConfig(r=4, target_modules=TARGETS))
    data = preference_data("dpo")
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, sync_ref_model=True)
    with pytest.raises(ValueError, match="AdapterDPOTrainer: sync_ref_model=True .* policy itself as training started"):
        adapter_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=0.1, sync_ref_model=True)
    with pytest.raises(ValueError, match="AdapterGRPOTrainer: sync_ref_model=True"):
        adapter_trainer(trl.GRPOTrainer)(model=model, reward_funcs=len, args=args, train_dataset=data)
    assert args.beta == 0.1
    with pytest.raises(TypeError, match="AdapterRLOOTrainer: pass args="):
        adapter_trainer(trl.RLOOTrainer)(model=model, reward_funcs=len, train_dataset=data)

    saving = moslora.inject(in_memory(tiny), moslora.MoSLoRAConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"modules_to_save \['lm_head'\] train in place"):
        adapter_trainer(trl.DPOTrainer)(model=saving, args=args, train_dataset=data, processing_class=tokenizer)


def test_trl_trainers_that_copy_or_move_their_reference_are_refused_without_a_ref_model(tiny, tmp_path):
    from trl.experimental.a2po import A2POTrainer
    from trl.experimental.bema_for_ref_model import DPOTrainer as BEMADPOTrainer
    from trl.experimental.online_dpo import OnlineDPOTrainer

    model = moslora.inject(in_memory(tiny), moslora.MoSLoRAConfig(r=4, target_modules=TARGETS))
    for cls, why, alternative in ((OnlineDPOTrainer, "deep-copies the policy", "Pass a ref_model= of your own"),
                                  (A2POTrainer, "always deep-copies", "Use trl.DPOTrainer"),
                                  (BEMADPOTrainer, r"\(BEMA\)", "Pass a ref_model= of your own")):  # BEMA's __init__(*args, **kwargs) is looked through
        with pytest.raises(ValueError, match=f"Adapter{cls.__name__} .*{why}.*{alternative}"):
            adapter_trainer(cls)(model=model, args=None)


@pytest.mark.parametrize("name", ["SFTTrainer", "DPOTrainer"])
def test_an_adapter_on_the_output_layer_is_refused_where_trl_reads_its_weight(name, tiny, tmp_path):
    """TRL's fused LM head reads lm_head.weight (the frozen base weight, through the wrapper) and never
    calls the layer, so its adapter would not train: refused, naming the module."""
    model = moslora.inject(in_memory(tiny), moslora.MoSLoRAConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert model.lm_head.weight is model.lm_head.base_layer.weight
    with pytest.raises(ValueError, match=f"Adapter{name} computes log-probabilities from lm_head.weight .* 'lm_head' would be skipped"):
        adapter_trainer(getattr(trl, name))(model=model, args=None)


@pytest.mark.slow
def test_an_adapted_tied_embedding_trains_under_dpo(tmp_path, tokenizer):
    """A tied input embedding with an adapter: TRL's fused head reads the tied lm_head.weight (the
    frozen base weight), the embedding's adapter learns, and the reference stays the base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    model = moslora.inject(LlamaForCausalLM(config), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]))
    assert model.get_input_embeddings().weight is model.lm_head.weight
    trainer, log = step_one("dpo", model, tokenizer, tmp_path, learning_rate=1e-2)  # overrides step_one's 0
    assert log["loss"] == torch.tensor(math.log(2), dtype=torch.float32).item()
    assert model.model.embed_tokens.lora_B.abs().max() > 0


# ----- RewardTrainer: the new head trains and is saved ------------------------------------------------------
@pytest.mark.slow
def test_reward_trainer_trains_and_saves_the_new_score_head_which_reloads_and_exports_exactly(tiny, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = moslora.inject(in_memory(tiny, AutoModelForSequenceClassification, num_labels=1),
                           moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    assert moslora.get_config(model).modules_to_save == ["score"] and model.score.weight.requires_grad
    assert not isinstance(model.score, moslora.MoSLoRALayer)
    head = model.score.weight.detach().clone()
    data = Dataset.from_dict({"chosen": [PROMPT + " true"] * 4, "rejected": [PROMPT + " false"] * 4})
    args = trl.RewardConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
                            report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no", max_length=64)
    trainer = adapter_trainer(trl.RewardTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert not torch.equal(model.score.weight, head)  # the head trained
    description, tensors = moslora.read_adapter(tmp_path / "adapter")  # the folder says it carries the head whole
    assert description.modules_to_save == ("score",) and torch.equal(tensors["score.weight"], model.score.weight)

    ids = tokenizer([PROMPT + " true", PROMPT + " false"], return_tensors="pt")
    with torch.no_grad():
        rewards = model.eval()(**ids).logits
    torch.manual_seed(1)  # a fresh base draws another random head: the saved one must replace it
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    assert not torch.equal(fresh.score.weight, model.score.weight)
    reloaded = moslora.load_adapter(fresh, tmp_path / "adapter", trainable=False).eval()
    exported = moslora.export_lora(tmp_path / "adapter", tmp_path / "peft")
    torch.manual_seed(2)
    theirs = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1), exported).eval()
    assert type(theirs).__name__ == "PeftModelForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, rewards, rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs(**ids).logits, rewards, rtol=0, atol=1e-5)


def test_the_head_can_opt_out_and_all_linear_leaves_it_to_modules_to_save(tiny, tmp_path):
    base = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    kept = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, target_modules="all-linear"))
    assert moslora.get_config(kept).modules_to_save == ["score"]
    assert "score" not in dict(moslora.adapter_layers(kept)) and kept.score.weight.requires_grad
    frozen = moslora.inject(copy.deepcopy(base), moslora.MoSLoRAConfig(r=4, target_modules=TARGETS, modules_to_save=[]))
    assert not frozen.score.weight.requires_grad and moslora.parameter_counts(frozen)["saved"] == 0
    moslora.save_adapter(frozen, tmp_path / "frozen")
    assert not any(k.startswith("score.") for k in moslora.read_adapter(tmp_path / "frozen")[1])
    # Loaded into a fresh base, an adapter without the head leaves that base's head as it is (frozen).
    loaded = moslora.load_adapter(copy.deepcopy(base), tmp_path / "frozen")
    assert moslora.get_config(loaded).modules_to_save == [] and not loaded.score.weight.requires_grad
