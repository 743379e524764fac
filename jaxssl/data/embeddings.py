"""Sequences of segment embeddings (LV-MAE's input): sources, the per-video window, and Grain pipelines.

A long video is cut into consecutive segments (LV-MAE: 5 s each), and each segment is embedded once by a frozen
video encoder; a video is then an (N, D) array, one row per segment, in time order. Sources return one record per
index: 'name', 'embeddings' (a path or an array), 'kind' ('file' | 'array') and 'label':
  EmbeddingFolderSource  <root>/<class>/<video>.npy: an (N, D) float array; labels index the sorted class names.
  SyntheticHmmSource     'synthetic_hmm', the built-in set: unit vectors emitted by a sticky Markov chain over 8
                         prototype directions; 6 classes that differ only in the chain's dynamics (how long a state
                         lasts, and whether the states cycle forwards, backwards or jump), so a video's class is in
                         the order of its segments, not in their average.
Each video (amazon-science/lv-mae data/CombinedData.py): rows L2-normalised (the stored LanguageBind vectors are
scaled by the model's temperature); in training a window of duration U{10 .. segment_seconds x max_len} seconds,
i.e. L = min(duration // segment_seconds, N) segments from a uniform start, repeated x3 when the video has fewer
than 5 segments (x8 below 2); in evaluation the first max_len segments. Batches carry 'embeddings' float32
(B, max_len, D), zero-padded, 'length' int32 (B,) and 'label'.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice
from jaxssl.data import folders, images, pipeline
from jaxssl.data.decode import DecodeError

DATASETS = ('folder', 'synthetic_hmm')
HMM_STATES = 8
# (probability of staying in a state, where the chain moves otherwise): +1 the next state, -1 the previous, 0 any other
HMM_CLASSES = ((0.6, 1), (0.6, -1), (0.6, 0), (0.9, 1), (0.9, -1), (0.9, 0))


# --- the built-in sequences ------------------------------------------------------------------------------------------
def hmm_transitions(stay: float, move: int, states: int = HMM_STATES) -> np.ndarray:
    """(states, states) transition matrix: stay with probability `stay`, else step by `move` around the cycle, or
    (move 0) jump uniformly to another state. Every class has the uniform stationary distribution."""
    t = np.eye(states) * stay
    for s in range(states):
        if move:
            t[s, (s + move) % states] += 1 - stay
        else:
            t[s, np.arange(states) != s] += (1 - stay) / (states - 1)
    return t


def synthesize_sequence(kind: int, dim: int, rng: np.random.Generator, length: int) -> np.ndarray:
    """(length, dim) float32: a chain of class `kind` from a uniform start, each step the state's prototype (fixed
    unit vectors, the same for every class) plus N(0, 0.3^2 / dim) noise per coordinate, scaled by a random factor
    in [2, 4] as stored embeddings are (so the pipeline's normalisation matters)."""
    prototypes = np.random.default_rng(1234).normal(size=(HMM_STATES, dim))
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    transitions = hmm_transitions(*HMM_CLASSES[kind])
    state, rows = int(rng.integers(HMM_STATES)), []
    for _ in range(length):
        rows.append(prototypes[state] + rng.normal(size=dim) * 0.3 / np.sqrt(dim))
        state = int(rng.choice(HMM_STATES, p=transitions[state]))
    return (np.stack(rows) * rng.uniform(2, 4)).astype(np.float32)


class SyntheticHmmSource:
    """The built-in videos: `per_class` sequences (train 200, val 50) of each of the 6 HMM_CLASSES, with 6 to
    `max_segments` segments of `dim` dimensions, generated from (split, index) on the fly; the label is the class."""

    label_keys = ('label',)

    def __init__(self, split: str, dim: int, max_segments: int):
        if split not in ('train', 'val'):
            raise ValueError(f"synthetic_hmm has splits 'train' and 'val', not '{split}'")
        self.split, self.dim, self.max_segments = split, dim, max_segments
        self.per_class = 200 if split == 'train' else 50

    def __len__(self) -> int:
        return self.per_class * len(HMM_CLASSES)

    def __getitem__(self, index: int) -> dict[str, Any]:
        kind = index % len(HMM_CLASSES)
        rng = np.random.default_rng([11, self.split == 'val', index])
        sequence = synthesize_sequence(kind, self.dim, rng, int(rng.integers(6, self.max_segments + 1)))
        return {'name': f'synthetic_hmm/{self.split}/{index}', 'embeddings': sequence, 'kind': 'array', 'label': kind}

    def __repr__(self) -> str:
        return f'SyntheticHmmSource({self.split!r}, {len(self)} videos of {self.dim}-d segments)'


class EmbeddingFolderSource:
    """Embedding files in class sub-folders of `root` (root/<class>/<video>.npy, nested folders allowed); labels
    index the sorted class names."""

    label_keys = ('label',)

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"embedding folder '{root}' does not exist (input.data_root / input.split)")
        self.root = root
        self.classes, self.files = folders.class_folder_files(root, ('.npy',))
        if not self.files:
            raise FileNotFoundError(f"no .npy files in class folders under '{root}'")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.files[index]
        return {'name': path, 'embeddings': path, 'kind': 'file', 'label': label}

    def __repr__(self) -> str:
        return f'EmbeddingFolderSource({self.root!r}, {len(self)} videos, {len(self.classes)} classes)'


def make_embedding_source(config: ml_collections.ConfigDict, split: str | None = None) -> Any:
    """The source `config.input` names, for `split` (default: input.split)."""
    c = config.input
    split = c.split if split is None else split
    if c.dataset == 'synthetic_hmm':
        return SyntheticHmmSource(split, c.embedding_dim, 2 * c.max_len)
    if not c.data_root:
        raise ConfigError("'input.data_root' is empty: set it to <root> with <root>/<split>/<class>/<video>.npy")
    return EmbeddingFolderSource(os.path.join(c.data_root, split))


def decode_embeddings(record: dict[str, Any], dim: int, min_segments: int = 1) -> np.ndarray:
    """A record's (N, dim) float32 rows, L2-normalised; DecodeError for files that cannot be read, another width,
    fewer than `min_segments` rows, or non-finite or zero rows."""
    embeddings = record['embeddings']
    if record['kind'] == 'file':
        try:
            embeddings = np.load(embeddings, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DecodeError(f'cannot read {record["name"]}: {e}') from e
    embeddings = np.asarray(embeddings, np.float64)
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise DecodeError(f'{record["name"]} holds shape {embeddings.shape}: need (segments, {dim})')
    if len(embeddings) < min_segments:
        raise DecodeError(f'{record["name"]} has {len(embeddings)} segments, fewer than {min_segments}')
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    if not np.all(np.isfinite(embeddings)) or not np.all(norms > 0):
        raise DecodeError(f'{record["name"]} has non-finite or zero rows')
    return (embeddings / norms).astype(np.float32)


def window(embeddings: np.ndarray, input_config: Any, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """One video's model input {'embeddings': (max_len, D) zero-padded, 'length': int32}: in training (`rng`) the
    reference's tiling and random-duration window, in evaluation the first max_len segments."""
    c = input_config
    if rng is None:
        chosen = embeddings[: c.max_len]
    else:
        n = len(embeddings)
        duration = int(rng.integers(c.min_seconds, c.segment_seconds * c.max_len + 1))
        length = min(duration // c.segment_seconds, n)
        start = int(rng.integers(0, n - length + 1))
        chosen = embeddings[start : start + length]
        if n < 5:  # the reference then tiles the windows of short videos: x8 below 2 segments, x3 below 5
            chosen = np.concatenate([chosen] * (8 if n < 2 else 3))[: c.max_len]
    padded = np.zeros((c.max_len, embeddings.shape[1]), np.float32)
    padded[: len(chosen)] = chosen
    return {'embeddings': padded, 'length': np.int32(len(chosen))}


def make_pretrain_dataset(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    source: Any = None,
    min_segments: int = 1,
    sample_transform: images.SampleTransform | None = None,
) -> grain.IterDataset:
    """Host-local pretraining batches {'embeddings' (B_local, max_len, D), 'length', 'label'} plus whatever
    `sample_transform` adds: the image pipeline's sharding, shuffling, resume and skip-and-count policy (videos of
    fewer than `min_segments` segments are skipped and counted, as the reference redraws them)."""
    c = config.input
    return images.make_image_pretrain_dataset(
        config,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        view=lambda embeddings, rng: window(embeddings, c, rng),
        sample_transform=sample_transform,
        source=make_embedding_source(config) if source is None else source,
        decode=functools.partial(decode_embeddings, dim=c.embedding_dim, min_segments=min_segments),
    )


class EvalEmbeddingLoader:
    """Grain map function: source index -> one video's evaluation input as a 1-view stack; an unreadable file
    yields `valid` 0 and zeros, and is counted (evaluation must see every example)."""

    def __init__(self, source: Any, config: ml_collections.ConfigDict, num_clips: int = 1, num_crops: int = 1):
        del num_clips, num_crops  # pipeline.make_eval_dataset's loader signature
        self.source, self.input = source, config.input

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        record = self.source[int(index)]
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}
        c = self.input
        try:
            sample, valid = window(decode_embeddings(record, c.embedding_dim), c), 1
        except DecodeError as e:
            pipeline._log_failure(record['name'], e)
            pipeline._add_skipped(1)
            sample = {'embeddings': np.zeros((c.max_len, c.embedding_dim), np.float32), 'length': np.int32(1)}
            valid = 0
        return {
            'embeddings': sample['embeddings'][None], 'length': sample['length'][None], 'index': np.int32(index),
            'valid': np.int32(valid), **labels,
        }  # fmt: skip


def make_eval_dataset(
    config: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int = 0,
) -> tuple[grain.IterDataset, int]:
    """One deterministic pass over a split: 'embeddings' (B, 1, max_len, D), 'length' (B, 1), 'index', 'valid',
    'label'."""
    return pipeline.make_eval_dataset(
        config,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        max_clips=max_examples,
        source=make_embedding_source(config, split),
        loader_cls=EvalEmbeddingLoader,
    )


def add_embedding_input_config(config: ml_collections.ConfigDict, *, runlocal: bool = False) -> None:
    """The `input` section of an embedding-sequence method (the built-in synthetic_hmm with `runlocal`)."""
    c = config.input = ml_collections.ConfigDict()
    c.dataset = 'synthetic_hmm' if runlocal else 'folder'
    c.data_root = ''  # 'folder': <data_root>/<split>/<class>/<video>.npy, (segments, embedding_dim) arrays
    c.split = 'train'
    c.embedding_dim = 32 if runlocal else 1024  # LanguageBind_Video_Huge's 1024
    c.max_len = 32 if runlocal else 256  # segments per sample (the reference's 256 x 5 s = 21 min)
    c.segment_seconds = 5  # seconds per segment: the window's duration is drawn in seconds
    c.min_seconds = 10  # the shortest window (2 segments)
    c.global_batch = 32 if runlocal else 128
    c.num_sample = 1  # views per example (the image pipeline's field)
    c.num_workers = 0 if runlocal else 8
    c.read_threads = 2 if runlocal else 1


def check_embedding_input_config(config: ml_collections.ConfigDict) -> None:
    c = config.input
    check_choice(config, 'input.dataset', DATASETS)
    for key, minimum in (('embedding_dim', 1), ('max_len', 2), ('segment_seconds', 1), ('min_seconds', 1)):
        if not isinstance(c[key], int) or c[key] < minimum:
            raise ConfigError(f"bad value {c[key]!r} for 'input.{key}': must be an integer >= {minimum}")
    if c.min_seconds > c.segment_seconds * c.max_len:
        raise ConfigError(
            f"'input.min_seconds' ({c.min_seconds}) exceeds the longest window, input.segment_seconds x "
            f'input.max_len ({c.segment_seconds * c.max_len} s)'
        )
    if c.min_seconds < c.segment_seconds:
        raise ConfigError(
            f"'input.min_seconds' ({c.min_seconds}) must cover at least one segment (input.segment_seconds)"
        )
