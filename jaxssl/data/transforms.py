"""VideoMAE V2 pretraining augmentation, as numpy functions on uint8 clips (T, H, W, 3).

The reference (dataset/pretrain_datasets.py, DataAugmentationForVideoMAEv2) applies GroupMultiScaleCrop to the
clip's frames (one crop for all frames), resizes the crop bilinearly with PIL to the input size, scales to [0, 1]
and normalises with ImageNet mean/std. No flip and no colour jitter. The crop is drawn in two uniform choices:
a (width, height) pair from the scale grid, then one of 13 fixed offsets for that size.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SCALES = (1.0, 0.875, 0.75, 0.66)


def multiscale_crop_sizes(
    height: int, width: int, input_size: int, scales: tuple[float, ...] = SCALES, max_distort: int = 1
) -> list[tuple[int, int]]:
    """The (crop_h, crop_w) pairs GroupMultiScaleCrop chooses from, in the reference's order.

    Side lengths are int(scale * shorter side); a length within 2 pixels of `input_size` snaps to it (so the common
    case of a crop already at the input size skips resampling). Height and width scale indices may differ by at most
    `max_distort`, which allows mildly non-square crops.
    """
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [input_size if abs(s - input_size) < 3 else s for s in sides]
    return [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]


def fixed_crop_offsets(
    height: int, width: int, crop_h: int, crop_w: int, more_fix_crop: bool = True
) -> list[tuple[int, int]]:
    """The (y, x) top-left corners of the fixed crops: 5 (corners + centre), or 13 with `more_fix_crop`.

    Positions are multiples of a quarter of the slack ((size - crop) // 4), in the reference's order: the four
    corners, the centre, then the four edge midpoints and the four quarter points.
    """
    ys, xs = (height - crop_h) // 4, (width - crop_w) // 4
    grid = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]  # (y, x) in quarter steps
    if more_fix_crop:
        grid += [(2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3), (3, 1), (3, 3)]
    return [(qy * ys, qx * xs) for qy, qx in grid]


def sample_multiscale_crop(height: int, width: int, input_size: int, rng: np.random.Generator) -> tuple[int, ...]:
    """One GroupMultiScaleCrop draw (scales SCALES, max_distort 1, fixed 13 offsets): returns (y, x, h, w)."""
    sizes = multiscale_crop_sizes(height, width, input_size)
    crop_h, crop_w = sizes[rng.integers(len(sizes))]
    offsets = fixed_crop_offsets(height, width, crop_h, crop_w)
    y, x = offsets[rng.integers(len(offsets))]
    return y, x, crop_h, crop_w


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bilinear resize of each uint8 frame (antialiased when shrinking, as the reference's PIL resize)."""
    from PIL import Image

    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack(
        [np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((width, height), Image.BILINEAR)) for f in frames]
    )


_SCALE = 1.0 / (255.0 * IMAGENET_STD)
_OFFSET = IMAGENET_MEAN / IMAGENET_STD


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 ImageNet-normalised: (x / 255 - mean) / std per channel (last axis)."""
    # One float32 buffer updated in place: about twice as fast as the textbook expression's four temporaries.
    out = frames.astype(np.float32)
    out *= _SCALE
    out -= _OFFSET
    return out


def pretrain_view(frames: np.ndarray, input_size: int, rng: np.random.Generator) -> np.ndarray:
    """One augmented view of a uint8 clip (T, H, W, 3): multi-scale fixed crop, resize, normalise -> float32."""
    y, x, h, w = sample_multiscale_crop(frames.shape[1], frames.shape[2], input_size, rng)
    return normalize(resize_frames(frames[:, y : y + h, x : x + w], input_size, input_size))
