"""Rank stability: how much the top-K set depends on the calibration sample.

Each seed draws its own calibration blocks, the metric is recomputed on them and the
top-K sets of every pair of seeds are compared by Jaccard similarity,

    J(A, B) = |A ∩ B| / |A ∪ B|,

1 for identical sets and 0 for disjoint ones. The fraction of calibration blocks two
seeds share is reported next to it, which shows the sample really changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from nn_core.select.weightset import WeightSet


def jaccard_matrix(sets: Sequence[WeightSet]) -> np.ndarray:
    """Pairwise Jaccard similarity of the sets (symmetric, ones on the diagonal)."""
    n = len(sets)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = sets[i].jaccard(sets[j])
    return out


def shared_fraction(blocks: Mapping[int, np.ndarray]) -> np.ndarray:
    """Fraction of calibration blocks each pair of seeds has in common."""
    seeds = list(blocks)
    n = len(seeds)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = blocks[seeds[i]], blocks[seeds[j]]
            inter = np.intersect1d(a, b).size
            out[i, j] = out[j, i] = inter / max(1, min(a.size, b.size))
    return out


def summarise(matrix: np.ndarray) -> dict:
    """Mean, min and max of the off-diagonal entries."""
    n = matrix.shape[0]
    if n < 2:
        return {"mean": None, "min": None, "max": None}
    off = matrix[~np.eye(n, dtype=bool)]
    return {"mean": float(off.mean()), "min": float(off.min()), "max": float(off.max())}
