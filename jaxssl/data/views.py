"""Augmented views for joint-embedding methods (SimCLR; VICReg and DINO use the same operations with other
probabilities): random resized crop, flip, colour jitter, grayscale, Gaussian blur, solarisation, on the host in
numpy; `multi_crop_views` makes several groups of views of different sizes (DINO's global and local crops).

Every random choice comes from the np.random.Generator Grain passes to the view function, so views are a pure
function of (seed, element index). Colour operations work on float32 RGB in [0, 1] and clip after each one, as
google-research/simclr tf2/data_util.py. Two approximations of TF's image ops, both documented in docs/methods.md:
saturation blends with the grey image (torchvision's rule) instead of scaling S in HSV, and hue rotates the
chroma plane in YIQ space instead of shifting H in HSV (the same for greys, close for moderate shifts).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxssl.data.images import random_resized_crop
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# ITU-R 601 luma, as tf.image.rgb_to_grayscale.
LUMA = np.array([0.2989, 0.5870, 0.1140], np.float32)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W, 3), every channel the luma."""
    return np.repeat((image @ LUMA)[..., None], 3, axis=-1)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """SimCLR v2's multiplicative brightness (v1 added a delta)."""
    return np.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """tf.image.adjust_contrast: each channel's deviation from its own mean, scaled."""
    mean = image.mean(axis=(0, 1), keepdims=True)
    return np.clip((image - mean) * factor + mean, 0.0, 1.0)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """A blend with the grey image: 0 greys it, 1 leaves it, > 1 saturates."""
    grey = grayscale(image)
    return np.clip(grey + factor * (image - grey), 0.0, 1.0)


def adjust_hue(image: np.ndarray, delta: float) -> np.ndarray:
    """Rotates the hue by `delta` turns (in [-0.5, 0.5]): a rotation of the (I, Q) chroma plane, luma kept."""
    yiq = image @ _RGB_TO_YIQ.T
    angle = 2 * np.pi * delta
    cos, sin = np.cos(angle), np.sin(angle)
    i, q = yiq[..., 1].copy(), yiq[..., 2].copy()
    yiq[..., 1], yiq[..., 2] = cos * i - sin * q, sin * i + cos * q
    return np.clip(yiq @ _YIQ_TO_RGB.T, 0.0, 1.0).astype(np.float32)


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """SimCLR's colour jitter at strength s: brightness, contrast, saturation 0.8 s, hue 0.2 s, in random order."""
    return jitter_colours(image, (0.8 * strength,) * 3 + (0.2 * strength,), rng)


def jitter_colours(
    image: np.ndarray, amounts: tuple[float, float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """torchvision's ColorJitter(brightness b, contrast c, saturation s, hue h) = `amounts`: factors ~ U(1 - x, 1 + x)
    (hue shift ~ U(-h, h)), the four operations in random order."""
    b, c, s, h = amounts
    ops = (
        lambda x: adjust_brightness(x, rng.uniform(max(1 - b, 0.0), 1 + b)),
        lambda x: adjust_contrast(x, rng.uniform(max(1 - c, 0.0), 1 + c)),
        lambda x: adjust_saturation(x, rng.uniform(max(1 - s, 0.0), 1 + s)),
        lambda x: adjust_hue(x, rng.uniform(-h, h)),
    )
    for index in rng.permutation(len(ops)):
        image = ops[index](image)
    return image


def gaussian_blur(image: np.ndarray, sigma: float, kernel_size: int) -> np.ndarray:
    """Separable Gaussian blur with an odd kernel of `kernel_size` taps and reflect padding."""
    radius = kernel_size // 2
    if radius < 1:
        return image
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode='reflect')
    h, w = image.shape[:2]
    rows = sum(taps[k] * padded[k : k + h] for k in range(2 * radius + 1))
    return sum(taps[k] * rows[:, k : k + w] for k in range(2 * radius + 1)).astype(np.float32)


def simclr_view(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    jitter_strength: float = 1.0,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: float = 0.5,
    interpolation: str = 'bicubic',
) -> np.ndarray:
    """One SimCLR view of a uint8 (H, W, 3) image -> float32 (size, size, 3), ImageNet-normalised (the eval view's
    normalisation; the reference feeds [0, 1] pixels). Crop, flip, jitter (p 0.8), grayscale (p 0.2), then blur
    with kernel size // 10 (odd) and sigma ~ U(0.1, 2) (p 0.5), in the reference's order."""
    crop = random_resized_crop(image, size, rng, scale, ratio, interpolation)
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    x = crop.astype(np.float32) / 255.0
    if rng.random() < jitter_prob:
        x = color_jitter(x, jitter_strength, rng)
    if rng.random() < grayscale_prob:
        x = grayscale(x)
    if rng.random() < blur_prob:
        x = gaussian_blur(x, rng.uniform(0.1, 2.0), (size // 10) | 1)
    return ((x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)).astype(np.float32)


def solarize(image: np.ndarray, threshold: float = 128 / 255) -> np.ndarray:
    """PIL's ImageOps.solarize(threshold 128) on [0, 1] pixels: values >= threshold are inverted."""
    return np.where(image >= threshold, 1.0 - image, image).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CropGroup:
    """A group of multi-crop views of one size: `name` is its batch key; `blur_probs` and `solarize_probs` hold one
    probability per view of the group (DINO blurs its first global view always, its second with p 0.1)."""

    name: str
    size: int
    scale: tuple[float, float]
    blur_probs: tuple[float, ...]
    solarize_probs: tuple[float, ...]

    @property
    def count(self) -> int:
        return len(self.blur_probs)


def pil_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """PIL's ImageFilter.GaussianBlur(radius=sigma) approximated by a true Gaussian over +-3 sigma (clamped to the
    image, which reflect padding needs)."""
    radius = min(int(np.ceil(3 * sigma)), min(image.shape[:2]) - 1)
    return gaussian_blur(image, sigma, 2 * radius + 1)


def multi_crop_views(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    groups: tuple[CropGroup, ...],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    interpolation: str = 'bicubic',
) -> dict[str, np.ndarray]:
    """Multi-crop (DINO's DataAugmentationDINO, BYOL's two-view set with one group): per group, `count` views of a
    uint8 (H, W, 3) image, each RandomResizedCrop(size, scale) -> flip (p 0.5) -> ColorJitter(`jitter`) with
    p `jitter_prob` -> grayscale (p `grayscale_prob`) -> Gaussian blur, sigma ~ U(0.1, 2), with the view's
    probability -> solarize with the view's probability -> ImageNet normalisation. Returns {group name: float32
    (count, size, size, 3)}: groups of different sizes are separate arrays."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    out = {}
    for group in groups:
        stack = []
        for blur_prob, solarize_prob in zip(group.blur_probs, group.solarize_probs, strict=True):
            crop = random_resized_crop(image, group.size, rng, group.scale, ratio, interpolation)
            if flip and rng.random() < 0.5:
                crop = crop[:, ::-1]
            x = crop.astype(np.float32) / 255.0
            if rng.random() < jitter_prob:
                x = jitter_colours(x, jitter, rng)
            if rng.random() < grayscale_prob:
                x = grayscale(x)
            if rng.random() < blur_prob:
                x = pil_blur(x, rng.uniform(0.1, 2.0))
            if rng.random() < solarize_prob:
                x = solarize(x)
            stack.append((x - mean) / std)
        out[group.name] = np.stack(stack).astype(np.float32)
    return out
