"""AugMix (Hendrycks et al., ICLR 2020) as GOPro uses it (its augmix_ops.py and `augmix`, after TPT): a random resized
crop + flip of the image, then a Dirichlet(1, 1, 1)-weighted mix of three chains of 1-3 random ops, blended with the
plain crop by m ~ Beta(1, 1):

    out = m * norm(crop) + (1 - m) * sum_i w_i * norm(chain_i(crop))

The ops are AugMix's nine that do not overlap ImageNet-C (autocontrast, equalize, posterize, rotate, solarize,
shear x / y, translate x / y), at severity 1: a level ~ U(0.1, severity) scaled to each op's range over 10 (so at
severity 1: posterize keeps 4 bits, rotations up to 3 degrees, shears up to 0.03, shifts up to a thirtieth of the
side). Geometric ops resample bilinearly and fill with black, as PIL's defaults in the reference. Every random draw
comes from the Generator Grain passes in, so views are a pure function of (seed, element).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxssl.data.images import random_resized_crop
from jaxssl.data.transforms import normalize

OPS = (
    'autocontrast', 'equalize', 'posterize', 'rotate', 'solarize', 'shear_x', 'shear_y', 'translate_x', 'translate_y',
)  # fmt: skip
CHAINS = 3  # the reference's mixture width
MAX_DEPTH = 3  # chain depth ~ randint(1, 4)


def _level(severity: float, rng: np.random.Generator) -> float:
    return rng.uniform(0.1, severity)  # the reference's sample_level


def apply_op(image: np.ndarray, name: str, severity: float, rng: np.random.Generator) -> np.ndarray:
    """AugMix op `name` on a uint8 (S, S, 3) image, with its level (and sign) drawn from rng."""
    from PIL import Image, ImageOps

    pil, size = Image.fromarray(np.ascontiguousarray(image)), image.shape[1::-1]
    signed = lambda value: -value if rng.uniform() > 0.5 else value
    affine = lambda coeffs: pil.transform(size, Image.AFFINE, coeffs, resample=Image.BILINEAR)
    if name == 'autocontrast':
        out = ImageOps.autocontrast(pil)
    elif name == 'equalize':
        out = ImageOps.equalize(pil)
    elif name == 'posterize':
        out = ImageOps.posterize(pil, 4 - int(_level(severity, rng) * 4 / 10))
    elif name == 'rotate':
        out = pil.rotate(signed(int(_level(severity, rng) * 30 / 10)), resample=Image.BILINEAR)
    elif name == 'solarize':
        out = ImageOps.solarize(pil, 256 - int(_level(severity, rng) * 256 / 10))
    elif name in ('shear_x', 'shear_y'):
        shear = signed(_level(severity, rng) * 0.3 / 10)
        out = affine((1, shear, 0, 0, 1, 0) if name == 'shear_x' else (1, 0, 0, shear, 1, 0))
    elif name in ('translate_x', 'translate_y'):
        # The reference scales by its fixed IMAGE_SIZE (224) / 3; the crop's own side is the same at 224.
        shift = signed(int(_level(severity, rng) * (image.shape[0] / 3) / 10))
        out = affine((1, 0, shift, 0, 1, 0) if name == 'translate_x' else (1, 0, 0, 0, 1, shift))
    else:
        raise ValueError(f"unknown AugMix op '{name}'; valid: {', '.join(OPS)}")
    return np.asarray(out)


def augmix_view(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    severity: float = 1.0,
    interpolation: str = 'bicubic',
    normalise: Callable[[np.ndarray], np.ndarray] = normalize,
) -> np.ndarray:
    """One AugMix view of a uint8 (H, W, 3) image -> float32 (size, size, 3), normalised (ImageNet statistics by
    default) before mixing, as the reference mixes normalised tensors."""
    crop = random_resized_crop(image, size, rng, scale, interpolation=interpolation)
    if rng.random() < 0.5:
        crop = np.ascontiguousarray(crop[:, ::-1])
    weights = rng.dirichlet([1.0] * CHAINS).astype(np.float32)
    m = np.float32(rng.beta(1.0, 1.0))
    mix = np.zeros(crop.shape, np.float32)
    for w in weights:
        chain = crop
        for _ in range(rng.integers(1, MAX_DEPTH + 1)):
            chain = apply_op(chain, OPS[rng.integers(len(OPS))], severity, rng)
        mix += w * normalise(chain)
    return (m * normalise(crop) + (1 - m) * mix).astype(np.float32)
