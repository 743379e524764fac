"""3-D scans read as stacks of 2-D slices, for the global / local contrastive method (Chaitanya et al. 2020):
the volume sources, the reference's slice preprocessing, its partition sampling and its augmentations.

Sources give records {'name', 'image' or 'path'}; `decode_volume` turns one into (image (Z, S, S) float32, labels
(Z, S, S) int32 or None), raising DecodeError for unreadable or malformed files (the pipeline skips and counts them).
- `cardiac_phantoms`: the built-in labelled volumes (jaxssl.data.phantoms), already at `input.image_size`.
- `folder`: <data_root>/<split>/*.npz, each with 'image' (Z, H, W) at the target in-plane resolution and
  optionally 'label' (Z, H, W) integer classes. Intensities are scaled per volume by the 1st / 99th percentiles
  and every slice is centre-cropped or zero-padded to input.image_size (the reference's create_cropped_imgs.py;
  resample to a common pixel spacing and correct the bias field before, as it does with N4).
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from jaxssl.config import ConfigError
from jaxssl.data import images, phantoms
from jaxssl.data.decode import DecodeError

# The reference's crop augmentation on 192 x 192 slices: a 100 x 100 window whose top-left corner is drawn from
# [10, 70) on each axis, resized back. Kept as fractions of the slice for other sizes.
CROP_SIZE, CROP_LOW, CROP_HIGH = 100 / 192, 10 / 192, 70 / 192


class VolumeFolderSource:
    """The .npz volumes in `root` (sorted): records {'name', 'path'}."""

    label_keys = ()

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"volume folder '{root}' does not exist (input.data_root / split)")
        self.root = root
        self.files = sorted(glob.glob(os.path.join(root, '*.npz')))
        if not self.files:
            raise FileNotFoundError(f"no .npz volumes in '{root}'")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {'name': self.files[index], 'path': self.files[index]}

    def __repr__(self) -> str:
        return f'VolumeFolderSource({self.root!r}, {len(self)} volumes)'


def make_volume_source(config: Any, split: str) -> Any:
    """The volumes of `split` that `config.input` names."""
    c = config.input
    if c.dataset == 'cardiac_phantoms':
        return phantoms.PhantomSource(split, c.image_size)
    if c.dataset != 'folder':
        raise ConfigError(f"bad value '{c.dataset}' for 'input.dataset'; valid: cardiac_phantoms, folder")
    if not c.data_root:
        raise ConfigError("'input.data_root' is empty: set it to <root> with <root>/<split>/*.npz volumes")
    return VolumeFolderSource(os.path.join(c.data_root, split))


def make_volume_dataset(
    config: Any, *, seed: int, process_index: int, process_count: int,
    view: Callable[[tuple[np.ndarray, Any], np.random.Generator], dict[str, np.ndarray]], min_slices: int = 1,
) -> tuple[Any, int]:  # fmt: skip
    """(host batches of `view((image, labels), rng)`, one volume of `input.split` per example in a shuffled pass
    per epoch, the split's volume count). Unreadable volumes, and those with fewer than `min_slices` slices, are
    skipped and counted."""
    source = make_volume_source(config, config.input.split)
    decode = functools.partial(decode_volume, size=config.input.image_size, min_slices=min_slices)
    dataset = images.make_image_pretrain_dataset(
        config, seed=seed, process_index=process_index, process_count=process_count, view=view, source=source,
        decode=decode,
    )  # fmt: skip
    return dataset, len(source)


def crop_or_pad(volume: np.ndarray, size: int) -> np.ndarray:
    """Centre crop or zero pad the last two axes to (size, size)."""
    out = volume
    for axis in (-2, -1):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
        elif n < size:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((size - n) // 2, size - n - (size - n) // 2)
            out = np.pad(out, pad)
    return out


def decode_volume(record: dict[str, Any], size: int, min_slices: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """(image (Z, size, size) float32 scaled by its percentiles, labels (Z, size, size) int32 or None)."""
    if 'image' in record:  # built in: generated at the size, already scaled
        if len(record['image']) < min_slices:
            raise DecodeError(f'{record["name"]} has {len(record["image"])} slices, fewer than {min_slices}')
        return record['image'], record.get('label')
    try:
        with np.load(record['path'], allow_pickle=False) as f:
            image = np.asarray(f['image'], np.float32)
            label = np.asarray(f['label']) if 'label' in f else None
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DecodeError(f'cannot read {record["name"]}: {e}') from e
    if image.ndim != 3 or image.shape[0] < min_slices:
        raise DecodeError(f'{record["name"]}: image of shape {image.shape}, need (Z >= {min_slices}, H, W)')
    if not np.all(np.isfinite(image)):
        raise DecodeError(f'{record["name"]} has non-finite intensities')
    if label is not None and label.shape != image.shape:
        raise DecodeError(f'{record["name"]}: label shape {label.shape} differs from the image {image.shape}')
    image = crop_or_pad(phantoms.normalize_volume(image), size)
    return image, None if label is None else crop_or_pad(label.astype(np.int32), size)


def partition_slices(depth: int, partitions: int, rng: np.random.Generator) -> np.ndarray:
    """One slice index per partition: partition k is slices [k m, (k + 1) m), m = floor(Z / partitions); the
    remainder at the end is never drawn (the reference's sampler)."""
    m = depth // partitions
    if m < 1:
        raise DecodeError(f'{depth} slices cannot be split into {partitions} partitions')
    return np.arange(partitions) * m + rng.integers(0, m, size=partitions)


def random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference's crop: a CROP_SIZE window at a corner drawn from [CROP_LOW, CROP_HIGH) of the slice on each
    axis, resized back bilinearly. (S, S) -> (S, S)."""
    size = image.shape[0]
    window = round(CROP_SIZE * size)
    top, left = rng.integers(round(CROP_LOW * size), max(round(CROP_HIGH * size), round(CROP_LOW * size) + 1), 2)
    top, left = min(top, size - window), min(left, size - window)
    crop = image[top : top + window, left : left + window]
    # skimage.transform.resize(order=1)'s sampling grid: pixel centres mapped by the size ratio.
    grid = (np.arange(size) + 0.5) * (window / size) - 0.5
    return ndimage.map_coordinates(crop, np.meshgrid(grid, grid, indexing='ij'), order=1, mode='nearest')


def intensity(image: np.ndarray, rng: np.random.Generator, *, brightness: float, contrast: tuple[float, float],
              clip: tuple[float, float]) -> np.ndarray:  # fmt: skip
    """The reference's brit_cont_net: x + delta (delta ~ U(-brightness, brightness)), then the contrast about the
    image's mean times c ~ U(contrast), then clipped to `clip`."""
    x = image + rng.uniform(-brightness, brightness)
    mean = x.mean()
    return np.clip((x - mean) * rng.uniform(*contrast) + mean, *clip)


def class_names(config: Any) -> tuple[str, ...]:
    """The label classes' names: the phantoms' (ACDC's) or class0, class1, ... for folders."""
    if config.input.dataset == 'cardiac_phantoms':
        return phantoms.CLASSES
    return tuple(f'class{k}' for k in range(config.model.classes))


def finetune_augment(image: np.ndarray, label: np.ndarray, classes: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The reference's fine-tuning augmentation of one labelled slice -> (image (S, S), soft one-hot (S, S, K)).
    One of five with equal chance (utils.py augmentation_function): a rotation by U(-15, 15) degrees, a scaling by
    U(0.95, 1.05) (rounded to 0.01) about the centre, a left-right flip with p 0.5, a rotation by a multiple of
    45 degrees, or nothing. Then, with p 0.5 (the reference warps a random tail of each batch), an elastic warp:
    a 3 x 3 grid of N(0, 5 px at 192 px) displacements per axis upsampled bicubically (create_rand_augs). The
    image is sampled bilinearly and the one-hot labels too (the reference's warp makes them soft as well)."""
    size = image.shape[0]
    centre = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    y, x = yy - centre, xx - centre
    option = rng.integers(0, 5) if image.max() > 0.001 else 4  # the reference leaves empty slices as they are
    scale, angle, flip = 1.0, 0.0, False
    if option == 0:
        angle = np.deg2rad(rng.uniform(-15, 15))
    elif option == 1:
        scale = round(rng.uniform(0.95, 1.05), 2)
    elif option == 2:
        flip = rng.random() < 0.5
    elif option == 3:
        angle = np.deg2rad(45 * rng.integers(0, 8))
    # Output pixel -> input pixel: undo the scaling and the rotation.
    c, s = np.cos(angle), np.sin(angle)
    src_y = (c * y - s * x) / scale + centre
    src_x = (s * y + c * x) / scale + centre
    if flip:
        src_x = (size - 1) - src_x
    if rng.random() < 0.5:
        sigma = 5.0 * size / 192
        for coords in (src_y, src_x):
            coords += ndimage.zoom(rng.normal(scale=sigma, size=(3, 3)), size / 3, order=3, mode='reflect')[
                :size, :size
            ]
    onehot = np.eye(classes, dtype=np.float32)[label]
    # Outside the slice: zero intensity, background.
    warp = lambda a, fill=0.0: ndimage.map_coordinates(a, (src_y, src_x), order=1, mode='constant', cval=fill)
    soft = np.stack([warp(onehot[..., k], float(k == 0)) for k in range(classes)], axis=-1)
    return warp(image).astype(np.float32), soft.astype(np.float32)
