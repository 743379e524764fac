"""ELECTRA (Clark et al., ICLR 2020): a small masked-LM generator and a discriminator that tells which tokens the
generator replaced, two BERT encoders (jaxssl.models.bert) sharing one embedding module, laid out so transformers'
ElectraForMaskedLM (generator) and ElectraForPreTraining (discriminator) weights load by name
(jaxssl.models.bert_weights.electra_to_flax).

- embeddings: word + position + token-type tables of `embedding_size` and their LayerNorm, shared by both models
  (google-research/electra builds them in one 'electra/embeddings' scope reused by both); each model projects them
  to its own width with its own 'embeddings_project' when the sizes differ.
- generator head (ElectraGeneratorPredictions + generator_lm_head): Dense(embedding_size) -> exact GELU ->
  LayerNorm -> hidden @ E^T + a per-token bias (the decoder is the shared word-embedding table).
- discriminator head (ElectraDiscriminatorPredictions): Dense(width) -> GELU -> Dense(1), one logit a token
  ("replaced"), no LayerNorm.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import bert

# Discriminator sizes (width, depth, heads, mlp, embedding_size): google-research/electra's small / base / large
# (heads = width / 64, mlp = 4 x width; ELECTRA-Small's embeddings are 128 wide); 'tiny' is bert's tiny, for CPU runs.
VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    'small': (256, 12, 4, 1024, 128),
    'base': (768, 12, 12, 3072, 768),
    'large': (1024, 24, 16, 4096, 1024),
    'tiny': (64, 2, 4, 256, 64),
}


def generator_shape(variant: str, size: float) -> dict[str, int]:
    """The generator of a discriminator variant at `size` x its width: the same depth, heads scaled alike (the
    reference's width / 64 at the paper's sizes: small 0.25 -> 64 wide, 1 head; base 1/3 and large 0.25 -> 256 wide,
    4 heads; the released ELECTRA-Small checkpoint was trained with a full-size generator, 1.0), mlp 4 x width."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ELECTRA variant '{variant}'; valid: {', '.join(VARIANTS)}")
    width, depth, heads, _, _ = VARIANTS[variant]
    g_width, g_heads = round(width * size), max(1, round(heads * size))
    if g_width < 1 or g_width % g_heads:
        raise ValueError(f'a generator {size} x {width} = {g_width} wide does not split into {g_heads} heads')
    return dict(width=g_width, depth=depth, heads=g_heads, mlp=4 * g_width)


class Electra(nn.Module):
    """`generate(tokens, mask, positions)` -> the generator's logits (B, P, vocab) float32 at `positions`;
    `discriminate(tokens, mask)` -> (the discriminator's "replaced" logits (B, L) float32, its last hidden states
    (B, L, width)). `embeddings` is a depth-0 encoder (the shared tables and their LayerNorm, no dropout: each model
    drops its own)."""

    embeddings: bert.BertEncoder
    generator: bert.BertEncoder
    discriminator: bert.BertEncoder
    init_std: float = 0.02

    def setup(self) -> None:
        g, d, e = self.generator, self.discriminator, self.embeddings
        init = nn.initializers.normal(self.init_std)
        self.generator_dense = nn.Dense(e.width, dtype=g.dtype, kernel_init=init)
        self.generator_norm = nn.LayerNorm(g.eps, dtype=g.dtype)
        self.output_bias = self.param('output_bias', nn.initializers.zeros, (e.vocab_size,))
        self.discriminator_dense = nn.Dense(d.width, dtype=d.dtype, kernel_init=init)
        self.discriminator_prediction = nn.Dense(1, dtype=d.dtype, kernel_init=init)

    def embed(self, tokens: jax.Array) -> jax.Array:
        embedded, _ = self.embeddings(tokens, jnp.ones_like(tokens), True)
        return embedded

    def generate(
        self, tokens: jax.Array, mask: jax.Array, positions: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        chex.assert_rank(positions, 2)
        hidden, _ = self.generator(tokens, mask, deterministic, self.embed(tokens))
        h = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        h = self.generator_norm(nn.gelu(self.generator_dense(h), approximate=False))
        table = self.embeddings.variables['params']['word_embeddings']['embedding']
        logits = jnp.einsum('bpd,vd->bpv', h.astype(jnp.float32), table.astype(jnp.float32)) + self.output_bias
        chex.assert_shape(logits, (*positions.shape, self.embeddings.vocab_size))
        return logits

    def discriminate(self, tokens: jax.Array, mask: jax.Array, deterministic: bool = True) -> tuple[jax.Array, Any]:
        hidden, _ = self.discriminator(tokens, mask, deterministic, self.embed(tokens))
        h = nn.gelu(self.discriminator_dense(hidden), approximate=False)
        logits = self.discriminator_prediction(h)[..., 0].astype(jnp.float32)
        chex.assert_shape(logits, tokens.shape)
        return logits, hidden

    def __call__(self, tokens: jax.Array, mask: jax.Array, positions: jax.Array, deterministic: bool = True) -> Any:
        """Both models on the same input (for init): (generator logits, discriminator logits)."""
        return self.generate(tokens, mask, positions, deterministic), self.discriminate(tokens, mask, deterministic)[0]


def make(
    variant: str, vocab_size: int, generator_size: float, max_positions: int = 512, **kwargs: Any
) -> tuple[Electra, bert.BertEncoder]:
    """(ELECTRA of a VARIANTS discriminator and a `generator_size` generator (BERT's layout: embedding LayerNorm,
    token types, eps 1e-12, exact GELU, N(0, 0.02) dense kernels), the discriminator as a standalone encoder that
    `discriminator_params` fit: what the pretraining leaves for downstream use)."""
    width, depth, heads, mlp, embedding_size = VARIANTS[variant]
    common = dict(vocab_size=vocab_size, max_positions=max_positions, init_std=0.02, embedding_size=embedding_size)
    embeddings = bert.BertEncoder(width=embedding_size, depth=0, heads=1, mlp=0, **common, **kwargs)
    generator = bert.BertEncoder(**generator_shape(variant, generator_size), **common, **kwargs)
    discriminator = bert.BertEncoder(width=width, depth=depth, heads=heads, mlp=mlp, **common, **kwargs)
    return Electra(embeddings, generator, discriminator), discriminator


def discriminator_params(params: dict[str, Any]) -> dict[str, Any]:
    """Electra params -> the standalone discriminator encoder's (the shared embedding tables and LayerNorm, then the
    discriminator's projection and layers)."""
    return {**params['embeddings'], **params['discriminator']}
