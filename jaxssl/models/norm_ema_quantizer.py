"""BEATs's NormEMAVectorQuantizer (microsoft/unilm beats/quantizer.py, after BEiT v2's) as pure functions: a codebook
of unit vectors, cosine nearest-neighbour codes, a cosine k-means initialisation on the first batch, and an EMA of
the normalised per-code means in place of a codebook gradient. The codebook and its usage statistics live in a
method's extra state; every function here takes a per-vector weight so padding never moves a code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2norm(x: jax.Array) -> jax.Array:
    """x / max(||x||, 1e-12) over the last axis (torch's F.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Unit vectors (..., d) -> (...,) int32 indices of the nearest unit codebook rows (K, d): the argmin of
    ||z - c||^2 = 2 - 2 z.c, so the largest dot product."""
    similarity = jnp.matmul(z.astype(jnp.float32), codebook.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.argmax(similarity, axis=-1).astype(jnp.int32)


def _means(samples: jax.Array, weights: jax.Array, codes: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
    """(the weighted sum of the samples per code (K, d), the weighted count per code (K,))."""
    onehot = jax.nn.one_hot(codes, num_codes, dtype=jnp.float32) * weights[:, None]
    return jnp.matmul(onehot.T, samples, precision=jax.lax.Precision.HIGHEST), onehot.sum(axis=0)


def kmeans_init(
    samples: jax.Array, weights: jax.Array, num_codes: int, rng: jax.Array, iterations: int = 10
) -> tuple[jax.Array, jax.Array]:
    """The reference's `kmeans(..., use_cosine_sim=True)` on unit samples (N, d) with weights (N,) (0: padding):
    num_codes starting means drawn from the non-padding samples (without replacement when there are enough of
    them, as its randperm), then `iterations` rounds of assigning each sample to its most similar mean and replacing
    every mean that got samples by their normalised mean. Returns (codebook (K, d), weighted counts of the last
    assignment)."""
    samples = samples.astype(jnp.float32)
    n = samples.shape[0]
    probabilities = weights / jnp.maximum(weights.sum(), 1.0)
    distinct = jax.random.choice(rng, n, (num_codes,), replace=False, p=probabilities) if n >= num_codes else None
    repeated = jax.random.choice(rng, n, (num_codes,), replace=True, p=probabilities)
    # Without replacement only when enough samples are not padding: jax's draw would fill up with padding otherwise.
    start = repeated if distinct is None else jnp.where(jnp.sum(weights > 0) >= num_codes, distinct, repeated)
    means, counts = samples[start], jnp.zeros(num_codes, jnp.float32)
    for _ in range(iterations):
        sums, counts = _means(samples, weights, nearest_codes(samples, means), num_codes)
        means = jnp.where((counts == 0)[:, None], means, l2norm(sums / jnp.maximum(counts, 1.0)[:, None]))
    return means, counts


def ema_update(
    codebook: jax.Array,
    usage: jax.Array,
    samples: jax.Array,
    codes: jax.Array,
    weights: jax.Array,
    decay: float,
) -> tuple[jax.Array, jax.Array]:
    """One training step's codebook update, as the reference's forward in training mode: usage <- decay usage +
    (1 - decay) counts; each code that got samples moves to l2norm(decay c + (1 - decay) l2norm(their mean)), the
    others only renormalise (their 'mean' is the code itself). Returns (codebook, usage)."""
    sums, counts = _means(samples.astype(jnp.float32), weights, codes, codebook.shape[0])
    means = jnp.where((counts == 0)[:, None], codebook, l2norm(sums / jnp.maximum(counts, 1.0)[:, None]))
    return l2norm(decay * codebook + (1.0 - decay) * means), decay * usage + (1.0 - decay) * counts
