"""Fine-tuning and test-time video transforms of the reference recipe, as numpy functions (channels-last).

Training (reference dataset/datasets.py, VideoClsDataset._aug_frame), per clip:
  RandAugment rand-m7-n4-mstd0.5-inc1 on the uint8 frames -> /255 and ImageNet normalisation ->
  random resized crop (area scale (0.08, 1), log-uniform aspect (3/4, 4/3), bilinear, no antialias) ->
  horizontal flip with p 0.5 (off for Something-Something V2) -> random erasing (p 0.25, one box shared by all
  frames, per-pixel N(0, 1) noise).
Testing: frames at the sampling stride over the whole video, short side resized to the input size, then
`num_clips` uniformly spaced clips x `num_crops` crops along the long side (3 x N views), softmax averaged by the
evaluator.
"""

from __future__ import annotations

import math

import numpy as np

from jaxssl.data.randaugment import parse_policy, rand_augment
from jaxssl.data.transforms import normalize


def bilinear_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (..., H, W, C) with half-pixel centres and no antialiasing.

    Same sampling as torch.nn.functional.interpolate(mode='bilinear', align_corners=False) and OpenCV INTER_LINEAR,
    which the reference uses for fine-tuning crops and test-time resizing. Returns float32.
    """
    in_h, in_w = frames.shape[-3:-1]

    def axis(out_size: int, in_size: int):
        pos = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
        low = np.minimum(np.floor(pos).astype(np.int64), in_size - 1)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, (pos - low).astype(np.float32)

    y0, y1, wy = axis(height, in_h)
    x0, x1, wx = axis(width, in_w)
    x = frames.astype(np.float32)
    rows = x[..., y0, :, :] * (1 - wy)[:, None, None] + x[..., y1, :, :] * wy[:, None, None]
    return rows[..., x0, :] * (1 - wx)[:, None] + rows[..., x1, :] * wx[:, None]


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Inception-style crop box (y, x, h, w): area fraction ~ U(scale), aspect w/h log-uniform in `ratio`.

    After `attempts` draws that do not fit, falls back to the largest centred crop with the aspect clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_erasing(
    frames: np.ndarray,
    rng: np.random.Generator,
    prob: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    attempts: int = 100,
) -> np.ndarray:
    """Random erasing in the reference's 'pixel' mode with one box for the whole clip ('cube').

    With probability `prob`, one box (area fraction ~ U(min_area, max_area), aspect log-uniform in
    [min_aspect, 1/min_aspect]) at the same place in every frame is filled with N(0, 1) noise (fresh noise per
    frame). Works on normalised float frames (T, H, W, C); returns a copy.
    """
    frames = np.array(frames, dtype=np.float32)
    if rng.random() > prob:
        return frames
    _, img_h, img_w, channels = frames.shape
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(attempts):
        target_area = rng.uniform(min_area, max_area) * img_h * img_w
        aspect = math.exp(rng.uniform(*log_aspect))
        h = round(math.sqrt(target_area * aspect))
        w = round(math.sqrt(target_area / aspect))
        if w < img_w and h < img_h:
            top, left = int(rng.integers(0, img_h - h + 1)), int(rng.integers(0, img_w - w + 1))
            noise = rng.standard_normal((len(frames), h, w, channels), dtype=np.float32)
            frames[:, top : top + h, left : left + w] = noise
            break
    return frames


def finetune_view(
    frames: np.ndarray,
    input_size: int,
    rng: np.random.Generator,
    *,
    auto_augment: str = 'rand-m7-n4-mstd0.5-inc1',
    flip: bool = True,
    erase_prob: float = 0.25,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """One fine-tuning training view of a uint8 clip (T, H, W, 3) -> float32 (T, S, S, 3), reference order."""
    if auto_augment:
        frames = rand_augment(frames, rng, **parse_policy(auto_augment))
    clip = normalize(frames)
    y, x, h, w = random_resized_crop_box(clip.shape[1], clip.shape[2], rng, scale, ratio)
    clip = bilinear_resize(clip[:, y : y + h, x : x + w], input_size, input_size)
    if flip and rng.random() < 0.5:
        clip = clip[:, :, ::-1]
    if erase_prob > 0:
        clip = random_erasing(clip, rng, erase_prob)
    return np.ascontiguousarray(clip)


def finetune_frame_indices(num_frames: int, frames: int, stride: int, rng: np.random.Generator | None) -> np.ndarray:
    """The reference's fine-tuning temporal sampling (VideoClsDataset.load_video, one segment).

    A window of frames * stride frames ending at a uniform random end (its centre with rng=None, validation) is
    sampled at `frames` evenly spaced points (np.linspace, so the step is slightly above `stride`). Videos no longer
    than the window are read at `stride` from the start and padded with the last frame.
    """
    window = frames * stride
    if num_frames <= window:
        index = np.linspace(0, num_frames, num=num_frames // stride)
        index = np.concatenate([index, np.full(frames - num_frames // stride, float(num_frames))])
        return np.clip(index, 0, num_frames - 1).astype(np.int64)
    end = (window + num_frames) // 2 if rng is None else int(rng.integers(window, num_frames))
    index = np.linspace(end - window, end, num=frames)
    return np.clip(index, end - window, end - 1).astype(np.int64)


def test_frame_indices(num_frames: int, frames: int, stride: int) -> np.ndarray:
    """Test-time frames: every `stride`-th frame of the whole video, padded with the last to at least `frames`."""
    index = list(range(0, num_frames, stride))
    index += [index[-1]] * max(0, frames - len(index))
    return np.asarray(index, np.int64)


def short_side_resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Resizes (T, H, W, C) so the shorter side is `size` (longer side truncated as int(size * long / short))."""
    h, w = frames.shape[1:3]
    if min(h, w) == size:
        return frames.astype(np.float32)
    new_h, new_w = (int(size * h / w), size) if w < h else (size, int(size * w / h))
    return bilinear_resize(frames, new_h, new_w)


def test_views(frames: np.ndarray, input_size: int, clip_len: int, num_clips: int, num_crops: int = 3) -> np.ndarray:
    """Test-time views of a whole video sampled by `test_frame_indices`: uint8 (N, H, W, 3) ->
    float32 (num_clips * num_crops, clip_len, S, S, 3), clip-major, normalised.

    Clip c starts at int(c * (N - clip_len) / (num_clips - 1)); crop k starts at int(k * (long - S) / (num_crops - 1))
    along the longer side (centred on the other). One clip or one crop means the first clip / the centre crop.
    """
    clip = short_side_resize(frames, input_size)
    n, h, w = clip.shape[:3]
    t_step = max((n - clip_len) / (num_clips - 1), 0) if num_clips > 1 else 0
    long_side = max(h, w)
    views = []
    for c in range(num_clips):
        t0 = int(c * t_step)
        segment = clip[t0 : t0 + clip_len]
        for k in range(num_crops):
            s0 = int(k * (long_side - input_size) / (num_crops - 1)) if num_crops > 1 else (long_side - input_size) // 2
            if h >= w:
                x0 = (w - input_size) // 2
                view = segment[:, s0 : s0 + input_size, x0 : x0 + input_size]
            else:
                y0 = (h - input_size) // 2
                view = segment[:, y0 : y0 + input_size, s0 : s0 + input_size]
            views.append(view)
    return normalize(np.stack(views))
