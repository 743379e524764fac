"""The pretraining input pipeline: Grain over a clip source, host-local batches of numpy arrays.

    range(len(source)) -> this process's shard -> shuffle -> repeat -> random_map(ClipLoader) -> batch
    -> to_iter_dataset (input.read_threads threads assemble batches concurrently)
    -> mp_prefetch (input.num_workers processes, if > 0) -> count skipped files (main process)

Every random choice (temporal start, crops, masks, the replacement for a broken file) comes from the
np.random.Generator that Grain derives from (seed, process_index, element index), so the stream is a pure function of
the seed and the iterator state is a few integers: `get_state()` / `set_state()` resume exactly, with or without
worker processes.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxssl.data.decode import DecodeError, clip_indices, read_frame_folder, read_video_frames
from jaxssl.data.sources import ClipSource, make_source
from jaxssl.data.transforms import pretrain_view

SampleTransform = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]

log = logging.getLogger(__name__)
SKIPPED_KEY = '_skipped_files'  # per-clip count carried from workers to the main process, removed before yielding
MAX_CONSECUTIVE_FAILURES = 50

_skipped_lock = threading.Lock()
_skipped_total = 0
_failures_logged = 0


def skipped_files() -> int:
    """How many unreadable files were skipped (and replaced) in the batches this process has yielded so far.

    Counted in the main process when a batch leaves the iterator, so it includes files skipped inside Grain worker
    processes (each clip carries its count through the batch), excludes batches still prefetched, and restarts at 0
    in a new process (it is not part of the iterator's checkpointed state). Each skipped file is also logged as a
    warning by the process that decoded it (a worker's log goes to its stderr).
    """
    return _skipped_total


def _add_skipped(count: int) -> None:
    global _skipped_total
    with _skipped_lock:
        _skipped_total += count


def _log_failure(name: str, error: Exception) -> None:
    # Log the first 20 per process, then every 100th, so a badly broken dataset does not flood the logs.
    global _failures_logged
    _failures_logged += 1
    if _failures_logged <= 20 or _failures_logged % 100 == 0:
        log.warning('skipping unreadable clip %s (%s); %d skipped in this process', name, error, _failures_logged)


def ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside absl.app.run nobody parsed them, so parse argv[0] only."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1] or ['jaxssl'])


def load_clip(
    record: dict[str, Any], frames: int, stride: int, rng: np.random.Generator, frame_template: str = 'img_{:05d}.jpg'
) -> np.ndarray:
    """Decodes one training clip (random start, `frames` frames `stride` apart) of a source record: uint8 (T, H, W, 3).

    Raises DecodeError when the record cannot be read.
    """
    clip = load_clip_frames(
        record,
        lambda n: clip_indices(n, frames, stride, rng),
        ml_collections.ConfigDict({'frame_template': frame_template}),
    )
    return clip


class ClipLoader:
    """Grain random_map function: shard position -> `num_sample` augmented views of one clip, stacked.

    A clip that cannot be read is replaced by another clip of the same shard, drawn from the element's generator
    (so deterministically), and counted. After MAX_CONSECUTIVE_FAILURES failures in a row it raises: the data, not a
    few files, is broken.
    """

    def __init__(
        self,
        source: ClipSource,
        shard: range,
        *,
        frames: int,
        stride: int,
        input_size: int,
        num_sample: int,
        frame_template: str,
        sample_transform: SampleTransform | None,
    ):
        self.source, self.shard = source, shard
        self.frames, self.stride, self.input_size = frames, stride, input_size
        self.num_sample, self.frame_template = num_sample, frame_template
        self.sample_transform = sample_transform

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        record, clip, failures = load_with_replacement(
            self.source,
            self.shard,
            index,
            rng,
            lambda r: load_clip(r, self.frames, self.stride, rng, self.frame_template),
        )
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}
        views = []
        for _ in range(self.num_sample):
            view = {'video': pretrain_view(clip, self.input_size, rng), **labels}
            if self.sample_transform is not None:
                view = self.sample_transform(view, rng)
            views.append(view)
        out = {key: np.stack([v[key] for v in views]) for key in views[0]}
        out[SKIPPED_KEY] = np.int32(failures)
        return out


def _merge_views(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # (clips, views, ...) -> (clips * views, ...): the views of a clip end up adjacent.
    return {k: v if k == SKIPPED_KEY else v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def _count_skipped(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = dict(batch)
    _add_skipped(int(batch.pop(SKIPPED_KEY).sum()))
    return batch


def host_batch_sizes(config: ml_collections.ConfigDict, process_count: int) -> tuple[int, int]:
    """(clips, views) per host batch: global_batch / process_count clips, each with num_sample views."""
    c = config.input
    if c.global_batch % process_count:
        raise ValueError(
            f'input.global_batch={c.global_batch} must be divisible by the {process_count} JAX processes '
            '(each host takes whole clips with all their num_sample views)'
        )
    clips = c.global_batch // process_count
    return clips, clips * c.num_sample


def make_pretrain_dataset(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    sample_transform: SampleTransform | None = None,
    num_epochs: int | None = None,
    source: ClipSource | None = None,
) -> grain.IterDataset:
    """Host-local pretraining batches for JAX process `process_index` of `process_count`.

    Yields dicts of numpy arrays with a leading axis of B_local = input.global_batch * input.num_sample /
    process_count, the num_sample views of each clip adjacent:
      'video' float32 (B_local, T, H, W, 3), ImageNet-normalised; one int32 (B_local,) per label the source knows
      ('label', and 'direction' / 'speed' for moving_digits); plus whatever `sample_transform(view, rng)` adds per
      view (e.g. VideoMAE masks).
    Each process reads a disjoint, equal-sized shard of the source (at most process_count - 1 clips are left out),
    shuffled per epoch; `num_epochs=None` repeats forever. `iter(dataset)` has get_state / set_state for
    checkpointing. `source` overrides the one `config.input` describes (tests, custom data).
    """
    c = config.input
    source = make_source(config) if source is None else source

    def make_loader(shard: range) -> ClipLoader:
        return ClipLoader(
            source,
            shard,
            frames=c.frames,
            stride=c.sampling_stride,
            input_size=c.image_size,
            num_sample=c.num_sample,
            frame_template=c.frame_template,
            sample_transform=sample_transform,
        )

    return sharded_pretrain_dataset(
        config,
        source,
        make_loader,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
    )


def sharded_pretrain_dataset(
    config: ml_collections.ConfigDict,
    source: ClipSource,
    make_loader: Callable[[range], Callable[[int, np.random.Generator], dict[str, np.ndarray]]],
    *,
    seed: int,
    process_index: int,
    process_count: int,
    num_epochs: int | None,
) -> grain.IterDataset:
    """make_pretrain_dataset's body for any per-clip loader (ClipLoader, the frame-pair loader, ...): this
    process's shard of `source`, shuffled per epoch, repeated, mapped by `make_loader(shard)` (a Grain random_map
    function that puts SKIPPED_KEY in its output, e.g. through `load_with_replacement`), then `batch_clips`."""
    clips_per_host, _ = host_batch_sizes(config, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} outside [0, {process_count})')
    usable = len(source) - len(source) % process_count
    shard = range(process_index, usable, process_count)
    if len(shard) == 0:
        raise ValueError(f'{source!r} has fewer clips than the {process_count} processes reading it')
    # Independent seeds for the shuffle and the per-clip generators, different on every process.
    shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence([seed, process_index]).generate_state(2))
    ds = grain.MapDataset.range(usable)[process_index::process_count]
    ds = ds.shuffle(seed=shuffle_seed).repeat(num_epochs).random_map(make_loader(shard), seed=map_seed)
    # Batching before to_iter_dataset fixes each batch's clips by its index alone, so the stream does not depend on
    # num_workers or read_threads: threads and workers each assemble whole batches.
    return batch_clips(ds, clips_per_host, config.input)


class EvalClipLoader:
    """Grain map function: source index -> the test-time views of one whole clip (no randomness).

    Frames every `input.sampling_stride` of the whole video, resized so the short side is `input.image_size`, cut into
    `num_clips` uniformly spaced clips of `input.frames` frames x `num_crops` spatial crops (finetune.test_views).
    An unreadable file is not replaced (evaluation must see every clip): it yields `valid` 0 and zero views.
    """

    def __init__(self, source: ClipSource, config: ml_collections.ConfigDict, num_clips: int, num_crops: int):
        self.source, self.config = source, config
        self.num_clips, self.num_crops = num_clips, num_crops

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        from jaxssl.data.finetune import test_frame_indices, test_views

        c = self.config.input
        record = self.source[int(index)]
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}
        try:
            frames = load_clip_frames(record, lambda n: test_frame_indices(n, c.frames, c.sampling_stride), c)
            views, valid = test_views(frames, c.image_size, c.frames, self.num_clips, self.num_crops), 1
        except DecodeError as e:
            _log_failure(record['name'], e)
            _add_skipped(1)
            shape = (self.num_clips * self.num_crops, c.frames, c.image_size, c.image_size, 3)
            views, valid = np.zeros(shape, np.float32), 0
        return {'video': views, 'index': np.int32(index), 'valid': np.int32(valid), **labels}


def load_clip_frames(record: dict[str, Any], pick: Callable[[int], np.ndarray], input_config: Any) -> np.ndarray:
    """Decodes the frames `pick(num_frames)` of a source record: uint8 (T, H, W, 3)."""
    kind, video = record['kind'], record['video']
    if kind in ('file', 'bytes'):
        return read_video_frames(video, pick)
    if kind == 'frames':
        return read_frame_folder(video, pick(record['total']) + record['start'], input_config.frame_template)
    if kind == 'array':
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
            raise DecodeError(f'expected uint8 (T, H, W, 3) frames, got {video.dtype} {video.shape}')
        return video[pick(len(video))]
    raise ValueError(f'unknown record kind {kind!r}')


def eval_indices(num_clips_in_source: int, max_clips: int) -> np.ndarray:
    """The source indices an evaluation reads: all, or `max_clips` > 0 evenly spaced ones."""
    indices = np.arange(num_clips_in_source)
    if 0 < max_clips < len(indices):
        indices = indices[np.linspace(0, len(indices) - 1, max_clips).astype(int)]
    return indices


def make_eval_dataset(
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
    loader_cls: Callable[..., Callable[[int], dict[str, np.ndarray]]] = EvalClipLoader,
) -> tuple[grain.IterDataset, int]:
    """One deterministic pass over a split for evaluation: (dataset, clips on this process).

    Batches: 'video' float32 (B, num_clips * num_crops, T, S, S, 3); 'index' (source index), 'valid' (0 for an
    unreadable file), and the source's labels, each (B,). The last batch is padded with `valid` 0 rows, so every
    clip is seen exactly once. `max_clips` > 0 takes an evenly spaced subset (cheap online evaluation).
    `loader_cls(source, config, num_clips, num_crops)` maps a source index to one clip's views (EvalClipLoader:
    uniformly spaced clips; the fine-tuning pipeline passes its segment sampler).
    """
    source = make_source(config, split) if source is None else source
    indices = eval_indices(len(source), max_clips)[process_index::process_count]
    ds = grain.MapDataset.source(indices.tolist()).map(loader_cls(source, config, num_clips, num_crops))
    pad = -len(indices) % batch_size

    def padded(i: int) -> dict[str, np.ndarray]:
        if i < len(indices):
            return ds[i]
        return {k: np.zeros_like(v) for k, v in ds[0].items()}

    full = grain.MapDataset.range(len(indices) + pad).map(padded).batch(batch_size, drop_remainder=True)
    threads = max(1, config.input.read_threads)
    return full.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)), len(indices)


def load_with_replacement(
    source: ClipSource, shard: range, index: int, rng: np.random.Generator, load: Callable[[dict[str, Any]], Any]
) -> tuple[dict[str, Any], Any, int]:
    """ClipLoader's policy for unreadable clips, for other per-clip loaders: (record, load(record), failures).

    A record whose `load` raises DecodeError is logged and replaced by another clip of `shard` drawn from `rng`
    (so deterministically); after MAX_CONSECUTIVE_FAILURES in a row it raises. Put `failures` under SKIPPED_KEY in the
    clip's output and finish the pipeline with `batch_clips`, so the skipped files are counted.
    """
    failures = 0
    while True:
        record = source[int(index)]
        try:
            return record, load(record), failures
        except DecodeError as e:
            failures += 1
            _log_failure(record['name'], e)
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(
                    f'{failures} clips in a row could not be read (last: {record["name"]}: {e}); '
                    'check input.data_root / input.list_file'
                ) from e
            index = shard[int(rng.integers(len(shard)))]


class EpochBatchOrder:
    """Grain map function: position in this process's stream -> source index, epoch after epoch, for orders made of
    whole global batches. Subclasses give `batches(epoch)`: (batches_per_epoch, global_batch) source indices, a pure
    function of the epoch (so resuming at a position reads the same examples). Position i is element i % per_host of
    host batch i // per_host; process p reads its slice [p per_host, (p + 1) per_host) of each global batch."""

    def __init__(self, global_batch: int, batches_per_epoch: int, process_index: int, process_count: int):
        self.global_batch, self.batches_per_epoch = global_batch, batches_per_epoch
        self.per_host = global_batch // process_count
        self.offset = process_index * self.per_host

    def batches(self, epoch: int) -> np.ndarray:
        raise NotImplementedError(f'{type(self).__name__} must define batches(epoch)')  # the one abstract method

    @functools.lru_cache(maxsize=2)  # noqa: B019 (a worker reads one epoch at a time; the cache dies with the object)
    def epoch(self, epoch: int) -> np.ndarray:
        return self.batches(epoch)

    def __call__(self, position: int) -> int:
        batch, element = divmod(int(position), self.per_host)
        epoch, batch = divmod(batch, self.batches_per_epoch)
        return int(self.epoch(epoch)[batch, self.offset + element])


BatchTransform = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


def batch_clips(
    ds: grain.MapDataset,
    clips_per_host: int,
    input_config: Any,
    batch_transform: BatchTransform | None = None,
    seed: int = 0,
) -> grain.IterDataset:
    """make_pretrain_dataset's tail for a MapDataset of per-clip dicts (views stacked on axis 0, SKIPPED_KEY set):
    batches of whole clips with their views merged, then `batch_transform(batch, rng)` if given (work that needs
    the whole host batch, e.g. wav2vec 2.0's crop to the shortest utterance; its generator is fixed by the batch
    index and `seed`), `read_threads` threads, `num_workers` processes, skipped files counted as batches leave the
    iterator."""
    ds = ds.batch(clips_per_host, drop_remainder=True).map(_merge_views)
    if batch_transform is not None:
        ds = ds.random_map(batch_transform, seed=seed)
    threads = input_config.read_threads
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, threads)))
    if input_config.num_workers > 0:
        ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=input_config.num_workers))
    return it.map(_count_skipped)
