"""Zero-shot segmentation from a prompt patch (MMC, Wu et al. arXiv 2308.11448): take a point on the object, the
patch that holds it is the prompt; the cosine similarity of every patch feature to the prompt's is the similarity
map; a threshold turns it into the predicted mask, scored by IoU with the object's true mask on the patch grid.

The paper's datasets (COCO, DAVIS-2017, VOC, ADE20K) and its threshold are not available offline; here the object
masks come from images whose foreground is known from the pixels (MNIST digits: bright strokes on black), and the
IoU is reported at a fixed threshold and at the best threshold of a sweep (the same threshold for all images),
beside the paper's other measure, the gap between the mean similarity of object patches and of background patches.
All functions are numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

THRESHOLDS = tuple(np.round(np.arange(-1.0, 1.0, 0.05), 2))  # cosines can be negative


def cosine_to_prompt(features: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Similarity maps (B, L): the cosine of every patch feature (B, L, D) with the prompt patch's (index (B,))."""
    f = np.asarray(features, np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    prompt = np.take_along_axis(f, np.asarray(prompts)[:, None, None], axis=1)  # (B, 1, D)
    return np.einsum('bld,bkd->bl', f, prompt)


def foreground_fraction(images: np.ndarray, patch: int, pixel_threshold: float = 0.5) -> np.ndarray:
    """(B, L) share of each patch's pixels that are foreground (mean over channels > pixel_threshold), raster
    patch order; `images` (B, S, S, C) in [0, 1]."""
    b, h, w, _ = images.shape
    fg = (np.asarray(images).mean(axis=-1) > pixel_threshold).astype(np.float64)
    cells = fg.reshape(b, h // patch, patch, w // patch, patch)
    return cells.mean(axis=(2, 4)).reshape(b, -1)


def choose_prompts(fraction: np.ndarray) -> np.ndarray:
    """The prompt point per image: the patch most covered by the object (the first such in raster order)."""
    return np.argmax(fraction, axis=1)


def iou(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU (B,) of boolean masks (B, L); 1 when both are empty."""
    inter = np.sum(predicted & truth, axis=1)
    union = np.sum(predicted | truth, axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def evaluate(
    features: np.ndarray,
    truth: np.ndarray,
    prompts: np.ndarray,
    threshold: float,
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, float]:
    """Segmentation metrics over a set of images: features (B, L, D), true masks (B, L) bool, prompt indices (B,).

    'iou': mean IoU of (similarity >= threshold) with the truth; 'best_iou' / 'best_threshold': the sweep's best
    mean IoU and its threshold; 'sim_gap': mean over images of (mean similarity of the object's patches other than
    the prompt) - (mean similarity of background patches), where an image has both.
    """
    truth = np.asarray(truth, bool)
    sim = cosine_to_prompt(features, prompts)
    scores = {t: float(np.mean(iou(sim >= t, truth))) for t in thresholds}
    best = max(scores, key=scores.get)
    others = truth.copy()
    np.put_along_axis(others, np.asarray(prompts)[:, None], False, axis=1)
    has_both = others.any(axis=1) & (~truth).any(axis=1)
    obj = np.sum(sim * others, axis=1) / np.maximum(others.sum(axis=1), 1)
    bg = np.sum(sim * ~truth, axis=1) / np.maximum((~truth).sum(axis=1), 1)
    gap = float(np.mean((obj - bg)[has_both])) if has_both.any() else 0.0
    return {
        'iou': float(np.mean(iou(sim >= threshold, truth))),
        'best_iou': scores[best],
        'best_threshold': float(best),
        'sim_gap': gap,
    }
