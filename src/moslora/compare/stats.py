"""The statistics of a paired comparison over seeds.

For n seeds, method X's metric x_i and LoRA's l_i on the same seed i, the paired differences are
d_i = x_i − l_i. The report gives their mean d̄, the 95% confidence interval
d̄ ± t_{0.975, n−1} · s_d / √n (s_d the sample standard deviation, ddof 1), the two-sided paired
t-test (``scipy.stats.ttest_rel``, which assumes roughly normal d_i) and the two-sided Wilcoxon
signed-rank test (``scipy.stats.wilcoxon``, which does not; with 5 seeds its smallest possible
p-value is 2/2⁵ = 0.0625, so it can never reach 0.05). Undefined quantities (a spread from one
seed, a test on identical results) are ``None``.

Power. The half-width h = t_{0.975, n−1} · s_d / √n of that interval is the comparison's
**minimum detectable effect** (MDE): a true difference smaller than h in magnitude will usually
not come out significant at these seeds and this spread, so "no significant difference" means
only "|Δ| is probably below about h". Halving h takes about four times the seeds;
:func:`seeds_for_half_width` gives the n at which the same spread s_d would reach a target h.
"""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats


SAME_DIFFERENCE = 1e-9  # paired differences closer than this are equal (float round-off)


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
    if summary["std"] is not None and summary["std"] < SAME_DIFFERENCE:
        # Equal differences on every seed (accuracies are multiples of 1/n, so 0.42 − 0.44 and
        # 0.40 − 0.42 differ only by round-off): no spread, hence no interval and no test.
        summary["std"] = 0.0
    result: dict[str, float | int | None] = {
        "n": n,
        "mean_diff": summary["mean"],
        "std_diff": summary["std"],
        "confidence": confidence,
        "ci_low": None,
        "ci_high": None,
        "half_width": None,
        "t_pvalue": None,
        "wilcoxon_pvalue": None,
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
    }
    if n < 2 or summary["std"] == 0:
        return result
    half = half_width(summary["std"], n, confidence)
    result["half_width"] = half
    result["ci_low"] = summary["mean"] - half
    result["ci_high"] = summary["mean"] + half
    result["t_pvalue"] = float(stats.ttest_rel(method, baseline).pvalue)
    if any(diffs):
        result["wilcoxon_pvalue"] = float(stats.wilcoxon(method, baseline).pvalue)
    return result


def half_width(std: float, n: int, confidence: float = 0.95) -> float:
    """h = t_{(1+confidence)/2, n−1} · std / √n: the half-width of the paired confidence interval
    (the minimum detectable effect) for n paired seeds whose differences have sample std ``std``."""
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 seeds, got {n}")
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)


def seeds_for_half_width(std: float, target: float, confidence: float = 0.95, limit: int = 100_000) -> int | None:
    """The smallest n ≥ 2 with :func:`half_width` (std, n) ≤ ``target``: how many paired seeds the
    same spread of differences would need for an interval of ±target. ``None`` beyond ``limit``."""
    if target <= 0:
        raise ValueError(f"target half-width must be positive, got {target}")
    if std == 0:
        return 2
    # (z·std/target)² is a lower bound (t > z); step up from there.
    n = max(2, math.floor((stats.norm.ppf(0.5 + confidence / 2) * std / target) ** 2))
    while half_width(std, n, confidence) > target:
        n += 1
        if n > limit:
            return None
    return n
