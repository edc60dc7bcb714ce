"""The paired bootstrap every comparison uses (compare, general ability, the sweep leaderboard)."""

import numpy as np


def paired_bootstrap_ci(base, tuned, samples: int, seed: int, level: float = 0.95):
    """CI of mean(tuned - base) resampling examples with replacement (pairs kept together)."""
    diff = np.asarray(tuned, dtype=float) - np.asarray(base, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(samples, len(diff)))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(diff.mean()), float(lo), float(hi)


def paired_delta(base_rows: list[dict], tuned_rows: list[dict], key: str, samples: int, seed: int) -> dict:
    """Means of per-example `key` on the same prompts and the paired-bootstrap CI of their difference."""
    base = [float(r[key]) for r in base_rows]
    tuned = [float(r[key]) for r in tuned_rows]
    delta, lo, hi = paired_bootstrap_ci(base, tuned, samples, seed)
    return {
        "base": float(np.mean(base)),
        "finetuned": float(np.mean(tuned)),
        "delta": delta,
        "ci95": [lo, hi],
        "significant": bool(lo > 0 or hi < 0),
    }
