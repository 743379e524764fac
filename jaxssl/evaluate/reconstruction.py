"""Reconstruction pictures for masked video modelling: input / masked input / reconstruction / target.

The model predicts each target tube in normalised-pixel space (per tube and channel); to show it as pixels the
prediction is un-normalised with the true tube's mean and std (as the VideoMAE authors' visualisations do), so the
picture shows structure the model predicted, at the true brightness. Tokens neither visible nor reconstructed (the
running-cell decoder mask) are grey in the reconstruction.
"""

from __future__ import annotations

import io

import numpy as np

from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

GREY = 0.5


def _tubes(pixels: np.ndarray, patch: int, tubelet: int) -> np.ndarray:
    """(T, H, W, C) -> (N, tubelet * patch * patch, C) in token order, vectors (p0 p1 p2) x c."""
    t, h, w, c = pixels.shape
    x = pixels.reshape(t // tubelet, tubelet, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 2, 4, 1, 3, 5, 6).reshape(-1, tubelet * patch * patch, c)


def _untubes(tubes: np.ndarray, shape: tuple[int, ...], patch: int, tubelet: int) -> np.ndarray:
    t, h, w, c = shape
    x = tubes.reshape(t // tubelet, h // patch, w // patch, tubelet, patch, patch, c)
    return x.transpose(0, 3, 1, 4, 2, 5, 6).reshape(shape)


def reconstruct(
    video: np.ndarray,
    prediction: np.ndarray,
    visible_idx: np.ndarray,
    target_idx: np.ndarray,
    patch: int,
    tubelet: int,
    normalized_target: bool = True,
) -> dict[str, np.ndarray]:
    """One clip's panels in [0, 1] pixels, each (T, H, W, 3): 'input', 'masked', 'reconstruction', 'target'.

    `video` is the ImageNet-normalised clip (T, H, W, 3); `prediction` the model output (N_tgt, tubelet*patch*patch*3).
    'target' shows the tubes the loss compares against, in pixels (the input where the decoder reconstructs, grey
    elsewhere).
    """
    pixels = np.clip(video * IMAGENET_STD + IMAGENET_MEAN, 0, 1)
    tubes = _tubes(pixels, patch, tubelet)
    predicted = prediction.reshape(len(target_idx), -1, tubes.shape[-1])
    if normalized_target:
        true = tubes[target_idx]
        predicted = predicted * true.std(axis=1, ddof=1, keepdims=True) + true.mean(axis=1, keepdims=True)
    masked = np.full_like(tubes, GREY)
    masked[visible_idx] = tubes[visible_idx]
    recon = masked.copy()
    recon[target_idx] = np.clip(predicted, 0, 1)
    target = np.full_like(tubes, GREY)
    target[target_idx] = tubes[target_idx]
    panels = {'input': tubes, 'masked': masked, 'reconstruction': recon, 'target': target}
    return {name: _untubes(value, pixels.shape, patch, tubelet) for name, value in panels.items()}


def grid(clips: list[dict[str, np.ndarray]], order=('input', 'masked', 'reconstruction', 'target')) -> np.ndarray:
    """A uint8 picture: for each clip, one row per panel, frames left to right (2 px white gutters)."""
    rows = []
    for panels in clips:
        for name in order:
            frames = panels[name]
            gutter = np.ones((frames.shape[1], 2, 3))
            rows.append(np.concatenate([np.concatenate([f, gutter], axis=1) for f in frames], axis=1))
            rows.append(np.ones((2, rows[-1].shape[1], 3)))
    return (np.concatenate(rows[:-1], axis=0) * 255).round().astype(np.uint8)


def animation(panels: dict[str, np.ndarray], order=('input', 'masked', 'reconstruction', 'target')) -> np.ndarray:
    """uint8 (T, H, 4W + gutters, 3): the panels side by side, one frame per time step."""
    frames = []
    for t in range(panels[order[0]].shape[0]):
        parts = []
        for name in order:
            parts += [panels[name][t], np.ones((panels[name].shape[1], 2, 3))]
        frames.append(np.concatenate(parts[:-1], axis=1))
    return (np.stack(frames) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
    from etils import epath
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    epath.Path(path).write_bytes(buffer.getvalue())


def save_gif(frames: np.ndarray, path: str, frame_ms: int = 200) -> None:
    from etils import epath
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format='GIF', save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    epath.Path(path).write_bytes(buffer.getvalue())
