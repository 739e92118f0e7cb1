"""`moslora train` on 2 CPU processes (gloo) under every engine it names, launched as a user would.

Each engine's final adapter is compared with a single-process run of the same effective batch, and
a run resumed from its middle checkpoint with the uninterrupted run (both ≤ 1e-5). The engines:
DDP through ``torchrun``; DeepSpeed ZeRO-2 and ZeRO-3 through ``accelerate launch`` with the configs
in ``recipes/accelerate`` (``DS_ACCELERATOR=cpu``; ZeRO-3 with ``stage3_param_persistence_threshold:
0`` so even these tiny tensors are partitioned); FSDP2 through ``accelerate launch`` and
``tests/engines/fsdp_on_cpu.py`` (accelerate runs plain DDP when asked for FSDP on CPU; that launcher
makes the one decision its GPU branch makes), asserting that the adapter really was sharded.

TRL's DPOTrainer with the initial-policy reference (``tests/engines/trl_reference.py``) gives, on
ZeRO-2, ZeRO-3 and FSDP2, the single process's step-1 numbers, with and without precomputed
reference log-probabilities (refused, when the trainer is built, under ZeRO-3).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llm_fixtures import boolq_rows, build_tiny_llama, write_jsonl

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate"
# 4 steps of an effective batch of 4; a checkpoint every 2 steps. No dropout: the processes draw
# their dropout masks from other generator states than one process would.
FLAGS = ["--max-steps", "4", "--save-steps", "2", "--batch-size", "4", "--val-set-size", "0", "--warmup-steps", "0",
         "--lr", "1e-2", "--logging-steps", "1", "--rank", "4", "--alpha", "8", "--dropout", "0"]
ENGINES = ["ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", boolq_rows(48))


@pytest.fixture(scope="module")
def single(tiny, train_file, tmp_path_factory) -> Path:
    """The reference: one process, micro-batches of 1, 4 accumulation steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    proc = _run([sys.executable, "-m", "moslora.cli.main"], tiny, train_file, out, ["--micro-batch-size", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_config(engine: str, folder: Path) -> Path:
    """The shipped accelerate config for ``engine``, made to run on 2 CPU processes."""
    name = {"deepspeed-zero2": "deepspeed-zero2.yaml", "deepspeed-zero3": "deepspeed-zero3.yaml", "fsdp2": "fsdp2.yaml"}[engine]
    config = yaml.safe_load((CONFIGS / name).read_text())
    # A port of its own, not accelerate's fixed 29500: a process of an earlier launch still holding
    # that port would make this one fail at random.
    config.update(num_processes=2, use_cpu=True, main_process_port=_free_port())
    config.pop("mixed_precision", None)  # fp32 on CPU
    if engine == "deepspeed-zero3":
        ds = json.loads((CONFIGS / "zero3.json").read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny adapter tensors
        (folder / "zero3.json").write_text(json.dumps(ds))
        config["deepspeed_config"]["deepspeed_config_file"] = str(folder / "zero3.json")
    path = folder / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launcher(engine: str, folder: Path) -> list[str]:
    if engine == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "moslora.cli.main"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_cpu_config(engine, folder))]
    if engine == "fsdp2":
        return accelerate + [str(REPO / "tests" / "engines" / "fsdp_on_cpu.py")]
    return accelerate + ["-m", "moslora.cli.main"]


def _run(launcher: list[str], tiny: Path, data: Path, out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO / "src")}
    cmd = [*launcher, "train", "--model", str(tiny), "--data", str(data), "--output", str(out), *FLAGS, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _assert_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=key)


def _pickles(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in {".pt", ".pth", ".bin", ".pkl"}]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_saves_the_adapter_a_single_process_trains_and_resumes_to_it(engine, tiny, train_file, single, tmp_path):
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    launcher = _launcher(engine, tmp_path)
    out = tmp_path / "run"
    proc = _run(launcher, tiny, train_file, out, ["--micro-batch-size", "1"])  # 1 × 2 processes × 2 accumulation steps
    assert proc.returncode == 0, proc.stderr[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    reference = json.loads((single / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    assert metrics["engine"] == {"ddp": "ddp", "fsdp2": "fsdp"}.get(engine, "deepspeed")
    assert metrics["adapter_sharding"] == {"deepspeed-zero3": "zero3", "fsdp2": "fsdp2"}.get(engine)  # really sharded
    assert metrics["trainable_params"] == reference["trainable_params"] > 0  # counted whole, not per shard
    assert metrics["adapter_params"] == reference["adapter_params"]

    final = load_file(out / "adapter_model.safetensors")
    _assert_close(final, load_file(single / "adapter_model.safetensors"))
    for step in (2, 4):  # every checkpoint holds the whole adapter, and only it
        saved = load_file(out / f"checkpoint-{step}" / "adapter_model.safetensors")
        _assert_close(saved, load_file(single / f"checkpoint-{step}" / "adapter_model.safetensors"))
    _assert_close(load_file(out / "checkpoint-4" / "adapter_model.safetensors"), final, atol=0)
    if engine.startswith("deepspeed"):
        # DeepSpeed's own files (its ZeRO optimizer partitions), of the trainable parameters only.
        assert {p.parent.name for p in _pickles(out)} == {"global_step2", "global_step4"}
        states = sorted((out / "checkpoint-2" / "global_step2").glob("*model_states.pt"))  # ZeRO-3: one per process
        assert states
        for path in states:
            module = torch.load(path, weights_only=False)["module"]
            assert module and all(k.rsplit(".", 1)[1] in {"lora_A", "lora_M", "lora_B"} for k in module), path.name
    else:
        assert _pickles(out) == []
        assert load_file(out / "checkpoint-2" / "optimizer.safetensors")  # whole optimizer state, by parameter name

    # Resume from the middle checkpoint: the same adapter as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    proc = _run(launcher, tiny, train_file, resumed, ["--micro-batch-size", "1", "--resume"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((resumed / "training_args.json").read_text())["resumed_from"].endswith("checkpoint-2")
    _assert_close(load_file(resumed / "adapter_model.safetensors"), final)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_a_non_finite_loss_stops_every_process_before_the_weights_change(engine, tiny, train_file, tmp_path):
    """A learning rate of 1e30 makes step 2's loss non-finite. Under DeepSpeed the gradients are
    not visible and the engine steps inside backward, so only the loss check can stop it."""
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    proc = _run(_launcher(engine, tmp_path), tiny, train_file, out, ["--micro-batch-size", "1", "--lr", "1e30", "--save-steps", "1"])
    assert proc.returncode != 0
    assert "non-finite (NaN or Inf) at step 2" in proc.stderr and "checkpoint-1" in proc.stderr
    assert not (out / "adapter_model.safetensors").exists()
    assert not (out / "checkpoint-2").exists()
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-1" / "adapter_model.safetensors").values())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed-zero2", "deepspeed-zero3", "fsdp2"])
def test_trl_dpo_with_the_initial_policy_reference_gives_the_single_process_numbers(engine, tiny, tmp_path):
    """Every row of the data is the same pair, so each process's batch is the single process's batch."""
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    pytest.importorskip("trl")
    from datasets import Dataset

    from engines.trl_reference import dpo_step

    Dataset.from_dict({"prompt": ["is apple a fruit?"] * 8, "chosen": [" the correct answer is true"] * 8,
                       "rejected": [" the correct answer is false"] * 8}).save_to_disk(tmp_path / "data")
    _, single = dpo_step(str(tiny), str(tmp_path / "data"), str(tmp_path / "single"), precompute=False)

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_cpu_config(engine, tmp_path))]
    if engine == "fsdp2":
        launcher.append(str(REPO / "tests" / "engines" / "fsdp_on_cpu.py"))
    script = REPO / "tests" / "engines" / "trl_reference.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([*launcher, str(script), str(tiny), str(tmp_path / "data"), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["initial_policy_reference"]  # inside the engine's wrapper
    assert result["engine"] == ("fsdp" if engine == "fsdp2" else "deepspeed")
    assert result["sharding"] == {"deepspeed-zero3": "zero3", "fsdp2": "fsdp2"}.get(engine)  # really sharded
    for name in ("plain", "precompute"):
        if name == "precompute" and engine == "deepspeed-zero3":
            assert "precompute_ref_log_probs=True under DeepSpeed ZeRO-3" in result[name]["refused"]
            continue
        assert result[name].keys() == single.keys() and len(single) == 5
        for key, value in single.items():
            assert result[name][key] == pytest.approx(value, abs=1e-6), (name, key)
