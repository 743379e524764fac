"""UNFUSED's self-distillation loss (Sreyan88/LAPE, src/upstream/unfused/upstream_expert.py `training_step` and
src/utils/utils.py `loss_fn_mse`): every exit of the student learns the pseudo labels and follows the clip classifier.

With z_c the classifier's logits, z_i the exit heads' and y the pseudo labels (B examples):

    L = a sum_i CE(z_i, y) + CE(z_c, y) + b sum_i KL(softmax(z_c) || softmax(z_i))
        + g sum_i mean_b (2 - 2 cos(z_i, z_c))

CE is the mean over the batch; KL is torch's KLDivLoss(reduction='batchmean') of log_softmax(z_i) against
softmax(z_c): summed over classes, averaged over the batch, no temperature; the cosine compares the logits. Nothing is
detached: as in the reference, the KL and cosine terms also pull the classifier (and the encoder under it) towards
the exits. Defaults a = 0.7, b = 0.3, g = 0.003 (the reference's config.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import xlogy


def kl_batchmean(target_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """KL(softmax(target_logits) || softmax(logits)) summed over classes, averaged over the batch."""
    target = jax.nn.softmax(target_logits)
    return jnp.sum(xlogy(target, target) - target * jax.nn.log_softmax(logits)) / logits.shape[0]


def cosine_distance(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
    """mean over the batch of 2 - 2 cos(a, b), rows normalised as torch's F.normalize (norm clamped at eps). The
    norm is taken as sqrt(max(sum x^2, eps^2)), so an all-zero row has a finite gradient (jnp.linalg.norm's is NaN)."""
    unit = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
    return jnp.mean(2.0 - 2.0 * jnp.sum(unit(a) * unit(b), axis=-1))


def self_distillation_loss(
    clip_logits: jax.Array,
    exit_logits: Sequence[jax.Array],
    labels: jax.Array,
    *,
    exit_weight: float = 0.7,
    kl_weight: float = 0.3,
    cosine_weight: float = 0.003,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(L above, its terms and the classifier's / the exits' pseudo-label accuracies) for logits (B, C), labels (B,)."""
    chex.assert_rank(clip_logits, 2)
    chex.assert_shape(labels, clip_logits.shape[:1])
    for z in exit_logits:
        chex.assert_equal_shape([z, clip_logits])
    clip_logits = clip_logits.astype(jnp.float32)
    exit_logits = [z.astype(jnp.float32) for z in exit_logits]
    ce = lambda z: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, labels))
    clip_ce = ce(clip_logits)
    exit_ce = sum(ce(z) for z in exit_logits)
    kl = sum(kl_batchmean(clip_logits, z) for z in exit_logits)
    cosine = sum(cosine_distance(z, clip_logits) for z in exit_logits)
    loss = exit_weight * exit_ce + clip_ce + kl_weight * kl + cosine_weight * cosine
    accuracy = lambda z: jnp.mean((jnp.argmax(z, axis=-1) == labels).astype(jnp.float32))
    metrics = {'loss': loss, 'clip_ce': clip_ce, 'exit_ce': exit_ce, 'kl': kl, 'cosine': cosine}
    metrics['clip_accuracy'] = accuracy(clip_logits)
    metrics.update({f'exit{i + 1}_accuracy': accuracy(z) for i, z in enumerate(exit_logits)})
    return loss, metrics
