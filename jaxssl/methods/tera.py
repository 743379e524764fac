"""TERA (Liu, Li, Lee, IEEE/ACM TASLP 2021): a Transformer encoder learns speech by reconstructing log-mel frames
altered along time, frequency and magnitude; L1 on the altered (frame, bin) elements.

The alteration policy is s3prl's `pretrain/mockingjay/task.py` with `pretrain/tera/exp_model_config/
logMelBase-T-F-M.yaml` (see `alter`); the time and frequency alterations are drawn per utterance in the Grain
pipeline, the magnitude alteration (Gaussian noise on the whole batch with probability 0.15) on the device.

Batch layout: 'spectrogram' (B, T, mel bins) the clean log-mel + CMVN frames, zero-padded (jaxssl.data.audio's
log_mel_cmvn front end), the reconstruction target; 'altered' (B, T, mel bins) the model input; 'time_mask' (B, T) and
'freq_mask' (B, mel bins) the altered frames and bins, which set the loss elements; 'label' (unused here).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import audio
from jaxssl.methods import _audio, base
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import tera as tera_model


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, alteration or front end cannot use."""
    check_choice(config, 'model.variant', tera_model.VARIANTS)
    check_choice(config, 'model.dtype', DTYPES)
    check_range(config, 'model.dropout', 0.0, 1.0)
    audio.check_audio_input_config(config)
    if config.input.features != 'log_mel_cmvn':
        raise ConfigError("'input.features' must be 'log_mel_cmvn' for TERA (its targets are per-utterance CMVN)")
    a = config.alteration
    check_range(config, 'alteration.time_proportion', 0.0, 1.0)
    check_range(config, 'alteration.max_freq_proportion', 0.0, 1.0)
    check_range(config, 'alteration.noise_probability', 0.0, 1.0 + 1e-9)
    if not 1 <= a.span_min <= a.span_max:
        raise ConfigError(f"'alteration.span_min' ({a.span_min}) and 'span_max' ({a.span_max}) need 1 <= min <= max")
    if a.time_proportion == 0 and a.max_freq_proportion == 0:
        raise ConfigError("'alteration.time_proportion' and 'alteration.max_freq_proportion' are both 0: no targets")


def alter(
    spectrogram: np.ndarray, rng: np.random.Generator, alteration: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """One utterance's time and frequency alteration, as task.py's loop body (overlapping spans allowed):

    time: a span length n in [span_min, span_max]; round(L * time_proportion / n) distinct starts drawn from
    [0, max(L - n - 1, 0)] (L: the utterance's frames before padding); one die per utterance: < 0.8 the spans are
    zeroed, < 0.9 each is replaced by a span at other random starts, else left as is; every chosen frame is a target.
    frequency: a width w uniform in [0, int(bins * max_freq_proportion)], a start uniform in [0, bins - w); those
    bins are zeroed in every frame and are targets in the utterance's frames.
    """
    frames, bins = spectrogram.shape
    length = int(audio.frame_lengths(spectrogram))
    altered = spectrogram.copy()
    time_mask, freq_mask = np.zeros(frames, bool), np.zeros(bins, bool)
    if alteration.time_proportion > 0:
        span = int(rng.integers(alteration.span_min, alteration.span_max + 1))
        last_start = max(length - span - 1, 0)
        count = round(length * alteration.time_proportion / span)
        spans = lambda starts: (starts[:, None] + np.arange(span)).ravel()
        chosen = spans(rng.permutation(last_start + 1)[:count])
        dice = rng.random()
        if dice < 0.8:
            altered[chosen] = 0
        elif dice < 0.9:
            altered[chosen] = spectrogram[spans(rng.permutation(last_start + 1)[:count])]
        time_mask[chosen] = True
    if alteration.max_freq_proportion > 0:
        width = int(rng.integers(0, int(bins * alteration.max_freq_proportion) + 1))
        start = int(rng.permutation(bins - width)[0])
        altered[:, start : start + width] = 0
        freq_mask[start : start + width] = True
    return {'altered': altered, 'time_mask': time_mask, 'freq_mask': freq_mask}


def target_mask(spectrogram: jax.Array, time_mask: jax.Array, freq_mask: jax.Array) -> jax.Array:
    """(B, T, F) loss elements: altered frames (every bin), and altered bins within each utterance's frames."""
    frames = jnp.arange(spectrogram.shape[1])[None, :] < audio.frame_lengths(spectrogram)[:, None]
    return time_mask[:, :, None] | (freq_mask[:, None, :] & frames[:, :, None])


def masked_l1(prediction: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """torch's L1Loss over `pred.masked_select(mask)`: the mean absolute error over the masked elements."""
    return jnp.sum(jnp.abs(prediction - target) * mask) / jnp.maximum(jnp.sum(mask), 1)


class Method(_audio.AudioMethod):
    """TERA pretraining for the trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        self.model = tera_model.make_model(
            m.variant,
            config.input.num_mel_bins,
            dropout=m.dropout,
            attention_dropout=m.dropout,
            dtype=DTYPES[m.dtype],
        )

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {**sample, **alter(sample['spectrogram'], rng, self.config.alteration)}

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        frames = batch['spectrogram']
        return tera_model.init_params(self.model, rng, frames, jnp.ones(frames.shape[:2], bool)), {}

    def loss(self, params, extra, batch, rng, step):
        target = batch['spectrogram']
        key_mask = jnp.arange(target.shape[1])[None, :] < audio.frame_lengths(target)[:, None]
        # Magnitude alteration, one die per batch (task.py's noise_proportion).
        noisy = jax.random.uniform(base.stream(rng, 'noise_die')) < self.config.alteration.noise_probability
        noise = self.config.alteration.noise_std * jax.random.normal(base.stream(rng, 'noise'), target.shape)
        inputs = batch['altered'] + jnp.where(noisy, noise, 0.0)
        prediction, _ = self.model.apply(
            {'params': params}, inputs, key_mask, deterministic=False, rngs={'dropout': base.stream(rng, 'dropout')}
        )
        mask = target_mask(target, batch['time_mask'], batch['freq_mask'])
        loss = masked_l1(prediction, target, mask)
        metrics = {'loss': loss, 'target_fraction': jnp.mean(mask), 'noisy_batch': noisy.astype(jnp.float32)}
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """The last block's hidden states averaged over the utterance's frames ('mean_pool'; s3prl's downstream tasks
        read the frame sequence) and the frames ('tokens'). No raw-input baseline: the per-utterance CMVN makes the
        time-averaged input zero."""
        frames = batch['spectrogram']
        valid = jnp.arange(frames.shape[1])[None, :] < audio.frame_lengths(frames)[:, None]
        hidden, _ = self.model.apply({'params': params}, frames, valid, method=self.model.encode)
        weights = valid[..., None] / jnp.maximum(valid.sum(axis=1), 1)[:, None, None]
        pool = lambda x: jnp.sum(x.astype(jnp.float32) * weights, axis=1)
        return {'mean_pool': pool(hidden), 'tokens': hidden.astype(jnp.float32)}

    def tokens_per_example(self) -> int:
        return self.config.input.target_length

    def flops_per_example(self) -> float:
        m, frames = self.model, self.config.input.target_length
        projections = 2 * frames * (m.out_dim * m.width + m.width * m.width + m.width * m.out_dim)  # in, head
        blocks = m.depth * (2 * frames * (4 * m.width * m.width + 2 * m.width * m.mlp) + 4 * frames * frames * m.width)
        return 3.0 * (projections + blocks)
