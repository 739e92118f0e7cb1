"""The convergence and learning-rate views of a comparison, on results whose numbers are known by hand."""

from __future__ import annotations

import pytest

from moslora.compare import report, views


def _run(method: str, seed: int, split: str, lr: float, value: float, losses: list[float]) -> dict:
    return {"method": method, "seed": seed, "split": split, "lr": lr, "value": value, "train_seconds": 1.0,
            "curve": {"step": [2, 4, 6, 8][: len(losses)], "loss": losses}, "trainable_params": 10,
            "parameter_counts": {"M": 0 if method == "lora" else 4}, "config": {"train_mixer": True}}


# Per seed: LoRA's loss at steps 2, 4, 6, 8, and MoSLoRA's.
LORA = {0: [4.0, 3.0, 2.0, 1.0], 1: [4.2, 3.2, 2.1, 1.1], 2: [4.1, 3.1, 2.4, 1.3]}
MOSLORA = {0: [3.0, 2.5, 2.0, 1.0], 1: [3.3, 3.0, 2.0, 1.0], 2: [4.1, 3.2, 3.0, 1.5]}


def _results() -> dict:
    runs = []
    for method, lr, accuracies in (("lora", 1e-3, [0.5, 0.6]), ("lora", 1e-2, [0.7, 0.8]),
                                   ("moslora", 1e-3, [0.6, 0.6]), ("moslora", 1e-2, [0.4, 0.5])):
        runs += [_run(method, 1000 + i, "validation", lr, a, [1.0]) for i, a in enumerate(accuracies)]
    for seed in range(3):
        runs.append(_run("lora", seed, "test", 1e-2, 0.7, LORA[seed]))
        runs.append(_run("moslora", seed, "test", 1e-3, 0.7, MOSLORA[seed]))
    return {"task": {"name": "toy", "kind": "classification", "steps": 8, "description": "", "model": "m", "sizes":
                     {"train": 1, "validation": 1, "test": 1}, "batch_size": 1, "max_length": 8, "alpha_over_r": 2, "chance": 0.5},
            "settings": {"methods": ["lora", "moslora"], "seeds": [0, 1, 2], "r": 8, "lrs": [1e-3, 1e-2], "validation_seeds": [1000, 1001]},
            "picked_lr": {"lora": 1e-2, "moslora": 1e-3}, "untrained": None, "runs": runs}


def test_convergence_pairs_the_loss_at_each_share_of_the_budget_by_hand():
    (row,) = views.convergence(_results())
    assert row["method"] == "moslora" and row["n"] == 3
    for fraction, k in ((0.25, 0), (0.5, 1), (1.0, 3)):  # steps 2, 4 and 8 of 8
        diffs = [MOSLORA[s][k] - LORA[s][k] for s in range(3)]
        got = row["loss"][fraction]
        assert got["step"] == [2, 4, 6, 8][k]
        assert got["diff"]["mean_diff"] == pytest.approx(sum(diffs) / 3)
        assert got["lora"] == pytest.approx(sum(LORA[s][k] for s in range(3)) / 3)
    # Half-budget level = LoRA's loss at step 4 on each seed (3.0, 3.2, 3.1). MoSLoRA first gets to or
    # below it at step 2, 4 and 6; LoRA at step 4 on every seed: differences -2, 0, +2.
    level = row["steps_to_level"]
    assert (level["method_reached"], level["lora_reached"]) == (3, 3)
    assert level["diff"]["mean_diff"] == pytest.approx(0.0)
    assert level["diff"]["std_diff"] == pytest.approx(2.0)
    assert (level["lora"], level["method"]) == (4, 4)


def test_a_method_that_never_reaches_the_level_is_counted_not_averaged():
    results = _results()
    for run in results["runs"]:
        if run["method"] == "moslora" and run["seed"] == 2:
            run["curve"]["loss"] = [9.0, 9.0, 9.0, 9.0]
    level = views.convergence(results)[0]["steps_to_level"]
    assert (level["method_reached"], level["lora_reached"]) == (2, 3)
    assert level["diff"]["n"] == 2 and level["diff"]["mean_diff"] == pytest.approx(-1.0)  # -2 and 0


def test_the_lr_view_averages_validation_seeds_per_rate_and_marks_the_pick():
    results = _results()
    assert views.lr_curves(results) == {"lora": {1e-3: [0.5, 0.6], 1e-2: [0.7, 0.8]}, "moslora": {1e-3: [0.6, 0.6], 1e-2: [0.4, 0.5]}}
    table = "\n".join(views.lr_markdown(results))
    assert "| lora | 55.0 | **75.0** |" in table and "| moslora | **60.0** | 45.0 |" in table


def test_the_report_writes_the_views_with_the_table(tmp_path):
    results = _results()
    paths = report.save(results, tmp_path, "moslora compare --task toy")
    for key in ("figure", "convergence", "lr"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["markdown"].read_text()
    assert "## Convergence" in text and "## Learning rate" in text and "Δ loss at 25% (step 2)" in text
    mean = sum(MOSLORA[s][0] - LORA[s][0] for s in range(3)) / 3
    assert f"{mean:+.4f}" in text


def test_no_search_no_lr_view(tmp_path):
    results = _results()
    results["runs"] = [run for run in results["runs"] if run["split"] == "test"]
    results["settings"].update(lrs=[1e-3], validation_seeds=[])
    paths = report.save(results, tmp_path, None)
    assert "lr" not in paths and "## Learning rate" not in paths["markdown"].read_text()


def test_several_results_files_give_their_views_side_by_side(tmp_path):
    import json

    from moslora.cli.main import main

    files = []
    for name in ("one", "two"):
        results = _results()
        results["task"]["name"] = name
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(results))
    assert main(["compare", "--report-from", *map(str, files), "--output", str(tmp_path / "views")]) == 0
    text = (tmp_path / "views" / "views.md").read_text()
    assert "## one, r = 8" in text and "## two, r = 8" in text and text.count("| lora | 55.0 | **75.0** |") == 2
    assert (tmp_path / "views" / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "views" / "lr.png").read_bytes()[:4] == b"\x89PNG"


def test_a_search_extended_by_a_later_run_reads_as_one_curve():
    first, extension = _results(), _results()
    extension["runs"] = [_run("lora", 1000, "validation", 3e-2, 0.9, [1.0]), _run("lora", 1000, "validation", 1e-2, 0.6, [1.0])]
    pooled = views.merged_lr_curves([first, extension])
    assert list(pooled) == [("toy", 8)]
    assert pooled[("toy", 8)]["lora"] == {1e-3: [0.5, 0.6], 1e-2: [0.7, 0.8, 0.6], 3e-2: [0.9]}
    other = _results()
    other["task"]["name"] = "other"
    assert list(views.merged_lr_curves([first, other])) == [("toy", 8), ("other", 8)]
