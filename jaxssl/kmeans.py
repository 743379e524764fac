"""A small k-means (k-means++ seeding, Lloyd iterations) in numpy, for the non-gradient clustering steps between
training stages (G-SimCLR's pseudo labels). Deterministic given the seed, like sklearn's KMeans(random_state=...)."""

from __future__ import annotations

import numpy as np


def _sq_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N, K) squared Euclidean distances, clipped at 0 (the expanded form can round below it)."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.maximum(d, 0.0)


CHUNK_DISTANCES = 2**24  # distances computed at once (128 MB in float64)


def _nearest(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centre and its squared distance, (N,) each, computed CHUNK_DISTANCES at a time so that the
    (N, K) matrix is never held (1.28M images x 5,000 centres would be 51 GB)."""
    chunk = max(1, CHUNK_DISTANCES // len(centres))
    labels, nearest = np.empty(len(x), np.int64), np.empty(len(x))
    for start in range(0, len(x), chunk):
        d = _sq_distances(x[start : start + chunk], centres)
        labels[start : start + chunk] = d.argmin(1)
        nearest[start : start + chunk] = d[np.arange(len(d)), labels[start : start + chunk]]
    return labels, nearest


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Arthur & Vassilvitskii's seeding: each next centre drawn with probability proportional to its squared
    distance from the nearest chosen one. (k, D)."""
    centres = [x[rng.integers(len(x))]]
    nearest = _sq_distances(x, centres[0][None])[:, 0]
    for _ in range(1, k):
        total = nearest.sum()
        # All points on chosen centres (duplicates): any point will do.
        index = rng.integers(len(x)) if total <= 0 else rng.choice(len(x), p=nearest / total)
        centres.append(x[index])
        nearest = np.minimum(nearest, _sq_distances(x, x[index][None])[:, 0])
    return np.stack(centres)


def kmeans(
    x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 300, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, float]:
    """Clusters the rows of `x` (N, D) into `k` groups: (labels int32 (N,), centres float64 (k, D), inertia).

    Lloyd iterations from k-means++ seeds until no centre moves more than `tol` (relative to the data's variance,
    as sklearn) or `max_iter`. A cluster that empties is re-seeded at the point farthest from its centre, so every
    label in [0, k) is used when the data has at least k distinct points.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not 1 <= k <= len(x):
        raise ValueError(f'kmeans needs (N, D) data with 1 <= k <= N; got shape {x.shape} and k={k}')
    rng = np.random.default_rng(seed)
    centres = kmeans_plus_plus(x, k, rng)
    threshold = tol * x.var(0).mean()
    for _ in range(max_iter):
        labels, nearest = _nearest(x, centres)
        counts = np.bincount(labels, minlength=k)
        new = np.zeros_like(centres)
        np.add.at(new, labels, x)
        for empty in np.flatnonzero(counts == 0):
            far = int(nearest.argmax())
            new[empty], counts[empty], labels[far] = x[far], 1, empty
            nearest[far] = 0.0
        new /= counts[:, None]
        shift = ((new - centres) ** 2).sum(1).max()
        centres = new
        if shift <= threshold:
            break
    labels, nearest = _nearest(x, centres)
    return labels.astype(np.int32), centres, float(nearest.sum())
