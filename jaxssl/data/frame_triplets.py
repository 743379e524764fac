"""A frame of a video and its neighbours `offset` frames before and after, for TOV-VICReg (Goulão & Oliveira,
"Pretraining the Vision Transformer using self-supervised methods for vision based Deep Reinforcement Learning",
2022; reference mgoulao/TOV-VICReg, tov_vicreg/dataset/dqn_dataset.py).

Per video (the reference's sample, at a time t ~ U{0, ..., T - 1}, neighbours clamped to the video):
  'image' (4, S, S, 3): [aug1(o_t), aug2(o_t), aug3(o_{t - offset}), aug3(o_{t + offset})]
      aug1, aug2  the two-view VICReg augmentation (jaxssl.data.views.simclr_view with the config's crop / jitter /
                  grayscale / blur), drawn independently;
      aug3        no crop and no flip: the whole frame resized, colour jitter (p jitter_prob) and grayscale
                  (p grayscale_prob) only, drawn independently for each neighbour;
  'order' (3,) int32: a permutation of the triplet [o_t, o_{t - offset}, o_{t + offset}] drawn uniformly from the 6,
      the temporal-order-verification input (label 0 for the identity, 1 otherwise: `order_labels`);
  'frame_index' (3,) int32: [t, t - offset, t + offset] after clamping (for checks); the source's labels.
The reference's offset equals its frame stack (3 frames per observation), so neighbouring observations do not
overlap. Decoding, sharding, shuffling and skip-and-count are the video pipeline's (jaxssl.data.pipeline).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxssl.data import pipeline, views
from jaxssl.data.sources import ClipSource, make_source

PERMUTATIONS = np.array(list(itertools.permutations(range(3))), np.int32)  # the identity first


def triplet_indices(num_frames: int, offset: int, rng: np.random.Generator) -> np.ndarray:
    """[t, t - offset, t + offset] with t ~ U{0, ..., T - 1} and the neighbours clamped to [0, T - 1]."""
    t = int(rng.integers(num_frames))
    return np.clip(np.array([t, t - offset, t + offset]), 0, num_frames - 1)


def sample_order(rng: np.random.Generator) -> np.ndarray:
    """One of the 3! permutations of the triplet, uniformly (the reference's randperm per sample)."""
    return PERMUTATIONS[int(rng.integers(len(PERMUTATIONS)))]


def order_labels(order: np.ndarray) -> np.ndarray:
    """The binary target: 0 where the triplet kept its order (the identity), 1 where it was shuffled."""
    order = np.asarray(order)
    return np.any(order != np.arange(3), axis=-1).astype(np.int32)


def triplet_view(frames: np.ndarray, rng: np.random.Generator, *, view: Any, neighbour_view: Any) -> np.ndarray:
    """uint8 (3, H, W, 3) [o_t, o_{t - offset}, o_{t + offset}] -> float32 (4, S, S, 3), the module docstring's
    'image'."""
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f'expected a frame triplet (3, H, W, 3), got {frames.shape}')
    return np.stack(
        [view(frames[0], rng), view(frames[0], rng), neighbour_view(frames[1], rng), neighbour_view(frames[2], rng)]
    )


def make_triplet_view(config: ml_collections.ConfigDict) -> Any:
    """The triplet view `config.input` describes."""
    c = config.input
    common = dict(
        size=c.image_size,
        jitter_strength=c.jitter_strength,
        jitter_prob=c.jitter_prob,
        grayscale_prob=c.grayscale_prob,
        interpolation=c.interpolation,
    )
    view = functools.partial(
        views.simclr_view, scale=tuple(c.crop_scale), ratio=tuple(c.crop_ratio), flip=c.hflip, blur_prob=c.blur_prob,
        **common,
    )  # fmt: skip
    # No crop: scale (1, 1) and ratio (1, 1) keep the whole frame when it is square (Atari's 84x84 observations,
    # moving digits' 64x64); other frames lose their sides to RandomResizedCrop's centred square fallback.
    neighbour = functools.partial(
        views.simclr_view, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, blur_prob=0.0, **common
    )
    return functools.partial(triplet_view, view=view, neighbour_view=neighbour)


class FrameTripletLoader:
    """Grain random_map function: shard position -> one triplet sample of a video (the module docstring's keys,
    with a views axis of 1). Unreadable videos are replaced and counted by `pipeline.load_with_replacement`."""

    def __init__(self, source: ClipSource, shard: range, *, offset: int, view: Any, input_config: Any):
        self.source, self.shard, self.offset = source, shard, offset
        self.view, self.input_config = view, input_config

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        picked = {}

        def pick(num_frames: int) -> np.ndarray:
            picked['frames'] = triplet_indices(num_frames, self.offset, rng)
            return picked['frames']

        record, frames, failures = pipeline.load_with_replacement(
            self.source, self.shard, index, rng, lambda r: pipeline.load_clip_frames(r, pick, self.input_config)
        )
        labels = {k: np.int32([record[k]]) for k in self.source.label_keys}
        return {
            'image': self.view(frames, rng)[None],
            'order': sample_order(rng)[None],
            'frame_index': picked['frames'].astype(np.int32)[None],
            **labels,
            pipeline.SKIPPED_KEY: np.int32(failures),
        }


def make_frame_triplet_dataset(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    source: ClipSource | None = None,
) -> grain.IterDataset:
    """Host-local batches: 'image' float32 (B_local, 4, S, S, 3), 'order' and 'frame_index' int32 (B_local, 3), the
    source's labels (B_local,); B_local = input.global_batch / process_count (input.num_sample must be 1)."""
    c = config.input
    source = make_source(config) if source is None else source

    def make_loader(shard: range) -> FrameTripletLoader:
        return FrameTripletLoader(source, shard, offset=c.frame_offset, view=make_triplet_view(config), input_config=c)

    return pipeline.sharded_pretrain_dataset(
        config, source, make_loader, seed=seed, process_index=process_index, process_count=process_count,
        num_epochs=num_epochs,
    )  # fmt: skip
