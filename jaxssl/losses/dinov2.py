"""DINOv2's losses beside DINO's cross-entropy (facebookresearch/dinov2 dinov2/loss/; shared/reference/methods/
simclr_vicreg_dino_poa_uni.md section 4): the KoLeo spreading regulariser, Sinkhorn-Knopp teacher targets and the
iBOT masked-patch cross-entropy. Pure functions on static shapes: where the reference gathers a variable number of
masked patches, these take a fixed number of slots per image with a 0/1 weight per slot.

Under jit with the batch sharded over devices every sum here runs over the global batch, which is what the
reference's all-reduces give for Sinkhorn-Knopp and iBOT; KoLeo's neighbours are searched in the whole batch given
(the reference searches each GPU's own batch: see docs/methods.md).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """KoLeoLoss: x (n, D) -> -mean_i log(||x_i - x_nn(i) + eps|| + eps) on L2-normalised rows, nn(i) the row of
    largest inner product other than i (torch's PairwiseDistance adds eps to the difference)."""
    chex.assert_rank(x, 2)
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)  # F.normalize(eps=1e-8)
    dots = x @ x.T
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)  # a row is never its own neighbour
    neighbour = jax.lax.stop_gradient(jnp.argmax(dots, axis=1))  # the reference's index is not differentiated
    distances = jnp.linalg.norm(x - x[neighbour] + eps, axis=-1)
    return -jnp.mean(jnp.log(distances + eps))


def sinkhorn_knopp(
    teacher: jax.Array, temperature: jax.Array | float, iterations: int = 3, weights: jax.Array | None = None
) -> jax.Array:
    """SinkhornKnoppTeacher: logits (n, K) -> targets (n, K). Q = exp(t / temp) normalised to sum 1, then
    `iterations` rounds of: each prototype's (column's) total -> 1 / K, each sample's (row's) total -> 1 / n;
    returned times n, so every row sums to 1 and every prototype gets n / K of the mass. `weights` (n,) of 0 / 1
    leave rows out (padding slots of iBOT's masked patches): they get zero targets and n counts the 1s."""
    chex.assert_rank(teacher, 2)
    logits = teacher.astype(jnp.float32) / temperature
    valid = jnp.ones(logits.shape[0], jnp.float32) if weights is None else weights.astype(jnp.float32)
    chex.assert_shape(valid, logits.shape[:1])
    # exp(l - max) differs from the reference's exp(l) by a constant factor, which the first normalisation removes.
    top = jnp.max(jnp.where(valid[:, None] > 0, logits, -jnp.inf))
    q = jnp.exp(logits - jax.lax.stop_gradient(top)) * valid[:, None]
    count, prototypes = jnp.sum(valid), logits.shape[1]
    q = _safe_divide(q, jnp.sum(q))  # with no valid row at all, the targets are all zero
    for _ in range(iterations):
        q = _safe_divide(q, jnp.sum(q, axis=0, keepdims=True)) / prototypes
        q = _safe_divide(q, jnp.sum(q, axis=1, keepdims=True) * count)
    return jax.lax.stop_gradient(q * count)


def _safe_divide(x: jax.Array, y: jax.Array) -> jax.Array:
    """x / y, 0 where y is 0 (the padding rows and columns of a masked Sinkhorn-Knopp)."""
    return jnp.where(y > 0, x / jnp.where(y > 0, y, 1.0), 0.0)


def ibot_loss(student: jax.Array, targets: jax.Array, weights: jax.Array, student_temp: float) -> jax.Array:
    """iBOTPatchLoss.forward_masked: student logits and teacher targets (n, M, K) at M patch slots per image,
    weights (n, M) 1 where a slot holds a masked patch. Per image, the mean over its masked patches of
    -sum_k t_k log_softmax(s / student_temp)_k; then the mean over all n images, unmasked ones counting 0."""
    chex.assert_rank([student, targets, weights], [3, 3, 2])
    chex.assert_equal_shape([student, targets])
    chex.assert_equal_shape([student[..., 0], weights])
    ce = -jnp.sum(targets * jax.nn.log_softmax(student.astype(jnp.float32) / student_temp, axis=-1), axis=-1)
    per_image = jnp.sum(ce * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return jnp.mean(per_image)
