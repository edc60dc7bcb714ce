"""The paired bootstrap every comparison uses (compare, leaderboard, general ability)."""

import numpy as np


def paired_bootstrap_ci(base, tuned, samples: int, seed: int, level: float = 0.95):
    """CI of mean(tuned - base) resampling examples with replacement (pairs kept together)."""
    diff = np.asarray(tuned, dtype=float) - np.asarray(base, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(samples, len(diff)))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(diff.mean()), float(lo), float(hi)
