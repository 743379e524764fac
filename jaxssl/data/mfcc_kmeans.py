"""HuBERT's first-iteration teacher (fairseq examples/hubert/simple_kmeans), which MERT's README names for its
k-means variants: frame labels = the nearest of K centroids fitted by k-means on MFCC features.

Features (dump_mfcc_feature.py): Kaldi MFCCs (torchaudio.compliance.kaldi.mfcc with use_energy=False: 23 mel bins,
13 cepstra, lifter 22, povey window, 25 ms frames every 10 ms, so 100 labels a second) with their first and second
deltas (torchaudio's compute_deltas, window 5, edges repeated): (frames, 39). The reference fits sklearn's
MiniBatchKMeans on a 10% sample of the corpus; here jaxssl.kmeans (k-means++ and Lloyd) on the frames of a sample
of clips.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from jaxssl import kmeans
from jaxssl.data import audio

FRAME_SHIFT_MS = 10.0  # the MFCC frame rate is 1000 / FRAME_SHIFT_MS = 100 Hz


@functools.lru_cache(maxsize=4)
def _dct_lifter(num_ceps: int, num_bins: int, lifter: float) -> np.ndarray:
    """(num_bins, num_ceps): the orthonormal DCT-II's first num_ceps basis vectors times Kaldi's cepstral lifter
    1 + lifter / 2 sin(pi i / lifter)."""
    n = np.arange(num_bins)[:, None]
    k = np.arange(num_ceps)[None, :]
    dct = np.sqrt(2.0 / num_bins) * np.cos(np.pi / num_bins * (n + 0.5) * k)
    dct[:, 0] = np.sqrt(1.0 / num_bins)
    return dct * (1.0 + 0.5 * lifter * np.sin(np.pi * np.arange(num_ceps) / lifter))


def kaldi_mfcc(waveform: np.ndarray, sample_rate: int, num_ceps: int = 13, num_bins: int = 23) -> np.ndarray:
    """Kaldi MFCCs without the energy term (frames, num_ceps) float32, as torchaudio.compliance.kaldi.mfcc(...,
    use_energy=False) with its defaults."""
    fbank = audio.kaldi_fbank(waveform, sample_rate, num_bins, window_type='povey')
    return (fbank.astype(np.float64) @ _dct_lifter(num_ceps, num_bins, 22.0)).astype(np.float32)


def deltas(x: np.ndarray, window: int = 5) -> np.ndarray:
    """torchaudio.functional.compute_deltas along the frames of x (frames, D): sum_k k (x[t + k] - x[t - k]) /
    (2 sum_k k^2), k = 1 .. window // 2, the first and last frames repeated past the edges."""
    n = window // 2
    padded = np.pad(x, ((n, n), (0, 0)), mode='edge')
    frames = len(x)
    total = sum(k * (padded[n + k : n + k + frames] - padded[n - k : n - k + frames]) for k in range(1, n + 1))
    return total / (2.0 * sum(k * k for k in range(1, n + 1)))


def hubert_mfcc(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """(frames, 39) float32: MFCCs, their deltas and delta-deltas (HuBERT's MfccFeatureReader)."""
    mfcc = kaldi_mfcc(waveform, sample_rate)
    first = deltas(mfcc)
    return np.concatenate([mfcc, first, deltas(first)], axis=1).astype(np.float32)


def nearest(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(frames,) int32: each frame's nearest centroid (squared Euclidean; ApplyKmeans)."""
    x = np.asarray(features, np.float64)
    distances = (centroids**2).sum(1)[None, :] - 2.0 * x @ centroids.T
    return np.argmin(distances, axis=1).astype(np.int32)


def fit_centroids(
    source: Any,
    sample_rate: int,
    clusters: int,
    *,
    clips: int,
    max_samples: int,
    seed: int,
    max_frames: int = 100_000,
) -> tuple[np.ndarray, float, int, int]:
    """(k-means centroids (clusters, 39) float64 on the MFCC frames of `clips` clips drawn from `source` (their
    first `max_samples` samples; at most `max_frames` frames, drawn at random), the mean squared distance of a frame
    to its centroid, the clips used, the unreadable files skipped). Deterministic given the seed."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(source))
    frames, skipped = [], 0
    for index in order:
        if len(frames) == clips:
            break
        try:
            waveform = audio.decode_audio(source[int(index)], sample_rate)
        except audio.DecodeError:
            skipped += 1
            continue
        features = hubert_mfcc(waveform[:max_samples], sample_rate)
        if len(features):
            frames.append(features)
    if not frames:
        raise ValueError(f'no readable clip in {source} to fit the MFCC k-means teacher on')
    data = np.concatenate(frames)
    if len(data) > max_frames:  # the fit runs at every start: a sample of the frames, as HuBERT's 10% of the corpus
        data = data[rng.choice(len(data), max_frames, replace=False)]
    if len(data) < clusters:
        raise ValueError(f'{len(data)} MFCC frames from {len(frames)} clips: too few for {clusters} clusters')
    labels, centroids, inertia = kmeans.kmeans(data, clusters, seed=seed)
    del labels
    return centroids, inertia / len(data), len(frames), skipped
