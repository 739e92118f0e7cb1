"""`moslora train`: recipes, data, checkpoints, resume, guards — on a tiny offline Llama."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moslora
from llm_fixtures import boolq_rows, build_tiny_llama, write_jsonl
from moslora.train import NonFiniteLossError, Recipe, load_recipe, read_rows, tokenize_row, train_causal_lm
from moslora.hf.state import last_checkpoint
from moslora.train.data import IGNORE_INDEX, build_datasets, prompt

REPO = Path(__file__).resolve().parents[1]
# Small, fast, deterministic settings shared by the runs below (no validation split unless asked).
FAST = dict(batch_size=4, micro_batch_size=2, val_set_size=0, warmup_steps=2, learning_rate=1e-2, logging_steps=1, r=4, alpha=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", boolq_rows(48))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


# ----- recipe ------------------------------------------------------------------------------------
def test_defaults_are_the_papers_commonsense_recipe():
    r = Recipe()
    assert (r.r, r.alpha, r.dropout) == (16, 32.0, 0.05)
    assert r.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert (r.learning_rate, r.num_epochs, r.batch_size, r.micro_batch_size) == (3e-4, 3.0, 16, 4)
    assert (r.cutoff_len, r.val_set_size, r.warmup_steps, r.optimizer) == (256, 120, 100, "adamw_torch")
    assert r.adapter_config().mixer == "kaiming" and r.adapter_config().scaling == 2.0
    assert r.gradient_accumulation_steps(world_size=1) == 4 and r.gradient_accumulation_steps(world_size=2) == 2


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("r: 8\nlearning_rate: 1e-4\nmethod: lora\n")
    r = load_recipe(path, r=4, alpha=None)
    assert (r.r, r.learning_rate, r.method, r.alpha) == (4, 1e-4, "lora", 32.0)
    assert r.adapter_config().mixer is None  # lora = the same adapter without M


def test_unknown_recipe_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lora_rank: 8\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lora_rank'\]"):
        load_recipe(path)


@pytest.mark.parametrize("name, method", [("llama3-8b-commonsense-moslora.yaml", "moslora"), ("llama3-8b-commonsense-lora.yaml", "lora")])
def test_shipped_recipes_are_the_papers_runs(name, method):
    r = load_recipe(REPO / "recipes" / name)
    assert r.method == method and r.model == "meta-llama/Meta-Llama-3-8B"
    assert (r.r, r.alpha, r.learning_rate, r.batch_size, r.micro_batch_size, r.num_epochs) == (16, 32.0, 3e-4, 16, 4, 3.0)


# ----- data --------------------------------------------------------------------------------------
def test_prompt_has_the_alpaca_form_with_and_without_input():
    assert prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Response:\n"
    )
    assert "### Input:\nctx\n\n### Response:\n" in prompt("Do X.", "ctx")


def test_loss_sees_only_the_response(tokenizer):
    row = boolq_rows(1)[0]
    ex = tokenize_row(tokenizer, row, cutoff_len=256)
    n_prompt = len(tokenizer(prompt(row["instruction"]))["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["labels"][n_prompt:-1]) == row["output"]
    cut = tokenize_row(tokenizer, row, cutoff_len=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and cut["input_ids"][-1] != tokenizer.eos_token_id
    assert tokenize_row(tokenizer, row, cutoff_len=256, train_on_inputs=True)["labels"] == ex["input_ids"]


def test_validation_split_and_cut_away_responses_are_counted(tokenizer, train_file):
    d = build_datasets(tokenizer, train_file, cutoff_len=256, val_set_size=8, seed=42)
    assert (len(d.train), len(d.val), d.dropped_no_response) == (40, 8, 0)
    with pytest.raises(ValueError, match="cut away by cutoff_len=5"):
        build_datasets(tokenizer, train_file, cutoff_len=5, val_set_size=0, seed=42)


def test_bad_row_is_an_error_naming_file_and_row(tmp_path):
    rows = boolq_rows(5)
    del rows[3]["output"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 4: missing field 'output'"):
        read_rows(path)
    read = read_rows(path, skip_bad_rows=True)
    assert len(read.dataset) == 4 and read.skipped == [4]


def test_wrong_type_and_broken_json_are_named(tmp_path):
    rows = boolq_rows(3)
    rows[1]["input"] = 7
    path = tmp_path / "typed.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"typed\.json: row 2: field 'input' must be a string"):
        read_rows(path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(boolq_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        read_rows(broken)


# ----- end to end ----------------------------------------------------------------------------------
def _no_pickles(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in {".pt", ".pth", ".bin", ".pkl"}]


@pytest.mark.slow
def test_train_writes_adapter_only_outputs_and_learns(tiny, train_file, tmp_path):
    out = tmp_path / "run"
    result = train_causal_lm(str(tiny), train_file, out, max_steps=8, save_steps=4, **{**FAST, "val_set_size": 8}, eval_steps=4)
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 8 and m["val_rows"] == 8 and m["eval_loss"] is not None and m["tokens_seen"] > 0
    assert m["adapter_params"]["M"] == 5 * 2 * 4 * 4  # 5 target kinds × 2 layers × r×r
    args = json.loads((out / "training_args.json").read_text())
    assert args["recipe"]["r"] == 4 and args["training_arguments"]["gradient_accumulation_steps"] == 2
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert _no_pickles(out) == []
    # checkpoints hold the adapter, not the model: no base weight in them
    keys = load_file(out / "checkpoint-8" / "adapter_model.safetensors").keys()
    assert keys and all(k.rsplit(".", 1)[1] in {"lora_A", "lora_M", "lora_B"} for k in keys)
    final = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in load_file(out / "checkpoint-8" / "adapter_model.safetensors").items())
    losses = [e["loss"] for e in json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]
    assert result.output_dir == out


@pytest.mark.slow
def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(tiny, train_file, tmp_path):
    """Interrupted after step 4 (last checkpoint: 3), resumed: equal to 6 uninterrupted steps.
    Dropout is on, so this also checks that the RNG state is restored."""
    from transformers import TrainerCallback

    settings = dict(max_steps=6, save_steps=3, dropout=0.1, **FAST)
    train_causal_lm(str(tiny), train_file, tmp_path / "straight", **settings)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_causal_lm(str(tiny), train_file, tmp_path / "resumed", callbacks=[Crash()], **settings)
    assert last_checkpoint(tmp_path / "resumed").name == "checkpoint-3"
    with pytest.raises(ValueError, match="--resume"):
        train_causal_lm(str(tiny), train_file, tmp_path / "resumed", **settings)
    train_causal_lm(str(tiny), train_file, tmp_path / "resumed", resume=True, **settings)

    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(straight[k], load_file(tmp_path / "straight" / "checkpoint-3" / "adapter_model.safetensors")[k]) for k in straight)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny, train_file, tmp_path):
    from transformers import TrainerCallback

    class PoisonFromStep5(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:  # step 5 is next
                model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))

    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="at step 5.*checkpoint-3"):
        train_causal_lm(str(tiny), train_file, out, max_steps=8, save_steps=3, callbacks=[PoisonFromStep5()], **FAST)
    assert last_checkpoint(out).name == "checkpoint-3"
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a broken run
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-3" / "adapter_model.safetensors").values())


def test_cli_lora_method_trains_the_same_adapter_without_mixer(tiny, train_file, tmp_path, capsys):
    from moslora.cli.main import main

    out = tmp_path / "lora"
    code = main(["train", "--model", str(tiny), "--data", str(train_file), "--output", str(out), "--method", "lora",
                 "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--val-set-size", "0", "--r", "4"])
    assert code == 0
    assert "done: 2 steps" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["format"] == "moslora" and config["config"]["mixer"] is None
    assert not [k for k in load_file(out / "adapter_model.safetensors") if k.endswith("lora_M")]
    assert main(["train", "--model", str(tiny), "--data", str(tmp_path / "missing.jsonl"), "--output", str(out / "x")]) == 2


def test_reloaded_adapter_changes_the_base_model_exactly_as_saved(tiny, train_file, tmp_path):
    """Export-free reload: base + load_adapter gives the trained function, and merging it gives the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    train_causal_lm(str(tiny), train_file, out, max_steps=3, save_steps=3, **FAST)
    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok([prompt(boolq_rows(1)[0]["instruction"])], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(tiny).eval()
    with torch.no_grad():
        before = base(**ids).logits
        model = moslora.load_adapter(base, out, trainable=False).eval()  # new adapter layers start in train mode
        adapted = model(**ids).logits
        merged = moslora.merge_and_unload(model)(**ids).logits
    assert not torch.allclose(before, adapted, atol=1e-4)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


# ----- QLoRA on CPU --------------------------------------------------------------------------------
def test_4bit_training_keeps_gradients_after_an_eval_forward(tmp_path):
    """bitsandbytes repacks CPU 4-bit weights on the first eval-mode no-grad forward, after which
    no gradient flows through them. load_model(for_training=True) switches that off."""
    pytest.importorskip("bitsandbytes")
    from moslora.train.model import load_model

    folder = build_tiny_llama(tmp_path / "tiny64", hidden_size=64)  # 4-bit blocks need in_features >= 64

    def none_grads(for_training: bool) -> int:
        model, tok = load_model(str(folder), quantize="4bit", for_training=for_training)
        moslora.inject(model, moslora.MoSLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        batch = tok(["is apple a fruit?"], return_tensors="pt")
        model.eval()
        with torch.no_grad():
            model(**batch)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert len(grads) == 2 * 3 * 3
        return sum(g is None for g in grads)

    import bitsandbytes as bnb

    assert none_grads(for_training=True) == 0
    if not bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks: the trap cannot be shown here")
    assert none_grads(for_training=False) > 0  # the trap is real here: without the switch, grads vanish


@pytest.mark.slow
def test_4bit_trainer_run_learns(tmp_path):
    pytest.importorskip("bitsandbytes")
    folder = build_tiny_llama(tmp_path / "tiny64", hidden_size=64)
    data = write_jsonl(tmp_path / "train.jsonl", boolq_rows(24))
    out = tmp_path / "q"
    train_causal_lm(str(folder), data, out, quantize="4bit", max_steps=3, save_steps=3, **{**FAST, "val_set_size": 4}, eval_steps=1)
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and math.isfinite(m["eval_loss"])
    B = [t for k, t in load_file(out / "adapter_model.safetensors").items() if k.endswith("lora_B")]
    assert B and all(t.abs().sum() > 0 for t in B)  # every layer learned, eval forwards in between notwithstanding


# ----- interrupted runs (the engines on several processes: test_distributed.py) ------------------
@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_adapter(tiny, train_file, tmp_path):
    """A real kill (no Python cleanup runs) partway through, then `--resume`: the final adapter
    equals an uninterrupted run's."""
    import signal

    settings = dict(max_steps=8, save_steps=2, dropout=0.1, **FAST)
    train_causal_lm(str(tiny), train_file, tmp_path / "straight", **settings)

    out = tmp_path / "killed"
    flags = ["--max-steps", "8", "--save-steps", "2", "--dropout", "0.1", "--batch-size", "4", "--micro-batch-size", "2",
             "--val-set-size", "0", "--warmup-steps", "2", "--lr", "1e-2", "--logging-steps", "1", "--rank", "4", "--alpha", "8"]
    args = ["train", "--model", str(tiny), "--data", str(train_file), "--output", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    # Held still right after checkpoint-4 is written, so the kill lands there whatever the load.
    hold = [sys.executable, str(REPO / "tests" / "engines" / "stop_after_checkpoint.py"), "4"]
    proc = subprocess.Popen(hold + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "held" in (line.strip() for line in proc.stdout), "training ended before checkpoint-4"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "checkpoint-6").exists()
    assert not (out / "adapter_model.safetensors").exists(), "killed before the end, so no final adapter"
    cmd = [sys.executable, "-m", "moslora.cli.main", *args]
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    assert straight.keys() == final.keys()
    for k in straight:
        torch.testing.assert_close(final[k], straight[k], rtol=0, atol=1e-6, msg=k)
