"""Two frames of one video at a random gap: the input pipeline of SiamMAE-style (two-frame Siamese) pretraining.

Built on the video pipeline (jaxssl.data.pipeline): the same clip sources (list files, class folders, TFDS, the
built-in moving_digits), the same frame-accurate decoding (`load_clip_frames`), the same skip-and-count policy for
unreadable files (`load_with_replacement`, `batch_clips`) and the same sharding and seeding
(`sharded_pretrain_dataset`). What is new is the frame sampler and the paired view, following the SiamMAE
reimplementation in alexandre-eymael/CropMAE (data/util/video_utils.py sample_frames, data/SiamMAE_PIPE.py):

  gap    ~ U{low', ..., high' - 1} with low' = min(low, T - 1), high' = min(high, T)   (numpy randint, T frames)
  first  ~ U{0, ..., T - gap - 1}, second = first + gap      (gaps count frames of the video at its own frame rate)
  crop   one TF-style random resized crop box (area ~ U(scale), log-uniform aspect, clamped to the frame, no
         retries) cut from BOTH frames, each resized to (size, size); one horizontal flip decision for BOTH frames
  norm   /255 and ImageNet mean / std

Repeated sampling (`input.num_sample` = R): R pairs, each with its own gap, crop, flip and mask, from one decode of
the video (the reference decodes all 2R frames in one call too).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxssl.data import pipeline
from jaxssl.data.decode import DecodeError
from jaxssl.data.images import _resize, eval_view
from jaxssl.data.sources import ClipSource, make_source
from jaxssl.data.transforms import normalize

SampleTransform = pipeline.SampleTransform


def pair_indices(num_frames: int, gap_range: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` (first, second) frame index pairs, int64 (count, 2), as the reference's sample_frames: the gap is
    drawn from the half-open [low, high) clipped to the video (so a short video still gives a pair), the first frame
    uniformly where the second still fits. Raises DecodeError for a video of fewer than 2 frames."""
    if num_frames < 2:
        raise DecodeError(f'a frame pair needs at least 2 frames, the video has {num_frames}')
    low, high = min(gap_range[0], num_frames - 1), min(gap_range[1], num_frames)
    gaps = rng.integers(low, high, size=count)
    firsts = rng.integers(0, num_frames - gaps)  # upper bound exclusive: first + gap <= num_frames - 1
    return np.stack([firsts, firsts + gaps], axis=1)


def tf_crop_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """The reference's TF/BYOL-style RandomResizedCrop box (y, x, h, w) (data/util/image_utils.py RRC.get_params):
    one draw of area fraction ~ U(scale) and log-uniform aspect w / h, each side clamped to the frame, no retries."""
    target = rng.uniform(*scale) * height * width
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = max(1, min(round(math.sqrt(target * aspect)), width))
    h = max(1, min(round(math.sqrt(target / aspect)), height))
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


def frame_pair_view(
    frames: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    interpolation: str = 'bilinear',
) -> np.ndarray:
    """The reference's DoubleRandomResizedCrop(use_same_crop=True): one crop box and one flip decision applied to
    both frames, each resized to (size, size) and normalised. uint8 (2, H, W, 3) -> float32 (2, size, size, 3)."""
    if frames.ndim != 4 or frames.shape[0] != 2 or frames.shape[-1] != 3:
        raise ValueError(f'expected a frame pair (2, H, W, 3), got {frames.shape}')
    y, x, h, w = tf_crop_box(frames.shape[1], frames.shape[2], rng, scale, ratio)
    crops = np.stack([_resize(f[y : y + h, x : x + w], size, size, interpolation) for f in frames])
    if flip and rng.random() < 0.5:  # one decision for both frames: the pair stays a consistent scene
        crops = crops[:, :, ::-1]
    return normalize(crops)


def make_pair_view(config: ml_collections.ConfigDict) -> Any:
    """The paired view `config.input` describes (image_size, crop_scale, crop_ratio, hflip, interpolation)."""
    c = config.input
    return functools.partial(
        frame_pair_view,
        size=c.image_size,
        scale=tuple(c.crop_scale),
        ratio=tuple(c.crop_ratio),
        flip=c.hflip,
        interpolation=c.interpolation,
    )


class FramePairLoader:
    """Grain random_map function: shard position -> `num_sample` augmented frame pairs of one video, stacked:
    'image' (num_sample, 2, S, S, 3) [earlier frame, later frame], 'frame_index' (num_sample, 2) int32 (the
    decoded frames' indices, for checks), the source's labels, plus what `sample_transform` adds per pair.
    Unreadable videos are replaced and counted by the video pipeline's `load_with_replacement`."""

    def __init__(
        self,
        source: ClipSource,
        shard: range,
        *,
        gap_range: tuple[int, int],
        num_sample: int,
        view: Any,
        input_config: Any,
        sample_transform: SampleTransform | None = None,
    ):
        self.source, self.shard, self.gap_range = source, shard, tuple(gap_range)
        self.num_sample, self.view, self.input_config = num_sample, view, input_config
        self.sample_transform = sample_transform

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        picked = {}

        def pick(num_frames: int) -> np.ndarray:
            # All pairs in one decode; the indices are kept for the output (a replaced video redraws them).
            picked['pairs'] = pair_indices(num_frames, self.gap_range, self.num_sample, rng)
            return picked['pairs'].reshape(-1)

        record, frames, failures = pipeline.load_with_replacement(
            self.source,
            self.shard,
            index,
            rng,
            lambda r: pipeline.load_clip_frames(r, pick, self.input_config),
        )
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}
        pairs = frames.reshape(self.num_sample, 2, *frames.shape[1:])
        samples = []
        for pair, frame_index in zip(pairs, picked['pairs'], strict=True):
            sample = {'image': self.view(pair, rng), 'frame_index': frame_index.astype(np.int32), **labels}
            if self.sample_transform is not None:
                sample = self.sample_transform(sample, rng)
            samples.append(sample)
        out = {key: np.stack([s[key] for s in samples]) for key in samples[0]}
        out[pipeline.SKIPPED_KEY] = np.int32(failures)
        return out


def make_frame_pair_dataset(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    sample_transform: SampleTransform | None = None,
    num_epochs: int | None = None,
    source: ClipSource | None = None,
) -> grain.IterDataset:
    """Host-local batches of frame pairs for JAX process `process_index` of `process_count`: 'image' float32
    (B_local, 2, S, S, 3), 'frame_index' int32 (B_local, 2), the source's labels (B_local,), and what
    `sample_transform` adds; B_local = input.global_batch * input.num_sample / process_count, the pairs of a video
    adjacent. Sharding, shuffling, resumable state and skipped-file counting are the video pipeline's."""
    c = config.input
    source = make_source(config) if source is None else source

    def make_loader(shard: range) -> FramePairLoader:
        return FramePairLoader(
            source,
            shard,
            gap_range=tuple(c.frame_gap),
            num_sample=c.num_sample,
            view=make_pair_view(config),
            input_config=c,
            sample_transform=sample_transform,
        )

    return pipeline.sharded_pretrain_dataset(
        config,
        source,
        make_loader,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
    )


class EvalFrameLoader:
    """Grain map function for `pipeline.make_eval_dataset`: source index -> the middle frame of the video, in the
    image pipeline's test view (short side to size / eval_crop_pct, centre crop), as a 1-view stack 'image'
    (1, S, S, 3). An unreadable video yields `valid` 0 and a zero view, and is counted."""

    def __init__(self, source: ClipSource, config: ml_collections.ConfigDict, num_clips: int = 1, num_crops: int = 1):
        del num_clips, num_crops  # make_eval_dataset's loader signature; one frame has one view
        self.source, self.config = source, config

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        c = self.config.input
        record = self.source[int(index)]
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}
        try:
            frame = pipeline.load_clip_frames(record, lambda n: np.array([max(n, 1) // 2]), c)[0]
            view = eval_view(frame, size=c.image_size, crop_pct=c.eval_crop_pct, interpolation=c.interpolation)
            valid = 1
        except DecodeError as e:
            pipeline._log_failure(record['name'], e)
            pipeline._add_skipped(1)
            view, valid = np.zeros((c.image_size, c.image_size, 3), np.float32), 0
        return {'image': view[None], 'index': np.int32(index), 'valid': np.int32(valid), **labels}


def make_frame_eval_dataset(
    config: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int = 0,
    source: ClipSource | None = None,
) -> tuple[grain.IterDataset, int]:
    """One deterministic pass over a video split for frozen-feature probes of an image encoder: batches 'image'
    (B, 1, S, S, 3) (each video's middle frame), 'index', 'valid' and the source's labels."""
    source = make_source(config, split) if source is None else source
    return pipeline.make_eval_dataset(
        config,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        max_clips=max_examples,
        source=source,
        loader_cls=EvalFrameLoader,
    )
