"""I2P-MAE's image side (Zhang et al., "Learning 3D Representations from 2D Pre-trained Models via Image-to-Point
Masked Autoencoders", CVPR 2023; ZrrSkywalker/I2P-MAE models/I2P_MAE.py): depth-like images of a point cloud seen
along its three axes, a frozen CLIP's patch features and class-token attention on them, and the way back from an
image map to the points.

- `project` (the reference's proj2img): view v reads the coordinates in VIEWS[v] order; the first two are the pixel
  (row, column), the third its value. One cell size per cloud, max(range of the two plane axes) / (S - 3); each
  point covers the 5 x 5 pixels around floor((p - min) / cell) + 1; the object is centred in the image (shifted so
  the middle of its pixels lands on S / 2 - 1), the few pixels that fall off the edge are moved one step in. Pixel
  values are the sum of the values of the points covering them (scatter-sum, 0 where empty), squashed by a sigmoid
  into all three channels, then normalised with ImageNet's mean and std (the reference's; not CLIP's own).
- `sample_at` (the reference's I2P): a map of the image's patch grid, upsampled bicubically to S x S (torch's
  F.interpolate, a = -0.75, align_corners False), read at the pixel each point fell on (its splat's centre). The
  upsampling is a separable linear map, so only the rows and columns of the read pixels are formed: the reference
  upsamples the whole (B, 512, 224, 224) feature map.
- `clip_maps`: the frozen CLIP image tower's patch features (post-LayerNorm, projected; openai's clip_attn returns
  them as a map) and the last block's attention of the class token to the patches, averaged over heads (the
  saliency).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

VIEWS = ((0, 1, 2), (2, 0, 1), (1, 2, 0))  # pts_1 = (x, y, z), pts_2 = (z, x, y), pts_3 = (y, z, x)
SPLAT = 2  # each point covers the (2 SPLAT + 1)^2 pixels around its own
BICUBIC_A = -0.75  # torch's bicubic kernel


class Frame(NamedTuple):
    """Where one view put a cloud: per cloud the plane axes' minimum (B, 2), the cell size (B,) and the shift that
    centres the object (B, 2)."""

    low: jax.Array
    cell: jax.Array
    shift: jax.Array


def view(points: jax.Array, v: int) -> jax.Array:
    """The coordinates of view v: (..., 3) reordered as VIEWS[v]."""
    return points[..., list(VIEWS[v])]


def _divide(x: jax.Array, divisor: jax.Array | float) -> jax.Array:
    """x / divisor correctly rounded, as torch's: XLA turns a division by a constant or a broadcast scalar into a
    product with its reciprocal, which can differ in the last bits and move a point across a pixel boundary. The
    barrier hides the full-shape divisor from that rewrite."""
    x, divisors = jax.lax.optimization_barrier((x, jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape)))
    return x / divisors


def _cells(points: jax.Array, frame: Frame) -> jax.Array:
    return jnp.floor(_divide(points[..., :2] - frame.low[:, None], frame.cell[:, None, None])).astype(jnp.int32)


def project(points: jax.Array, size: int = 224) -> tuple[jax.Array, Frame]:
    """(images (B, S, S, 3) ImageNet-normalised, frame) of view-ordered points (B, N, 3); see the module doc."""
    chex.assert_rank(points, 3)
    b = points.shape[0]
    points = points.astype(jnp.float32)
    low, high = points.min(axis=1), points.max(axis=1)
    cell = _divide(jnp.max(high[:, :2] - low[:, :2], axis=-1), size - 3)
    frame = Frame(low[:, :2], cell, jnp.zeros((b, 2), jnp.int32))
    offsets = np.stack(np.meshgrid(np.arange(-SPLAT, SPLAT + 1), np.arange(-SPLAT, SPLAT + 1), indexing='ij'), -1)
    pixels = (_cells(points, frame)[:, :, None] + offsets.reshape(-1, 2) + 1).reshape(b, -1, 2)
    centre = (pixels.max(axis=1) + pixels.min(axis=1)) // 2  # floor, as the reference's on non-negative sums
    shift = size // 2 - 1 - centre
    pixels = pixels + shift[:, None]
    pixels = pixels + (pixels < 0) - (pixels > size - 1)
    flat = pixels[..., 0] * size + pixels[..., 1]
    values = jnp.repeat(points[:, :, 2], offsets.size // 2, axis=1)
    image = jnp.zeros((b, size * size), jnp.float32).at[jnp.arange(b)[:, None], flat].add(values)
    image = jax.nn.sigmoid(image.reshape(b, size, size, 1))
    image = (image - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return image, frame._replace(shift=shift)


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) float32 M with M @ x = torch's F.interpolate(x, out, mode='bicubic', align_corners=False) along one
    axis: source position (i + 0.5) in / out - 0.5, Keys' cubic with a = -0.75 on its 4 neighbours, indices
    clamped to the edge."""

    def cubic(x: np.ndarray) -> np.ndarray:
        x, a = np.abs(x), BICUBIC_A
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x <= 1, near, np.where(x < 2, far, 0.0))

    matrix = np.zeros((out_size, in_size), np.float64)
    source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    first = np.floor(source).astype(int)
    for tap in range(-1, 3):
        index = np.clip(first + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), index), cubic(source - (first + tap)))
    return matrix.astype(np.float32)


def sample_at(points: jax.Array, frame: Frame, maps: jax.Array, size: int = 224) -> jax.Array:
    """(B, N, C): the maps (B, h, w, C), bicubically upsampled to size x size, at the pixels of view-ordered
    points (B, N, 3) in `frame` (a cloud's own points and any point inside its bounds fall inside the image)."""
    chex.assert_rank(maps, 4)
    pixels = jnp.clip(_cells(points, frame) + 1 + frame.shift[:, None], 0, size - 1)
    rows = jnp.asarray(bicubic_matrix(size, maps.shape[1]))[pixels[..., 0]]  # (B, N, h)
    cols = jnp.asarray(bicubic_matrix(size, maps.shape[2]))[pixels[..., 1]]  # (B, N, w)
    return jnp.einsum('bnh,bnw,bhwc->bnc', rows, cols, maps.astype(jnp.float32))


def clip_maps(tower: Any, params: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(patch features (B, h, w, D), saliency (B, h, w)) of a frozen CLIP: `tower` a jaxssl.models.clip.ImageTower,
    `params` {'vision_model': its params, 'visual_projection': {'kernel': (width, D)}}. The features are
    post_layernorm then the projection on every patch token of the last layer; the saliency is the last block's
    softmax(q k^T / sqrt(head dim)) of the class token over the patches, averaged over the heads."""
    if tower.depth < 2:
        raise ValueError("the CLIP image tower needs >= 2 blocks (the saliency reads the last block's input)")
    vision, layer_norm = params['vision_model'], nn.LayerNorm(1e-5)
    (_, tokens), state = tower.apply({'params': vision}, images, mutable=['intermediates'])
    before = state['intermediates']['hidden_states'][tower.depth - 2]  # the last block's input
    last = vision[f'layers_{tower.depth - 1}']
    y = layer_norm.apply({'params': last['layer_norm1']}, before.astype(jnp.float32))
    heads = tower.heads or max(tower.width // 64, 1)
    b, n, w = y.shape
    q = (y[:, :1] @ last['q_proj']['kernel'] + last['q_proj']['bias']).reshape(b, 1, heads, w // heads)
    k = (y @ last['k_proj']['kernel'] + last['k_proj']['bias']).reshape(b, n, heads, w // heads)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(w // heads)
    saliency = jax.nn.softmax(logits, axis=-1).mean(axis=1)[:, 0, 1:]  # (B, h w)
    features = layer_norm.apply({'params': vision['post_layernorm']}, tokens[:, 1:].astype(jnp.float32))
    features = features @ params['visual_projection']['kernel']
    side = round((n - 1) ** 0.5)
    return features.reshape(b, side, side, -1), saliency.reshape(b, side, side)
