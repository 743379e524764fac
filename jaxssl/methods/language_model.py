"""Language-model pretraining of a Transformer on sentences: BERT's masked language model (MLM) and GPT's causal,
next-token language model (CLM), the two objectives the survey of Yang et al. ("Can bidirectional encoder become the
ultimate winner for downstream applications of foundation models?", arXiv 2411.18021) compares: a bidirectional
encoder that fills in masked tokens against a unidirectional decoder that predicts each token from the ones before.

- mlm (Devlin et al. 2019; google-research/bert create_pretraining_data.py): per sentence, round(0.15 x its tokens,
  [CLS] and [SEP] counted) positions (at least 1, at most `masking.max_predictions`), drawn uniformly among the
  real tokens other than [CLS] / [SEP]; each becomes [MASK] with p 0.8, a uniformly random vocabulary id with p
  0.1, itself with p 0.1. Cross-entropy at the drawn positions only (the kept and replaced ones included), a mean
  over them (run_pretraining.py's sum(weights x loss) / sum(weights)). Drawn on the device each step, so every epoch
  masks anew (RoBERTa's dynamic masking; BERT duplicated its data 10 times with 10 static masks).
- clm (Radford et al. 2018, GPT-1): causal attention; position t predicts token t + 1, a mean over the real next
  tokens ([SEP], the end marker, included).

Architectures (`model.head`): 'bert' = BERT's post-norm stack with the embedding LayerNorm and the transform + bias
masked-LM head; 'gpt' = GPT-1's (no embedding LayerNorm, eps 1e-5, the tied decoder alone). Both decode with the word
embeddings (tied), are N(0, 0.02)-initialised and equal transformers' BertForMaskedLM / OpenAIGPTLMHeadModel with
converted weights (tests/test_language_model.py). Attention is causal exactly when the objective is clm.

Evaluation: the frozen encoder's sentence embeddings (mirror_bert's Lee similarity Spearman and noisy-duplicate
retrieval, per pooling: 'mean', 'last' (GPT's classification token), 'cls'); the language model itself on held-out
text (the Lee similarity documents' sentences, disjoint from the training corpus): loss, perplexity and accuracy of
the predicted tokens under its own objective, with a fixed mask draw; and word-order minimal pairs, scored the same
way for both objectives: how often a held-out sentence is likelier than its copy with two words exchanged (the causal
LM's log-likelihood, the masked LM's pseudo-log-likelihood).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import text
from jaxssl.evaluate import sentence
from jaxssl.methods import base, mirror_bert
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import bert, bert_weights, language_model

OBJECTIVES = ('mlm', 'clm')
# Sentences a pass in the evaluation: the pseudo-log-likelihood runs eval.max_len copies of each, and the causal
# LM's logits are (rows, eval.max_len, vocab) floats (250 MB at 128 tokens and BERT's 30,522 ids).
EVAL_ROWS = 16


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks or evaluation cannot use."""
    m, k = config.model, config.masking
    check_choice(config, 'model.objective', OBJECTIVES)
    check_choice(config, 'model.head', language_model.HEADS)
    check_choice(config, 'model.variant', bert.VARIANTS)
    check_choice(config, 'model.dtype', DTYPES)
    check_range(config, 'model.dropout', 0.0, 1.0)
    check_range(config, 'model.attention_dropout', 0.0, 1.0)
    check_range(config, 'masking.ratio', 0.0, 1.0)
    check_range(config, 'masking.mask_prob', 0.0, 1.0)
    check_range(config, 'masking.random_prob', 0.0, 1.0)
    if k.mask_prob + k.random_prob > 1.0:
        raise ConfigError(
            f"'masking.mask_prob' + 'masking.random_prob' = {k.mask_prob + k.random_prob} exceeds 1 (the rest keeps "
            'the token)'
        )
    check_rows_and_evaluation(config)
    if m.objective == 'mlm' and k.ratio <= 0:
        raise ConfigError("bad value 0 for 'masking.ratio': the masked LM needs tokens to predict")


def check_rows_and_evaluation(config: ml_collections.ConfigDict) -> None:
    """The row, batch, vocabulary, prediction-count (when the config has a `masking` section) and pooling keys the
    text pretraining methods share (this module's, ELECTRA's and E2S2's)."""
    integers = [('input.max_len', 3), ('input.global_batch', 1), ('eval.max_len', 3), ('input.vocab_min_count', 0)]
    if 'masking' in config:
        integers.append(('masking.max_predictions', 1))
    for key, low in integers:
        group, name = key.split('.')
        if not isinstance(config[group][name], int) or config[group][name] < low:
            raise ConfigError(f"bad value {config[group][name]!r} for '{key}': must be an integer >= {low}")
    if 'masking' in config and config.masking.max_predictions > config.input.max_len:
        raise ConfigError(
            f"bad value {config.masking.max_predictions} for 'masking.max_predictions': more than the "
            f"{config.input.max_len} tokens of 'input.max_len'"
        )
    for pooling in config.eval.poolings:
        if pooling not in bert.POOLINGS:
            raise ConfigError(f"bad value '{pooling}' in 'eval.poolings'; valid: {', '.join(bert.POOLINGS)}")


def draw_mlm_targets(
    rng: jax.Array,
    tokens: jax.Array,
    mask: jax.Array,
    special_ids: tuple[int, ...],
    mask_id: int,
    vocab_size: int,
    ratio: float,
    max_predictions: int,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> dict[str, jax.Array]:
    """BERT's masked-LM corruption of a batch (B, L): {'tokens' (B, L) corrupted input, 'positions' (B, P) int32,
    'labels' (B, P) the original ids there, 'weights' (B, P) float32 1 for the drawn positions, 0 for padding},
    P = max_predictions, or the row length L if shorter (an evaluation at fewer tokens than training). Each row draws
    k = min(max(1, round(ratio x its real tokens)), P, its candidates) positions uniformly among its real tokens that
    are not special ([PAD], [CLS], [SEP])."""
    chex.assert_rank([tokens, mask], 2)
    tokens = jnp.asarray(tokens)
    choose, action, replace = jax.random.split(rng, 3)
    b, length = tokens.shape
    max_predictions = min(max_predictions, length)  # no row has more candidates than tokens
    candidate = mask.astype(bool) & ~jnp.isin(tokens, jnp.asarray(special_ids))
    count = jnp.maximum(jnp.round(mask.sum(axis=1) * ratio), 1).astype(jnp.int32)
    count = jnp.minimum(jnp.minimum(count, max_predictions), candidate.sum(axis=1))
    # A uniform random subset of size k: the k candidates with the largest uniform scores.
    scores = jnp.where(candidate, jax.random.uniform(choose, (b, length)), -1.0)
    positions = jnp.argsort(-scores, axis=1)[:, :max_predictions].astype(jnp.int32)
    weights = (jnp.arange(max_predictions)[None] < count[:, None]).astype(jnp.float32)
    labels = jnp.take_along_axis(tokens, positions, axis=1)
    u = jax.random.uniform(action, labels.shape)
    random_ids = jax.random.randint(replace, labels.shape, 0, vocab_size, dtype=tokens.dtype)
    new = jnp.where(u < mask_prob, mask_id, jnp.where(u < mask_prob + random_prob, random_ids, labels))
    new = jnp.where(weights > 0, new, labels)  # the unused slots (distinct positions too) write back their token
    corrupted = tokens.at[jnp.arange(b)[:, None], positions].set(new)
    return {'tokens': corrupted, 'positions': positions, 'labels': labels, 'weights': weights}


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Weighted mean token cross-entropy and accuracy (0 without tokens), and the weight total (the number of
    predicted tokens)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    count = weights.sum()
    total = jnp.maximum(count, 1.0)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {'loss': (nll * weights).sum() / total, 'accuracy': (correct * weights).sum() / total, 'tokens': count}


class Method(mirror_bert.Method):
    """MLM / CLM pretraining for the one trainer. Mirror-BERT's corpus loading and sentence evaluation are inherited;
    its model set-up is not (base.Method's __init__ only)."""

    input_key = 'tokens'

    def __init__(self, config: ml_collections.ConfigDict):
        base.Method.__init__(self, config)
        m = config.model
        self.tokenizer = self.make_tokenizer()
        kwargs = dict(dropout=m.dropout, attention_dropout=m.attention_dropout, dtype=DTYPES[m.dtype])
        causal = m.objective == 'clm'
        self.lm = language_model.make(m.variant, self.tokenizer.vocab_size, m.head, causal, **kwargs)
        self.model = self.lm.encoder  # mirror_bert's evaluation encodes with self.model
        if max(config.input.max_len, config.eval.max_len) > self.model.max_positions:
            raise ConfigError(
                f"'input.max_len' / 'eval.max_len' exceed the model's {self.model.max_positions} positions"
            )

    def make_tokenizer(self) -> bert_weights.Tokenizer | text.CorpusVocabulary:
        """input.tokenizer's WordPiece vocabulary, restricted to the corpus's ids when input.vocab_min_count > 0."""
        c = self.config.input
        try:
            tokenizer = bert_weights.Tokenizer(c.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"'input.tokenizer': {e}") from None
        return text.CorpusVocabulary(tokenizer, self.sentences, c.vocab_min_count) if c.vocab_min_count else tokenizer

    # --- data -------------------------------------------------------------------------------------------------
    @functools.cached_property
    def packed_rows(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.config.input
        return text.pack_sentences(self.tokenizer, self.sentences, c.max_len, self.tokenizer.special_ids[1])

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        c = self.config.input
        if c.pack:
            tokens, mask = self.packed_rows
            return text.make_row_dataset(tokens, mask, c.global_batch, seed, process_index, process_count), len(tokens)
        args = (c.global_batch, c.max_len, seed, process_index, process_count)
        return text.make_sentence_dataset(self.sentences, self.tokenizer, *args), len(self.sentences)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.config.input.max_len)
        return {'tokens': np.zeros(shape, np.int32), 'mask': np.ones(shape, np.int32)}

    # --- model ------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        return self.lm.init(rng, batch['tokens'], batch['mask'])['params'], {}

    def lm_terms(self, params: Any, tokens: jax.Array, mask: jax.Array, rng: jax.Array, train: bool) -> dict:
        """The objective's loss, accuracy and predicted-token count on a batch; dropout only when `train`."""
        chex.assert_rank([tokens, mask], 2)
        mask_rng, dropout_rng = jax.random.split(rng)
        rngs = {'dropout': dropout_rng} if train else {}
        if self.config.model.objective == 'clm':
            logits, _ = self.lm.apply({'params': params}, tokens, mask, None, not train, rngs=rngs)
            weights = (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32)  # real tokens predicting real tokens
            return cross_entropy(logits[:, :-1], tokens[:, 1:], weights)
        k = self.config.masking
        draw = draw_mlm_targets(
            mask_rng, tokens, mask, self.tokenizer.special_ids, self.tokenizer.mask_id, self.tokenizer.vocab_size,
            k.ratio, k.max_predictions, k.mask_prob, k.random_prob,
        )  # fmt: skip
        logits, _ = self.lm.apply({'params': params}, draw['tokens'], mask, draw['positions'], not train, rngs=rngs)
        return cross_entropy(logits, draw['labels'], draw['weights'])

    def loss(self, params, extra, batch, rng, step):
        terms = self.lm_terms(params, batch['tokens'], batch['mask'], rng, train=True)
        return terms['loss'], ({**terms, 'perplexity': jnp.exp(terms['loss'])}, extra)

    def represent(self, params, extra, batch):
        """Sentence embeddings: each pooling of eval.poolings over the encoder's last hidden states."""
        tokens, mask = batch['tokens'], batch['mask']
        hidden, _ = self.model.apply({'params': params['encoder']}, tokens, mask)
        return {pooling: bert.pool(hidden, mask, pooling) for pooling in self.config.eval.poolings}

    # --- evaluation -------------------------------------------------------------------------------------------
    @functools.cached_property
    def held_out_sentences(self) -> list[str]:
        documents, _ = text.load_lee_similarity()
        return [s for d in documents for s in text.split_sentences(d)]

    def held_out(self, params: Any) -> dict[str, float]:
        """The objective on the held-out sentences (one a row, eval.max_len tokens, EVAL_ROWS a pass, a fixed mask
        draw): loss, its perplexity and accuracy, each a mean over all the predicted tokens."""
        max_len = self.config.eval.max_len
        terms = jax.jit(lambda p, t, m, r: self.lm_terms(p, t, m, r, train=False))
        sentences, sums = self.held_out_sentences, np.zeros(3)
        for i, lo in enumerate(range(0, len(sentences), EVAL_ROWS)):
            chunk = sentences[lo : lo + EVAL_ROWS]
            tokens, mask = self.tokenizer(chunk + [''] * (EVAL_ROWS - len(chunk)), max_len)
            mask[len(chunk) :] = 0  # the filler rows predict nothing
            got = jax.device_get(terms(params, tokens, mask, jax.random.key(i)))
            sums += np.array([got['loss'], got['accuracy'], 1.0]) * got['tokens']
        loss, accuracy = sums[0] / sums[2], sums[1] / sums[2]
        return {'held_out/loss': loss, 'held_out/perplexity': float(np.exp(loss)), 'held_out/accuracy': accuracy}

    def sentence_log_likelihoods(self, params: Any, sentences: list[str]) -> np.ndarray:
        """Each sentence's log-likelihood under the model (eval.max_len tokens): the causal LM's sum of log
        p(token | the tokens before); the masked LM's pseudo-log-likelihood (Salazar et al. 2020), the sum over its
        real non-special tokens of log p(token | the sentence with that one token [MASK]ed).

        Sentences go in passes of EVAL_ROWS sorted by length, each cut to the power of two (16 or more) that holds its
        longest: trailing padding changes no score (it is masked out of every attention), and the masked LM runs
        one copy per position, so a 128-token pass of 30-token sentences would be 4x the work."""
        clm = self.config.model.objective == 'clm'
        special, mask_id = jnp.asarray(self.tokenizer.special_ids), self.tokenizer.mask_id

        @jax.jit  # params an argument, not a constant folded into the program
        def scores(params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
            if clm:
                logits, _ = self.lm.apply({'params': params}, tokens, mask)
                logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
                picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
                return (picked * mask[:, :-1] * mask[:, 1:]).sum(axis=1)
            b, length = tokens.shape  # one copy of each sentence per position, that position masked
            eye = jnp.eye(length, dtype=bool)
            copies = jnp.where(eye[None], mask_id, tokens[:, None, :]).reshape(b * length, length)
            positions = jnp.tile(jnp.arange(length), b)[:, None]
            logits, _ = self.lm.apply({'params': params}, copies, jnp.repeat(mask, length, axis=0), positions)
            logp = jax.nn.log_softmax(logits[:, 0], axis=-1).reshape(b, length, -1)
            picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
            return (picked * (mask.astype(bool) & ~jnp.isin(tokens, special))).sum(axis=1)

        tokens, mask = self.tokenizer(list(sentences), self.config.eval.max_len)
        order = np.argsort(mask.sum(axis=1), kind='stable')
        out = np.zeros(len(sentences))
        for lo in range(0, len(sentences), EVAL_ROWS):
            rows = order[lo : lo + EVAL_ROWS]
            length = min(max(16, 1 << (int(mask[rows].sum(axis=1).max()) - 1).bit_length()), tokens.shape[1])
            pad = EVAL_ROWS - len(rows)  # filler rows of padding, so every pass has EVAL_ROWS rows
            t = np.pad(tokens[rows, :length], ((0, pad), (0, 0)), constant_values=self.tokenizer.pad_id)
            m = np.pad(mask[rows, :length], ((0, pad), (0, 0)))
            out[rows] = np.asarray(jax.device_get(scores(params, t, m)))[: len(rows)]
        return out

    def score_in_passes(self, params: Any, sentences: list[str], scores: Any) -> np.ndarray:
        """A per-sentence score of every sentence (eval.max_len tokens): the jitted `scores(params, tokens, mask)`
        over passes of EVAL_ROWS rows (the last padded with empty rows), in the sentences' order."""
        tokens, mask = self.tokenizer(list(sentences), self.config.eval.max_len)
        pad = -len(sentences) % EVAL_ROWS
        tokens = np.pad(tokens, ((0, pad), (0, 0)), constant_values=self.tokenizer.pad_id)
        mask = np.pad(mask, ((0, pad), (0, 0)))
        out = [
            jax.device_get(scores(params, tokens[i : i + EVAL_ROWS], mask[i : i + EVAL_ROWS]))
            for i in range(0, len(tokens), EVAL_ROWS)
        ]
        return np.concatenate(out)[: len(sentences)]

    def minimal_pairs(self, params: Any, seed: int = 0) -> float:
        """Share of held-out sentences (6+ words) the model finds likelier than their copy with two words
        exchanged (the same tokens in another order: BLiMP-style minimal pairs of word order); a tie (two words
        that map to the same ids, e.g. both [UNK]) counts a half. 0.5 is chance."""
        originals = sentence.retrieval_sentences(self.config.eval.max_sentences)
        rng = np.random.default_rng(seed)
        swapped = [sentence.swap_two_words(s, rng) for s in originals]
        scores = self.sentence_log_likelihoods(params, originals + swapped)
        real, swapped = scores[: len(originals)], scores[len(originals) :]
        return float(np.mean((real > swapped) + 0.5 * (real == swapped)))

    def evaluate(self, params: Any, extra: Any, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """Mirror-BERT's sentence measures per pooling, the held-out objective and the word-order minimal pairs."""
        results = {**super().evaluate(params, extra, mesh), **self.held_out(params)}
        return {**results, 'held_out/word_order_pairs': self.minimal_pairs(params)}

    def flops_per_example(self) -> float:
        """Mirror-BERT's encoder count (dense layers and attention scores) plus the head's decoding of the predicted
        positions against the vocabulary (and the masked LM's transform), forward and backward."""
        m, c = self.model, self.config
        mlm = c.model.objective == 'mlm'
        decoded = c.masking.max_predictions if mlm else c.input.max_len
        head = 2 * decoded * m.width * (self.tokenizer.vocab_size + (m.width if mlm else 0))
        return super().flops_per_example() + 3.0 * head
