"""Built-in labelled 3-D scans for the medical-segmentation methods: procedural short-axis cardiac MR phantoms.

No medical images ship with any package here, so the runlocal data of the global / local contrastive method
(Chaitanya et al. 2020, pretrained on ACDC's short-axis cine MR) is generated: a stack of Z slices from the heart's
base to its apex, each (size, size), labelled like ACDC (0 background, 1 right-ventricle cavity, 2 left-ventricle
myocardium, 3 left-ventricle cavity). What the method relies on is kept: neighbouring volumes are roughly aligned, so
a slice's depth partition says what it shows (a large LV with a wide RV crescent and the aorta beside them at the
base, a small LV ring and no RV at the apex; the liver appears in the lower slices), and volumes differ in pose,
size, shape, contrast, bias field and noise, as scans of different patients and scanners do. Around the heart: the
body with its subcutaneous fat, the lungs, and, inside the LV, papillary muscles labelled as its cavity (ACDC's
convention). It is a stand-in, not a model of cardiac anatomy: users with
real scans point `input.data_root` at them (jaxssl.data.volume_folders).

Each volume is drawn from its own seed (split, index), so a split is a fixed set and needs no storage.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLASSES = ('background', 'rv', 'myocardium', 'lv')
SPLIT_SIZES = {'train': 100, 'val': 10, 'test': 20}  # ACDC: 100 training patients


def _ellipse(yy, xx, cy, cx, ry, rx, angle):
    """Inside mask of the ellipse centred (cy, cx) with radii (ry, rx), rotated by `angle` radians."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dy + s * dx, -s * dy + c * dx
    return (u / max(ry, 1e-6)) ** 2 + (v / max(rx, 1e-6)) ** 2 <= 1.0


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A smooth random field in [-1, 1]: a 4 x 4 grid of normal values upsampled cubically (a bias field)."""
    grid = rng.normal(size=(4, 4))
    field = ndimage.zoom(grid, size / 4, order=3, mode='nearest')[:size, :size]
    return scale * field / max(np.abs(field).max(), 1e-6)


def sample_volume(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (Z, size, size) before normalisation, labels int32 (Z, size, size)), Z in [8, 14]: one
    patient's stack from base (slice 0) to apex."""
    depth = int(rng.integers(8, 15))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    # Per-patient pose and anatomy.
    heart_y, heart_x = 0.5 + rng.uniform(-0.1, 0.1, size=2)
    heart_scale = rng.uniform(0.75, 1.25)
    lv_radius = 0.14 * heart_scale
    lv_ratio, lv_angle = rng.uniform(0.8, 1.0), rng.uniform(0, np.pi)  # the LV's ellipticity and its axis
    wall = rng.uniform(0.03, 0.055) * heart_scale
    rv_angle = rng.uniform(0.5, 1.3) * np.pi  # the RV lies to the LV's left, roughly
    rv_width = rng.uniform(0.5, 0.9)
    body_angle = rng.uniform(-0.3, 0.3)
    aorta = (heart_y - rng.uniform(0.15, 0.25) * heart_scale, heart_x + rng.uniform(0.0, 0.15), rng.uniform(0.04, 0.06))
    papillary = rng.uniform(0, 2 * np.pi, size=2)  # the papillary muscles' angles inside the LV
    # Per-scan contrast: tissue intensities, noise and a multiplicative bias field.
    blood = rng.uniform(0.6, 1.0)
    muscle = rng.uniform(0.1, 0.35)
    tissue = rng.uniform(0.3, 0.55)
    fat = rng.uniform(0.7, 1.0)
    liver_value = rng.uniform(0.4, 0.65)
    noise = rng.uniform(0.02, 0.08)
    bias = 1.0 + _smooth_field(rng, size, rng.uniform(0.05, 0.35))
    image = np.zeros((depth, size, size), np.float64)
    labels = np.zeros((depth, size, size), np.int32)
    for z in range(depth):
        t = z / (depth - 1)  # 0 at the base, 1 at the apex
        body = _ellipse(yy, xx, 0.5, 0.5, 0.42, 0.36, body_angle)
        inner = _ellipse(yy, xx, 0.5, 0.5, 0.39, 0.33, body_angle)  # inside the subcutaneous fat
        texture = 0.05 * _smooth_field(rng, size, 1.0)
        slice_ = np.where(inner, tissue + texture, np.where(body, fat, 0.0))
        for side in (-1, 1):  # the lungs, dark, either side of the heart
            lung = _ellipse(yy, xx, 0.4 - 0.05 * t, 0.5 + side * 0.22, 0.16 - 0.04 * t, 0.09, side * 0.3) & inner
            slice_[lung] = 0.05
        liver = _ellipse(yy, xx, 0.72 - 0.1 * t, 0.32, 0.05 + 0.18 * t, 0.12 + 0.08 * t, body_angle) & inner
        slice_[liver & (t > 0.35)] = liver_value
        if t < 0.3:  # the aorta: blood, but not a ventricle
            slice_[_ellipse(yy, xx, aorta[0], aorta[1], aorta[2], aorta[2], 0.0)] = blood
        cavity_radius = lv_radius * (1.0 - 0.65 * t)
        outer_radius = cavity_radius + wall
        outer = _ellipse(yy, xx, heart_y, heart_x, outer_radius, lv_ratio * outer_radius, lv_angle)
        cavity = _ellipse(yy, xx, heart_y, heart_x, cavity_radius, lv_ratio * cavity_radius, lv_angle)
        rv_size = max(0.0, 1.0 - t / 0.8)
        rv_centre = (heart_y + 0.6 * lv_radius * np.sin(rv_angle), heart_x + 1.1 * lv_radius * np.cos(rv_angle))
        rv_radii = (1.3 * lv_radius * rv_size, rv_width * lv_radius * rv_size)
        rv = _ellipse(yy, xx, *rv_centre, *rv_radii, rv_angle) & ~outer
        labels[z][rv] = 1
        labels[z][outer & ~cavity] = 2
        labels[z][cavity] = 3
        slice_[rv | cavity] = blood
        slice_[outer & ~cavity] = muscle
        if 0.2 < t < 0.7:  # papillary muscles: dark, inside the cavity, labelled with it (as in ACDC)
            for angle in papillary:
                centre = (heart_y + 0.6 * cavity_radius * np.sin(angle), heart_x + 0.6 * cavity_radius * np.cos(angle))
                slice_[_ellipse(yy, xx, *centre, 0.2 * cavity_radius, 0.2 * cavity_radius, 0.0) & cavity] = muscle
        image[z] = ndimage.gaussian_filter(slice_ * bias, 0.6) + rng.normal(scale=noise, size=(size, size))
    return image.astype(np.float32), labels


def normalize_volume(image: np.ndarray) -> np.ndarray:
    """The reference's intensity scaling (dataloaders.py normalize_minmax_data): per volume, (x - p1) / (p99 - p1)
    with the 1st and 99th percentiles, not clipped."""
    low, high = np.percentile(image, [1, 99])
    return ((image - low) / max(high - low, 1e-6)).astype(np.float32)


class PhantomSource:
    """The built-in volumes of one split (train 100, val 10, test 20): records {'name', 'image' (Z, S, S) float32
    normalised, 'label' (Z, S, S) int32}, generated from (split, index) when read."""

    classes = CLASSES
    label_keys = ()  # no per-example class labels: the labels are the segmentation maps

    def __init__(self, split: str, size: int):
        if split not in SPLIT_SIZES:
            raise ValueError(f"cardiac_phantoms has splits {', '.join(SPLIT_SIZES)}, not '{split}'")
        self.split, self.size = split, size

    def __len__(self) -> int:
        return SPLIT_SIZES[self.split]

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([11, list(SPLIT_SIZES).index(self.split), index])
        image, label = sample_volume(rng, self.size)
        return {'name': f'cardiac_phantoms/{self.split}/{index}', 'image': normalize_volume(image), 'label': label}

    def __repr__(self) -> str:
        return f'PhantomSource({self.split!r}, {len(self)} volumes of {self.size} px)'
