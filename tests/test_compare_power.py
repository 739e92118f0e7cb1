"""`moslora compare`'s power and honesty: the minimum detectable effect (hand-computed), the seeds
a target resolution needs, the plain-sentence summary, the rank sweep's table and figure, and the
YAML reading shared by task files."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from moslora.compare import ranks, report
from moslora.compare.stats import half_width, paired, seeds_for_half_width
from moslora.io.yaml_mapping import read_yaml_mapping


def test_half_width_is_the_t_interval_by_hand():
    # d = [0.02, 0.02, −0.01, 0.04, 0.02]: s_d = √(0.00128/4); t_{0.975,4} = 2.7764451051977987 from tables
    s_d = math.sqrt(0.00128 / 4)
    assert half_width(s_d, 5) == pytest.approx(2.7764451051977987 * s_d / math.sqrt(5), rel=1e-12)
    p = paired([0.80, 0.82, 0.79, 0.85, 0.81], [0.78, 0.80, 0.80, 0.81, 0.79])
    assert p["half_width"] == pytest.approx(2.7764451051977987 * s_d / math.sqrt(5), rel=1e-9)
    assert p["ci_high"] - p["mean_diff"] == pytest.approx(p["half_width"], abs=1e-12)
    assert paired([0.9], [0.8])["half_width"] is None
    with pytest.raises(ValueError, match="at least 2 seeds"):
        half_width(0.1, 1)


def test_seeds_for_half_width_is_the_smallest_n_that_reaches_the_target():
    # s_d = 4 points: n must satisfy t_{0.975,n−1}·4/√n ≤ 1; by hand n = 64 gives 1.998·4/8 = 0.999.
    n = seeds_for_half_width(4.0, 1.0)
    assert half_width(4.0, n) <= 1.0 < half_width(4.0, n - 1)
    assert n == 64
    assert scipy_stats.t.ppf(0.975, 63) * 4 / 8 == pytest.approx(half_width(4.0, 64))
    assert seeds_for_half_width(0.0, 1.0) == 2
    assert seeds_for_half_width(1000.0, 0.001, limit=100) is None
    with pytest.raises(ValueError, match="positive"):
        seeds_for_half_width(1.0, 0)


def _results(values: dict[str, list[float]], *, r: int = 8, untrained: float | None = None, chance: float = 1 / 3) -> dict:
    runs = []
    for method, accs in values.items():
        for seed, acc in enumerate(accs):
            runs.append({"method": method, "seed": seed, "lr": 1e-3, "split": "test", "value": acc, "train_seconds": 1.0,
                         "trainable_params": 10, "parameter_counts": {"M": 0 if method == "lora" else 4},
                         "config": {"train_mixer": True}, "curve": {"step": [1], "loss": [1.0]}})
    return {
        "task": {"name": "toy", "kind": "instruction", "description": "toy", "model": "m", "sizes": {"train": 1, "validation": 1, "test": 1},
                 "steps": 1, "batch_size": 1, "max_length": 8, "alpha_over_r": 2.0, "dropout": 0.0, "scoring": "choice",
                 "dataset": "boolq", "max_new_tokens": 1, "modules_to_save": [], "chance": chance},
        "settings": {"methods": list(values), "seeds": list(range(len(values["lora"]))), "r": r, "lrs": [1e-3], "validation_seeds": []},
        "untrained": None if untrained is None else {"test": untrained},
        "picked_lr": {m: 1e-3 for m in values},
        "runs": runs,
    }


def test_the_summary_says_what_the_numbers_do_and_do_not_show():
    inside = _results({"lora": [0.60, 0.62, 0.61, 0.63], "moslora": [0.61, 0.60, 0.62, 0.62]}, untrained=0.42)
    first, second = report.verdict(inside)
    assert first == "LoRA reaches 61.5% against 42.0% for the untrained model: at this budget it clearly learns the task."
    p = paired([0.61, 0.60, 0.62, 0.62], [0.60, 0.62, 0.61, 0.63])
    assert second.startswith(f"moslora − LoRA = {100 * p['mean_diff']:+.2f} points (95% CI [")
    assert "no difference is detectable" in second and f"smaller than about {100 * p['half_width']:.1f} points" in second

    below = _results({"lora": [0.60, 0.62, 0.61, 0.63], "moslora": [0.58, 0.61, 0.59, 0.60]})
    first, second = report.verdict(below)
    assert first.startswith("LoRA reaches 61.5% against 33.3% for chance")
    assert second.startswith("moslora is below LoRA by 2.00 points (95% CI [") and "says nothing about other settings" in second
    same = _results({"lora": [0.60, 0.62], "moslora": [0.59, 0.61]})
    assert report.verdict(same)[1] == "moslora − LoRA = -1.00 points on each of the 2 paired seeds (no spread, so no interval)."
    # 0.40 − 0.42 and 0.42 − 0.44 differ by round-off only (a real siqa --quick run): still no spread.
    rounded = _results({"lora": [0.42, 0.44], "moslora": [0.40, 0.42]})
    assert report.verdict(rounded)[1] == "moslora − LoRA = -2.00 points on each of the 2 paired seeds (no spread, so no interval)."
    assert paired([0.40, 0.42], [0.42, 0.44])["t_pvalue"] is None

    flat = _results({"lora": [0.35, 0.34], "moslora": [0.35, 0.30]}, untrained=0.335)
    assert "barely learns the task" in report.verdict(flat)[0]
    table = report.markdown_table(below)
    assert "**In short:** LoRA reaches 61.5%" in table and "| MDE, pts |" in table
    assert "Before training: chance 33.33% (test)." in table


def test_the_rank_sweep_table_and_figure(tmp_path):
    sweep = [
        _results({"lora": [0.60, 0.62, 0.61], "moslora": [0.61, 0.63, 0.60]}, r=4),
        _results({"lora": [0.70, 0.71, 0.69], "moslora": [0.66, 0.67, 0.66]}, r=16),
    ]
    rows = ranks.sweep_rows(list(reversed(sweep)))  # sorted by rank whatever the order given
    assert [(row["r"], row["method"]) for row in rows] == [(4, "lora"), (4, "moslora"), (16, "lora"), (16, "moslora")]
    expected = paired([0.66, 0.67, 0.66], [0.70, 0.71, 0.69])
    assert rows[3]["vs_baseline"]["mean_diff"] == pytest.approx(expected["mean_diff"])
    paths = ranks.save_sweep(sweep, tmp_path, "moslora compare --r 4,16")
    table = paths["markdown"].read_text()
    line = next(line for line in table.splitlines() if line.startswith("| 16 | moslora"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == f"{100 * expected['mean_diff']:+.2f} [{100 * expected['ci_low']:+.2f}, {100 * expected['ci_high']:+.2f}]"
    assert cells[5] == f"±{100 * expected['half_width']:.2f}" and cells[6] == "0/3" and cells[7] == "3"
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_yaml_mapping_names_the_file_and_the_unknown_key(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("a: 1\nb: two\n")
    assert read_yaml_mapping(good, {"a", "b", "c"}) == {"a": 1, "b": "two"}
    with pytest.raises(ValueError, match=r"recipe .*good.yaml: unknown field\(s\) \['b'\]; known fields: \['a'\]"):
        read_yaml_mapping(good, {"a"}, what="recipe")
    assert read_yaml_mapping(good, lambda data: set(data)) == {"a": 1, "b": "two"}  # keys that depend on the content
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml must be a YAML mapping"):
        read_yaml_mapping(tmp_path / "list.yaml", {"a"})
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        read_yaml_mapping(tmp_path / "bad.yaml", {"a"})
    with pytest.raises(FileNotFoundError, match="task file .*nowhere.yaml does not exist"):
        read_yaml_mapping(tmp_path / "nowhere.yaml", {"a"}, what="task file")
