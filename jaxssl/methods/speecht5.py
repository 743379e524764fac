"""SpeechT5 (Ao et al., ACL 2022) pre-training: one encoder-decoder learns from unpaired speech and text, each through
its own pre- and post-nets, tied by a quantizer that swaps a tenth of the encoder's output for codevectors shared by
both modalities (microsoft/SpeechT5: models/speecht5.py, criterions/speech_pretrain_criterion.py,
text_pretrain_criterion.py, text_to_speech_loss.py; the model is jaxssl.models.speecht5).

Speech (per reference GPU batch, in the Grain pipeline): every utterance cut at a random start to the batch's
shortest and wav2vec 2.0's span masks (`mask.prob` 0.8, `mask.length` 10, at least 2 spans, require_same_masks:
jaxssl.methods.wav2vec2.crop_and_mask); the masked-prediction labels of the cropped clip (HuBERT's first-iteration
units: MFCC k-means, jaxssl.methods.mert's teacher); the decoder's 80-bin log-mel targets (jaxssl.data.audio.
speecht5_log_mel, 62.5 frames a second) of the utterance as loaded (up to `input.max_samples`), cut to the crop as
the reference (start = int(crop start / (samples / frames)), as many frames as int(crop / (samples / frames))).
On device, per reference batch (`loss.reference_batches`, default one per device: each its own code steps and
normalisation), then averaged:
  mean CE of the HuBERT head over the masked frames (encoder output before the code mix)
  + `loss.feature_penalty_weight` (10) x mean(feature encoder output ^ 2)
  + `loss.diversity_weight` (0.1) x (G V - perplexity) / (G V) of the quantizer over the batch's frames
  + `loss.reconstruction_weight` (1, the reference's dec_weight) x (L1 of the log-mel before and after the
    post-net + the stop BCE (pos_weight 5)) of the speech decoder, teacher-forced on every second frame, reading the
    encoder output with floor(`quantizer.share` (0.1) x T) of the batch's T time steps replaced by codevectors (the
    same steps for all its rows).
Text (`text.rows_per_utterance` sentences per utterance, drawn at random from `text.corpus` in the pipeline; jaxssl.
data.char_denoising; a reference batch's text rows are those of its utterances): BART's text infilling of the
character sequence into the encoder, the decoder reads the clean sequence shifted right (after the same code mix)
and predicts it:
  mean NLL over the clean sequence's tokens + `loss.diversity_weight` x the quantizer's diversity over the batch's
  steps (up to its longest row, padding within included, as the reference's collated batch).
Each step: (1 - `loss.text_share`) x the speech loss + `loss.text_share` x the text loss. The reference's batches are
each one modality, shuffled together in about equal numbers, each normalised by its own size and averaged over the
update: text_share 0.5 is that average. The Gumbel temperature decays per update as max(2 x 0.999995^step, 0.5).

Differences from the reference (docs/methods.md): no x-vectors (the speech decoder runs without its speaker input,
none offline); MFCC k-means labels computed on the crop (the reference: HuBERT iteration-2 units, 500 classes, of
the whole utterance, cropped); the post-net's BatchNorm statistics over the global batch's valid frames (the
reference's: per GPU batch); `represent` has no code mix and no dropout (the reference keeps the mix and Tacotron's
pre-net dropout on at evaluation; `visualize` keeps the mix); random symbols in the text noise leave out <s> and
<pad>; text rows are padded to `text.max_len` (the reference's to each batch's longest: same values, more compute).

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
    collater: start int(start / (N / F)), int(size / (N / F)) frames, no further than the last. An utterance of one
    window or less (which the configs' input.min_samples keep out) gives no frames: its decoder terms weigh nothing.
    """
    if len(waveform) <= audio.SPEECHT5_N_FFT // 2:
        return np.zeros((0, 80), np.float32)
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
    whole = [w[:n] for w, n in zip(batch['waveform'], batch['num_samples'], strict=True)]  # crop_and_mask copies
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
def grouped(x: jax.Array, groups: int) -> jax.Array:
    """(B, ...) -> (groups, B / groups, ...): the reference batches, consecutive rows."""
    return x.reshape(groups, -1, *x.shape[1:])


def group_code_positions(model: speecht5_model.SpeechT5, valid: jax.Array, groups: int, share: float) -> jax.Array:
    """(B, T) bool: each reference batch's own draw of floor(share x its length) steps (its length: its longest
    row's, as the reference's collater pads to), the same steps for its rows."""
    lengths = grouped(valid, groups).any(axis=1).sum(axis=1)
    keys = jax.random.split(model.make_rng('codes'), groups)
    draw = jax.vmap(lambda k, n: speecht5_model.code_positions(k, valid.shape[1], share, n))
    return jnp.repeat(draw(keys, lengths), valid.shape[0] // groups, axis=0)


def speech_forward(
    model: speecht5_model.SpeechT5, batch: dict[str, jax.Array], temperature: jax.Array, share: float, groups: int,
    deterministic: bool,
) -> dict[str, jax.Array]:  # fmt: skip
    """Masked waveforms -> the HuBERT head's logits, the feature penalty, the quantizer's probabilities and the speech
    decoder's outputs (teacher-forced on the log-mel targets, reading the code-mixed encoder output)."""
    x, valid, penalty = model.speech_prenet(batch['waveform'], batch['num_samples'], batch['time_mask'], deterministic)
    states = model.encode(x, valid, deterministic)
    vectors, _, probs = model.quantize(states, temperature, deterministic)
    memory = speecht5_model.mix_codes(states, vectors, group_code_positions(model, valid, groups, share))
    frames, frame_mask = losses.decoder_inputs(batch['mel'], batch['mel_frames'], model.reduction)
    before, after, stop = model.decode_speech(frames, frame_mask, memory, valid, None, deterministic)
    return {
        'logits': model.label_logits(states), 'penalty': penalty, 'probs': probs, 'valid': valid, 'before': before,
        'after': after, 'stop': stop,
    }  # fmt: skip


def text_forward(
    model: speecht5_model.SpeechT5, batch: dict[str, jax.Array], temperature: jax.Array, share: float, groups: int,
    deterministic: bool,
) -> dict[str, jax.Array]:  # fmt: skip
    """Noised sentences -> the quantizer's probabilities and the text decoder's next-token logits (teacher-forced on
    the clean sentences, reading the code-mixed encoder output), and each row's steps of its collated reference
    batch ('collated' (B K, L): up to the batch's longest row, where the reference pads to)."""
    source_mask = batch['text_source_mask'].astype(bool)
    states = model.encode(model.text_prenet(batch['text_source'], deterministic), source_mask, deterministic)
    vectors, _, probs = model.quantize(states, temperature, deterministic)
    memory = speecht5_model.mix_codes(states, vectors, group_code_positions(model, source_mask, groups, share))
    prev_mask = batch['text_target_mask'].astype(bool)
    _, logits = model.decode(batch['text_prev'], prev_mask, memory, source_mask, deterministic)
    collated = jnp.repeat(grouped(source_mask, groups).any(axis=1), source_mask.shape[0] // groups, axis=0)
    return {'logits': logits, 'probs': probs, 'collated': collated}


def flat_text(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The text rows (B, K, L) as (B K, L): each utterance's K rows adjacent, so reference batches stay consecutive."""
    return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in TEXT_KEYS}


def speech_terms(
    speech: dict[str, jax.Array], batch: dict[str, jax.Array], groups: int, reduction: int
) -> dict[str, jax.Array]:
    """The speech terms of each reference batch (groups,), each a mean over that batch (the reference normalises
    each of its batches by its own masked frames)."""
    labels = batch['labels'][:, 0]
    masked = batch['time_mask'] & (labels >= 0)
    g = functools.partial(grouped, groups=groups)
    prediction, accuracy = jax.vmap(losses.masked_prediction_loss)(
        g(speech['logits']), g(jnp.maximum(labels, 0)), g(masked)
    )
    reconstruction, terms = jax.vmap(functools.partial(losses.reconstruction_loss, reduction=reduction))(
        g(speech['before']), g(speech['after']), g(speech['stop']), g(batch['mel']), g(batch['mel_frames'])
    )
    frames = g(speech['valid']).sum(axis=2).astype(jnp.float32)  # the features_pen of the whole batch
    penalty = jnp.sum(g(speech['penalty']) * frames, axis=1) / jnp.maximum(frames.sum(axis=1), 1.0)
    return {
        'prediction': prediction, 'accuracy': accuracy, 'features_pen': penalty,
        'speech_diversity': jax.vmap(losses.diversity_loss)(g(speech['probs']), g(speech['valid'])),
        'reconstruction': reconstruction, **terms,
        'masked_fraction': g(masked).sum(axis=(1, 2)) / jnp.maximum(g(speech['valid']).sum(axis=(1, 2)), 1),
    }  # fmt: skip


def text_terms(words: dict[str, jax.Array], flat: dict[str, jax.Array], groups: int) -> dict[str, jax.Array]:
    """The text terms of each reference batch (groups,): the NLL per clean token and the diversity."""
    g = functools.partial(grouped, groups=groups)
    target_mask = flat['text_target_mask'].astype(bool)
    nll, accuracy = jax.vmap(losses.masked_prediction_loss)(g(words['logits']), g(flat['text_target']), g(target_mask))
    diversity = jax.vmap(losses.diversity_loss)(g(words['probs']), g(words['collated']))
    return {'text_nll': nll, 'text_accuracy': accuracy, 'text_diversity': diversity}


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
        # Reference batches (one per device by default): each its own crop, masks, code steps and normalisation.
        groups = self.groups() if batch['waveform'].shape[0] % self.groups() == 0 else 1  # 1: smaller than the mesh
        speech, updated = self.model.apply(
            {'params': params, 'batch_stats': extra['batch_stats']}, batch, temperature, c.quantizer.share, groups,
            False, method=speech_forward, rngs=rngs, mutable=['batch_stats'],
        )  # fmt: skip
        t = {k: v.mean() for k, v in speech_terms(speech, batch, groups, self.model.reduction).items()}
        speech_loss = (
            t['prediction'] + c.loss.feature_penalty_weight * t['features_pen']
            + c.loss.diversity_weight * t['speech_diversity'] + c.loss.reconstruction_weight * t['reconstruction']
        )  # fmt: skip
        metrics = {**t, 'speech': speech_loss, 'temperature': temperature}
        loss = (1 - c.loss.text_share) * speech_loss
        if c.loss.text_share > 0:
            flat = flat_text(batch)
            text_rng = base.stream(rng, 'text')  # draws of its own, as the reference's separate text batches
            words = self.model.apply(
                {'params': params}, flat, temperature, c.quantizer.share, groups, False, method=text_forward,
                rngs={k: base.stream(text_rng, k) for k in streams},
            )  # fmt: skip
            t = {k: v.mean() for k, v in text_terms(words, flat, groups).items()}
            metrics |= {**t, 'text': t['text_nll'] + c.loss.diversity_weight * t['text_diversity']}
            loss = loss + c.loss.text_share * metrics['text']
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
        usable = (clips['valid'] > 0) & (clips['num_samples'][:, 0] > audio.SPEECHT5_N_FFT)  # unreadable: zeros
        if not usable.any():
            return {}
        speech = {'waveform': clips['waveform'][usable, 0], 'num_samples': clips['num_samples'][usable, 0]}
        # Each clip its own reference batch: cut to nothing shorter.
        batch = self.batch_transform(groups=int(usable.sum()))(speech, np.random.default_rng(self.config.seed))
        out = self.model.apply(
            {'params': params, 'batch_stats': extra['batch_stats']}, jax.tree.map(jnp.asarray, batch),
            jnp.float32(1.0), self.config.quantizer.share, 1, True, method=speech_forward,
            rngs={'codes': jax.random.key(self.config.seed)},
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
