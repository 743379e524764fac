"""RandAugment for clips (the reference's 'rand-m7-n4-mstd0.5-inc1'), one op sequence shared by all frames.

Semantics of the reference fine-tuning recipe (timm's RandAugment as adapted in dataset/rand_augment.py):
`num_ops` ops are drawn uniformly with replacement from the 15 'increasing' ops; each is applied with probability
0.5; when applied, its magnitude is drawn from N(magnitude, magnitude_std) clipped to [0, 10], and signed ops
(rotate, shear, translate, enhance) flip sign with probability 0.5. Geometric ops use bicubic resampling (the
reference's default train interpolation) and fill with grey (128, 128, 128). The same parameters are applied to
every frame, so the clip stays temporally coherent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MAX_LEVEL = 10.0
FILL = (128, 128, 128)


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


def _affine(coeffs):
    from PIL import Image

    return lambda img: img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BICUBIC, fillcolor=FILL)


def _enhance(kind: str, factor: float):
    from PIL import ImageEnhance

    return lambda img: getattr(ImageEnhance, kind)(img).enhance(factor)


def _solarize_add(add: int, threshold: int = 128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)] * 3
    return lambda img: img.point(lut)


def _op(name: str, level: float, size: tuple[int, int], rng: np.random.Generator) -> Callable:
    """A PIL image -> image function for op `name` at magnitude `level` in [0, 10] (draws the sign from rng)."""
    from PIL import Image, ImageOps

    frac = level / MAX_LEVEL
    if name == 'AutoContrast':
        return ImageOps.autocontrast
    if name == 'Equalize':
        return ImageOps.equalize
    if name == 'Invert':
        return ImageOps.invert
    if name == 'Rotate':
        degrees = _signed(frac * 30.0, rng)
        return lambda img: img.rotate(degrees, resample=Image.BICUBIC, fillcolor=FILL)
    if name == 'PosterizeIncreasing':
        bits = 4 - int(frac * 4)
        return lambda img: img if bits >= 8 else ImageOps.posterize(img, bits)
    if name == 'SolarizeIncreasing':
        threshold = 256 - int(frac * 256)
        return lambda img: ImageOps.solarize(img, threshold)
    if name == 'SolarizeAdd':
        return _solarize_add(int(frac * 110))
    if name in ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'):
        factor = 1.0 + _signed(frac * 0.9, rng)
        return _enhance(name.removesuffix('Increasing'), factor)
    if name == 'ShearX':
        return _affine((1, _signed(frac * 0.3, rng), 0, 0, 1, 0))
    if name == 'ShearY':
        return _affine((1, 0, 0, _signed(frac * 0.3, rng), 1, 0))
    if name == 'TranslateXRel':
        return _affine((1, 0, _signed(frac * 0.45, rng) * size[0], 0, 1, 0))
    if name == 'TranslateYRel':
        return _affine((1, 0, 0, 0, 1, _signed(frac * 0.45, rng) * size[1]))
    raise ValueError(f'unknown RandAugment op {name!r}')


INCREASING_OPS = (
    'AutoContrast',
    'Equalize',
    'Invert',
    'Rotate',
    'PosterizeIncreasing',
    'SolarizeIncreasing',
    'SolarizeAdd',
    'ColorIncreasing',
    'ContrastIncreasing',
    'BrightnessIncreasing',
    'SharpnessIncreasing',
    'ShearX',
    'ShearY',
    'TranslateXRel',
    'TranslateYRel',
)


def parse_policy(policy: str) -> dict:
    """'rand-m7-n4-mstd0.5-inc1' -> dict(magnitude=7, num_ops=4, magnitude_std=0.5). Only 'inc1' is supported."""
    parts = policy.split('-')
    if parts[0] != 'rand':
        raise ValueError(f"RandAugment policy must start with 'rand-', got {policy!r}")
    out = dict(magnitude=10.0, num_ops=2, magnitude_std=0.0)
    for part in parts[1:]:
        key, value = part.rstrip('0123456789.'), part.lstrip('abcdefghijklmnopqrstuvwxyz')
        if key == 'm':
            out['magnitude'] = float(value)
        elif key == 'n':
            out['num_ops'] = int(value)
        elif key == 'mstd':
            out['magnitude_std'] = float(value)
        elif key == 'inc':
            if value != '1':
                raise ValueError(f'only the increasing op set (inc1) is implemented, got {policy!r}')
        else:
            raise ValueError(f'unknown RandAugment field {part!r} in {policy!r}')
    return out


def rand_augment(
    frames: np.ndarray,
    rng: np.random.Generator,
    *,
    magnitude: float = 7.0,
    num_ops: int = 4,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
) -> np.ndarray:
    """Applies RandAugment to a uint8 clip (T, H, W, 3); the same ops and parameters to every frame."""
    from PIL import Image

    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    size = images[0].size
    for name in (INCREASING_OPS[i] for i in rng.integers(len(INCREASING_OPS), size=num_ops)):
        if rng.random() > prob:
            continue
        level = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
        op = _op(name, float(np.clip(level, 0.0, MAX_LEVEL)), size, rng)
        images = [op(img) for img in images]
    return np.stack([np.asarray(img) for img in images])
