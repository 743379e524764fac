"""ELECTRA (Clark et al., ICLR 2020, "Pre-training Text Encoders as Discriminators Rather Than Generators"):
replaced-token detection. A small masked-LM generator fills masked positions with samples from its own predictions;
the discriminator, the encoder kept for downstream use, learns from every token of the row whether it is the
original or a replacement. google-research/electra (run_pretraining.py, pretrain/pretrain_helpers.py) is followed:

- masking (pretrain_helpers.mask): per row, round(mask_prob x its real tokens) positions ([CLS] / [SEP] counted,
  never drawn), at least 1, at most max_predictions (int((mask_prob + 0.005) x max_len)); each becomes [MASK] with p
  0.85, else keeps its token (no random ids). Drawn on the device every step (jaxssl.methods.language_model's draw).
- generator: the masked-LM cross-entropy at the drawn positions, a mean over them.
- replacements (_get_fake_data): every drawn position (the kept ones too) takes a sample of the generator's softmax
  at temperature 1 (the Gumbel-max trick there; jax.random.categorical here), with no gradient into the generator;
  a sample equal to the original is labelled original.
- discriminator: a sigmoid cross-entropy of "replaced" at every real token ([CLS] / [SEP] included), their mean.
- loss = gen_weight x generator + disc_weight x discriminator (1 and 50). The two models share the embedding
  tables and LayerNorm (jaxssl.models.electra), so the discriminator's loss reaches the embeddings, not the
  generator's layers.

One deviation: the reference draws positions with replacement (a row of 128 tokens masks ~1.4 of its 19 positions
twice, counting them twice in the generator's loss); here they are distinct, as BERT's.

Evaluation: the discriminator's frozen sentence embeddings (mirror_bert's Lee similarity and duplicate retrieval,
per pooling); the pretraining metrics of the reference's metric_fn on held-out text (the Lee similarity documents'
sentences, a fixed draw): the generator's loss and accuracy, the share of samples equal to the original, the
discriminator's loss, accuracy, precision and recall; and word-order minimal pairs scored by the discriminator: a
sentence's log-probability that none of its tokens was replaced, sum of log sigmoid(-logit) over its real tokens.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.methods import base, language_model
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import bert, electra


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the models, masks or evaluation cannot use."""
    m, k = config.model, config.masking
    check_choice(config, 'model.variant', electra.VARIANTS)
    check_choice(config, 'model.dtype', DTYPES)
    check_range(config, 'model.dropout', 0.0, 1.0)
    check_range(config, 'model.attention_dropout', 0.0, 1.0)
    check_range(config, 'masking.ratio', 0.0, 1.0)
    check_range(config, 'masking.mask_prob', 0.0, 1.0)
    if k.ratio <= 0:
        raise ConfigError("bad value 0 for 'masking.ratio': the generator needs tokens to predict")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if not number(m.generator_size) or not 0 < m.generator_size <= 1:
        raise ConfigError(f"bad value {m.generator_size!r} for 'model.generator_size': must be in (0, 1]")
    try:
        electra.generator_shape(m.variant, m.generator_size)
    except ValueError as e:
        raise ConfigError(f"'model.generator_size': {e}") from None
    if not number(m.temperature) or not m.temperature > 0:
        raise ConfigError(f"bad value {m.temperature!r} for 'model.temperature': must be > 0")
    for key in ('loss.gen_weight', 'loss.disc_weight'):
        group, name = key.split('.')
        if not number(config[group][name]) or not config[group][name] >= 0:
            raise ConfigError(f"bad value {config[group][name]!r} for '{key}': must be >= 0")
    language_model.check_rows_and_evaluation(config)


def replace_tokens(
    tokens: jax.Array, positions: jax.Array, weights: jax.Array, samples: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The discriminator's input and labels: `tokens` (B, L), the original rows, with `samples` (B, P) written at the
    drawn `positions` (B, P) whose `weights` are 1 (the [MASK]ed and the kept ones alike); labels (B, L) float32 1
    where a real token (`mask`) now differs from the original, so a sample equal to it is labelled original."""
    chex.assert_equal_shape([positions, weights, samples])
    new = jnp.where(weights > 0, samples, jnp.take_along_axis(tokens, positions, axis=1))
    fake = tokens.at[jnp.arange(tokens.shape[0])[:, None], positions].set(new)
    return fake, ((fake != tokens) & mask.astype(bool)).astype(jnp.float32)


def detection_terms(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """The discriminator's mean sigmoid cross-entropy over the real tokens, its accuracy, precision (of the tokens
    it calls replaced) and recall (of the replaced ones), each with the token count it is a mean over."""
    real = mask.astype(jnp.float32)
    labels = labels * real  # padding is never a replaced token
    predicted = (logits > 0).astype(jnp.float32) * real
    correct = ((logits > 0) == (labels > 0)).astype(jnp.float32) * real
    count = lambda w: jnp.maximum(w.sum(), 1.0)
    return {
        'loss': (optax.sigmoid_binary_cross_entropy(logits, labels) * real).sum() / count(real),
        'accuracy': correct.sum() / count(real),
        'precision': (correct * predicted).sum() / count(predicted),
        'recall': (correct * labels).sum() / count(labels),
        'tokens': real.sum(),
        'predicted': predicted.sum(),
        'replaced': labels.sum(),
    }


class Method(language_model.Method):
    """ELECTRA pretraining for the one trainer; the corpus, packed rows, tokenizer and sentence evaluation are the
    language models' (jaxssl.methods.language_model, mirror_bert)."""

    def __init__(self, config: ml_collections.ConfigDict):
        base.Method.__init__(self, config)
        m = config.model
        self.tokenizer = self.make_tokenizer()
        kwargs = dict(dropout=m.dropout, attention_dropout=m.attention_dropout, dtype=DTYPES[m.dtype])
        self.electra, self.model = electra.make(m.variant, self.tokenizer.vocab_size, m.generator_size, **kwargs)
        if max(config.input.max_len, config.eval.max_len) > self.model.max_positions:
            raise ConfigError(
                f"'input.max_len' / 'eval.max_len' exceed the model's {self.model.max_positions} positions"
            )

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        positions = jnp.zeros((batch['tokens'].shape[0], self.config.masking.max_predictions), jnp.int32)
        return self.electra.init(rng, batch['tokens'], batch['mask'], positions)['params'], {}

    def electra_terms(self, params: Any, tokens: jax.Array, mask: jax.Array, rng: jax.Array, train: bool) -> dict:
        """Both models' terms on a batch (dropout only when `train`): 'generator' and 'discriminator' dicts of
        language_model.cross_entropy / detection_terms, 'sampled_accuracy' (samples equal to the original) and the
        weighted 'loss'."""
        chex.assert_rank([tokens, mask], 2)
        c, k = self.config, self.config.masking
        mask_rng, sample_rng, gen_rng, disc_rng = jax.random.split(rng, 4)
        draw = language_model.draw_mlm_targets(
            mask_rng, tokens, mask, self.tokenizer.special_ids, self.tokenizer.mask_id, self.tokenizer.vocab_size,
            k.ratio, k.max_predictions, k.mask_prob, random_prob=0.0,
        )  # fmt: skip
        apply = lambda method, *args, rng: self.electra.apply(
            {'params': params}, *args, not train, method=method, rngs={'dropout': rng} if train else {}
        )
        logits = apply('generate', draw['tokens'], mask, draw['positions'], rng=gen_rng)
        generator = language_model.cross_entropy(logits, draw['labels'], draw['weights'])
        samples = jax.random.categorical(sample_rng, jax.lax.stop_gradient(logits) / c.model.temperature)
        fake, labels = replace_tokens(tokens, draw['positions'], draw['weights'], samples, mask)
        disc_logits, _ = apply('discriminate', fake, mask, rng=disc_rng)
        discriminator = detection_terms(disc_logits, labels, mask)
        same = ((samples == draw['labels']) * draw['weights']).sum() / jnp.maximum(draw['weights'].sum(), 1.0)
        loss = c.loss.gen_weight * generator['loss'] + c.loss.disc_weight * discriminator['loss']
        return {'loss': loss, 'generator': generator, 'discriminator': discriminator, 'sampled_accuracy': same}

    def loss(self, params, extra, batch, rng, step):
        terms = self.electra_terms(params, batch['tokens'], batch['mask'], rng, train=True)
        g, d = terms['generator'], terms['discriminator']
        metrics = {
            'loss': terms['loss'],
            'generator_loss': g['loss'],
            'generator_accuracy': g['accuracy'],
            'sampled_accuracy': terms['sampled_accuracy'],
            'discriminator_loss': d['loss'],
            'discriminator_accuracy': d['accuracy'],
            'discriminator_precision': d['precision'],
            'discriminator_recall': d['recall'],
            'replaced_share': d['replaced'] / jnp.maximum(d['tokens'], 1.0),
        }
        return terms['loss'], (metrics, extra)

    def represent(self, params, extra, batch):
        """Sentence embeddings of the discriminator: each pooling of eval.poolings over its last hidden states."""
        tokens, mask = batch['tokens'], batch['mask']
        _, hidden = self.electra.apply({'params': params}, tokens, mask, method='discriminate')
        return {pooling: bert.pool(hidden, mask, pooling) for pooling in self.config.eval.poolings}

    # --- evaluation -------------------------------------------------------------------------------------------
    def held_out(self, params: Any) -> dict[str, float]:
        """The reference's pretraining metrics on the held-out sentences (one a row, eval.max_len tokens, EVAL_ROWS a
        pass, a fixed draw), each a mean over all the tokens it concerns across the passes."""
        max_len = self.config.eval.max_len
        terms = jax.jit(lambda p, t, m, r: self.electra_terms(p, t, m, r, train=False))
        sentences = self.held_out_sentences
        # (name, value, its count): the generator's over its predicted tokens, the discriminator's over real ones.
        sums: dict[str, np.ndarray] = {}
        for i, lo in enumerate(range(0, len(sentences), language_model.EVAL_ROWS)):
            chunk = sentences[lo : lo + language_model.EVAL_ROWS]
            tokens, mask = self.tokenizer(chunk + [''] * (language_model.EVAL_ROWS - len(chunk)), max_len)
            mask[len(chunk) :] = 0  # the filler rows predict nothing
            got = jax.device_get(terms(params, tokens, mask, jax.random.key(i)))
            g, d = got['generator'], got['discriminator']
            for name, value, count in (
                ('generator_loss', g['loss'], g['tokens']),
                ('generator_accuracy', g['accuracy'], g['tokens']),
                ('sampled_accuracy', got['sampled_accuracy'], g['tokens']),
                ('discriminator_loss', d['loss'], d['tokens']),
                ('discriminator_accuracy', d['accuracy'], d['tokens']),
                ('discriminator_precision', d['precision'], d['predicted']),
                ('discriminator_recall', d['recall'], d['replaced']),
            ):
                sums[name] = sums.get(name, np.zeros(2)) + np.array([value * count, count])
        return {f'held_out/{name}': float(s[0] / max(s[1], 1.0)) for name, s in sums.items()}

    def sentence_log_likelihoods(self, params: Any, sentences: list[str]) -> np.ndarray:
        """Each sentence's log-probability, under the discriminator, that none of its real non-special tokens was
        replaced: the sum of log sigmoid(-logit) (eval.max_len tokens, EVAL_ROWS a pass)."""
        special = jnp.asarray(self.tokenizer.special_ids)

        @jax.jit
        def scores(params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
            logits, _ = self.electra.apply({'params': params}, tokens, mask, method='discriminate')
            real = mask.astype(bool) & ~jnp.isin(tokens, special)
            return (jax.nn.log_sigmoid(-logits) * real).sum(axis=1)

        return self.score_in_passes(params, sentences, scores)

    def flops_per_example(self) -> float:
        """Both encoders' dense layers and attention scores, the embedding projections, the generator's head at the
        predicted positions (transform and vocabulary) and the discriminator's head at every token; forward and
        backward."""
        n, p = self.config.input.max_len, self.config.masking.max_predictions
        e, vocab = self.electra.embeddings.width, self.tokenizer.vocab_size

        def encoder(m: bert.BertEncoder) -> float:
            per_layer = 2 * n * (4 * m.width * m.width + 2 * m.width * m.mlp) + 4 * n * n * m.width
            return m.depth * per_layer + (2 * n * e * m.width if e != m.width else 0)

        g, d = self.electra.generator, self.electra.discriminator
        heads = 2 * p * (g.width * e + e * vocab) + 2 * n * (d.width * d.width + d.width)
        return 3.0 * (encoder(g) + encoder(d) + heads)
