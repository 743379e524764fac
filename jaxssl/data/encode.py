"""Writing H.264 mp4 files with PyAV (the built-in datasets and the tests make their videos with it)."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray,
    *,
    fps: int = 12,
    gop: int = 8,
    crf: int = 12,
    bframes: int = 2,
) -> None:
    """Encodes uint8 RGB frames (T, H, W, 3) (H, W even) as H.264 yuv420p.

    `gop` is the keyframe interval: short GOPs keep seeking cheap and make frame-accurate seeking matter.
    B-frames are on by default so decode order differs from presentation order, as in real videos.
    x264 runs single-threaded so that the same frames always give the same bytes.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f'expected uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}')
    height, width = frames.shape[1:3]
    with av.open(os.fspath(path), mode='w', format='mp4') as container:
        stream = container.add_stream('libx264', rate=Fraction(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = 'yuv420p'
        stream.options = {
            'crf': str(crf),
            'g': str(gop),
            'keyint_min': str(gop),
            'sc_threshold': '0',  # keyframes exactly every `gop` frames, not at scene cuts
            'bf': str(bframes),
            'threads': '1',
            'preset': 'veryfast',
        }
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
