"""The ranking loss with hard and random in-batch negatives of Wang & Gupta's video triplets (ICCV 2015), which
Transitive Invariance (Wang, He, Gupta, ICCV 2017) trains its Triplet-Siamese network with.

The reference is Caffe's RankHardLoss layer (xiaolonw/caffe-video_triplet@c39ea1a, src/caffe/layers/
rank_hard_loss_layer.cpp). The batch holds N embeddings as consecutive pairs (anchor 2k, positive 2k + 1) with an
integer label per embedding (the source video in 2015, the graph's cluster here); the embeddings are L2-normalised
(the reference's Norm layer after fc7 + ReLU) and D(a, b) = -a.b. For each anchor a with positive p:

1. candidates: every j whose label differs from a's and whose hinge max(0, D(a, p) - D(a, j) + margin) is > 0;
2. at most neg_num candidates: all of them;
3. otherwise, sorted by D(a, j) ascending (the most similar first), the first neg_num form the hard pool; a random
   hard_num = int(neg_num * hard_ratio) of the pool are taken, the pool's rest joins the other candidates, and a
   random rand_num = int(neg_num * rand_ratio) of those are taken;
4. loss = sum over pairs and chosen n of max(0, D(a, p) - D(a, n) + m) + max(0, D(a, p) - D(p, n) + m), divided by
   the fixed count 2 * neg_num * N / 2, however many negatives were chosen.

The choice is a boolean mask, constant to autodiff, so autodiff gives the reference's hand-written backward pass
(tests/test_transitive_invariance.py checks it against a transcription of Backward_cpu). The reference's
random_shuffle-then-take-the-first-k is drawn here as the k smallest of independent uniform keys, the same uniform
choice of a k-subset, and static in shape under jit.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

PAIR_SIZE = 2  # the reference's pair_size: anchor, positive


def _rank(keys: jax.Array) -> jax.Array:
    """Each entry's position in its row's stable ascending order (ties: the lower index first, as sorting
    (distance, index) pairs)."""
    order = jnp.argsort(keys, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def choose_negatives(
    distances: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    neg_num: int,
    hard_ratio: float,
    rand_ratio: float,
    margin: float,
) -> jax.Array:
    """The reference's mask of chosen negatives, bool (N / 2, N): row k for the anchor 2k. `distances` (N, N)."""
    n = distances.shape[0]
    chex.assert_shape(distances, (n, n))
    chex.assert_shape(labels, (n,))
    anchors = jnp.arange(0, n, PAIR_SIZE)
    to_positive = distances[anchors, anchors + 1]
    from_anchor = distances[anchors]
    candidates = (labels[None, :] != labels[anchors, None]) & (to_positive[:, None] - from_anchor + margin > 0)
    # C++: int hard_num = neg_num * hard_ratio, with hard_ratio a float: the product rounded to float32, truncated.
    hard_num, rand_num = (int(np.float32(neg_num) * np.float32(ratio)) for ratio in (hard_ratio, rand_ratio))
    pool = candidates & (_rank(jnp.where(candidates, from_anchor, jnp.inf)) < neg_num)
    hard_key, rand_key = jax.random.split(rng)
    hard = pool & (_rank(jnp.where(pool, jax.random.uniform(hard_key, pool.shape), jnp.inf)) < hard_num)
    rest = candidates & ~hard
    random = rest & (_rank(jnp.where(rest, jax.random.uniform(rand_key, rest.shape), jnp.inf)) < rand_num)
    few = candidates.sum(axis=1, keepdims=True) <= neg_num
    return jnp.where(few, candidates, hard | random)


def rank_hard_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    neg_num: int = 4,
    hard_ratio: float = 0.5,
    rand_ratio: float = 0.5,
    margin: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of L2-normalised `embeddings` (N, D) laid out as (anchor, positive) pairs with `labels` (N,).
    The defaults are the reference's (imagenet_train.prototxt: neg_num 4, hard_ratio 0.5, rand_ratio 0.5,
    margin 1)."""
    chex.assert_rank(embeddings, 2)
    n = embeddings.shape[0]
    if n % PAIR_SIZE:
        raise ValueError(f'rank_hard_loss needs (anchor, positive) pairs: got {n} embeddings')
    x = embeddings.astype(jnp.float32)
    # Full float32 products (TF32 would move near-ties across the hard pool's edge); the diagonal is 0 as the layer
    # never writes it (it matters only for a pair whose two items carry different labels).
    distances = -jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    distances = jnp.where(jnp.eye(n, dtype=bool), 0.0, distances)
    # A boolean mask: no gradient flows through the choice, as the layer's fixed mask_ in Backward_cpu.
    chosen = choose_negatives(
        jax.lax.stop_gradient(distances),
        labels,
        rng,
        neg_num=neg_num,
        hard_ratio=hard_ratio,
        rand_ratio=rand_ratio,
        margin=margin,
    )
    anchors = jnp.arange(0, n, PAIR_SIZE)
    to_positive = distances[anchors, anchors + 1][:, None]
    anchor_side = jax.nn.relu(to_positive - distances[anchors] + margin)
    positive_side = jax.nn.relu(to_positive - distances[anchors + 1] + margin)
    total = jnp.sum(jnp.where(chosen, anchor_side + positive_side, 0.0))
    loss = total / (neg_num * n // PAIR_SIZE * 2)  # the reference's cnt, fixed whatever was chosen
    count = jnp.maximum(chosen.sum(), 1)
    metrics = {
        'positive_similarity': -to_positive.mean(),
        'negative_similarity': -jnp.sum(jnp.where(chosen, distances[anchors], 0.0)) / count,
        'negatives_per_pair': chosen.sum(axis=1).mean().astype(jnp.float32),
    }
    return loss, metrics
