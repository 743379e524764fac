"""TOV-VICReg's temporal order verification (mgoulao/TOV-VICReg, tov_vicreg/models/builder.py): the backbone
features of a frame and its two neighbours, [r(o_t), r(o_{t - k}), r(o_{t + k})], are permuted by one of the 3!
orders per sample, concatenated and classified by a linear layer as in order (label 0, the identity) or shuffled
(label 1); the loss is the binary cross-entropy with logits (BCEWithLogits, mean over the batch)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax


def permute_triplets(features: jax.Array, order: jax.Array) -> jax.Array:
    """features (B, 3, D), order (B, 3) int -> (B, 3 * D): row b is features[b, order[b]] concatenated."""
    chex.assert_rank(features, 3)
    chex.assert_shape(order, (features.shape[0], 3))
    permuted = jnp.take_along_axis(features, order[:, :, None], axis=1)
    return permuted.reshape(features.shape[0], -1)


def order_targets(order: jax.Array) -> jax.Array:
    """float32 (B,): 0 where `order` is the identity [0, 1, 2], 1 where the triplet was shuffled."""
    return jnp.any(order != jnp.arange(3), axis=-1).astype(jnp.float32)


def order_loss(logits: jax.Array, order: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean binary cross-entropy of the logits (B,) against `order_targets(order)`, {'tov_bce', 'tov_acc'})."""
    chex.assert_rank(logits, 1)
    targets = order_targets(order)
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets))
    accuracy = jnp.mean(((logits > 0).astype(jnp.float32) == targets).astype(jnp.float32))
    return bce, {'tov_bce': bce, 'tov_acc': accuracy}
