"""SpeechT5 (Ao et al., ACL 2022) pre-training: one encoder-decoder learns from unpaired speech and text, each through
its own pre- and post-nets, tied by a quantizer that swaps a tenth of the encoder's output for codevectors shared by
both modalities (microsoft/SpeechT5: models/speecht5.py, criterions/speech_pretrain_criterion.py,
text_pretrain_criterion.py, text_to_speech_loss.py; the model is jaxssl.models.speecht5).

Speech (per reference GPU batch, in the Grain pipeline): every utterance cut at a random start to the batch's
shortest and wav2vec 2.0's span masks (`mask.prob` 0.8, `mask.length` 10, at least 2 spans, require_same_masks:
jaxssl.methods.wav2vec2.crop_and_mask); the masked-prediction labels of the cropped clip (HuBERT's first-iteration
units: MFCC k-means, jaxssl.methods.mert's teacher); the decoder's 80-bin log-mel targets (jaxssl.data.audio.
speecht5_log_mel, 62.5 frames a second) of the whole utterance, cut to the crop as the reference (start = int(crop
start / (samples / frames)), as many frames as int(crop / (samples / frames))). On device:
  mean CE of the HuBERT head over the masked frames (encoder output before the code mix)
  + `loss.feature_penalty_weight` (10) x mean(feature encoder output ^ 2)
  + `loss.diversity_weight` (0.1) x (G V - perplexity) / (G V) of the quantizer over the batch's frames
  + `loss.reconstruction_weight` (1, the reference's dec_weight) x (L1 of the log-mel before and after the
    post-net + the stop BCE (pos_weight 5)) of the speech decoder, teacher-forced on every second frame, reading the
    encoder output with floor(`quantizer.share` (0.1) x T) time steps replaced by codevectors (the same steps for
    the whole batch).
Text (`text.rows_per_utterance` sentences per utterance, drawn at random from `text.corpus` in the pipeline; jaxssl.
data.char_denoising): BART's text infilling of the character sequence into the encoder, the decoder reads the clean
sequence shifted right (after the same code mix) and predicts it:
  mean NLL over the clean sequence's tokens + `loss.diversity_weight` x the quantizer's diversity over the batch.
Each step: (1 - `loss.text_share`) x the speech loss + `loss.text_share` x the text loss. The reference's batches are
each one modality, shuffled together in about equal numbers, each normalised by its own size and averaged over the
update: text_share 0.5 is that average. The Gumbel temperature decays per update as max(2 x 0.999995^step, 0.5).

Differences from the reference (docs/methods.md): no x-vectors (the speech decoder runs without its speaker input,
none offline); MFCC k-means labels (the reference: HuBERT iteration-2 units, 500 classes); the code mix and the
Tacotron pre-net dropout are off in evaluation; random symbols in the text noise leave out <pad>.

Batch layout: 'waveform' (B, N) float32, 'num_samples' (B,) int32, 'time_mask' (B, T) bool, 'labels' (B, 1, T)
int32 (-1: none), 'mel' (B, F, 80) float32 with 'mel_frames' (B,) int32, and the text rows 'text_source',
'text_source_mask', 'text_prev', 'text_target', 'text_target_mask' (B, K, L) int32 (K = rows_per_utterance).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import audio, char_denoising, text
from jaxssl.losses import speecht5 as losses
from jaxssl.methods import _audio, base, mert, wav2vec2
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import mert as mert_model
from jaxssl.models import speecht5 as speecht5_model
from jaxssl.models import wav2vec2 as w2v

TEXT_KEYS = ('text_source', 'text_source_mask', 'text_prev', 'text_target', 'text_target_mask')


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks, teacher, text or losses cannot use."""
    check_choice(config, 'model.variant', speecht5_model.VARIANTS)
    wav2vec2.check_encoder_config(config, 'SpeechT5')
    if config.input.sample_rate != 16000:
        raise ConfigError(f"'input.sample_rate' is {config.input.sample_rate}: SpeechT5's log-mel targets are 16 kHz")
    if config.input.max_samples <= audio.SPEECHT5_N_FFT:
        raise ConfigError(f"'input.max_samples' ({config.input.max_samples}) must exceed one 1,024-sample window")
    if config.teacher.clusters < 2 or config.teacher.fit_clips < 1:
        raise ConfigError("'teacher.clusters' must be >= 2 and 'teacher.fit_clips' >= 1")
    t0, t_min, decay = config.quantizer.temperature
    if not 0 < t_min <= t0 or not 0 < decay <= 1:
        raise ConfigError(f"bad 'quantizer.temperature' {tuple(config.quantizer.temperature)}: need 0 < min <= start")
    check_range(config, 'quantizer.share', 0.0, 1.0)
    check_range(config, 'loss.text_share', 0.0, 1.0)
    for key in ('feature_penalty_weight', 'diversity_weight', 'reconstruction_weight'):
        if config.loss[key] < 0:
            raise ConfigError(f"bad value {config.loss[key]} for 'loss.{key}': must be >= 0")
    x = config.text
    if x.rows_per_utterance < 1:
        raise ConfigError(f"bad value {x.rows_per_utterance} for 'text.rows_per_utterance': must be >= 1")
    if x.max_len < 8:
        raise ConfigError(f"bad value {x.max_len} for 'text.max_len': must be >= 8 tokens")
    check_range(config, 'text.mask_ratio', 0.0, 1.0)
    check_range(config, 'text.random_ratio', 0.0, 1.0)
    if not x.poisson_lambda > 0:
        raise ConfigError(f"bad value {x.poisson_lambda} for 'text.poisson_lambda': must be > 0")


# --- the pipeline (host side) ----------------------------------------------------------------------------------------
def mel_frames(max_samples: int) -> int:
    """The log-mel rows a batch carries: enough for a crop of `max_samples` (the reference's int(crop / (samples /
    frames)) can exceed crop // 256 by one), even, so that the decoder's steps cover them in pairs."""
    frames = max_samples // audio.SPEECHT5_HOP + 2
    return frames + frames % 2


def cropped_log_mel(waveform: np.ndarray, start: int, size: int, sample_rate: int) -> np.ndarray:
    """The log-mel frames of a crop (`size` samples from `start`) cut from the whole utterance's, as the reference's
    collater: start int(start / (N / F)), int(size / (N / F)) frames, no further than the last."""
    mel = audio.speecht5_log_mel(waveform, sample_rate)
    ratio = len(waveform) / len(mel)
    first = int(start / ratio)
    return mel[first : min(first + int(size / ratio), len(mel))]


def speech_and_text(
    batch: dict[str, np.ndarray], rng: np.random.Generator, *, groups: int, mask: Any, centroids: np.ndarray,
    sample_rate: int, frames: int, samples: list[np.ndarray], noise: Any, rows: int, max_len: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """One host batch: the speech crop, masks, labels and log-mel targets (module doc), and `rows` noised sentences
    per utterance drawn uniformly from the encoded `samples` (with replacement: the reference upsamples its smaller
    modality)."""
    whole = [w[:n].copy() for w, n in zip(batch['waveform'], batch['num_samples'], strict=True)]
    batch = wav2vec2.crop_and_mask(batch, rng, groups=groups, mask=mask, keep_starts=True)
    batch = mert.add_mfcc_labels(batch, centroids, sample_rate)
    mel = np.zeros((len(whole), frames, 80), np.float32)
    counts = np.zeros(len(whole), np.int32)
    for i, (w, start, size) in enumerate(zip(whole, batch.pop('crop_start'), batch['num_samples'], strict=True)):
        m = cropped_log_mel(w, int(start), int(size), sample_rate)[:frames]
        mel[i, : len(m)], counts[i] = m, len(m)
    drawn = rng.integers(0, len(samples), len(whole) * rows)
    noised = char_denoising.denoising_rows([samples[i] for i in drawn], noise, rng, max_len)
    noised = {k: v.reshape(len(whole), rows, max_len) for k, v in noised.items()}
    return {**batch, 'mel': mel, 'mel_frames': counts, **noised}


def corpus_samples(config: ml_collections.ConfigDict) -> tuple[char_denoising.CharDictionary, list[np.ndarray]]:
    """(the character dictionary of `text.corpus`, its sentences encoded, those over `text.max_len` left out)."""
    x = config.text
    try:
        sentences = text.load_corpus(x.corpus)
    except (OSError, ValueError) as e:
        raise ConfigError(f"'text.corpus' {x.corpus}: {e}") from None
    dictionary = char_denoising.CharDictionary(sentences, x.min_char_count)
    encoded = [dictionary.encode(s) for s in sentences]
    kept = [e for e in encoded if len(e) <= x.max_len]
    logging.info(
        'SpeechT5 text: %d of %d sentences of %s within text.max_len %d, %d symbols',
        len(kept), len(encoded), x.corpus, x.max_len, len(dictionary),
    )  # fmt: skip
    if not kept:
        raise ConfigError(f"no sentence of 'text.corpus' {x.corpus} fits 'text.max_len' {x.max_len}")
    return dictionary, kept


# --- the forward passes (device side; flax methods of the model) -----------------------------------------------------
def speech_forward(
    model: speecht5_model.SpeechT5, batch: dict[str, jax.Array], temperature: jax.Array, share: float,
    deterministic: bool,
) -> dict[str, jax.Array]:  # fmt: skip
    """Masked waveforms -> the HuBERT head's logits, the feature penalty, the quantizer's probabilities and the speech
    decoder's outputs (teacher-forced on the log-mel targets, reading the code-mixed encoder output)."""
    x, valid, penalty = model.speech_prenet(batch['waveform'], batch['num_samples'], batch['time_mask'], deterministic)
    states = model.encode(x, valid, deterministic)
    vectors, _, probs = model.quantize(states, temperature, deterministic)
    length = states.shape[1]
    positions = speecht5_model.code_positions(model.make_rng('codes'), length, share, valid.sum(axis=1).max())
    memory = speecht5_model.mix_codes(states, vectors, positions)
    frames, frame_mask = losses.decoder_inputs(batch['mel'], batch['mel_frames'], model.reduction)
    before, after, stop = model.decode_speech(frames, frame_mask, memory, valid, None, deterministic)
    return {
        'logits': model.label_logits(states), 'penalty': penalty, 'probs': probs, 'valid': valid, 'before': before,
        'after': after, 'stop': stop,
    }  # fmt: skip


def text_forward(
    model: speecht5_model.SpeechT5, batch: dict[str, jax.Array], temperature: jax.Array, share: float,
    deterministic: bool,
) -> dict[str, jax.Array]:  # fmt: skip
    """Noised sentences -> the quantizer's probabilities and the text decoder's next-token logits (teacher-forced on
    the clean sentences, reading the code-mixed encoder output)."""
    source_mask = batch['text_source_mask'].astype(bool)
    states = model.encode(model.text_prenet(batch['text_source'], deterministic), source_mask, deterministic)
    vectors, _, probs = model.quantize(states, temperature, deterministic)
    length = states.shape[1]
    collated = source_mask.any(axis=0)  # the steps of the reference's batch, padded to its longest row only
    positions = speecht5_model.code_positions(model.make_rng('codes'), length, share, collated.sum())
    memory = speecht5_model.mix_codes(states, vectors, positions)
    prev_mask = batch['text_target_mask'].astype(bool)
    _, logits = model.decode(batch['text_prev'], prev_mask, memory, source_mask, deterministic)
    return {'logits': logits, 'probs': probs, 'collated': collated}


def flat_text(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The text rows (B, K, L) as (B K, L)."""
    return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in TEXT_KEYS}


class Method(_audio.AudioMethod):
    """SpeechT5 pre-training for the trainer."""

    input_key = 'waveform'
    represent_keys = ('num_samples',)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m, x = config.model, config.text
        self.dictionary, self.samples = corpus_samples(config)
        self.noise = char_denoising.make_noise(self.dictionary, x.mask_ratio, x.poisson_lambda, x.random_ratio)
        self.centroids = mert.teacher_centroids(config, self.train_source())
        self.model = speecht5_model.make(
            m.variant, len(self.dictionary),
            label_classes=len(self.centroids) + mert_model.SPECIAL_SYMBOLS,  # fairseq's 4 specials are classes too
            dropout=m.dropout, attention_dropout=m.attention_dropout, activation_dropout=m.activation_dropout,
            layerdrop=m.layerdrop, feature_grad_mult=m.feature_grad_mult, dtype=DTYPES[m.dtype],
        )  # fmt: skip
        self.frames = int(w2v.frame_counts(config.input.max_samples))
        self.mel_frames = mel_frames(config.input.max_samples)

    def groups(self) -> int:
        return wav2vec2.reference_groups(self.config, self.mesh)

    def reading_order(self, source: Any, seed: int, process_index: int, process_count: int) -> Any:
        return wav2vec2.bucketed_order(self.config, self.groups(), source, seed, process_index, process_count)

    def batch_transform(self, groups: int | None = None) -> Any:
        return functools.partial(
            speech_and_text, groups=groups or wav2vec2.groups_per_host(self.groups()), mask=self.config.mask,
            centroids=self.centroids, sample_rate=self.config.input.sample_rate, frames=self.mel_frames,
            samples=self.samples, noise=self.noise, rows=self.config.text.rows_per_utterance,
            max_len=self.config.text.max_len,
        )  # fmt: skip

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        batch = _audio.random_waveforms(batch_size, self.config.input.max_samples, rng)
        return self.batch_transform(groups=1)(batch, rng)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        variables = jax.jit(self.model.init)(  # one text row per utterance: the init decodes it from the speech
            {'params': rng},
            batch['waveform'],
            batch['num_samples'],
            batch['text_prev'][:, 0],
            batch['text_target_mask'][:, 0],
        )
        return variables['params'], {'batch_stats': variables['batch_stats']}

    def temperature(self, step: jax.Array) -> jax.Array:
        return wav2vec2.gumbel_temperature(self.config.quantizer, step, 0)

    def loss(self, params, extra, batch, rng, step):
        c = self.config
        temperature = self.temperature(step)
        streams = ('dropout', 'gumbel', 'layerdrop', 'codes')
        rngs = {k: base.stream(rng, k) for k in streams}
        speech, updated = self.model.apply(
            {'params': params, 'batch_stats': extra['batch_stats']}, batch, temperature, c.quantizer.share, False,
            method=speech_forward, rngs=rngs, mutable=['batch_stats'],
        )  # fmt: skip
        labels = batch['labels'][:, 0]
        masked = batch['time_mask'] & (labels >= 0)
        prediction, accuracy = losses.masked_prediction_loss(speech['logits'], jnp.maximum(labels, 0), masked)
        speech_diversity = losses.diversity_loss(speech['probs'], speech['valid'])
        reconstruction, terms = losses.reconstruction_loss(
            speech['before'], speech['after'], speech['stop'], batch['mel'], batch['mel_frames'], self.model.reduction
        )
        speech_loss = (
            prediction + c.loss.feature_penalty_weight * speech['penalty'] + c.loss.diversity_weight * speech_diversity
            + c.loss.reconstruction_weight * reconstruction
        )  # fmt: skip
        metrics = {
            'speech': speech_loss, 'prediction': prediction, 'accuracy': accuracy, 'features_pen': speech['penalty'],
            'speech_diversity': speech_diversity, 'reconstruction': reconstruction, **terms,
            'masked_fraction': jnp.sum(masked) / jnp.maximum(jnp.sum(speech['valid']), 1), 'temperature': temperature,
        }  # fmt: skip
        loss = (1 - c.loss.text_share) * speech_loss
        if c.loss.text_share > 0:
            flat = flat_text(batch)
            text_rng = base.stream(rng, 'text')  # draws of its own, as the reference's separate text batches
            words = self.model.apply(
                {'params': params}, flat, temperature, c.quantizer.share, False, method=text_forward,
                rngs={k: base.stream(text_rng, k) for k in streams},
            )  # fmt: skip
            target_mask = flat['text_target_mask'].astype(bool)
            nll, text_accuracy = losses.masked_prediction_loss(words['logits'], flat['text_target'], target_mask)
            collated = jnp.broadcast_to(words['collated'], words['probs'].shape[:2])
            text_diversity = losses.diversity_loss(words['probs'], collated)
            text_loss = nll + c.loss.diversity_weight * text_diversity
            loss = loss + c.loss.text_share * text_loss
            metrics |= {'text': text_loss, 'text_nll': nll, 'text_accuracy': text_accuracy,
                        'text_diversity': text_diversity}  # fmt: skip
        metrics['loss'] = loss
        return loss, (metrics, {'batch_stats': jax.lax.stop_gradient(updated['batch_stats'])})

    def represent(self, params, extra, batch):
        """wav2vec 2.0's: the encoder's last and middle blocks averaged over the clip's frames ('mean_pool',
        'mid_pool'), and the last block's frames ('tokens'); unmasked speech, no code mix."""

        def encode(model, waveform, num_samples):
            x, valid, _ = model.speech_prenet(waveform, num_samples, None, True)
            return model.encode(x, valid, True, return_layers=True)

        hidden, layers = self.model.apply({'params': params}, batch['waveform'], batch['num_samples'], method=encode)
        layers = {f'layer_{i}': h for i, h in enumerate(layers)}
        return wav2vec2.pooled_frames(hidden, layers, batch['num_samples'], self.model.encoder_depth)

    def visualize(self, params, extra):
        """The log-mel targets of the first `eval.pictures` clips of the eval split (row 1) and the speech decoder's
        frames before (row 2) and after (row 3) the post-net, teacher-forced on masked speech as in training
        (evaluation mode: no dropout, argmax codes in the mix); frequency upwards, time to the right."""
        from jaxssl.evaluate import reconstruction

        count = self.config.eval.pictures
        if count <= 0:
            return {}
        clips = next(iter(self.eval_dataset(self.config.eval.split, count, count, 0, 1)))
        speech = {'waveform': clips['waveform'][:, 0], 'num_samples': clips['num_samples'][:, 0]}
        batch = self.batch_transform(groups=1)(speech, np.random.default_rng(self.config.seed))
        out, _ = self.model.apply(
            {'params': params, 'batch_stats': extra['batch_stats']}, jax.tree.map(jnp.asarray, batch),
            jnp.float32(1.0), self.config.quantizer.share, True, method=speech_forward,
            rngs={'codes': jax.random.key(self.config.seed)}, mutable=['batch_stats'],
        )  # fmt: skip
        frames = int(batch['mel_frames'].min()) // self.model.reduction * self.model.reduction
        panels = {'target': batch['mel'], 'before': np.asarray(out['before']), 'after': np.asarray(out['after'])}
        panels = {k: v[:, :frames] for k, v in panels.items()}
        low, high = np.percentile(panels['target'], 1), panels['target'].max()
        grey = {
            k: np.repeat(np.clip((v.transpose(0, 2, 1)[:, ::-1] - low) / (high - low + 1e-6), 0, 1)[..., None], 3, -1)
            for k, v in panels.items()
        }  # fmt: skip
        return {'log_mel': reconstruction.grid([grey], order=('target', 'before', 'after'))}

    def tokens_per_example(self) -> int:
        return self.frames
