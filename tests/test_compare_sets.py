"""A task pooling several data sets (its rows say their `set`), as `commonsense` pools the paper's
eight: every run's accuracy per set and their average, recomputed by hand from the run's answers;
the paired 95% CIs per set and on the average against `stats.paired` on hand-made per-seed values;
the per-set table in results.md and the terminal table; and a task of one set reporting exactly
what it always did."""

from __future__ import annotations

from pathlib import Path

import pytest

from moslora.compare import report
from moslora.compare.instruction import InstructionTask
from moslora.compare.runner import run_comparison
from moslora.compare.stats import paired, seeds_for_half_width

# Unequal sets (6, 4, 2 test rows), so the average of the sets differs from the pooled accuracy.
SETS = ["alpha"] * 6 + ["beta"] * 4 + ["gamma"] * 2


def _rows(n: int, seed: int, sets: list[str] | None) -> list[dict]:
    from llm_fixtures import boolq_rows

    long = "is apple a fruit"  # options of 1 and 4 tokens, as in test_compare_choice
    rows = []
    for k, row in enumerate(boolq_rows(n, seed)):
        options = ["true", long] if k % 2 else [long, "false"]
        gold = options[(k // 2) % 2]
        rows.append({**row, "output": gold, "answer": gold, "options": options, **({"set": sets[k % len(sets)]} if sets else {})})
    return rows


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from llm_fixtures import build_sharp_tiny_llama

    return build_sharp_tiny_llama(tmp_path_factory.mktemp("tiny-llama-sets"))


def _task(tiny_llama: Path, with_sets: bool) -> InstructionTask:
    sets = SETS if with_sets else None
    return InstructionTask(name="tiny-sets", model=str(tiny_llama), dataset=None, train=_rows(32, 0, sets),
                           validation=_rows(4, 1, SETS[:4] if with_sets else None), test=_rows(12, 2, sets),
                           steps=4, batch_size=4, max_length=64, log_every=1, scoring="choice")


@pytest.fixture(scope="module")
def pooled(tiny_llama):
    task = _task(tiny_llama, with_sets=True)
    return task, run_comparison(task, methods=["lora", "moslora"], seeds=4, r=4, lrs=[0.3], progress=False)


def _by_hand(rows: list[dict], answers: list[str]) -> dict[str, float]:
    per = {}
    for name in ("alpha", "beta", "gamma"):
        picked = [(row, answer) for row, answer in zip(rows, answers) if row["set"] == name]
        per[name] = sum(answer == row["answer"] for row, answer in picked) / len(picked)
    return {**per, "average": sum(per.values()) / 3}


def test_each_runs_accuracy_per_set_and_their_average_are_its_answers_counted_by_hand(pooled):
    from moslora.eval.evaluate import evaluate
    from moslora.train.model import load_model

    task, results = pooled
    tests = [run for run in results["runs"] if run["split"] == "test"]
    assert len(tests) == 8
    for run in tests:
        hand = _by_hand(task.test, run["answers"])
        assert run["by_set"] == pytest.approx({k: v for k, v in hand.items() if k != "average"}, abs=1e-12)
        assert list(run["by_set"]) == ["alpha", "beta", "gamma"]  # the order the sets first appear in
        assert report.set_values(results, run["method"])[run["seed"]]["average"] == pytest.approx(hand["average"], abs=1e-12)
        assert run["value"] == pytest.approx(sum(a == r["answer"] for a, r in zip(run["answers"], task.test)) / 12)
    # The untrained model (B = 0), scored by moslora.eval.evaluate on the bare model
    model, tokenizer = load_model(str(task.model), precision="fp32", for_training=False)
    answers = [e["extracted"] for e in evaluate(model, tokenizer, task.test, None, scoring="choice")["examples"]]
    hand = _by_hand(task.test, answers)
    assert results["untrained_by_set"]["test"] == pytest.approx({k: v for k, v in hand.items() if k != "average"}, abs=1e-12)
    assert report.per_set(results)["untrained"]["average"] == pytest.approx(hand["average"], abs=1e-12)
    assert results["task"]["test_sets"] == {"alpha": 6, "beta": 4, "gamma": 2}
    # the runs' answers differ across seeds and methods (else the paired checks below prove little)
    assert len({tuple(run["answers"]) for run in tests}) > 1


def test_the_paired_cis_per_set_and_on_the_average_are_stats_paired_on_the_per_seed_values(pooled):
    task, results = pooled
    hand = {(run["method"], run["seed"]): _by_hand(task.test, run["answers"]) for run in results["runs"] if run["split"] == "test"}
    table = report.per_set(results)
    assert table["columns"] == ["alpha", "beta", "gamma", "average"]
    lora, moslora = table["rows"]
    assert (lora["method"], lora["vs_baseline"], moslora["method"], moslora["n"]) == ("lora", None, "moslora", 4)
    intervals = 0
    for column in table["columns"]:
        for row in (lora, moslora):
            assert row["mean"][column] == pytest.approx(sum(hand[row["method"], s][column] for s in range(4)) / 4, abs=1e-12)
        expected = paired([hand["moslora", s][column] for s in range(4)], [hand["lora", s][column] for s in range(4)])
        got = moslora["vs_baseline"][column]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == (pytest.approx(value, abs=1e-12) if value is not None else None), (column, key)
        intervals += got["ci_low"] is not None
    assert intervals >= 1, "no column has a spread across seeds: the comparison of intervals checked nothing"
    spread = moslora["vs_baseline"]["average"]["std_diff"]
    assert moslora["seeds_for_1pt"] == (None if spread is None else seeds_for_half_width(spread, 0.01))


def test_the_per_set_table_is_in_results_md_and_the_terminal_table(pooled, tmp_path):
    from moslora.compare import views

    task, results = pooled
    table = report.per_set(results)
    paths = report.save(results, tmp_path, "moslora compare --task tiny")
    markdown = paths["markdown"].read_text()
    text = report.text_table(results)
    lora, moslora = table["rows"]
    assert "## Per set" in markdown and "Per set:" in text
    assert "| method | alpha | beta | gamma | average |" in markdown
    assert "| lora | " + " | ".join(f"{100 * lora['mean'][c]:.1f}" for c in table["columns"]) + " |" in markdown
    delta = [views.signed(moslora["vs_baseline"][c], 1, 100) for c in table["columns"]]
    assert "| moslora − LoRA | " + " | ".join(delta) + " |" in markdown
    assert "test questions per set: alpha 6, beta 4, gamma 2 (12 in all)" in markdown
    assert "average = the mean of the 3 per-set accuracies" in markdown
    untrained = table["untrained"]
    assert "| untrained model | " + " | ".join(f"{100 * untrained[c]:.1f}" for c in table["columns"]) + " |" in markdown
    assert all(cell in text for cell in delta)
    assert markdown.index("## Per set") < markdown.index("## Convergence")  # the other views are still there


def test_a_task_of_one_set_reports_what_it_always_did(tiny_llama, tmp_path):
    task = _task(tiny_llama, with_sets=False)
    results = run_comparison(task, methods=["lora", "moslora"], seeds=1, r=4, lrs=[0.3], progress=False)
    assert "untrained_by_set" not in results and "test_sets" not in results["task"]
    assert not any("by_set" in run for run in results["runs"])
    assert report.per_set(results) is None
    assert "Per set" not in report.markdown_table(results) and "Per set" not in report.text_table(results)


def test_rows_that_only_sometimes_say_their_set_are_refused(tiny_llama):
    from dataclasses import replace

    task = _task(tiny_llama, with_sets=True)
    test = [*task.test[:3], {k: v for k, v in task.test[3].items() if k != "set"}, *task.test[4:]]
    with pytest.raises(ValueError, match="field 'test': row 4 has no 'set'"):
        replace(task, test=test)
