"""MERT (Li et al., ICLR 2024) pretraining: predict an acoustic teacher's codes and regress the musical teacher's CQT
at masked frames, on waveforms with in-batch noise mixed in.

The objective is the reference's `MERTModel.forward` (yizhilll/MERT) with fairseq's hubert criterion:
- per reference GPU batch, in the Grain pipeline: every clip cut at a random start to the batch's shortest and span
  masks with require_same_masks (wav2vec 2.0's `crop_and_mask`: `mask.prob` 0.8, `mask.length` 5, at least 2
  spans); then the acoustic teacher's labels of the cropped clip (`label_frames`);
- on device: the CQT targets of the clean clips (jaxssl.models.cqt, nnAudio's transform); then the in-batch noise
  mixture (`inbatch_noise`): each clip, with probability `mixture.prob`, gets 1-3 segments of 0.5-1 s cut from the
  other clips of its reference batch added at random places;
- the loss per masked frame: sum over the teacher's codebooks of the cross-entropy of cos(final_proj chunk, label
  embedding) / 0.1 + `loss.feature_penalty_weight` (10) x mean(feature encoder output ^ 2), per reference batch
  weighted by its masked frames as fairseq + `cqt.weight` (1) x the MSE of Linear(hidden) to the CQT over the masked
  frames' bins.

Acoustic teachers (`teacher.kind`):
  encodec      the paper's: EnCodec 24 kHz's residual-VQ codes at 6 kbps (8 codebooks of 1,024, 75 Hz, one per
               encoder frame), computed on device from the clean cropped clips by jaxssl.models.encodec with the
               released weights converted into `teacher.path` (python -m jaxssl.models.encodec_weights).
  mfcc_kmeans  HuBERT's first-iteration labels, which MERT's README names for its k-means models: the nearest of
               `teacher.clusters` k-means centroids of 39-dim MFCC + delta features at 100 Hz
               (jaxssl.data.mfcc_kmeans), fitted at start on `teacher.fit_clips` training clips, or read from
               `teacher.centroids` (.npy). Computed in the Grain pipeline after the crop.

Labels at `rate` per second reach the encoder's frames as the reference's forward_targets does: frame t takes label
floor(t x rate x 320 / sample_rate), and frames past the last label are left out of the loss.

Batch layout: 'waveform' (B, N) float32, 'num_samples' (B,) int32, 'time_mask' (B, T) bool; with mfcc_kmeans also
'labels' (B, K, T) int32 (-1 where a frame has none).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import params_io
from jaxssl.config import ConfigError, check_choice
from jaxssl.data import mfcc_kmeans
from jaxssl.methods import _audio, base, wav2vec2
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import cqt, encodec, mert
from jaxssl.models import wav2vec2 as w2v

TEACHERS = ('encodec', 'mfcc_kmeans')
HOP = int(np.prod([stride for _, stride in w2v.KERNELS_STRIDES]))  # 320 samples per encoder frame


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks, teachers, mixture or loss cannot use."""
    check_choice(config, 'model.variant', mert.VARIANTS)
    wav2vec2.check_encoder_config(config, 'MERT')
    if not config.model.logit_temp > 0:
        raise ConfigError(f"bad value {config.model.logit_temp} for 'model.logit_temp': must be > 0")
    t = config.teacher
    check_choice(config, 'teacher.kind', TEACHERS)
    if t.clusters < 2 or t.fit_clips < 1:
        raise ConfigError("'teacher.clusters' must be >= 2 and 'teacher.fit_clips' >= 1")
    if not t.bandwidth > 0:
        raise ConfigError(f"bad value {t.bandwidth} for 'teacher.bandwidth': must be > 0 (kbps)")
    c = config.cqt
    if c.weight < 0:
        raise ConfigError(f"bad value {c.weight} for 'cqt.weight': must be >= 0")
    if c.weight:
        if c.bins < 1 or c.bins_per_octave < 1 or not c.fmin > 0:
            raise ConfigError("'cqt.bins', 'cqt.bins_per_octave' and 'cqt.fmin' must be positive")
        top = c.fmin * 2.0 ** ((c.bins - 1) / c.bins_per_octave)
        if top > config.input.sample_rate / 2:
            raise ConfigError(
                f"'cqt.bins' {c.bins} from 'cqt.fmin' {c.fmin} Hz at {c.bins_per_octave} a octave reach {top:.0f} "
                f'Hz, above the Nyquist frequency of input.sample_rate {config.input.sample_rate}'
            )
    x = config.mixture
    if not 0 <= x.prob <= 1:
        raise ConfigError(f"bad value {x.prob} for 'mixture.prob': must be in [0, 1]")
    low, high = x.lengths
    if not 1 <= low <= high:
        raise ConfigError(f"bad 'mixture.lengths' {tuple(x.lengths)}: need 1 <= shortest <= longest (samples)")
    if not 1 <= x.counts[0] <= x.counts[1]:
        raise ConfigError(f"bad 'mixture.counts' {tuple(x.counts)}: need 1 <= fewest <= most")


# --- the acoustic teacher's labels (host side) -----------------------------------------------------------------------
def label_frames(labels: np.ndarray, frames: int, rate: float, sample_rate: int) -> np.ndarray:
    """A clip's teacher labels (K, L) at `rate` per second -> (K, frames) at the encoder's frame rate, as the
    reference's forward_targets: frame t takes label floor(t x rate x 320 / sample_rate) (computed in float32, as
    its torch.arange(...).float()); frames whose label would fall past L (the reference drops them) get -1."""
    ratio = rate * HOP / sample_rate
    kept = min(frames, int(labels.shape[1] / ratio)) if ratio * frames > labels.shape[1] else frames
    index = (np.arange(kept, dtype=np.float32) * np.float32(ratio)).astype(np.int64)
    out = np.full((labels.shape[0], frames), -1, np.int32)
    out[:, :kept] = labels[:, index]
    return out


def mfcc_labels(
    batch: dict[str, np.ndarray], rng: np.random.Generator, *, groups: int, mask: Any, centroids: np.ndarray,
    sample_rate: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """wav2vec 2.0's crop_and_mask, then `add_mfcc_labels`."""
    return add_mfcc_labels(wav2vec2.crop_and_mask(batch, rng, groups=groups, mask=mask), centroids, sample_rate)


def add_mfcc_labels(batch: dict[str, np.ndarray], centroids: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
    """A cropped, masked batch + each clip's MFCC k-means labels at the encoder frames: 'labels' (B, 1, T) int32."""
    frames = batch['time_mask'].shape[1]
    labels = np.full((len(batch['waveform']), 1, frames), -1, np.int32)
    for i, (waveform, n) in enumerate(zip(batch['waveform'], batch['num_samples'], strict=True)):
        codes = mfcc_kmeans.nearest(mfcc_kmeans.hubert_mfcc(waveform[:n], sample_rate), centroids)
        rate = 1000.0 / mfcc_kmeans.FRAME_SHIFT_MS
        valid = min(int(w2v.frame_counts(n)), frames)
        labels[i, :, :valid] = label_frames(codes[None], valid, rate, sample_rate)
    return {**batch, 'labels': labels}


def teacher_centroids(config: ml_collections.ConfigDict, source: Any) -> np.ndarray:
    """The MFCC k-means teacher's (clusters, 39) centroids: read from `teacher.centroids`, or fitted on
    `teacher.fit_clips` clips of `source`."""
    t, c = config.teacher, config.input
    if t.centroids:
        try:
            centroids = np.load(t.centroids)
        except (OSError, ValueError) as e:
            raise ConfigError(f"'teacher.centroids' {t.centroids}: {e}") from None
        if centroids.ndim != 2 or centroids.shape[1] != 39 or len(centroids) < 2:
            raise ConfigError(
                f"'teacher.centroids' {t.centroids} holds shape {centroids.shape}; need (clusters, 39) MFCC centroids"
            )
        return centroids.astype(np.float64)
    centroids, spread, used, skipped = mfcc_kmeans.fit_centroids(
        source, c.sample_rate, t.clusters, clips=t.fit_clips, max_samples=c.max_samples, seed=config.seed
    )
    logging.info(
        'MFCC k-means teacher: %d centroids from %d clips (%d unreadable skipped), mean squared distance %.3f',
        len(centroids), used, skipped, spread,
    )  # fmt: skip
    return centroids


# --- the in-batch noise mixture (device side) ------------------------------------------------------------------------
def _mix_group(
    x: jax.Array, lengths: jax.Array, rng: jax.Array, prob: float, shortest: int, longest: int, fewest: int,
    most: int, volume: float,
) -> jax.Array:  # fmt: skip
    """One reference batch (b, N) of clips of equal valid length: the reference's inbatch_noise_augment per clip."""
    b, n = x.shape
    length = lengths[0]  # cut to the batch's shortest: all equal
    pool = (b - 1) * length  # the other clips, end to end
    k_mix, k_count, k_start, k_dur, k_pos = jax.random.split(rng, 5)
    mixed = jax.random.uniform(k_mix, (b,)) < prob
    count = jax.random.randint(k_count, (b,), fewest, most + 1)
    # torch.randint(0, pool - longest + 1): every segment lies inside the pool
    starts = jnp.floor(jax.random.uniform(k_start, (b, most)) * (pool - longest + 1)).astype(jnp.int32)
    durations = jax.random.randint(k_dur, (b, most), shortest, longest + 1)
    positions = jnp.floor(jax.random.uniform(k_pos, (b, most)) * (length - durations + 1)).astype(jnp.int32)
    used = jnp.arange(most)[None, :] < count[:, None]
    # The reference's try / except leaves a clip unmixed when any of its segments cannot be drawn.
    possible = (pool - longest + 1 > 0) & jnp.all(~used | (durations <= length), axis=1)
    t = jnp.arange(n)[None, None, :]
    inside = used[..., None] & (t >= positions[..., None]) & (t < (positions + durations)[..., None])
    source = starts[..., None] + t - positions[..., None]  # an index into the pool
    row = jnp.clip(source // length, 0, b - 2)
    row = row + (row >= jnp.arange(b)[:, None, None])  # the pool skips the clip itself
    noise = jnp.where(inside, x[row, jnp.clip(source % length, 0, n - 1)], 0.0).sum(axis=1)
    return x + jnp.where((mixed & possible)[:, None], volume * noise, 0.0)


def inbatch_noise(waveform: jax.Array, num_samples: jax.Array, rng: jax.Array, groups: int, mixture: Any) -> jax.Array:
    """The reference's in-batch noise mixture per reference batch (`groups` of consecutive rows): each clip, with
    probability `mixture.prob` (the reference draws rand > mixture_prob, 0.5), gets U{counts} segments of U{lengths}
    samples cut from the concatenation of the other clips of its batch, added at uniform positions times
    `mixture.volume`; a clip whose segment cannot be drawn (longer than the clip, too small a batch) stays clean."""
    b, n = waveform.shape
    x = waveform.astype(jnp.float32).reshape(groups, b // groups, n)
    mix = functools.partial(
        _mix_group, prob=mixture.prob, shortest=mixture.lengths[0], longest=mixture.lengths[1],
        fewest=mixture.counts[0], most=mixture.counts[1], volume=mixture.volume,
    )  # fmt: skip
    mixed = jax.vmap(mix)(x, num_samples.reshape(groups, -1), jax.random.split(rng, groups))
    return mixed.reshape(b, n)


# --- the loss --------------------------------------------------------------------------------------------------------
def mert_loss(
    outputs: dict[str, Any], labels: jax.Array, mask: jax.Array, cqt_targets: jax.Array | None, groups: int,
    config: ml_collections.ConfigDict,
) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """fairseq's hubert criterion with MERT's extra losses, per masked frame: sum_k CE_k + feature penalty weight x
    the per-reference-batch features_pen weighted by masked frames + cqt weight x the masked frames' CQT MSE."""
    weights = (mask & (labels[:, 0] >= 0)).astype(jnp.float32)
    masked = jnp.maximum(weights.sum(), 1.0)
    metrics = {}
    prediction = 0.0
    for k, logits in enumerate(outputs['logits']):
        target = jnp.maximum(labels[:, k], 0)
        ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        prediction = prediction + jnp.sum(ce * weights) / masked
        metrics[f'accuracy_{k}'] = jnp.sum((jnp.argmax(logits, axis=-1) == target) * weights) / masked
    group_weights = weights.reshape(groups, -1).sum(axis=1) / masked
    penalty = jnp.sum(group_weights * outputs['features_pen'].reshape(groups, -1).mean(axis=1))
    loss = prediction + config.loss.feature_penalty_weight * penalty
    metrics.update(prediction=prediction, features_pen=penalty, masked_fraction=weights.mean())
    if cqt_targets is not None:
        # Each reference batch's nn.MSELoss times its masked frames, over all masked frames: the MSE over all.
        squared = jnp.mean(jnp.square(outputs['cqt'] - cqt_targets), axis=-1)
        metrics['cqt'] = jnp.sum(squared * weights) / masked
        loss = loss + config.cqt.weight * metrics['cqt']
    metrics['loss'] = loss
    return loss, metrics


class Method(_audio.AudioMethod):
    """MERT pretraining for the trainer."""

    input_key = 'waveform'
    represent_keys = ('num_samples',)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m, c, t = config.model, config.cqt, config.teacher
        self.centroids = None
        if t.kind == 'encodec':
            self.codebooks = encodec.codebooks_for_bandwidth(t.bandwidth)
            self.stored_codebooks = self._encodec_codebooks()
            sizes = (encodec.CODEBOOK_SIZE,) * self.codebooks
        else:
            self.centroids = teacher_centroids(config, self.train_source())
            sizes = (len(self.centroids),)
        # Labels 0 .. V - 1; the 4 classes above them are fairseq's special symbols, never targets.
        sizes = tuple(v + mert.SPECIAL_SYMBOLS for v in sizes)
        self.model = mert.make_model(
            m.variant,
            codebook_sizes=sizes,
            cqt_bins=c.bins if c.weight else 0,
            logit_temp=m.logit_temp,
            dropout=m.dropout,
            attention_dropout=m.attention_dropout,
            dropout_input=m.dropout_input,
            dropout_features=m.dropout_features,
            layerdrop=m.layerdrop,
            feature_grad_mult=m.feature_grad_mult,
            dtype=DTYPES[m.dtype],
        )
        self.frames = int(w2v.frame_counts(config.input.max_samples))

    def _encodec_codebooks(self) -> int:
        """The codebooks stored in teacher.path (a converted EnCodec), checked against the bandwidth's."""
        t = self.config.teacher
        if self.config.input.sample_rate != 24000:
            raise ConfigError(
                f"'input.sample_rate' is {self.config.input.sample_rate}: the EnCodec teacher reads 24 kHz"
            )
        try:
            metadata = params_io.read_metadata(t.path)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"'teacher.path' {t.path!r}: {e}; convert the released EnCodec 24 kHz weights with "
                'python -m jaxssl.models.encodec_weights IN OUT_DIR'
            ) from None
        if metadata.get('kind') != 'encodec_24khz' or metadata.get('codebooks', 0) < self.codebooks:
            raise ConfigError(
                f"'teacher.path' {t.path} holds {metadata.get('kind')} with {metadata.get('codebooks')} codebooks; "
                f'need an EnCodec 24 kHz with >= {self.codebooks} (teacher.bandwidth {t.bandwidth} kbps)'
            )
        return int(metadata['codebooks'])

    def groups(self) -> int:
        return wav2vec2.reference_groups(self.config, self.mesh)

    def reading_order(self, source: Any, seed: int, process_index: int, process_count: int) -> Any:
        return wav2vec2.bucketed_order(self.config, self.groups(), source, seed, process_index, process_count)

    def batch_transform(self) -> Any:
        if self.centroids is None:  # labels on device
            return functools.partial(
                wav2vec2.crop_and_mask, groups=wav2vec2.groups_per_host(self.groups()), mask=self.config.mask
            )
        return functools.partial(
            mfcc_labels, groups=wav2vec2.groups_per_host(self.groups()), mask=self.config.mask,
            centroids=self.centroids, sample_rate=self.config.input.sample_rate,
        )  # fmt: skip

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        batch = _audio.random_waveforms(batch_size, self.config.input.max_samples, rng)
        if self.centroids is None:
            return wav2vec2.crop_and_mask(batch, rng, groups=1, mask=self.config.mask)
        return mfcc_labels(
            batch, rng, groups=1, mask=self.config.mask, centroids=self.centroids,
            sample_rate=self.config.input.sample_rate,
        )  # fmt: skip

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        params = mert.init_params(self.model, rng, batch['waveform'])
        if self.centroids is not None:
            return params, {}
        shapes = encodec.param_shapes(self.stored_codebooks)
        return params, {'encodec': base.load_frozen(self.config.teacher.path, 'teacher.path', shapes)}

    def teacher_labels(self, extra: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """(B, K, T) int32: the pipeline's MFCC k-means labels, or EnCodec's codes of the clean clips (frame t of
        the codec is the encoder's frame t: both advance 320 samples, and the causal codec's frames inside a clip
        do not see its zero padding)."""
        if 'labels' in batch:
            return batch['labels']
        codes = encodec.encode(extra['encodec'], batch['waveform'], self.codebooks)
        return codes[:, :, : batch['time_mask'].shape[1]]

    def cqt_targets(self, waveform: jax.Array) -> jax.Array:
        """The musical teacher: |CQT| of the clean waveforms at the encoder's frames (B, T, bins)."""
        c = self.config.cqt
        spectrum = cqt.cqt_magnitude(
            waveform, sample_rate=self.config.input.sample_rate, hop=HOP, fmin=c.fmin, n_bins=c.bins,
            bins_per_octave=c.bins_per_octave,
        )  # fmt: skip
        return spectrum[:, : int(w2v.frame_counts(waveform.shape[1]))]

    def loss(self, params, extra, batch, rng, step):
        waveform, num_samples, mask = batch['waveform'], batch['num_samples'], batch['time_mask']
        groups = self.groups() if mask.shape[0] % self.groups() == 0 else 1  # 1: a batch smaller than the mesh
        targets = self.cqt_targets(waveform) if self.config.cqt.weight else None  # before the mixture
        if self.config.mixture.prob > 0:
            waveform = inbatch_noise(waveform, num_samples, base.stream(rng, 'mixture'), groups, self.config.mixture)
        outputs = self.model.apply(
            {'params': params}, waveform, num_samples, mask, deterministic=False,
            rngs={k: base.stream(rng, k) for k in ('dropout', 'layerdrop')},
        )  # fmt: skip
        labels = self.teacher_labels(extra, batch)
        loss, metrics = mert_loss(outputs, labels, mask, targets, groups, self.config)
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """wav2vec 2.0's: the last and middle blocks' hidden states averaged over the clip ('mean_pool', 'mid_pool'),
        and the last block's frames ('tokens')."""
        hidden, layers = self.model.apply(
            {'params': params}, batch['waveform'], batch['num_samples'], method=self.model.encode
        )
        return wav2vec2.pooled_frames(hidden, layers, batch['num_samples'], self.model.encoder.depth)

    def tokens_per_example(self) -> int:
        return self.frames

    def flops_per_example(self) -> float:
        """Forward + backward (3x) of the encoder and heads; the CQT targets forward only."""
        e, t, m = self.model.encoder, self.frames, self.model
        heads = 2 * t * (e.conv_channels * e.width + e.width * m.final_dim * len(m.codebook_sizes))
        heads += 2 * t * m.final_dim * sum(m.codebook_sizes) + 2 * t * e.width * m.cqt_bins
        spectrum = 0.0
        if m.cqt_bins:
            c = self.config.cqt
            _, lengths = cqt.cqt_kernels(self.config.input.sample_rate, c.fmin, c.bins, c.bins_per_octave)
            widths = 2 ** np.ceil(np.log2(lengths))
            spectrum = 2 * 2 * cqt.cqt_frames(self.config.input.max_samples, HOP) * float(widths.sum())
        return 3.0 * (wav2vec2.encoder_flops(e, self.config.input.max_samples) + heads) + spectrum
