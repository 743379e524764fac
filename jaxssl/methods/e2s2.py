"""E2S2 (Zhong et al., arXiv 2205.14912, "E2S2: Encoding-Enhanced Sequence-to-Sequence Pretraining for Language
Understanding and Generation"): BART's denoising pretraining with two objectives on the encoder, following the
authors' fairseq patch (WHU-ZQH/E2S2; fact sheet in docs/methods.md):

- the input is corrupted by text infilling, then local token shuffles, then random replacements
  (jaxssl.data.text_noise, in the input pipeline); the decoder reconstructs the original row (teacher forcing on
  the row shifted right behind [SEP], BART's decoder start), a token cross-entropy over every real target token;
- self-supervised denoising: a 3-way head on the encoder's last states tells each input token original /
  shuffled / replaced (cross-entropy, summed over the input's real tokens, per target token as the NLL);
- contrastive learning: the encoder's mean-pooled states of the corrupted input and of the text-infilled-only
  ("mask-only") input of the same row are positives, every other row of the global batch (both inputs) a negative:
  NT-Xent at temperature 1 (jaxssl.losses.contrastive); the mask-only input also goes through the decoder.
- loss = 0.5 x NLL(corrupted) + 0.5 x NLL(mask-only) + 0.05 x contrastive + 0.05 x detection (the reference's
  weights); without the contrastive term (`loss.contrastive=False`, what the repository's train.sh runs: it never
  passes --cse) NLL(corrupted) + 0.05 x detection. With `noise.shuffle=False, noise.replace_ratio=0,
  loss.detection_weight=0, loss.contrastive=False` this is BART's text-infilling pretraining.

Deviations, each from a bug or a batch artefact of the reference: the detection loss counts every real input token
of all three classes (the reference's ignore_index is the pad id 1, which is also the "shuffled" label, so it never
trains that class, and it trains padding as "original"); the pooled states are a mean over the real tokens (the
reference averages over the padded length, whose padding states depend on the batch's longest row); the negatives
are the global batch's (the reference's one GPU's micro-batch, no gathering).

Evaluation: the encoder's frozen sentence embeddings (mirror_bert's Lee similarity and duplicate retrieval, per
pooling); on held-out text (the Lee similarity documents' sentences, a fixed corruption): the reconstruction loss,
perplexity and accuracy, the detection accuracy and the recall of shuffled and of replaced tokens; word-order
minimal pairs scored by the denoising autoencoder: log p(sentence | the sentence), higher for the sentence whose
words are in order.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import sharding
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import text, text_noise
from jaxssl.losses import contrastive
from jaxssl.methods import base, language_model
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import bart, bert, bert_weights


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, the corruption or the evaluation cannot use."""
    check_choice(config, 'model.variant', bart.VARIANTS)
    check_choice(config, 'model.dtype', DTYPES)
    for key in ('model.dropout', 'model.attention_dropout', 'model.activation_dropout'):
        check_range(config, key, 0.0, 1.0)
    check_range(config, 'noise.mask_ratio', 0.0, 1.0)
    check_range(config, 'noise.replace_ratio', 0.0, 1.0)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if not number(config.noise.poisson_lambda) or not 0 < config.noise.poisson_lambda < 16:
        # Past ~16.1, P(0) < 1e-7: fairseq's truncated table holds only length 0 and no span ever ends the draw.
        raise ConfigError(f"bad value {config.noise.poisson_lambda!r} for 'noise.poisson_lambda': must be in (0, 16)")
    if not number(config.loss.temperature) or not config.loss.temperature > 0:
        raise ConfigError(f"bad value {config.loss.temperature!r} for 'loss.temperature': must be > 0")
    for key in ('loss.contrastive_weight', 'loss.detection_weight'):
        group, name = key.split('.')
        if not number(config[group][name]) or config[group][name] < 0:
            raise ConfigError(f"bad value {config[group][name]!r} for '{key}': must be >= 0")
    for key in ('noise.shuffle', 'loss.contrastive'):
        group, name = key.split('.')
        if not isinstance(config[group][name], bool):
            raise ConfigError(f"bad value {config[group][name]!r} for '{key}': must be true or false")
    language_model.check_rows_and_evaluation(config)


def shift_right(tokens: jax.Array, start_id: int) -> jax.Array:
    """The decoder's input for target rows (B, T): [start] + each row but its last token (transformers'
    shift_tokens_right; fairseq moves the row's eos to the front, which differs only at padded positions)."""
    return jnp.concatenate([jnp.full_like(tokens[:, :1], start_id), tokens[:, :-1]], axis=1)


def detection_terms(logits: jax.Array, labels: jax.Array, mask: jax.Array, per: jax.Array) -> dict[str, jax.Array]:
    """The 3-way detection cross-entropy summed over the real input tokens (`mask`) and divided by `per` (the target
    token count, as the reference's normalisation), its accuracy and each noise class's recall."""
    chex.assert_rank(logits, 3)
    real = mask.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * real
    of = lambda c: (labels == c).astype(jnp.float32) * real
    count = lambda w: jnp.maximum(w.sum(), 1.0)
    return {
        'loss': (nll * real).sum() / jnp.maximum(per, 1.0),
        'accuracy': hit.sum() / count(real),
        'shuffled_recall': (hit * of(text_noise.SHUFFLED)).sum() / count(of(text_noise.SHUFFLED)),
        'replaced_recall': (hit * of(text_noise.REPLACED)).sum() / count(of(text_noise.REPLACED)),
        'tokens': real.sum(),
        'shuffled': of(text_noise.SHUFFLED).sum(),
        'replaced': of(text_noise.REPLACED).sum(),
    }


class Method(language_model.Method):
    """E2S2 pretraining for the one trainer; the corpus, tokenizer, held-out sentences and sentence evaluation are
    the language models' (jaxssl.methods.language_model, mirror_bert)."""

    def __init__(self, config: ml_collections.ConfigDict):
        base.Method.__init__(self, config)
        m = config.model
        self.tokenizer = self.make_tokenizer()
        kwargs = dict(
            dropout=m.dropout, attention_dropout=m.attention_dropout, activation_dropout=m.activation_dropout,
            dtype=DTYPES[m.dtype],
        )  # fmt: skip
        self._pretrained = None
        if m.pretrained:  # E2S2 proper: continue a released BART's pretraining
            if config.input.vocab_min_count:
                raise ConfigError(
                    "'input.vocab_min_count' must be 0 with 'model.pretrained' (the model's ids are the tokenizer's)"
                )
            try:
                fields, self._pretrained = bert_weights.load_bart(m.pretrained)
            except (FileNotFoundError, ValueError, KeyError) as e:
                raise ConfigError(f"'model.pretrained': {e}") from None
            if self.tokenizer.vocab_size > fields['vocab_size']:
                raise ConfigError(
                    f"'input.tokenizer' has {self.tokenizer.vocab_size} ids, more than the {fields['vocab_size']} of "
                    "'model.pretrained' (give the model's own tokenizer folder)"
                )
            self.bart = bart.Bart(**fields, **kwargs)
        else:
            self.bart = bart.make(m.variant, self.tokenizer.vocab_size, **kwargs)
        if max(config.input.max_len, config.eval.max_len) > self.bart.max_positions:
            raise ConfigError(
                f"'input.max_len' / 'eval.max_len' exceed the model's {self.bart.max_positions} positions"
            )
        t, n = self.tokenizer, config.noise
        _, self.cls_id, self.sep_id = t.special_ids
        self.noise = text_noise.Noise(
            mask_id=t.mask_id, pad_id=t.pad_id, special_ids=t.special_ids, vocab_size=t.vocab_size,
            never_drawn=(t.pad_id, self.cls_id), mask_ratio=n.mask_ratio, poisson_lambda=n.poisson_lambda,
            shuffle=n.shuffle, replace_ratio=n.replace_ratio,
        )  # fmt: skip

    # --- data -------------------------------------------------------------------------------------------------
    @functools.cached_property
    def packed_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows of [CLS], consecutive sentences and a closing [SEP] (BART's [bos] ... [eos], the sentences joined
        without separators as fairseq's denoising task strips each line's eos): the language models' packing at
        max_len - 1 of the sentences without their [SEP], then the [SEP] after each row's last token."""

        def without_separator(texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
            ids, mask = self.tokenizer(texts, max_len)
            ends = mask.sum(axis=1) - 1
            ids[np.arange(len(ids)), ends], mask[np.arange(len(ids)), ends] = self.tokenizer.pad_id, 0
            return ids, mask

        max_len = self.config.input.max_len
        short, short_mask = text.pack_sentences(without_separator, self.sentences, max_len - 1, self.cls_id)
        tokens = np.pad(short, ((0, 0), (0, 1)), constant_values=self.tokenizer.pad_id)
        mask = np.pad(short_mask, ((0, 0), (0, 1)))
        ends = short_mask.sum(axis=1)
        tokens[np.arange(len(tokens)), ends], mask[np.arange(len(tokens)), ends] = self.sep_id, 1
        return tokens, mask

    def corrupt(self, tokens: np.ndarray, mask: np.ndarray, seed: int, first_row: int = 0) -> dict[str, np.ndarray]:
        """Clean rows (B, L) -> the batch the loss reads: 'tokens', 'mask' (the targets) and the corrupted inputs
        (text_noise.corrupt_batch)."""
        return {'tokens': tokens, 'mask': mask, **text_noise.corrupt_batch(tokens, mask, self.noise, seed, first_row)}

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        c = self.config.input
        tokens, mask = self.packed_rows

        def corrupted(indices: np.ndarray, rng: np.random.Generator, rows: slice) -> dict[str, np.ndarray]:
            mine = np.asarray(indices[rows], np.int64)
            batch_seed = int(rng.integers(2**32))  # the same in every process: each draws the whole global batch
            return {**self.corrupt(tokens[mine], mask[mine], batch_seed, rows.start), 'index': mine}

        batches = text.shuffled_batches(len(tokens), c.global_batch, seed, process_index, process_count, corrupted)
        return batches, len(tokens)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.config.input.max_len)
        ones, zeros = np.ones(shape, np.int32), np.zeros(shape, np.int32)
        return {'tokens': zeros, 'mask': ones, 'noisy': zeros, 'noisy_mask': ones, 'masked': zeros, 'labels': zeros}

    # --- model ------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        """A fresh BART, or with `model.pretrained` the released weights and a fresh detection head."""
        params = self.bart.init(rng, batch['noisy'], batch['noisy_mask'], batch['tokens'])['params']
        if self._pretrained is not None:
            released = jax.tree.map(jnp.asarray, self._pretrained)
            chex.assert_trees_all_equal_shapes(released, {k: v for k, v in params.items() if k != 'detection'})
            params = {**params, **released}
        return params, {}

    def e2s2_terms(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, train: bool, pair: bool) -> dict:
        """The terms on a batch (dropout only when `train`): 'nll' (language_model.cross_entropy of the corrupted
        input's reconstruction), 'detection' (detection_terms), with `pair` also 'masked_nll' and 'contrastive'
        (the NT-Xent and its accuracy); and the weighted 'loss' (the contrastive form only with `pair`)."""
        c = self.config.loss
        target, target_mask = batch['tokens'], batch['mask']
        chex.assert_equal_shape([target, target_mask, batch['noisy'], batch['noisy_mask'], batch['labels']])
        rngs = jax.random.split(rng, 5)
        apply = lambda method, *args, rng: self.bart.apply(
            {'params': params}, *args, not train, method=method, rngs={'dropout': rng} if train else {}
        )
        decoder_tokens = shift_right(target, self.sep_id)

        def reconstruct(source: jax.Array, i: int) -> tuple[dict, jax.Array]:
            memory = apply('encode', source, batch['noisy_mask'], rng=rngs[i])
            logits = apply('decode', decoder_tokens, memory, batch['noisy_mask'], rng=rngs[i + 1])
            return language_model.cross_entropy(logits, target, target_mask.astype(jnp.float32)), memory

        nll, memory = reconstruct(batch['noisy'], 0)
        detect_logits = apply('detect', memory, rng=rngs[4])
        detection = detection_terms(detect_logits, batch['labels'], batch['noisy_mask'], nll['tokens'])
        out = {'nll': nll, 'detection': detection}
        if not pair:
            out['loss'] = nll['loss'] + c.detection_weight * detection['loss']
            return out
        masked_nll, masked_memory = reconstruct(batch['masked'], 2)
        z1 = bert.pool(memory, batch['noisy_mask'], 'mean')
        z2 = bert.pool(masked_memory, batch['noisy_mask'], 'mean')
        loss, metrics = contrastive.global_nt_xent(z1, z2, c.temperature, self.mesh, sharding.BATCH_AXES)
        out['masked_nll'], out['contrastive'] = masked_nll, {'loss': loss, **metrics}
        out['loss'] = (
            0.5 * nll['loss'] + 0.5 * masked_nll['loss'] + c.contrastive_weight * loss
            + c.detection_weight * detection['loss']
        )  # fmt: skip
        return out

    def loss(self, params, extra, batch, rng, step):
        pair = self.config.loss.contrastive
        terms = self.e2s2_terms(params, batch, rng, train=True, pair=pair)
        n, d = terms['nll'], terms['detection']
        metrics = {
            'loss': terms['loss'],
            'nll': n['loss'],
            'perplexity': jnp.exp(n['loss']),
            'accuracy': n['accuracy'],
            'detection_loss': d['loss'],
            'detection_accuracy': d['accuracy'],
            'shuffled_recall': d['shuffled_recall'],
            'replaced_recall': d['replaced_recall'],
        }
        if pair:
            metrics |= {
                'masked_nll': terms['masked_nll']['loss'],
                'contrastive_loss': terms['contrastive']['loss'],
                'contrastive_acc': terms['contrastive']['contrastive_acc'],
            }
        return terms['loss'], (metrics, extra)

    def represent(self, params, extra, batch):
        """Sentence embeddings of the encoder: each pooling of eval.poolings over its last states."""
        tokens, mask = batch['tokens'], batch['mask']
        hidden = self.bart.apply({'params': params}, tokens, mask, method='encode')
        return {pooling: bert.pool(hidden, mask, pooling) for pooling in self.config.eval.poolings}

    # --- evaluation -------------------------------------------------------------------------------------------
    def held_out(self, params: Any) -> dict[str, float]:
        """Reconstruction and detection on the held-out sentences (one a row, eval.max_len tokens, EVAL_ROWS a pass,
        corrupted with a fixed seed), each a mean over all the tokens it concerns across the passes."""
        rows = language_model.EVAL_ROWS
        terms = jax.jit(lambda p, b: self.e2s2_terms(p, b, jax.random.key(0), train=False, pair=False))
        sentences = self.held_out_sentences
        sums: dict[str, np.ndarray] = {}
        for lo in range(0, len(sentences), rows):
            chunk = sentences[lo : lo + rows]
            tokens, mask = self.tokenizer(chunk + ['.'] * (rows - len(chunk)), self.config.eval.max_len)
            batch = self.corrupt(tokens, mask, seed=0, first_row=lo)
            for key in ('mask', 'noisy_mask'):
                batch[key][len(chunk) :] = 0  # the filler rows count for nothing
            got = jax.device_get(terms(params, batch))
            n, d = got['nll'], got['detection']
            for name, value, count in (
                ('loss', n['loss'], n['tokens']),
                ('accuracy', n['accuracy'], n['tokens']),
                ('detection_accuracy', d['accuracy'], d['tokens']),
                ('shuffled_recall', d['shuffled_recall'], d['shuffled']),
                ('replaced_recall', d['replaced_recall'], d['replaced']),
            ):
                sums[name] = sums.get(name, np.zeros(2)) + np.array([value * count, count])
        out = {f'held_out/{name}': float(s[0] / max(s[1], 1.0)) for name, s in sums.items()}
        out['held_out/perplexity'] = float(np.exp(out['held_out/loss']))
        return out

    def sentence_log_likelihoods(self, params: Any, sentences: list[str]) -> np.ndarray:
        """Each sentence's log p(sentence | sentence) under the denoising autoencoder: the clean sentence encoded,
        the sum over its real target tokens of the decoder's log-probability (eval.max_len tokens, EVAL_ROWS a
        pass)."""

        @jax.jit
        def scores(params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
            logits, _, _ = self.bart.apply({'params': params}, tokens, mask, shift_right(tokens, self.sep_id))
            logp = jax.nn.log_softmax(logits, axis=-1)
            return (jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0] * mask).sum(axis=1)

        return self.score_in_passes(params, sentences, scores)

    def flops_per_example(self) -> float:
        """The encoder's and decoder's dense layers and attention scores (the decoder's cross-attention included),
        the output projection over the vocabulary and the detection head, forward and backward; twice with the
        mask-only input's pass."""
        m, n, vocab = self.bart, self.config.input.max_len, self.tokenizer.vocab_size
        w = m.width
        encoder = m.encoder_depth * (2 * n * (4 * w * w + 2 * w * m.mlp) + 4 * n * n * w)
        decoder = m.decoder_depth * (2 * n * (8 * w * w + 2 * w * m.mlp) + 8 * n * n * w)
        one = encoder + decoder + 2 * n * w * (vocab + m.detection_classes)
        return 3.0 * one * (2 if self.config.loss.contrastive else 1)
