"""The paper's commonsense files, written offline in LLM-Adapters' formats (``moslora data commonsense``),
and the paper's route over them: the shipped recipe names the training file, ``moslora train`` learns
from it, ``moslora eval`` reads every test file's answers back.

Run on the real cache (``make test`` fetches it first). The reference rows are LLM-Adapters' own
examples of each template (its README's data table and its test files as commonsense_evaluate.py
prints them), quoted here character for character where the source is unambiguous.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_fixtures import build_tiny_llama
from moslora.data import llm_adapters, olmo
from moslora.eval.tasks import TASKS, choices, extract_answer

REPO = Path(__file__).resolve().parents[1]
TEST_ROWS = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042, "winogrande": 1267,
             "ARC-Easy": 2376, "ARC-Challenge": 1172, "openbookqa": 500}  # each set's public labelled split


def cli(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "moslora.cli.main", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, f"moslora {' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, str]:
    """``moslora data commonsense --output <tmp>/commonsense`` from the real cache: the folder and what it printed."""
    folder = tmp_path_factory.mktemp("paper") / "commonsense"
    return folder, cli("data", "commonsense", "--output", str(folder))


def read(path: Path) -> list[dict[str, str]]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_training_file_has_llm_adapters_rows_per_set_and_the_command_prints_them(written):
    folder, out = written
    rows = read(folder / "commonsense_170k.json")
    assert len(rows) == 147_580 == sum(llm_adapters.PUBLISHED_TRAIN_ROWS.values())
    at = 0
    for name, count in llm_adapters.PUBLISHED_TRAIN_ROWS.items():  # one block per set, in the paper's column order
        dataset = llm_adapters.NAMES[name]
        block = rows[at : at + count]
        at += count
        assert all(extract_answer(dataset, r["instruction"] + "\n" + r["output"]) != "" for r in block[:3])
        assert {r["answer"] for r in block} <= set(TASKS[dataset].labels), dataset
        assert f"| {dataset} | {count:,} | {count:,} |" in out
    assert "| all | 147,580 | 147,580 | 22,419 |" in out


def test_each_test_file_is_its_sets_labelled_split_under_llm_adapters_name(written):
    folder, _ = written
    assert sorted(p.name for p in (folder / "dataset").iterdir()) == sorted(TEST_ROWS)
    for name, count in TEST_ROWS.items():
        rows = read(folder / "dataset" / name / "test.json")
        assert len(rows) == count, name
        assert all(set(r) == {"instruction", "input", "output", "answer"} and r["input"] == "" for r in rows)


@pytest.mark.parametrize("part", ["train", "test"])
def test_every_written_response_reads_back_as_its_answer_and_its_options_are_the_questions(written, part):
    """extract_answer (LLM-Adapters' first-match rule) of each output gives the row's answer; the labels
    the instruction lists (moslora.eval.tasks.choices) are one per option, with the gold option's text after its label."""
    folder, _ = written
    train = iter(read(folder / "commonsense_170k.json")) if part == "train" else None
    for name, dataset in llm_adapters.NAMES.items():
        questions = olmo.read(name, "train" if part == "train" else llm_adapters.test_split(name))
        rows = [next(train) for _ in questions] if train else read(folder / "dataset" / dataset / "test.json")
        assert len(rows) == len(questions)
        for i, (row, q) in enumerate(zip(rows, questions)):
            where = f"{dataset} {part} row {i + 1}"
            assert extract_answer(dataset, row["output"]) == row["answer"], where
            assert row["output"] == f"the correct answer is {row['answer']}", where
            labels = choices(dataset, row["instruction"])
            assert len(labels) == len(q.options) and labels.index(row["answer"]) == q.gold, where
            if name != "boolq":  # boolq's options are true/false themselves
                gold = f"{row['answer'][0].upper()}{row['answer'][1:]}: {q.options[q.gold]}"
                assert gold in row["instruction"], where


# LLM-Adapters' own examples of its templates (the contents from its data table, which renders line
# breaks as <br> and ' as ’; the line breaks as its test files print them through commonsense_evaluate.py),
# each the first training row of its set here too.
REFERENCE = {
    "piqa": ("Please choose the correct solution to the question: When boiling butter, when it's ready, you can\n\n"
             "Solution1: Pour it onto a plate\n\nSolution2: Pour it into a jar\n\nAnswer format: solution1/solution2", "solution2"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: Ian volunteered to eat "
                   "Dennis's menudo after already having a bowl because _ despised eating intestine.\n\nOption1: Ian Option2: Dennis "
                   "Answer format: option1/option2", "option2"),
    "arc_easy": ("Please choose the correct answer to the question: Which factor will most likely cause a person to develop a fever?\n\n"
                 "Answer1: a leg muscle relaxing after exercise Answer2: a bacterial population in the bloodstream Answer3: several "
                 "viral particles on the skin Answer4: carbohydrates being digested in the stomach\n\n"
                 "Answer format: answer1/answer2/answer3/answer4", "answer2"),
    "openbookqa": ("Please choose the correct answer to the question: The sun is responsible for\n\nAnswer1: puppies learning new "
                   "tricks Answer2: children growing up and getting old Answer3: flowers wilting in a vase Answer4: plants sprouting, "
                   "blooming and wilting\n\nAnswer format: answer1/answer2/answer3/answer4", "answer4"),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_the_first_training_row_is_llm_adapters_own_example(name):
    instruction, answer = REFERENCE[name]
    assert llm_adapters.row(name, olmo.read(name, "train")[0]) == {
        "instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def test_boolq_rows_carry_the_question_alone_as_llm_adapters_did():
    q = olmo.read("boolq", "validation")[0]
    row = llm_adapters.row("boolq", q)
    assert row["instruction"] == ("Please answer the following question with true or false, question: "
                                  "does ethanol take more energy make that produces?\n\nAnswer format: true/false")
    assert (q.options[q.gold], row["answer"]) == ("no", "false")


def test_a_missing_cache_is_an_error_naming_the_fetch_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MOSLORA_DATA_DIR": str(tmp_path / "empty")}
    proc = subprocess.run([sys.executable, "-m", "moslora.cli.main", "data", "commonsense", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert "boolq/train.jsonl is missing" in proc.stderr and "moslora data fetch" in proc.stderr
    assert not (tmp_path / "out" / "commonsense_170k.json").exists()


@pytest.mark.parametrize("recipe", ["llama3-8b-commonsense-moslora.yaml", "llama3-8b-commonsense-lora.yaml"])
def test_the_commonsense_recipes_name_the_written_training_file(recipe):
    from moslora.train.recipe import load_recipe

    assert load_recipe(REPO / "recipes" / recipe).data == "commonsense/commonsense_170k.json"
    assert "moslora data commonsense --output commonsense" in (REPO / "recipes" / recipe).read_text()


@pytest.mark.slow
def test_the_papers_route_runs_offline_from_the_written_files(written, tmp_path):
    """data commonsense -> moslora train --config <the paper's recipe> (a tiny Llama, 2 steps, on a slice of
    the written training file: 3 rows of each set) -> moslora eval on the first rows of each of the eight test files."""
    import torch

    from moslora.eval import evaluate_adapter

    folder, _ = written
    model = build_tiny_llama(tmp_path / "tiny")
    rows = read(folder / "commonsense_170k.json")
    starts = [0]
    for count in list(llm_adapters.PUBLISHED_TRAIN_ROWS.values())[:-1]:
        starts.append(starts[-1] + count)
    sliced = tmp_path / "commonsense_slice.json"
    sliced.write_text(json.dumps([r for s in starts for r in rows[s : s + 3]]), encoding="utf-8")
    out = tmp_path / "run"
    cli("train", "--config", str(REPO / "recipes" / "llama3-8b-commonsense-moslora.yaml"), "--model", str(model),
        "--data", str(sliced), "--output", str(out), "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "4",
        "--val-set-size", "4", "--warmup-steps", "0", "--save-steps", "100", "--eval-steps", "100", "--precision", "fp32")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["train_rows"], metrics["val_rows"], metrics["steps"]) == (20, 4, 2), metrics
    # moslora eval as a user runs it, on one set...
    printed = cli("eval", "--model", str(model), "--adapter", str(out), "--data", str(folder / "dataset" / "boolq" / "test.json"),
                  "--dataset", "boolq", "--limit", "3", "--max-new-tokens", "4", "--output", str(tmp_path / "results.json"))
    assert printed.startswith("boolq: accuracy ") and "/3," in printed
    # ...and on all eight (in-process: one model load each), ranking the labels each row's instruction lists.
    torch.manual_seed(0)
    for dataset in TEST_ROWS:
        data = folder / "dataset" / dataset / "test.json"
        result = evaluate_adapter(str(model), data, dataset, adapter=out, output=tmp_path / "results.json", scoring="loglik", limit=3)
        gold = read(data)[:3]
        assert result["total"] == 3 and result["no_answer"] == 0, dataset
        for example, row in zip(result["examples"], gold):
            assert example["answer"] == row["answer"]
            assert list(example["prediction"]) == choices(dataset, row["instruction"]), dataset
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results["datasets"]) == sorted(TEST_ROWS)
