"""Mirror-BERT (Liu, Vulić, Korhonen & Collier, "Fast, Effective, and Self-Supervised: Transforming Masked Language
Models into Universal Lexical and Sentence Encoders", EMNLP 2021; reference cambridgeltl/mirror-bert @ 8b6b9de):
identity fine-tuning of a pretrained BERT into a sentence encoder. Each sentence is its own positive: two views of it
(the sentence, and a copy with a random character span replaced by [MASK]) go through the encoder with independent
dropout, are pooled, and InfoNCE (NT-Xent, cosine, temperature 0.04) over the batch pulls the two together and pushes
every other view of the batch away. No projection head.

Batch layout: 'tokens' and 'mask' (2B, L) int32, the two views of each sentence adjacent (rows 2i: the sentence, 2i +
1: its span-masked copy; jaxssl.data.text makes them in the Grain pipeline), padded to L = input.max_len. The loss
all-gathers the pooled views over the mesh's batch axes (jaxssl.losses.contrastive.global_nt_xent), so every anchor has
the 2N - 2 negatives of the global batch, as the reference's NTXentLoss on one (DataParallel-gathered) batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import sharding
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import text
from jaxssl.evaluate import sentence
from jaxssl.losses import contrastive
from jaxssl.methods import base
from jaxssl.methods.simclr import split_views
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import bert, bert_weights


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, views or loss cannot use (files: when the method is built)."""
    m = config.model
    if not m.pretrained:
        check_choice(config, 'model.variant', bert.VARIANTS)
    check_choice(config, 'model.dtype', DTYPES)
    check_choice(config, 'model.pooling', bert.POOLINGS)
    check_range(config, 'model.dropout', 0.0, 1.0)
    check_range(config, 'model.attention_dropout', 0.0, 1.0)
    if not config.loss.temperature > 0:
        raise ConfigError(f"bad value {config.loss.temperature} for 'loss.temperature': must be > 0")
    if config.input.num_sample != 2:
        raise ConfigError(f"bad value {config.input.num_sample} for 'input.num_sample': Mirror-BERT takes 2 views")
    for key, low in (('input.max_len', 3), ('input.global_batch', 1), ('eval.max_len', 3)):
        group, name = key.split('.')
        if not isinstance(config[group][name], int) or config[group][name] < low:
            raise ConfigError(f"bad value {config[group][name]!r} for '{key}': must be an integer >= {low}")
    if config.input.span < 0:
        raise ConfigError(f"bad value {config.input.span} for 'input.span': must be >= 0 (0 disables masking)")
    for pooling in config.eval.poolings:
        if pooling not in bert.POOLINGS:
            raise ConfigError(f"bad value '{pooling}' in 'eval.poolings'; valid: {', '.join(bert.POOLINGS)}")


class Method(base.Method):
    """Mirror-BERT identity fine-tuning for the one trainer."""

    input_key = 'tokens'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        kwargs = dict(dropout=m.dropout, attention_dropout=m.attention_dropout, dtype=DTYPES[m.dtype])
        try:
            self.tokenizer = bert_weights.Tokenizer(config.input.tokenizer)
            if m.pretrained:
                self.model, self._pretrained = bert_weights.make_pretrained_encoder(m.pretrained, **kwargs)
            else:
                self.model, self._pretrained = bert.make_encoder(m.variant, self.tokenizer.vocab_size, **kwargs), None
        except FileNotFoundError as e:
            raise ConfigError(f"'model.pretrained' / 'input.tokenizer': {e}") from None
        if config.input.max_len > self.model.max_positions or config.eval.max_len > self.model.max_positions:
            limit = self.model.max_positions
            raise ConfigError(f"'input.max_len' / 'eval.max_len' exceed the model's {limit} positions")

    # --- data -------------------------------------------------------------------------------------------------
    @functools.cached_property
    def sentences(self) -> list[str]:
        try:
            return text.load_corpus(self.config.input.corpus)
        except FileNotFoundError as e:
            raise ConfigError(f"'input.corpus': {e}") from None

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        c = self.config.input
        args = (c.global_batch, c.max_len, c.span, c.min_chars, seed, process_index, process_count)
        dataset = text.make_pretrain_dataset(self.sentences, self.tokenizer, *args)
        return dataset, len(self.sentences)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (2 * batch_size, self.config.input.max_len)
        return {'tokens': np.zeros(shape, np.int32), 'mask': np.ones(shape, np.int32)}

    def tokens_per_example(self) -> int:
        return self.config.input.max_len

    # --- model ------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        if self._pretrained is not None:
            # The released weights are the starting point (Mirror-BERT fine-tunes, it does not pretrain from scratch).
            return jax.tree.map(jnp.asarray, self._pretrained), {}
        return self.model.init(rng, batch['tokens'], batch['mask'])['params'], {}

    def embed(self, params: Any, tokens: jax.Array, mask: jax.Array, pooling: str, rng: jax.Array | None) -> jax.Array:
        """Pooled sentence embeddings (N, D); dropout on when `rng` is given."""
        rngs = {'dropout': rng} if rng is not None else {}
        hidden, _ = self.model.apply({'params': params}, tokens, mask, rng is None, rngs=rngs)
        return bert.pool(hidden, mask, pooling)

    def loss(self, params, extra, batch, rng, step):
        tokens, mask = batch['tokens'], batch['mask']
        chex.assert_rank(tokens, 2)
        # One forward pass over both views: each row draws its own dropout mask, as the reference's two passes do.
        z1, z2 = split_views(self.embed(params, tokens, mask, self.config.model.pooling, base.stream(rng, 'dropout')))
        devices = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
        if z1.shape[0] % devices:
            raise ConfigError(
                f"'input.global_batch': {z1.shape[0]} sentences per (micro-)batch do not split over the {devices} "
                'devices of the batch axes; Mirror-BERT needs both views of a sentence on one device'
            )
        loss, metrics = contrastive.global_nt_xent(z1, z2, self.config.loss.temperature, self.mesh, sharding.BATCH_AXES)
        return loss, ({'loss': loss, **metrics}, extra)

    def represent(self, params, extra, batch):
        """Sentence embeddings of one view: each pooling of eval.poolings."""
        tokens, mask = batch['tokens'], batch['mask']
        hidden, _ = self.model.apply({'params': params}, tokens, mask)
        return {pooling: bert.pool(hidden, mask, pooling) for pooling in self.config.eval.poolings}

    # --- evaluation -------------------------------------------------------------------------------------------
    def embedder(self, params: Any) -> dict[str, sentence.Embed]:
        """pooling -> a function of strings to (N, D) numpy embeddings (eval.max_len tokens, eval.batch_size a pass)."""
        e = self.config.eval
        represent = jax.jit(lambda p, t, m: self.represent(p, {}, {'tokens': t, 'mask': m}))

        def embed_all(texts: list[str]) -> dict[str, np.ndarray]:
            parts = []
            for lo in range(0, len(texts), e.batch_size):
                chunk = texts[lo : lo + e.batch_size]
                tokens, mask = self.tokenizer(chunk + [''] * (e.batch_size - len(chunk)), e.max_len)
                out = jax.device_get(represent(params, tokens, mask))
                parts.append({k: v[: len(chunk)] for k, v in out.items()})
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

        cache: dict[tuple[str, ...], dict[str, np.ndarray]] = {}

        def one(pooling: str) -> sentence.Embed:
            def embed(texts: list[str]) -> np.ndarray:
                key = tuple(texts)
                if key not in cache:  # one encoder pass serves every pooling
                    cache[key] = embed_all(texts)
                return cache[key][pooling]

            return embed

        return {pooling: one(pooling) for pooling in e.poolings}

    def evaluate(self, params: Any, extra: Any, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """Lee similarity Spearman x 100 and noisy-duplicate retrieval top-1 (%), per pooling."""
        results = {}
        for pooling, embed in self.embedder(params).items():
            results[f'lee_spearman/{pooling}'] = sentence.lee_spearman(embed)
            results[f'duplicate_top1/{pooling}'] = sentence.duplicate_retrieval(embed, self.config.eval.max_sentences)
        return results

    def flops_per_example(self) -> float:
        """Per view: 2 x params x tokens for the dense layers plus attention scores, forward and backward."""
        m, n = self.model, self.config.input.max_len
        per_layer = 2 * n * (4 * m.width * m.width + 2 * m.width * m.mlp) + 4 * n * n * m.width
        return 3.0 * m.depth * per_layer
