"""The statistics of a paired comparison over seeds.

For n seeds, method X's metric x_i and LoRA's l_i on the same seed i, the paired differences are
d_i = x_i − l_i. The report gives their mean d̄, the 95% confidence interval
d̄ ± t_{0.975, n−1} · s_d / √n (s_d the sample standard deviation, ddof 1), the two-sided paired
t-test (``scipy.stats.ttest_rel``, which assumes roughly normal d_i) and the two-sided Wilcoxon
signed-rank test (``scipy.stats.wilcoxon``, which does not; with 5 seeds its smallest possible
p-value is 2/2⁵ = 0.0625, so it can never reach 0.05). Undefined quantities (a spread from one
seed, a test on identical results) are ``None``.
"""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats


def describe(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean and sample standard deviation (ddof 1) of one method's metric over seeds."""
    n = len(values)
    mean = sum(values) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std}


def paired(method: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict[str, float | int | None]:
    """Paired difference ``method − baseline`` over seeds: mean, std, confidence interval, tests."""
    if len(method) != len(baseline):
        raise ValueError(f"paired samples must have the same length, got {len(method)} and {len(baseline)}")
    diffs = [m - b for m, b in zip(method, baseline)]
    n = len(diffs)
    summary = describe(diffs)
    result: dict[str, float | int | None] = {
        "n": n,
        "mean_diff": summary["mean"],
        "std_diff": summary["std"],
        "confidence": confidence,
        "ci_low": None,
        "ci_high": None,
        "t_pvalue": None,
        "wilcoxon_pvalue": None,
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
    }
    if n < 2 or summary["std"] == 0:
        return result
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * summary["std"] / math.sqrt(n)
    result["ci_low"] = summary["mean"] - half
    result["ci_high"] = summary["mean"] + half
    result["t_pvalue"] = float(stats.ttest_rel(method, baseline).pvalue)
    if any(diffs):
        result["wilcoxon_pvalue"] = float(stats.wilcoxon(method, baseline).pvalue)
    return result
