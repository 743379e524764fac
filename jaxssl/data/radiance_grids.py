"""Radiance grids for NeRF-MAE: the built-in procedural rooms, users' grids in NeRF-MAE's .npz format, and the
reference's density-to-alpha conversions and zero padding.

NeRF-MAE pretrains on Instant-NGP grids sampled in each scene's canonical frame: (W, L, H, 4) arrays of RGB in [0, 1]
and density, stored as `rgbsigma` in one .npz per scene (zubair-irshad/NeRF-MAE@721b5ee nerf_rpn/datasets.py). The
loader turns density into alpha (`density_to_alpha`: Front3D / HM3D / Hypersim grids hold log densities, ScanNet's raw
ones) and the model zero-pads every grid to R^3 (R = 160; its 200 for Hypersim cannot pass its decoder) with a
validity mask (torch_utils.pad_tensor). Those grids are not available offline, so `RoomSource` draws grids of the same
kind: a room of random extent (each side 0.6 R to R) with a floor slab and 2-5 boxes, spheres and cylinders of random
size and colour, stored as log densities (solid: exp(sigma) in [100, 1000], alpha 0.63-1; free space: alpha ~ 0 with a
few low-density floaters, as NeRFs leave) with uncorrelated colours in free space (a NeRF's colour there is
arbitrary). Each voxel also has a label (0 free, 1 floor, 2 box, 3 sphere, 4 cylinder) for the voxel-labelling probe.
A scene is drawn from its own seed (split, index), so a split needs no storage.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np

from jaxssl.data.decode import DecodeError

SPLIT_SIZES = {'train': 2000, 'val': 64}
SPLIT_SALT = {'train': 0, 'val': 1}
CLASSES = ('free', 'floor', 'box', 'sphere', 'cylinder')
DENSITY_KINDS = ('log', 'relu', 'alpha')  # nerf_rpn/datasets.py: Front3D-style, ScanNet-style, already alpha
OCCUPIED = 0.01  # the reference's alpha threshold for the RGB loss and the PSNR


def density_to_alpha(density: np.ndarray, kind: str) -> np.ndarray:
    """The reference loaders' alpha: 'log' (Front3D, HM3D, Hypersim) clip(1 - exp(-exp(sigma) / 100), 0, 1);
    'relu' (ScanNet) clip(1 - exp(-max(sigma, 0) / 100), 0, 1); 'alpha' unchanged."""
    density = np.asarray(density, np.float64)
    if kind == 'log':
        return np.clip(1.0 - np.exp(-np.exp(density) / 100.0), 0.0, 1.0)
    if kind == 'relu':
        return np.clip(1.0 - np.exp(-np.maximum(density, 0.0) / 100.0), 0.0, 1.0)
    if kind == 'alpha':
        return density
    raise ValueError(f'unknown density kind {kind!r}; valid: {", ".join(DENSITY_KINDS)}')


def pad_grid(grid: np.ndarray, resolution: int, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """torch_utils.pad_tensor: a (W, L, H, 4) grid zero-padded at the far ends to R^3, with 'valid' 1 on the
    original voxels; labels (if any) padded with -1 (no label: the padding is not part of the scene)."""
    pads = [(0, resolution - s) for s in grid.shape[:3]]
    out = {
        'grid': np.pad(grid.astype(np.float32), [*pads, (0, 0)]),
        'valid': np.pad(np.ones(grid.shape[:3], np.float32), pads),
    }
    if labels is not None:
        out['labels'] = np.pad(labels.astype(np.int32), pads, constant_values=-1)
    return out


def scene_seed(split: str, index: int, seed: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_SALT[split], index])


def sample_room(rng: np.random.Generator, resolution: int) -> dict[str, np.ndarray]:
    """One procedural room: 'rgbsigma' float32 (W, L, H, 4) with log densities (the Front3D files' kind) and
    'labels' int32 (W, L, H). Sides are drawn in [0.6 R, R]; the floor is the lowest R / 16 voxels of the third
    axis."""
    low = max(round(0.6 * resolution), 4)
    shape = tuple(int(s) for s in rng.integers(low, resolution + 1, size=3))
    log_density = rng.normal(-4.0, 0.5, size=shape).astype(np.float32)  # free space: exp(sigma) ~ 0.02, alpha ~ 2e-4
    rgb = rng.random(size=(*shape, 3), dtype=np.float32)  # free space: arbitrary colours, never supervised
    labels = np.zeros(shape, np.int32)
    floaters = rng.random(size=shape, dtype=np.float32) < 0.002  # a NeRF's stray low-density blobs: alpha 0.01-0.18
    log_density[floaters] = np.log(rng.uniform(1.0, 20.0, size=int(floaters.sum())))

    def paint(box: tuple[slice, ...], inside: np.ndarray, label: int) -> None:
        """Fills the voxels `inside` (a mask over the sub-grid `box`) with one solid of random colour."""
        colour = rng.uniform(0.1, 0.9, size=3)
        count = int(inside.sum())
        rgb[box][inside] = np.clip(colour + rng.normal(0.0, 0.03, size=(count, 3)), 0.0, 1.0)
        log_density[box][inside] = np.log(rng.uniform(100.0, 1000.0)) + rng.normal(0.0, 0.1, size=count)
        labels[box][inside] = label

    floor = max(resolution // 16, 1)
    paint((slice(None), slice(None), slice(0, floor)), np.ones((*shape[:2], floor), bool), CLASSES.index('floor'))
    for _ in range(int(rng.integers(2, 6))):
        kind = CLASSES[int(rng.integers(2, len(CLASSES)))]
        radius = rng.uniform(0.08, 0.2) * resolution
        centre = np.array([rng.uniform(radius, s - radius) if s > 2 * radius else s / 2 for s in shape])
        centre[2] = floor + radius  # resting on the floor
        # Only the object's bounding box is visited (a 160^3 room would otherwise cost seconds).
        box = tuple(
            slice(max(int(c - radius) - 1, 0), min(int(c + radius) + 2, s)) for c, s in zip(centre, shape, strict=True)
        )
        d = np.stack(np.meshgrid(*[np.arange(b.start, b.stop) + 0.5 for b in box], indexing='ij'), axis=-1) - centre
        if kind == 'box':
            half = radius * rng.uniform(0.6, 1.0, size=3)
            inside = np.all(np.abs(d) <= half, axis=-1)
        elif kind == 'sphere':
            inside = np.sum(d**2, axis=-1) <= radius**2
        else:  # an upright cylinder
            inside = (d[..., 0] ** 2 + d[..., 1] ** 2 <= (0.7 * radius) ** 2) & (np.abs(d[..., 2]) <= radius)
        paint(box, inside, CLASSES.index(kind))
    return {'rgbsigma': np.concatenate([rgb, log_density[..., None]], axis=-1).astype(np.float32), 'labels': labels}


class RoomSource:
    """The built-in rooms of one split, as records {'name', 'room': (split, index, seed)}; drawn when decoded."""

    label_keys: tuple[str, ...] = ()

    def __init__(self, split: str, size: int | None = None, seed: int = 0):
        if split not in SPLIT_SIZES:
            raise ValueError(f'unknown split {split!r} of the built-in rooms: {sorted(SPLIT_SIZES)}')
        self.split, self.seed = split, seed
        self.size = SPLIT_SIZES[split] if size is None else min(size, SPLIT_SIZES[split])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {'name': f'rooms/{self.split}/{index}', 'room': (self.split, index, self.seed)}


class FolderSource:
    """NeRF-MAE's files: <root>/<split>/*.npz, each 'rgbsigma' (W, L, H, 4) (floats: RGB in [0, 1] + density;
    uint8: all four channels / 255, the fourth taken as alpha) and optionally 'labels' (W, L, H) integers."""

    label_keys: tuple[str, ...] = ()

    def __init__(self, root: str, split: str, size: int | None = None):
        self.root = os.path.join(root, split)
        self.files = sorted(glob.glob(os.path.join(self.root, '*.npz')))
        if not self.files:
            raise ValueError(f'no .npz grids in {self.root}')
        if size is not None:
            self.files = self.files[:size]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {'name': self.files[index], 'path': self.files[index]}


def read_grid(record: dict[str, Any], resolution: int, density: str) -> dict[str, np.ndarray]:
    """A record's unpadded grid: 'grid' float32 (W, L, H, 4) with alpha in the last channel and 'labels' int32
    (W, L, H) (-1 everywhere when a file has none). Raises DecodeError on anything to skip and count: unreadable
    files, wrong shapes, grids larger than R, NaN, alpha outside [0, 1]."""
    if 'room' in record:
        split, index, seed = record['room']
        arrays = sample_room(scene_seed(split, index, seed), resolution)
    else:
        try:
            with np.load(record['path'], allow_pickle=False) as f:
                arrays = {key: np.asarray(f[key]) for key in f.files if key in ('rgbsigma', 'labels')}
        except Exception as e:  # a missing, truncated or corrupt file (BadZipFile, zlib.error, ...): skip it
            raise DecodeError(f'cannot read {record["name"]}: {type(e).__name__}: {e}') from e
        if 'rgbsigma' not in arrays:
            raise DecodeError(f'{record["name"]}: no "rgbsigma" array')
    grid = arrays['rgbsigma']
    if grid.ndim != 4 or grid.shape[-1] != 4:
        raise DecodeError(f'{record["name"]}: rgbsigma {grid.shape}, need (W, L, H, 4)')
    if max(grid.shape[:3]) > resolution:
        raise DecodeError(f'{record["name"]}: grid {grid.shape[:3]} is larger than input.resolution {resolution}')
    if grid.dtype == np.uint8:  # all four channels / 255, the fourth taken as alpha (the reference's path breaks)
        grid = grid.astype(np.float32) / 255.0
    elif np.issubdtype(grid.dtype, np.floating):
        grid = grid.astype(np.float32)  # a copy
        grid[..., 3] = density_to_alpha(grid[..., 3], 'log' if 'room' in record else density)
    else:
        raise DecodeError(f'{record["name"]}: rgbsigma of dtype {grid.dtype}, need floats or uint8')
    if not np.all(np.isfinite(grid)):
        raise DecodeError(f'{record["name"]}: rgbsigma holds NaN or inf')
    if grid[..., 3].min() < 0 or grid[..., 3].max() > 1:
        raise DecodeError(f'{record["name"]}: alpha outside [0, 1] (is input.density right?)')
    labels = arrays.get('labels')
    if labels is None:
        labels = np.full(grid.shape[:3], -1, np.int32)
    elif labels.shape != grid.shape[:3] or not np.issubdtype(labels.dtype, np.integer):
        raise DecodeError(f'{record["name"]}: labels {labels.shape} {labels.dtype}, need integers {grid.shape[:3]}')
    return {'grid': grid, 'labels': labels.astype(np.int32)}


def augment(item: dict[str, np.ndarray], rng: np.random.Generator, rotate_prob: float, flip_prob: float):
    """The reference's training augmentation (nerf_rpn/datasets.py augment_rpn_inputs, z up, no boxes): with
    probability rotate_prob a 90-degree turn about the third (up) axis (first two axes swapped, then the first
    reversed), then each of the first two axes reversed with probability flip_prob. On the unpadded grid."""
    grid, labels = item['grid'], item['labels']
    if rng.random() < rotate_prob:
        grid, labels = np.swapaxes(grid, 0, 1)[::-1], np.swapaxes(labels, 0, 1)[::-1]
    for axis in (0, 1):
        if rng.random() < flip_prob:
            grid, labels = np.flip(grid, axis), np.flip(labels, axis)
    return {'grid': grid, 'labels': labels}


def load_grid(record: dict[str, Any], resolution: int, density: str) -> dict[str, np.ndarray]:
    """read_grid's example padded to R^3 ('grid', 'valid', 'labels'): what the evaluation reads."""
    item = read_grid(record, resolution, density)
    return pad_grid(item['grid'], resolution, item['labels'])
