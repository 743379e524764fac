"""wav2vec 2.0 fine-tuning for speech recognition with CTC (Baevski et al., NeurIPS 2020, section 3.3; fairseq's
`wav2vec_ctc` model, `ctc` criterion and `audio_finetuning` task): the pretrained encoder, a Linear head to letters,
the CTC loss; the second step of the seed papers' Ainu model (continued pretraining, then fine-tuning).

As fairseq's recipe (examples/wav2vec/config/finetuning/base_{10h,100h}.yaml):
- the feature encoder stays frozen (feature_grad_mult 0); the rest of the encoder stays frozen for the first
  `model.freeze_finetune_updates` updates, during which only the head trains;
- batches of similar lengths (`input.bucket_by_length`, fairseq's size-sorted batches), padded, not cropped;
- masks while training: time spans replaced by the learned mask embedding (mask_prob 0.65, length 10), then channel
  spans zeroed (mask_channel_prob 0.5, length 64), both drawn per reference batch with require_same_masks, on each
  utterance's own frames (a crop would cut the transcript);
- CTC with the blank at fairseq's <s> (id 0), summed per utterance, averaged over utterances (sentence_avg);
  impossible alignments count zero (zero_infinity);
- Adam (0.9, 0.98), eps 1e-8, no weight decay, the tri-stage schedule (10% warmup from 1% of the peak, 40% hold, 50%
  exponential decay to 5%);
- evaluation: greedy (argmax) decoding, letter error rate (with word ends, fairseq's uer) and word error rate.

Starts from a pretraining run (`init_from` its workdir: every parameter but the head) or a transformers
Wav2Vec2ForPreTraining folder (`model.pretrained`; the quantizer is left behind), or continues a Wav2Vec2ForCTC
folder (its letter head too when the alphabet has its size).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import audio, transcripts
from jaxssl.evaluate import features
from jaxssl.methods import _audio
from jaxssl.methods.videomae import DTYPES
from jaxssl.methods.wav2vec2 import bucketed_order, groups_per_host, reference_groups, span_mask
from jaxssl.models import wav2vec2 as w2v
from jaxssl.models import wav2vec2_weights

DATASETS = ('manifest', 'synthetic_words')


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks, loss or input cannot use (files: at run start)."""
    m = config.model
    if not m.pretrained:
        check_choice(config, 'model.variant', w2v.VARIANTS)
    check_choice(config, 'model.dtype', DTYPES)
    for key in ('dropout', 'attention_dropout', 'activation_dropout', 'dropout_input', 'layerdrop', 'final_dropout'):
        check_range(config, f'model.{key}', 0.0, 1.0)
    audio.check_audio_input_config(config, DATASETS)
    if config.input.features != 'waveform':
        raise ConfigError("'input.features' must be 'waveform' for wav2vec 2.0 (its encoder reads the samples)")
    for group in ('mask', 'channel_mask'):
        check_range(config, f'{group}.prob', 0.0, 1.0)
        if config[group].length < 1:
            raise ConfigError(f"bad value {config[group].length} for '{group}.length': must be >= 1")
    if not isinstance(m.freeze_finetune_updates, int) or m.freeze_finetune_updates < 0:
        raise ConfigError(
            f"bad value {m.freeze_finetune_updates!r} for 'model.freeze_finetune_updates': an integer >= 0"
        )
    if config.loss.reference_batches < 0:
        raise ConfigError("'loss.reference_batches' must be >= 0 (0: one per device)")


def ctc_masks(
    batch: dict[str, np.ndarray], rng: np.random.Generator, *, groups: int, time: Any, channel: Any, width: int
) -> dict[str, np.ndarray]:
    """fairseq's fine-tuning masks for one host batch of `groups` reference batches: 'time_mask' (B, T) spans over
    each utterance's own frames (compute_mask_indices with the padding mask, min `time.min_spans` spans) and
    'channel_mask' (B, width) spans over the channels (no minimum); within a reference batch every row keeps a uniform
    random subset of the smallest count (require_same_masks)."""
    lengths = batch['num_samples']
    time_mask = np.zeros((len(lengths), int(w2v.frame_counts(batch['waveform'].shape[1]))), bool)
    channel_mask = np.zeros((len(lengths), width), bool)
    for rows in np.split(np.arange(len(lengths)), groups):
        frames = [int(w2v.frame_counts(int(lengths[i]))) for i in rows]
        _same_count_spans(time_mask, rows, frames, rng, time, time.min_spans)
        _same_count_spans(channel_mask, rows, [width] * len(rows), rng, channel, 0)
    return {**batch, 'time_mask': time_mask, 'channel_mask': channel_mask}


def _same_count_spans(
    out: np.ndarray, rows: np.ndarray, sizes: list[int], rng: np.random.Generator, spec: Any, min_spans: int
) -> None:
    """Sets `span_mask` spans in out[rows] (each over its first `sizes` positions), then trims every row to a random
    subset of the smallest count."""
    if spec.prob <= 0:
        return
    chosen = [np.flatnonzero(span_mask(out.shape[1], n, rng, spec.prob, spec.length, min_spans)) for n in sizes]
    target = min(len(c) for c in chosen)
    for i, c in zip(rows, chosen, strict=True):
        out[i, rng.choice(c, target, replace=False) if len(c) > target else c] = True


def ctc_loss(
    logits: jax.Array, frames: jax.Array, targets: jax.Array, target_lengths: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-utterance CTC negative log likelihood (B,) with blank 0 over each utterance's first `frames` frames, and
    whether the alignment is possible (B,) bool: at least one frame per target plus one per repeated pair (torch's
    zero_infinity zeroes the others)."""
    t, n = logits.shape[1], targets.shape[1]
    logit_paddings = (jnp.arange(t)[None] >= frames[:, None]).astype(jnp.float32)
    label_valid = jnp.arange(n)[None] < target_lengths[:, None]
    per_utterance = optax.ctc_loss(
        logits.astype(jnp.float32), logit_paddings, targets, (~label_valid).astype(jnp.float32), blank_id=0
    )
    repeats = jnp.sum((targets[:, 1:] == targets[:, :-1]) & label_valid[:, 1:], axis=1)
    return per_utterance, frames >= target_lengths + repeats


class Method(_audio.AudioMethod):
    """wav2vec 2.0 CTC fine-tuning for the trainer."""

    input_key = 'waveform'
    represent_keys = ('num_samples',)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m, c = config.model, config.input
        if c.dataset == 'manifest' and not c.manifest_dir:  # paths are checked when a run starts
            raise ConfigError(
                "'input.manifest_dir' is empty: fairseq's <split>.tsv / <split>.ltr / dict.ltr.txt folder"
            )
        try:
            if c.dataset == 'manifest':
                self.dictionary = transcripts.LetterDictionary.from_file(f'{c.manifest_dir}/dict.ltr.txt')
            else:
                letters = sorted({s for t in transcripts.SYNTHETIC_SPELLINGS for s in t.split()})
                self.dictionary = transcripts.LetterDictionary(letters)
        except OSError as e:
            raise ConfigError(f"'input.manifest_dir': {e}") from None
        overrides = dict(
            dropout=m.dropout,
            attention_dropout=m.attention_dropout,
            activation_dropout=m.activation_dropout,
            dropout_input=m.dropout_input,
            layerdrop=m.layerdrop,
            feature_grad_mult=0.0,  # the feature encoder is never trained in fine-tuning
            final_dropout=m.final_dropout,
            dtype=DTYPES[m.dtype],
            pretraining=False,
            vocab_size=len(self.dictionary),
        )
        self._pretrained = None
        if m.pretrained:
            try:
                fields, params = wav2vec2_weights.load(m.pretrained, quantizer=False)
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"'model.pretrained' {m.pretrained}: {e}") from None
            if 'lm_head' in params and released_symbols(m.pretrained) != self.dictionary.symbols:
                del params['lm_head']  # another alphabet, or its order unknown: a new head
            self._pretrained = params
            self.model = w2v.Wav2Vec2(**{**fields, **overrides})
            if (fields['extractor_mode'] == 'layer') != c.normalize_waveform:  # fairseq's recipes: layer <=> normalize
                raise ConfigError(
                    f"'input.normalize_waveform' is {c.normalize_waveform} but {m.pretrained} has a "
                    f'{fields["extractor_mode"]}-norm feature encoder, trained on '
                    f'{"standardised" if fields["extractor_mode"] == "layer" else "raw"} waveforms'
                )
        else:
            self.model = w2v.make_model(m.variant, **overrides)
        self.max_target = config.loss.max_target_length
        self._sources: dict[str, Any] = {}

    # --- data -------------------------------------------------------------------------------------------------
    def source(self, split: str) -> Any:
        """The split's transcribed utterances, built once per split."""
        if split not in self._sources:
            self._sources[split] = self._make_source(split)
        return self._sources[split]

    def _make_source(self, split: str) -> Any:
        c = self.config.input
        if c.dataset == 'synthetic_words':
            return transcripts.SpelledWords(audio.SyntheticWordsSource(split, c.sample_rate))
        try:
            return transcripts.ManifestSource(c.manifest_dir, split, c.max_samples, c.min_samples)
        except (OSError, ValueError) as e:
            raise ConfigError(f"'input.manifest_dir' / 'input.split': {e}") from None

    def train_source(self) -> Any:
        """The training split, its transcripts checked against loss.max_target_length before any step."""
        longest = max(len(ids) for ids in self.targets)
        if longest > self.max_target:
            raise ConfigError(f"'loss.max_target_length' {self.max_target}: a transcript has {longest} letters")
        return self.source(self.config.input.split)

    @functools.cached_property
    def targets(self) -> list[np.ndarray]:
        """The training split's transcripts as letter ids, by 'transcript' index."""
        return [self.dictionary.encode(t) for t in self.source(self.config.input.split).transcripts]

    def sample_transform(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids = self.targets[int(sample['transcript'])]
        padded = np.full(self.max_target, transcripts.PAD, np.int32)
        padded[: len(ids)] = ids
        return {**sample, 'targets': padded, 'target_length': np.int32(len(ids))}

    def reading_order(self, source: Any, seed: int, process_index: int, process_count: int) -> Any:
        """With `input.bucket_by_length`, fairseq's size-sorted batches: each reference batch holds utterances of
        similar length, so require_same_masks trims little (random lengths would cut every row to the shortest's
        mask count)."""
        return bucketed_order(self.config, self.groups(), source, seed, process_index, process_count)

    def groups(self) -> int:
        return reference_groups(self.config, self.mesh)

    def batch_transform(self) -> Any:
        c = self.config
        return functools.partial(
            ctc_masks, groups=groups_per_host(self.groups()), time=c.mask, channel=c.channel_mask,
            width=self.model.width,
        )  # fmt: skip

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        n = self.config.input.max_samples
        batch = {
            'waveform': np.zeros((batch_size, n), np.float32),
            'num_samples': np.full(batch_size, n, np.int32),
            'targets': np.full((batch_size, self.max_target), transcripts.PAD, np.int32),
            'target_length': np.ones(batch_size, np.int32),
        }
        return ctc_masks(
            batch, np.random.default_rng(0), groups=1, time=self.config.mask, channel=self.config.channel_mask,
            width=self.model.width,
        )  # fmt: skip

    # --- model ------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        params = w2v.init_params(self.model, rng, batch['waveform'])
        if self._pretrained is not None:
            params = {**params, **jax.tree.map(jnp.asarray, self._pretrained)}  # a new head on the released encoder
        return params, {}

    def loss(self, params, extra, batch, rng, step):
        rngs = {name: jax.random.fold_in(rng, i) for i, name in enumerate(('dropout', 'layerdrop'))}
        # freeze_finetune_updates: before it, only the head gets a gradient. fairseq's recipe (fp16, one flat fp32
        # buffer, legacy_ddp) then steps Adam with zero gradients for the encoder: moments stay 0 and the step count
        # is shared, as here with the encoder's gradients zeroed.
        if self.config.model.freeze_finetune_updates > 0:
            frozen = step < self.config.model.freeze_finetune_updates
            params = {
                k: v if k == 'lm_head' else jax.tree.map(lambda p: jnp.where(frozen, jax.lax.stop_gradient(p), p), v)
                for k, v in params.items()
            }
        logits = self.model.apply(
            {'params': params}, batch['waveform'], batch['num_samples'], batch['time_mask'], batch['channel_mask'],
            deterministic=False, rngs=rngs, method=self.model.ctc_logits,
        )  # fmt: skip
        frames = w2v.frame_counts(batch['num_samples'])
        per_utterance, possible = ctc_loss(logits, frames, batch['targets'], batch['target_length'])
        loss = jnp.sum(jnp.where(possible, per_utterance, 0.0)) / per_utterance.shape[0]  # sentence_avg
        metrics = {'loss': loss, 'impossible': jnp.mean(1.0 - possible.astype(jnp.float32))}
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """'tokens': the argmax letter of each frame (B, T), blank on the padding frames (which greedy decoding then
        drops, as if the utterance ended there)."""
        logits = self.model.apply(
            {'params': params}, batch['waveform'], batch['num_samples'], method=self.model.ctc_logits
        )
        valid = w2v.valid_frames(batch['num_samples'], logits.shape[1])
        return {'tokens': jnp.where(valid, jnp.argmax(logits, axis=-1), transcripts.BLANK)}

    # --- evaluation -------------------------------------------------------------------------------------------
    def eval_dataset(self, split: str, batch_size: int, max_examples: int, process_index: int, process_count: int):
        dataset, _ = audio.make_eval_dataset(
            self.config, split=split, batch_size=batch_size, process_index=process_index,
            process_count=process_count, max_examples=max_examples, source=self.source(split),
        )  # fmt: skip
        return dataset

    def evaluate(self, params: Any, extra: Any, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """Greedy decoding of eval.split: 'uer' (letter errors, word ends included, per reference letter, %) and
        'wer' (word errors per reference word, %), fairseq's validation metrics."""
        e = self.config.eval
        source = self.source(e.split)
        dataset = self.eval_dataset(e.split, e.batch_size, e.max_test_clips, jax.process_index(), jax.process_count())
        out = features.extract(self, params, extra, dataset, mesh, keep_tokens=True)
        return error_rates(out['tokens'], out['valid'], out['transcript'], source.transcripts, self.dictionary)

    def tokens_per_example(self) -> int:
        return int(w2v.frame_counts(self.config.input.max_samples))


def released_symbols(directory: str) -> list[str] | None:
    """The letters of a transformers CTC folder's head in id order (its vocab.json), or None without one."""
    path = os.path.join(directory, 'vocab.json')
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        vocab = json.load(f)
    return [symbol for symbol, _ in sorted(vocab.items(), key=lambda item: item[1])]


def error_rates(
    tokens: np.ndarray,
    valid: np.ndarray,
    index: np.ndarray,
    references: list[str],
    dictionary: transcripts.LetterDictionary,
) -> dict[str, float]:
    """uer / wer (%) of the greedy decodings of per-frame argmax ids `tokens` (N, T) against `references[index]`
    (fairseq letters), over the `valid` rows, as fairseq's ctc criterion: ids compared (letters outside the
    dictionary are <unk> in the reference; <pad> and </s> dropped from the hypothesis), errors summed over the corpus
    and divided by the reference's length."""
    letter_errors = letters = word_errors = words = 0
    for row, keep, i in zip(np.asarray(tokens).astype(np.int64), valid, index, strict=True):
        if not keep:
            continue
        reference = dictionary.encode(references[int(i)]).tolist()
        hypothesis = [
            t for t in transcripts.greedy_decode(row, len(row)) if t not in (transcripts.PAD, transcripts.EOS)
        ]
        letter_errors += transcripts.edit_distance(hypothesis, reference)
        letters += len(reference)
        ref_words = transcripts.words(dictionary.decode(reference).split())
        hyp_words = transcripts.words(dictionary.decode(hypothesis).split())
        word_errors += transcripts.edit_distance(hyp_words, ref_words)
        words += len(ref_words)
    return {'uer': 100.0 * letter_errors / max(letters, 1), 'wer': 100.0 * word_errors / max(words, 1)}
