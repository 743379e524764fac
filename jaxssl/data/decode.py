"""Reading frames: frame-accurate clips from video files (PyAV) and from folders of extracted frames (PIL).

`read_video_frames` returns exactly the frames a full sequential decode would return at the requested indices,
but only decodes from the keyframe before the first one: it seeks there, decodes forward, and identifies each
decoded frame by its presentation timestamp. `clip_indices` is the reference's pretraining frame sampler.
Every failure to read (missing file, corrupt or truncated container, too few frames) raises `DecodeError`, which
the pipeline turns into a skipped sample.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np

VideoSource = str | os.PathLike | bytes


class DecodeError(RuntimeError):
    """A video or frame folder that cannot be read: missing, corrupt, truncated, or shorter than claimed."""


def clip_indices(num_frames: int, frames: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """Pretraining frame indices: `frames` frames `stride` apart from a uniformly random start.

    As the reference (HybridVideoMAE / VideoMAE datasets, one segment, no jitter): the start is drawn from
    [0, num_frames - frames * stride] when the video holds `frames * stride` frames, else it is 0; a video too short
    for the whole clip repeats its last frame on the stride grid. (The reference stops one grid step early when the
    video's very last frame lies on the grid; here that frame is used.)
    """
    if num_frames < 1:
        raise DecodeError('video has no frames')
    span = frames * stride
    start = int(rng.integers(0, num_frames - span + 1)) if num_frames >= span else 0
    last_step = (num_frames - 1 - start) // stride
    return start + stride * np.minimum(np.arange(frames), last_step)


def _open(source: VideoSource):
    import av  # imported here: PyAV is the optional 'video' extra

    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(source)), mode='r')
    if not os.path.isfile(source):
        raise DecodeError(f'no such file: {source}')
    return av.open(os.fspath(source), mode='r')


def _rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise DecodeError('video stream has no frame rate')
    return Fraction(rate)


def _count_packets(source: VideoSource) -> int:
    # Containers without a frame count in their header (e.g. some WebM/MKV): count the video packets once.
    with _open(source) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size and packet.pts is not None)


def video_num_frames(source: VideoSource) -> int:
    """Number of frames of the first video stream (from the container header when it has one)."""
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise DecodeError('no video stream')
            frames = container.streams.video[0].frames
        return frames if frames > 0 else _count_packets(source)
    except DecodeError:
        raise
    except Exception as e:  # PyAV raises many error types (InvalidDataError, EOFError, OSError, ...)
        raise DecodeError(f'{type(e).__name__}: {e}') from e


def _decode(container, stream, wanted: Sequence[int], seek: bool) -> dict[int, np.ndarray]:
    """Decodes frames with the given (sorted, unique) indices; returns {index: rgb array}."""
    rate, time_base = _rate(stream), stream.time_base
    start_pts = stream.start_time or 0
    first, last, wanted_set = wanted[0], wanted[-1], set(wanted)
    if seek and first > 0:
        # Seek to the keyframe at or before the target's timestamp; decoding forward from there reaches it.
        target_pts = start_pts + int(Fraction(first) / rate / time_base)
        container.seek(target_pts, stream=stream, backward=True, any_frame=False)
    out: dict[int, np.ndarray] = {}
    count = 0  # fallback index for frames without timestamps
    for frame in container.decode(stream):
        if frame.pts is None:
            if seek and first > 0:
                raise _SeekUnreliable
            index = count
        else:
            index = round((frame.pts - start_pts) * time_base * rate)
        count += 1
        if not out and index > first:
            if seek and first > 0:
                raise _SeekUnreliable  # the demuxer landed after the target: redo without seeking
            raise DecodeError(f'frame {first} missing (stream starts at frame {index})')
        if index in wanted_set:
            out[index] = frame.to_ndarray(format='rgb24')
        if index >= last:
            break
    return out


class _SeekUnreliable(Exception):
    pass


def read_video_frames(
    source: VideoSource, indices: Sequence[int] | Callable[[int], Sequence[int]], *, seek: bool = True
) -> np.ndarray:
    """Frames at `indices` (any order, repeats allowed) as uint8 (len(indices), H, W, 3) RGB.

    `source` is a path or the encoded file's bytes. `indices` may be a function of the video's frame count (e.g.
    `lambda n: clip_indices(n, 16, 4, rng)`), so the file is opened once. With `seek=False` the video is decoded
    from its first frame (slower; what seeking must reproduce). Raises DecodeError on any failure.
    """
    try:
        try:
            with _open(source) as container:
                if not container.streams.video:
                    raise DecodeError('no video stream')
                stream = container.streams.video[0]
                if callable(indices):
                    indices = indices(stream.frames if stream.frames > 0 else _count_packets(source))
                wanted = _check_indices(indices)
                stream.thread_type = 'AUTO'  # frame + slice threads; decoding releases the GIL
                frames = _decode(container, stream, wanted, seek)
        except _SeekUnreliable:
            with _open(source) as container:
                frames = _decode(container, container.streams.video[0], wanted, seek=False)
    except DecodeError:
        raise
    except Exception as e:  # PyAV raises many error types (InvalidDataError, EOFError, OSError, ...)
        raise DecodeError(f'{type(e).__name__}: {e}') from e
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise DecodeError(f'video ended before frame {missing[0]} ({len(frames)} of {len(wanted)} frames decoded)')
    return np.stack([frames[int(i)] for i in indices])


def _check_indices(indices: Sequence[int]) -> list[int]:
    wanted = sorted({int(i) for i in indices})
    if not wanted:
        raise ValueError('no frame indices requested')
    if wanted[0] < 0:
        raise DecodeError(f'negative frame index {wanted[0]}')
    return wanted


def read_frame_folder(folder: str, indices: Sequence[int], template: str = 'img_{:05d}.jpg') -> np.ndarray:
    """Frames `template.format(i)` for i in `indices` from a folder of extracted frames, uint8 (N, H, W, 3) RGB."""
    from PIL import Image

    out = []
    for index in indices:
        path = os.path.join(folder, template.format(int(index)))
        try:
            with Image.open(path) as image:
                out.append(np.asarray(image.convert('RGB')))
        except Exception as e:  # missing file, truncated JPEG, ...
            raise DecodeError(f'{path}: {type(e).__name__}: {e}') from e
    if any(frame.shape != out[0].shape for frame in out):
        raise DecodeError(f'{folder}: frames differ in size')
    return np.stack(out)
