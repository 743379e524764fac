"""Contrastive losses: NT-Xent (SimCLR's normalised temperature-scaled cross entropy), MoCo-style InfoNCE and CLIP's
symmetric image-text InfoNCE, each on one device and over the global batch of a device mesh.

NT-Xent (Chen et al. 2020, eq. 1; google-research/simclr tf2/objective.py): N images give 2N views z. Each view is
an anchor whose positive is the other view of its image and whose 2N - 2 negatives are every other view of the
batch; similarity is the cosine, divided by a temperature. The loss is the cross entropy of the positive among
the 2N - 1 candidates, averaged over the 2N anchors (the paper's 1/(2N) sum; the tf2 code sums the two
directional means, i.e. 2x this value, a constant factor that LARS's trust ratio cancels).

`global_nt_xent` computes the same number when the batch is sharded over a mesh: each device all-gathers the
normalised views of every device (`lax.all_gather`, whose transpose is the reduce-scatter of the gathered
gradients), scores its own anchors against all 2N columns, and the per-device sums are psum'ed. So every anchor
sees the negatives of the whole global batch, as the reference's cross-replica concatenation, and each device
holds a (n_local, 2N) block of logits instead of the full (2N, 2N) matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

# Added to an anchor's similarity with itself before the softmax: the reference's LARGE_NUM (1e9) masking.
# Finite rather than -inf so that 0 * mask stays 0 in the backward pass.
SELF_MASK = 1e9


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis, as tf.math.l2_normalize (eps on the norm, not the square)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _anchor_losses(
    q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array, offset: jax.Array | int, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """Per-anchor cross entropies and top-1 hits for the anchors q1, q2 (n, D), rows `offset`.. of the keys k1, k2
    (N, D): all four are unit vectors, view 1 and view 2 of the same images.

    Row i of q1 is the positive of row offset + i of k2 (and q2 of k1); its own row in k1 is masked out. Returns
    (losses (2n,), correct (2n,)) ordered [view-1 anchors, view-2 anchors].
    """
    n, big_n = q1.shape[0], k1.shape[0]
    rows = offset + jnp.arange(n)
    self_mask = jax.nn.one_hot(rows, big_n, dtype=q1.dtype) * SELF_MASK

    def direction(q: jax.Array, k_same: jax.Array, k_other: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Candidates: the other view of every image (the positive among them), then the same view of every
        # other image. Logits in float32 whatever the compute dtype: 1/temperature amplifies rounding.
        other = jnp.dot(q, k_other.T, preferred_element_type=jnp.float32) / temperature
        same = jnp.dot(q, k_same.T, preferred_element_type=jnp.float32) / temperature - self_mask
        logits = jnp.concatenate([other, same], axis=1)
        log_z = jax.nn.logsumexp(logits, axis=1)
        positive = jnp.take_along_axis(other, rows[:, None], axis=1)[:, 0]
        correct = jnp.argmax(logits, axis=1) == rows
        return log_z - positive, correct

    loss1, correct1 = direction(q1, k1, k2)
    loss2, correct2 = direction(q2, k2, k1)
    return jnp.concatenate([loss1, loss2]), jnp.concatenate([correct1, correct2])


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """NT-Xent of one batch on one device. z1, z2: (N, D) projections of view 1 and view 2 of the same N images
    (row i of each is image i; they need not be normalised). Returns (mean loss over the 2N anchors, metrics)."""
    chex.assert_rank([z1, z2], 2)
    chex.assert_equal_shape([z1, z2])
    k1, k2 = l2_normalize(z1.astype(jnp.float32)), l2_normalize(z2.astype(jnp.float32))
    losses, correct = _anchor_losses(k1, k2, k1, k2, 0, temperature)
    return jnp.mean(losses), {'contrastive_acc': jnp.mean(correct.astype(jnp.float32))}


def global_nt_xent(
    z1: jax.Array, z2: jax.Array, temperature: float, mesh: Mesh | None, axes: Sequence[str] = ('data', 'fsdp')
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """NT-Xent over the global batch of `mesh`: z1, z2 (N, D) sharded (or to be sharded) over the mesh `axes` on
    their leading axis; the value and its gradient equal `nt_xent` on the whole batch. `mesh=None` (or a mesh of
    one device on those axes) runs `nt_xent` directly. N must divide evenly over the axes' devices."""
    chex.assert_rank([z1, z2], 2)
    chex.assert_equal_shape([z1, z2])
    axes = tuple(axes)
    devices = 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)
    if devices == 1:
        return nt_xent(z1, z2, temperature)
    if z1.shape[0] % devices:
        raise ValueError(f'{z1.shape[0]} images do not split evenly over {devices} devices on mesh axes {axes}')
    big_n = z1.shape[0]

    def per_device(z1_local: jax.Array, z2_local: jax.Array) -> tuple[jax.Array, jax.Array]:
        q1, q2 = l2_normalize(z1_local.astype(jnp.float32)), l2_normalize(z2_local.astype(jnp.float32))
        # tiled: (n, D) per device -> (N, D) in the order of the axes' linear index, which axis_index also uses,
        # so this device's anchors are rows offset .. offset + n of the gathered keys.
        k1 = jax.lax.all_gather(q1, axes, tiled=True)
        k2 = jax.lax.all_gather(q2, axes, tiled=True)
        offset = jax.lax.axis_index(axes) * q1.shape[0]
        losses, correct = _anchor_losses(q1, q2, k1, k2, offset, temperature)
        total = jax.lax.psum(jnp.sum(losses), axes)
        hits = jax.lax.psum(jnp.sum(correct.astype(jnp.float32)), axes)
        return total / (2 * big_n), hits / (2 * big_n)

    spec = PartitionSpec(axes)
    loss, accuracy = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=(PartitionSpec(),) * 2)(
        z1, z2
    )
    return loss, {'contrastive_acc': accuracy}


def _query_key_losses(
    q: jax.Array, k: jax.Array, offset: jax.Array | int, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """Cross entropies and top-1 hits of the unit queries q (n, D), rows `offset`.. of the batch, against all unit
    keys k (N, D), the positive of query i being key offset + i."""
    rows = offset + jnp.arange(q.shape[0])
    logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) / temperature
    positive = jnp.take_along_axis(logits, rows[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - positive, jnp.argmax(logits, axis=1) == rows


def info_nce(q: jax.Array, k: jax.Array, temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MoCo-style InfoNCE on one device: query i's positive is key i, its negatives every other key of the batch
    (no query-query pairs, unlike NT-Xent). q, k (N, D), normalised here; the keys usually come from a momentum
    teacher under stop_gradient. Returns (mean cross entropy over the N queries, metrics); plain cross entropy,
    without MoCo v3's 2T factor."""
    chex.assert_rank([q, k], 2)
    chex.assert_equal_shape([q, k])
    losses, correct = _query_key_losses(
        l2_normalize(q.astype(jnp.float32)), l2_normalize(k.astype(jnp.float32)), 0, temperature
    )
    return jnp.mean(losses), {'contrastive_acc': jnp.mean(correct.astype(jnp.float32))}


def global_info_nce(
    q: jax.Array, k: jax.Array, temperature: float, mesh: Mesh | None, axes: Sequence[str] = ('data', 'fsdp')
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`info_nce` over the global batch of `mesh` (q, k sharded over `axes` on their leading axis): each device
    all-gathers the keys and scores its own queries against all N of them, as `global_nt_xent` does."""
    chex.assert_rank([q, k], 2)
    chex.assert_equal_shape([q, k])
    axes = tuple(axes)
    devices = 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)
    if devices == 1:
        return info_nce(q, k, temperature)
    if q.shape[0] % devices:
        raise ValueError(f'{q.shape[0]} queries do not split evenly over {devices} devices on mesh axes {axes}')
    big_n = q.shape[0]

    def per_device(q_local: jax.Array, k_local: jax.Array) -> tuple[jax.Array, jax.Array]:
        keys = jax.lax.all_gather(l2_normalize(k_local.astype(jnp.float32)), axes, tiled=True)
        offset = jax.lax.axis_index(axes) * q_local.shape[0]
        losses, correct = _query_key_losses(l2_normalize(q_local.astype(jnp.float32)), keys, offset, temperature)
        total = jax.lax.psum(jnp.sum(losses), axes)
        hits = jax.lax.psum(jnp.sum(correct.astype(jnp.float32)), axes)
        return total / big_n, hits / big_n

    spec = PartitionSpec(axes)
    loss, accuracy = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=(PartitionSpec(),) * 2)(q, k)
    return loss, {'contrastive_acc': accuracy}


def clip_loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CLIP's symmetric InfoNCE on one device (openai/CLIP's pseudocode, open_clip's ClipLoss): image i's positive is
    text i among all N texts, text i's is image i among all N images, logits exp(logit_scale) x cosine; the mean of
    the two directions' cross entropies. image, text (N, D), normalised here. Metrics: both directions' top-1."""
    chex.assert_rank([image, text], 2)
    chex.assert_equal_shape([image, text])
    q_image, q_text = l2_normalize(image.astype(jnp.float32)), l2_normalize(text.astype(jnp.float32))
    temperature = 1.0 / jnp.exp(logit_scale.astype(jnp.float32))
    image_losses, image_hits = _query_key_losses(q_image, q_text, 0, temperature)
    text_losses, text_hits = _query_key_losses(q_text, q_image, 0, temperature)
    loss = (jnp.mean(image_losses) + jnp.mean(text_losses)) / 2
    return loss, {
        'image_to_text_acc': jnp.mean(image_hits.astype(jnp.float32)),
        'text_to_image_acc': jnp.mean(text_hits.astype(jnp.float32)),
    }


def global_clip_loss(
    image: jax.Array,
    text: jax.Array,
    logit_scale: jax.Array,
    mesh: Mesh | None,
    axes: Sequence[str] = ('data', 'fsdp'),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`clip_loss` over the global batch of `mesh` (image, text sharded over `axes` on their leading axis): each
    device all-gathers both sides' unit embeddings (differentiably: open_clip's local_loss + gather_with_grad, which
    equals the loss on the whole batch) and scores its own rows against all N columns."""
    chex.assert_rank([image, text], 2)
    chex.assert_equal_shape([image, text])
    axes = tuple(axes)
    devices = 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)
    if devices == 1:
        return clip_loss(image, text, logit_scale)
    if image.shape[0] % devices:
        raise ValueError(f'{image.shape[0]} pairs do not split evenly over {devices} devices on mesh axes {axes}')
    big_n = image.shape[0]

    def per_device(image_local: jax.Array, text_local: jax.Array, scale: jax.Array) -> tuple[jax.Array, ...]:
        q_image, q_text = l2_normalize(image_local.astype(jnp.float32)), l2_normalize(text_local.astype(jnp.float32))
        k_image = jax.lax.all_gather(q_image, axes, tiled=True)
        k_text = jax.lax.all_gather(q_text, axes, tiled=True)
        offset = jax.lax.axis_index(axes) * q_image.shape[0]
        temperature = 1.0 / jnp.exp(scale.astype(jnp.float32))
        image_losses, image_hits = _query_key_losses(q_image, k_text, offset, temperature)
        text_losses, text_hits = _query_key_losses(q_text, k_image, offset, temperature)
        total = jax.lax.psum(jnp.sum(image_losses) + jnp.sum(text_losses), axes)
        hits = [jax.lax.psum(jnp.sum(h.astype(jnp.float32)), axes) for h in (image_hits, text_hits)]
        return total / (2 * big_n), hits[0] / big_n, hits[1] / big_n

    spec = PartitionSpec(axes)
    loss, image_acc, text_acc = jax.shard_map(
        per_device, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=(PartitionSpec(),) * 3
    )(image, text, logit_scale)
    return loss, {'image_to_text_acc': image_acc, 'text_to_image_acc': text_acc}
