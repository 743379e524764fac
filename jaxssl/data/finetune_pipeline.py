"""The fine-tuning input pipelines: augmented training clips with labels, and multi-view test clips.

Training (the reference's VideoClsDataset / RawFrameClsDataset in 'train' mode):

    range(len(source)) -> this process's shard -> shuffle -> repeat -> random_map(FinetuneClipLoader) -> batch
    -> to_iter_dataset -> mp_prefetch (input.num_workers) -> count skipped files

One clip is decoded per source record (a random window of `input.frames` frames at `input.sampling_stride`, or, with
`input.temporal_sampling='segments'` as the reference does for Something-Something V2, one random frame in each of
`input.frames` equal segments), then `input.num_sample` independent views are cut from it by
`finetune.finetune_view` (RandAugment, random resized crop, flip, random erasing; repeated augmentation). Batches:
'video' float32 (clips * num_sample, T, S, S, 3), the views of a clip adjacent, and 'label' int32 taken from the
source's `input.label_key` ('label', or 'direction' / 'speed' for moving_digits).

As in the pretraining pipeline, every random choice comes from the generator Grain derives from (seed, process,
element index), so the stream is a function of the seed and `get_state()` / `set_state()` resume exactly; unreadable
files are replaced deterministically and counted (`pipeline.load_with_replacement`, `pipeline.batch_clips`).

Testing: `make_finetune_eval_dataset` gives `pipeline.make_eval_dataset`'s uniformly spaced clips x crops, or for
'segments' sampling the reference's segment-offset views, in the same batch layout.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from jaxssl.data import finetune, pipeline
from jaxssl.data.decode import DecodeError
from jaxssl.data.sources import ClipSource, ListSource, make_source

TEMPORAL_SAMPLING = ('clip', 'segments')


def segment_frame_indices(num_frames: int, num_segments: int, rng: np.random.Generator | None) -> np.ndarray:
    """TSN-style sampling of the reference's RawFrameClsDataset (train / validation): one frame per segment.

    The video is cut into `num_segments` segments of num_frames // num_segments frames; each gives the frame at a
    random offset (its middle with rng=None). A video shorter than `num_segments` frames gives its first frame
    repeated, then every frame.
    """
    duration = num_frames // num_segments
    if duration == 0:
        return np.concatenate([np.zeros(num_segments - num_frames, np.int64), np.arange(num_frames)])
    offsets = np.full(num_segments, duration // 2) if rng is None else rng.integers(duration, size=num_segments)
    return np.arange(num_segments) * duration + offsets


def segment_test_indices(num_frames: int, num_segments: int, test_segments: int) -> np.ndarray:
    """The reference's test-time segment views: (test_segments, num_segments) frame indices, view t sampling each
    segment at offset t / test_segments of its length."""
    tick = num_frames / num_segments
    return np.asarray(
        [[int(t * tick / test_segments + tick * x) for x in range(num_segments)] for t in range(test_segments)],
        np.int64,
    )


def label_source(config: ml_collections.ConfigDict, split: str | None = None) -> ClipSource:
    """The labelled source for `split`: 'train' is config.input's; other splits use `eval.list_file` /
    `eval.data_root` for list and folder datasets (their split is a file or a folder) and `split` otherwise."""
    c = config.input
    if split in (None, c.split):
        return make_source(config, split)
    evaluation = config.get('eval', {})
    if c.dataset == 'list' and evaluation.get('list_file'):
        return ListSource(evaluation['list_file'], c.data_root, c.list_columns)
    if c.dataset == 'folder' and evaluation.get('data_root'):
        from jaxssl.data.sources import FolderSource

        return FolderSource(evaluation['data_root'])
    if c.dataset in ('list', 'folder'):
        raise ValueError(f"input.dataset '{c.dataset}' needs eval.list_file / eval.data_root to evaluate")
    return make_source(config, split)


def _pick_frames(config: ml_collections.ConfigDict, rng: np.random.Generator | None):
    c = config.input
    if c.temporal_sampling == 'segments':
        return lambda n: segment_frame_indices(n, c.frames, rng)
    return lambda n: finetune.finetune_frame_indices(n, c.frames, c.sampling_stride, rng)


class FinetuneClipLoader:
    """Grain random_map function: shard position -> `num_sample` augmented training views of one clip + labels."""

    def __init__(self, source: ClipSource, shard: range, config: ml_collections.ConfigDict):
        self.source, self.shard, self.config = source, shard, config
        self.label_key = config.input.label_key

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c, a = self.config.input, self.config.augment
        pick = _pick_frames(self.config, rng)
        record, clip, failures = pipeline.load_with_replacement(
            self.source, self.shard, index, rng, lambda r: pipeline.load_clip_frames(r, pick, c)
        )
        views = [
            finetune.finetune_view(
                clip,
                c.image_size,
                rng,
                auto_augment=a.auto_augment,
                flip=a.flip,
                erase_prob=a.erase_prob,
                scale=tuple(a.crop_scale),
                ratio=tuple(a.crop_ratio),
            )
            for _ in range(c.num_sample)
        ]
        return {
            'video': np.stack(views),
            'label': np.full(c.num_sample, record[self.label_key], np.int32),
            pipeline.SKIPPED_KEY: np.int32(failures),
        }


def check_label_key(config: ml_collections.ConfigDict, source: ClipSource) -> None:
    from jaxssl.config import ConfigError

    if config.input.label_key not in source.label_keys:
        have = ', '.join(source.label_keys) or 'none'
        raise ConfigError(f"'input.label_key' {config.input.label_key!r} is not a label of {source!r}; labels: {have}")


def make_finetune_dataset(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    source: ClipSource | None = None,
) -> grain.IterDataset:
    """Host-local fine-tuning batches for JAX process `process_index` of `process_count` (see the module doc).

    Each process reads a disjoint, equal-sized shard of the source, shuffled per epoch; `num_epochs=None` repeats
    forever. `iter(dataset)` has get_state / set_state for checkpointing.
    """
    clips_per_host, _ = pipeline.host_batch_sizes(config, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} outside [0, {process_count})')
    if config.input.temporal_sampling not in TEMPORAL_SAMPLING:
        raise ValueError(f'unknown input.temporal_sampling {config.input.temporal_sampling!r}; valid: clip, segments')
    source = make_source(config) if source is None else source
    check_label_key(config, source)
    usable = len(source) - len(source) % process_count
    shard = range(process_index, usable, process_count)
    if len(shard) == 0:
        raise ValueError(f'{source!r} has fewer clips than the {process_count} processes reading it')
    shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence([seed, process_index, 1]).generate_state(2))
    ds = grain.MapDataset.range(usable)[process_index::process_count]
    ds = (
        ds.shuffle(seed=shuffle_seed)
        .repeat(num_epochs)
        .random_map(FinetuneClipLoader(source, shard, config), seed=map_seed)
    )
    return pipeline.batch_clips(ds, clips_per_host, config.input)


class SegmentEvalLoader:
    """Grain map function for 'segments' sampling: source index -> `num_clips` segment-offset views x `num_crops`
    crops of one whole clip (the reference's RawFrameClsDataset in 'test' mode). Unreadable: `valid` 0, zero views."""

    def __init__(self, source: ClipSource, config: ml_collections.ConfigDict, num_clips: int, num_crops: int):
        self.source, self.config = source, config
        self.num_clips, self.num_crops = num_clips, num_crops

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        c = self.config.input
        record = self.source[int(index)]
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}

        def pick(n: int) -> np.ndarray:
            return segment_test_indices(n, c.frames, self.num_clips).reshape(-1)

        try:
            frames = pipeline.load_clip_frames(record, pick, c)
            frames = frames.reshape(self.num_clips, c.frames, *frames.shape[1:])
            views = np.concatenate([finetune.test_views(f, c.image_size, c.frames, 1, self.num_crops) for f in frames])
            valid = 1
        except DecodeError as e:
            pipeline._log_failure(record['name'], e)
            pipeline._add_skipped(1)
            shape = (self.num_clips * self.num_crops, c.frames, c.image_size, c.image_size, 3)
            views, valid = np.zeros(shape, np.float32), 0
        return {'video': views, 'index': np.int32(index), 'valid': np.int32(valid), **labels}


def make_finetune_eval_dataset(
    config: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    num_clips: int = 1,
    num_crops: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    max_clips: int = 0,
    source: ClipSource | None = None,
) -> tuple[grain.IterDataset, int]:
    """One deterministic pass over `split` for testing: (dataset, clips on this process); `make_eval_dataset`'s
    layout ('video' (B, num_clips * num_crops, T, S, S, 3), 'index', 'valid', labels; padded last batch)."""
    source = label_source(config, split) if source is None else source
    segments = config.input.temporal_sampling == 'segments'
    return pipeline.make_eval_dataset(
        config,
        split=split,
        batch_size=batch_size,
        num_clips=num_clips,
        num_crops=num_crops,
        process_index=process_index,
        process_count=process_count,
        max_clips=max_clips,
        source=source,
        loader_cls=SegmentEvalLoader if segments else pipeline.EvalClipLoader,
    )
