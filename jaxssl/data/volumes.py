"""A built-in stand-in for 3-D scans (OCT volumes): moving-digit clips read as (D, H, W) volumes.

Uni4Eye pretrains on 2-D fundus photographs and 3-D OCT volumes together; no volume data ships with any package
here, so the 3-D half of its runlocal data is generated: a clip of jaxssl.data.moving_digits (one or two real MNIST
digits drifting over a 64x64 canvas) is rendered in memory (no video encoding) and its frames are taken as the depth
axis, so each volume holds digit strokes that move smoothly through depth, as retinal layers do through B-scans.
`depth` frames are taken evenly spaced from the clip's 32, the canvas is block-averaged to `size`, and the volume is
z-scored over its own voxels (the successor code z-scores its OCT volumes; it does so over the nonzero voxels).
Users with real volumes replace `sample_volume`; this is a stand-in, not a model of OCT.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxssl.data import moving_digits


@functools.cache
def _train_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = moving_digits.load_mnist_digits()
    pool = moving_digits._split_digits(labels)['train']
    return images, labels, pool


def check_volume_shape(depth: int, size: int) -> None:
    """ValueError unless a (depth, size, size) volume can be cut from a moving-digits clip."""
    if not 1 <= depth <= moving_digits.FRAMES:
        raise ValueError(f'volume depth {depth} must be in [1, {moving_digits.FRAMES}]')
    if size < 1 or moving_digits.CANVAS % size:
        raise ValueError(f'volume size {size} must divide the {moving_digits.CANVAS}-pixel canvas')


def sample_volume(rng: np.random.Generator, depth: int, size: int) -> tuple[np.ndarray, int]:
    """(volume float32 (depth, size, size, 1) z-scored, label of its first digit), drawn from `rng`."""
    check_volume_shape(depth, size)
    images, labels, pool = _train_digits()
    spec = moving_digits.sample_clip_spec(rng, pool, labels)
    frames = moving_digits.render_clip(spec, images)[..., 0].astype(np.float32) / 255.0  # (32, 64, 64)
    frames = frames[np.linspace(0, moving_digits.FRAMES - 1, depth).round().astype(int)]
    factor = moving_digits.CANVAS // size
    volume = frames.reshape(depth, size, factor, size, factor).mean(axis=(2, 4))
    volume = (volume - volume.mean()) / (volume.std() + 1e-6)
    return volume[..., None].astype(np.float32), spec['label']
