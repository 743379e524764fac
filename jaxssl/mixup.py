"""Mixup / CutMix with label smoothing, and the soft-target cross-entropy, as pure jnp functions (on device, jitted).

Semantics of timm's `Mixup(mode='batch')`, which the VideoMAE V2 fine-tuning recipe uses (mixup 0.8, cutmix 1.0,
prob 1.0, switch prob 0.5, label smoothing 0.1):
- one draw per batch: with probability `prob` the batch is mixed, by CutMix with probability `switch_prob` (when both
  are enabled), its lambda ~ Beta(alpha, alpha) of the chosen kind; otherwise lambda = 1 (labels still smoothed);
- every sample is mixed with its mirror in the batch (row i with row B - 1 - i: `x.flip(0)`);
- CutMix pastes one box, the same for every frame and channel: side int(size * sqrt(1 - lambda)) (floor), centre
  uniform over the image, halves of side // 2 on both sides clipped to the image; lambda is then corrected to
  1 - box area / image area;
- targets: smoothed one-hot (off = s / K, on = 1 - s + s / K), mixed lambda * y + (1 - lambda) * y_flipped.

`groups` splits the batch into that many equal contiguous chunks and mirrors rows within each chunk. With the batch
sharded over G devices, groups = G keeps the mirror device-local (no cross-device traffic) and matches the reference,
where each GPU mixes its own batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MixConfig(NamedTuple):
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """(B,) int labels -> (B, K) float32 targets: 1 - s + s / K on the label, s / K elsewhere (timm's one_hot)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def mirror(x: jax.Array, groups: int = 1) -> jax.Array:
    """Reverses the leading axis within each of `groups` equal contiguous chunks (timm's `x.flip(0)` for groups=1)."""
    if x.shape[0] % groups:
        raise ValueError(f'batch {x.shape[0]} is not divisible into {groups} mixing groups')
    return jnp.flip(x.reshape(groups, -1, *x.shape[1:]), axis=1).reshape(x.shape)


def cutmix_box(
    lam: jax.Array, center_y: jax.Array, center_x: jax.Array, height: int, width: int
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """((y_lo, y_hi, x_lo, x_hi), corrected lambda) of timm's rand_bbox + cutmix_bbox_and_lam for a given centre."""
    ratio = jnp.sqrt(jnp.maximum(1.0 - lam, 0.0))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    y_lo = jnp.clip(center_y - cut_h // 2, 0, height)
    y_hi = jnp.clip(center_y + cut_h // 2, 0, height)
    x_lo = jnp.clip(center_x - cut_w // 2, 0, width)
    x_hi = jnp.clip(center_x + cut_w // 2, 0, width)
    area = (y_hi - y_lo) * (x_hi - x_lo)
    return (y_lo, y_hi, x_lo, x_hi), 1.0 - area.astype(jnp.float32) / (height * width)


def draw_mix(rng: jax.Array, config: MixConfig, height: int, width: int) -> dict[str, jax.Array]:
    """One batch's mixing parameters: {'lam' (corrected), 'cutmix' (bool), 'box' (y_lo, y_hi, x_lo, x_hi)}."""
    k_apply, k_switch, k_lam, k_y, k_x = jax.random.split(rng, 5)
    use_mixup, use_cutmix = config.mixup_alpha > 0, config.cutmix_alpha > 0
    if not (use_mixup or use_cutmix):
        return {'lam': jnp.float32(1), 'cutmix': jnp.asarray(False), 'box': jnp.zeros(4, jnp.int32)}
    apply = jax.random.uniform(k_apply) < config.prob
    if use_mixup and use_cutmix:
        cutmix = jax.random.uniform(k_switch) < config.switch_prob
    else:
        cutmix = jnp.asarray(use_cutmix)
    # Both candidate lambdas from one Beta sampler (a disabled kind draws from Beta(1, 1) and is never used).
    alphas = jnp.asarray([config.mixup_alpha if use_mixup else 1.0, config.cutmix_alpha if use_cutmix else 1.0])
    lam_mixup, lam_cutmix = jax.random.beta(k_lam, alphas, alphas)
    center_y = jax.random.randint(k_y, (), 0, height)
    center_x = jax.random.randint(k_x, (), 0, width)
    box, lam_box = cutmix_box(lam_cutmix, center_y, center_x, height, width)
    lam = jnp.where(apply, jnp.where(cutmix, lam_box, lam_mixup), 1.0).astype(jnp.float32)
    return {'lam': lam, 'cutmix': apply & cutmix, 'box': jnp.stack(box).astype(jnp.int32)}


def apply_mix(
    video: jax.Array,
    labels: jax.Array,
    params: dict[str, jax.Array],
    num_classes: int,
    smoothing: float,
    groups: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Mixes a (B, T, H, W, C) batch and its (B,) labels with `draw_mix` parameters -> (video, (B, K) targets)."""
    lam = params['lam']
    partner = mirror(video, groups)
    height, width = video.shape[2], video.shape[3]
    y_lo, y_hi, x_lo, x_hi = params['box']
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)
    pasted = jnp.where(inside[None, None, :, :, None], partner, video)
    blended = (video * lam + partner * (1.0 - lam)).astype(video.dtype)
    mixed = jnp.where(params['cutmix'], pasted, blended)
    targets = smooth_one_hot(labels, num_classes, smoothing)
    targets = targets * lam + mirror(targets, groups) * (1.0 - lam)
    return mixed, targets


def mix_batch(
    rng: jax.Array, video: jax.Array, labels: jax.Array, num_classes: int, config: MixConfig, groups: int = 1
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Draws and applies one batch's Mixup / CutMix: (mixed video, soft targets (B, K), parameters drawn)."""
    params = draw_mix(rng, config, video.shape[2], video.shape[3])
    mixed, targets = apply_mix(video, labels, params, num_classes, config.label_smoothing, groups)
    return mixed, targets, params


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of sum_k -target_k log softmax(logits)_k (timm's SoftTargetCrossEntropy), in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(-targets * log_probs, axis=-1))
