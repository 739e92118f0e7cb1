"""moslora.hf in a user's own training script: AdapterTrainer, adapter_trainer(trl.SFTTrainer), what
a stock Trainer does with an injected model, and save_adapter's refusals and gathering."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moslora
from llm_fixtures import boolq_rows, build_tiny_llama
from moslora.hf import AdapterTrainer, adapter_trainer, last_checkpoint
from moslora.io.native import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError
from moslora.io.validate import check_adapter_tensors
from moslora.model.full_state import ADVICE
from tiny import perturb, tiny_llama

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _injected(tiny: Path, seed: int = 0):
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)
    return moslora.inject(AutoModelForCausalLM.from_pretrained(tiny), moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=TARGETS))


def _texts(n: int = 24) -> list[str]:
    return [f"{row['instruction']} {row['output']}" for row in boolq_rows(n)]


# ----- trl.SFTTrainer through the public integration ------------------------------------------------
def _sft(tiny: Path, out: Path, resume_from: str | None = None):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    args = trl.SFTConfig(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         lr_scheduler_type="linear", logging_steps=1, report_to="none", use_cpu=True, max_length=64,
                         dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True, bf16=False, gradient_checkpointing=False)
    trainer = adapter_trainer(trl.SFTTrainer)(model=_injected(tiny), args=args, train_dataset=Dataset.from_dict({"text": _texts()}),
                                              processing_class=AutoTokenizer.from_pretrained(tiny))
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model()
    return trainer


@pytest.mark.slow
def test_trl_sft_trainer_saves_adapter_only_checkpoints_that_reload_and_resume(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = _sft(tiny, tmp_path / "straight")
    out = tmp_path / "straight"
    assert type(trainer).__name__ == "AdapterSFTTrainer" and trainer.parameter_counts["M"] == 2 * 3 * 4 * 4
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        keys = load_file(folder / WEIGHTS_NAME).keys()
        assert keys and all(k.rsplit(".", 1)[1] in {"lora_A", "lora_M", "lora_B"} for k in keys)
        assert not [p for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth"} or p.name == "model.safetensors"]
    assert (out / "tokenizer.json").is_file()  # the processing class is saved, as Trainer does

    # Reloaded into the plain base model, the adapter gives the trained model's logits.
    ids = trainer.processing_class(_texts(1), return_tensors="pt")
    trained = trainer.model.eval()
    reloaded = moslora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny), out, trainable=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, trained(**ids).logits, rtol=0, atol=1e-5)

    # Resumed from the middle checkpoint: the uninterrupted run's adapter.
    shutil.copytree(out / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    _sft(tiny, tmp_path / "resumed", resume_from=str(last_checkpoint(tmp_path / "resumed")))
    straight, resumed = load_file(out / WEIGHTS_NAME), load_file(tmp_path / "resumed" / WEIGHTS_NAME)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def test_adapter_trainer_of_any_trainer_class_is_made_once_and_refuses_a_model_without_adapters(tiny, tmp_path):
    from transformers import Trainer, TrainingArguments

    assert adapter_trainer(Trainer) is adapter_trainer(Trainer) and adapter_trainer(AdapterTrainer) is AdapterTrainer
    with pytest.raises(TypeError, match="Trainer subclass"):
        adapter_trainer(dict)
    with pytest.raises(TypeError, match="moslora.inject"):
        AdapterTrainer(model=tiny_llama(), args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True))


# ----- a stock Trainer with an injected model ---------------------------------------------------------
def test_a_stock_trainer_save_warns_that_the_folder_is_not_this_model(tiny, tmp_path):
    """Why the warning: the folder a stock Trainer writes loads as a different model."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = _injected(tiny)
    perturb(model)
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True))
    with pytest.warns(UserWarning, match="does NOT load back with from_pretrained") as record:
        trainer.save_model(str(tmp_path / "stock"))
    assert "moslora.hf.AdapterTrainer" in str(record[0].message) and str(record[0].message) == ADVICE
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "stock")(ids).logits, model.eval()(ids).logits, atol=1e-3)

    # AdapterTrainer writes the adapter alone, which loads back as this model; no warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdapterTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)).save_model(str(tmp_path / "ours"))
    reloaded = moslora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "ours", trainable=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


# ----- save_adapter refuses what is not the adapter -----------------------------------------------------
def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("damage", ["empty", "flat-shard"])
def test_save_adapter_refuses_a_piece_of_a_sharded_tensor_and_writes_nothing(damage, tmp_path):
    """What ZeRO-3 leaves in a parameter (an empty tensor) and what FSDP1 leaves (this process's 1-D slice)."""
    model = moslora.inject(tiny_llama(), moslora.MoSLoRAConfig(r=4, target_modules=TARGETS))
    perturb(model)
    layer = model.model.layers[1].mlp.down_proj
    whole = layer.lora_B.data
    layer.lora_B.data = torch.empty(0) if damage == "empty" else whole.flatten()[: whole.numel() // 2].clone()
    before = _snapshot(model)
    with pytest.raises(AdapterFormatError, match=r"model\.layers\.1\.mlp\.down_proj\.lora_B.*sharded engine.*every process"):
        moslora.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_save_adapter_writes_the_models_own_names_through_wrappers(tmp_path):
    """Activation checkpointing wraps layers (``_checkpoint_wrapped_module``); the file still names
    the model's own modules and loads into the plain model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = moslora.inject(tiny_llama(), moslora.MoSLoRAConfig(r=4, target_modules=TARGETS))
    perturb(model)
    expected = {k: v.clone() for k, v in moslora.adapter_state_dict(model).items()}
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    assert any("_checkpoint_wrapped_module" in name for name, _ in moslora.adapter_layers(model))
    moslora.save_adapter(model, tmp_path / "out")
    saved = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    plain = moslora.load_adapter(tiny_llama(), tmp_path / "out")
    assert all(torch.equal(v, expected[k]) for k, v in moslora.adapter_state_dict(plain).items())


def test_the_check_refuses_wrapper_named_missing_and_stray_tensors(tmp_path):
    where = tmp_path / WEIGHTS_NAME
    ok = {"a.lora_A": torch.ones(2, 3), "a.lora_B": torch.ones(4, 2)}
    shapes = {"a.lora_A": (2, 3), "a.lora_B": (4, 2)}
    check_adapter_tensors(where, ok, shapes)
    with pytest.raises(AdapterFormatError, match="wrapper segment '_fsdp_wrapped_module'"):
        check_adapter_tensors(where, {"_fsdp_wrapped_module.a.lora_A": torch.ones(2, 3)}, shapes)
    with pytest.raises(AdapterFormatError, match="'a.lora_B' of the adapter is missing"):
        check_adapter_tensors(where, {"a.lora_A": torch.ones(2, 3)}, shapes)
    with pytest.raises(AdapterFormatError, match="'b.lora_A' belongs to no adapter layer"):
        check_adapter_tensors(where, {**ok, "b.lora_A": torch.ones(2, 3)}, shapes)
    with pytest.raises(AdapterFormatError, match="dtype torch.int64"):
        check_adapter_tensors(where, {**ok, "a.lora_A": torch.ones(2, 3, dtype=torch.long)}, shapes)


# ----- gathering from torch's FSDP1 and FSDP2 directly ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_save_adapter_gathers_fsdp_shards_on_every_process(kind, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "engines" / "sharded_save.py"), kind, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
    assert (tmp_path / "saved" / CONFIG_NAME).is_file()


@pytest.mark.slow
def test_destroy_process_group_frees_the_group_when_fsdp_is_imported_after_it_starts():
    """The cause of a rank aborting at exit ("terminate called without an active exception"):
    FSDP imported after ``init_process_group`` used to bind the group into default arguments, so
    destroying it freed nothing and gloo's threads outlived the interpreter. moslora imports that
    module first (model/sharded.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "engines" / "group_freed.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


LEAVER = """
import atexit, sys
import torch.distributed as dist
from moslora.model.sharded import exit_process

if sys.argv[1] == "group":
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    held = dist.group.WORLD  # as an engine's group registry holds it


class Finalized:
    def __del__(self):
        print("finalized", flush=True)


kept = Finalized()
atexit.register(lambda: print("atexit, group alive:", dist.is_initialized(), flush=True))
exit_process(3)
"""


@pytest.mark.parametrize("group", [True, False], ids=["in-a-process-group", "alone"])
def test_exit_process_destroys_the_group_runs_atexit_and_skips_finalization_only_in_a_group(group, tmp_path):
    """The engines' rare abort at exit happens in the interpreter's finalization, which a process in
    a group must not reach; everything registered with atexit still runs, with the group gone."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", LEAVER, "group" if group else "alone", str(tmp_path / "store")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "atexit, group alive: False" in proc.stdout
    assert ("finalized" in proc.stdout) is not group  # a normal exit finalizes; one from a group does not


# ----- the guard ----------------------------------------------------------------------------------------
def test_a_non_finite_gradient_under_a_finite_loss_stops_before_the_optimizer_step(tiny, tmp_path):
    """The loss check cannot see this one (the loss is finite); the gradient check before the
    optimizer step does, and the adapter keeps the last good values."""
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, TrainerCallback, TrainingArguments

    from moslora.hf import NonFiniteLossError

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    data = Dataset.from_dict(tokenizer(_texts(8)))
    model = _injected(tiny)
    B = model.model.layers[0].self_attn.q_proj.lora_B

    class PoisonStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                B.register_hook(lambda g: g * float("nan"))
                self.before = B.detach().clone()

    poison = PoisonStep3()
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data, callbacks=[poison],
                             data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    with pytest.raises(NonFiniteLossError, match="a gradient became non-finite .* at step 3.*none"):
        trainer.train()
    assert torch.equal(B.detach(), poison.before)
