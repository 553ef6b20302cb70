"""Statistics, plots and verdicts of a drift run (``nn-drift analyze``).

Drift magnitude per member: ``relative`` and ``l2`` as logged, and ``1 - cosine`` for the
cosine (so larger always means more drift). For every group G other than the baseline
(``random`` by default) and each chosen step:

* Cohen's d = (mean_G − mean_R) / s_p, s_p = sqrt(((n_G−1) s_G² + (n_R−1) s_R²) / (n_G+n_R−2))
  (sample variances, ddof=1); d > 0: G drifts more than the baseline.
* a percentile bootstrap confidence interval of d: both samples resampled with
  replacement ``n_boot`` times (seeded), the (1−level)/2 and (1+level)/2 quantiles;
* the two-sided Mann-Whitney U p-value (scipy.stats.mannwhitneyu).

Verdict per group and metric (at the last chosen step): **H1** (safety neurons drift
more than random) when the CI lies above 0 and p < alpha; **H2** (similar drift) when the
CI lies inside (−``similar``, +``similar``) (default 0.2, a "small" effect); **less** when
the CI lies below 0 and p < alpha; otherwise **inconclusive**.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nn_core.errors import NNError

DRIFT_METRICS = ("relative", "l2", "cosine")


def cohens_d(x, y) -> float:
    """(mean x − mean y) / pooled sample standard deviation (ddof=1)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        raise NNError("Cohen's d needs at least 2 members in each group: use larger groups")
    sp2 = ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)
    diff = float(x.mean() - y.mean())
    if sp2 <= 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(sp2)


def bootstrap_ci(x, y, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 max_n: int = 20000) -> tuple[float, float]:
    """Percentile bootstrap CI of :func:`cohens_d` (both samples resampled; samples longer
    than ``max_n`` are first subsampled to ``max_n`` without replacement, seeded)."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size > max_n:
        x = rng.choice(x, max_n, replace=False)
    if y.size > max_n:
        y = rng.choice(y, max_n, replace=False)
    ds = np.empty(n_boot)
    for b in range(n_boot):
        ds[b] = cohens_d(rng.choice(x, x.size), rng.choice(y, y.size))
    lo, hi = np.quantile(ds, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mann_whitney_p(x, y) -> float:
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(np.asarray(x), np.asarray(y), alternative="two-sided").pvalue)


def verdict(ci: tuple[float, float], p: float, *, alpha: float = 0.05, similar: float = 0.2) -> str:
    lo, hi = ci
    if lo > 0 and p < alpha:
        return "H1"
    if -similar < lo and hi < similar:
        return "H2"
    if hi < 0 and p < alpha:
        return "less"
    return "inconclusive"


def _magnitude(metric: str, v: np.ndarray) -> np.ndarray:
    return 1.0 - v if metric == "cosine" else v


def compare(folder: str | Path, *, baseline: str = "random", steps: Sequence[int] | None = None,
            metrics: Sequence[str] = DRIFT_METRICS, n_boot: int = 1000, seed: int = 0,
            alpha: float = 0.05, similar: float = 0.2) -> dict:
    """Statistics of every group vs ``baseline`` at ``steps`` (default: the last logged
    step with member values) from a run folder; see the module docstring."""
    from nn_drift.drift import member_steps, read_members

    have = member_steps(folder)
    if not have:
        raise NNError(f"'{folder}' has no per-member drift values: pass a folder written by "
                      "nn-drift finetune")
    steps = [have[-1]] if not steps else list(steps)
    bad = [s for s in steps if s not in have]
    if bad:
        raise NNError(f"step {bad[0]} was not logged: choose from {have}")
    out: dict = {"baseline": baseline, "steps": steps, "alpha": alpha, "similar": similar,
                 "n_boot": n_boot, "groups": {}}
    for step in steps:
        vals = read_members(folder, step)
        if baseline not in vals:
            raise NNError(f"no '{baseline}' group in the run (have {', '.join(vals)}): pass --baseline")
        for g, per in vals.items():
            if g == baseline:
                continue
            for m in metrics:
                x = _magnitude(m, per[m].double().numpy())
                y = _magnitude(m, vals[baseline][m].double().numpy())
                d = cohens_d(x, y)
                ci = bootstrap_ci(x, y, n_boot=n_boot, seed=seed)
                p = mann_whitney_p(x, y)
                out["groups"].setdefault(g, {}).setdefault(m, {})[str(step)] = {
                    "d": d, "ci": list(ci), "p": p, "mean": float(x.mean()),
                    "baseline_mean": float(y.mean()), "n": int(x.size),
                    "baseline_n": int(y.size), "verdict": verdict(ci, p, alpha=alpha, similar=similar)}
    return out


def plot_series(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """One PNG per metric: the mean of each group over steps with its q25–q75 band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in DRIFT_METRICS:
        fig, ax = plt.subplots(figsize=(6, 4))
        for g in sorted({r["group"] for r in rows}):
            rs = sorted((r for r in rows if r["group"] == g and r["metric"] == metric and r.get("n")),
                        key=lambda r: r["step"])
            if not rs:
                continue
            st = [r["step"] for r in rs]
            ax.plot(st, [r["mean"] for r in rs], label=g)
            ax.fill_between(st, [r["q25"] for r in rs], [r["q75"] for r in rs], alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"drift: {metric} (mean, q25-q75)")
        ax.legend()
        fig.tight_layout()
        p = out_dir / f"drift_{metric}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def report(stats: dict) -> str:
    """Markdown table of the statistics and verdicts."""
    lines = ["# Drift analysis", "",
             f"Baseline: `{stats['baseline']}`; Cohen's d of drift magnitude (relative, l2, "
             f"1 − cosine), {stats['n_boot']} bootstrap resamples (95 % CI), two-sided "
             f"Mann-Whitney U; H1 = CI > 0 and p < {stats['alpha']}, H2 = CI inside "
             f"±{stats['similar']}.", "",
             "| group | metric | step | d | 95 % CI | p | mean | baseline mean | n | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g, per in stats["groups"].items():
        for m, by in per.items():
            for s, r in by.items():
                lines.append(f"| {g} | {m} | {s} | {r['d']:.3f} | [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] "
                             f"| {r['p']:.2g} | {r['mean']:.3e} | {r['baseline_mean']:.3e} | {r['n']} "
                             f"| **{r['verdict']}** |")
    return "\n".join(lines) + "\n"


def write_analysis(run: str | Path, out: Path, *, behaviour: dict | None = None, **kw) -> dict:
    """``statistics.json``, ``report.md`` and ``drift_<metric>.png`` into ``out``; with
    ``behaviour`` (refusal rate and utility loss per stage) also ``behaviour.json``, the
    same under ``statistics.json``'s ``behaviour`` and a Behaviour section in the report."""
    from nn_drift.drift import read_drift

    stats = compare(run, **kw)
    text = report(stats)
    if behaviour is not None:
        from nn_drift.behaviour import behaviour_markdown

        stats["behaviour"] = behaviour
        (out / "behaviour.json").write_text(json.dumps(behaviour, indent=2))
        text += "\n## Behaviour\n\n" + behaviour_markdown(behaviour)
    (out / "statistics.json").write_text(json.dumps(stats, indent=2))
    (out / "report.md").write_text(text)
    plot_series(read_drift(run), out)
    return stats
