"""BART (Lewis et al., ACL 2020): a post-norm Transformer encoder-decoder, laid out so transformers'
BartForConditionalGeneration weights load by name (jaxssl.models.bart_weights), with E2S2's noise-detection head on
the encoder.

- embeddings: one token table shared by the encoder, the decoder and the output projection (tied); each side adds its
  own learned positions, whose table keeps BART's offset of 2 rows (position p reads row p + 2: fairseq's
  LearnedPositionalEmbedding reserved them for padding), then its own LayerNorm and dropout. No sqrt(width) scaling
  (bart-base / bart-large: scale_embedding false).
- encoder blocks: jaxssl.models.bert's post-norm Layer (eps 1e-5, exact GELU, dropout after the activation too).
- decoder blocks: causal self-attention, cross-attention to the encoder's last states (its padding masked), MLP;
  each sub-block x = LN(x + Dropout(sub(x))).
- logits: the decoder's last states @ the token table^T (transformers' final_logits_bias is a zero buffer, never
  trained: left out).
- detection head (E2S2): Dense(width, classes) on the encoder's last states.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import bert

# (width, encoder depth, decoder depth, heads, mlp): facebook/bart-base and bart-large; 'tiny' for CPU runs.
VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    'base': (768, 6, 6, 12, 3072),
    'large': (1024, 12, 12, 16, 4096),
    'tiny': (64, 2, 2, 4, 256),
}
POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding's


class DecoderLayer(nn.Module):
    """One post-norm BART decoder block: causal self-attention, cross-attention to the encoder, MLP."""

    width: int
    heads: int
    mlp: int
    dropout: float
    attention_dropout: float
    activation_dropout: float
    eps: float = 1e-5
    dtype: Any = jnp.float32
    init_std: float | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, memory: jax.Array, memory_mask: jax.Array, deterministic: bool
    ) -> jax.Array:
        drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=deterministic)
        norm = lambda name: nn.LayerNorm(self.eps, dtype=self.dtype, name=name)
        attention = lambda causal, name: bert.SelfAttention(
            self.width, self.heads, self.attention_dropout, self.dtype, causal, self.init_std, name=name
        )
        x = norm('self_attention_norm')(x + drop(attention(True, 'self_attention')(x, mask, deterministic)))
        crossed = attention(False, 'cross_attention')(x, memory_mask, deterministic, context=memory)
        x = norm('cross_attention_norm')(x + drop(crossed))
        dense = lambda size, name: nn.Dense(
            size, dtype=self.dtype, kernel_init=bert.dense_init(self.init_std), name=name
        )
        h = nn.gelu(dense(self.mlp, 'intermediate')(x), approximate=False)
        h = nn.Dropout(self.activation_dropout)(h, deterministic=deterministic)
        return norm('output_norm')(x + drop(dense(self.width, 'output')(h)))


class Bart(nn.Module):
    """`encode(tokens, mask)` -> the encoder's last states (B, L, width); `decode(decoder_tokens, memory,
    memory_mask)` -> logits (B, T, vocab) float32; `detect(states)` -> the detection logits (B, L, classes) float32;
    `__call__` all three (decoder_tokens: the target shifted right, jaxssl.methods.e2s2.shift_right)."""

    vocab_size: int
    width: int = 64
    encoder_depth: int = 2
    decoder_depth: int = 2
    heads: int = 4
    mlp: int = 256
    max_positions: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0  # bart-base / bart-large
    activation_dropout: float = 0.0
    detection_classes: int = 3  # E2S2: original / shuffled / randomly replaced
    eps: float = 1e-5
    dtype: Any = jnp.float32
    init_std: float | None = 0.02  # BART's N(0, 0.02); None: lecun (the released-weights tests)

    def setup(self) -> None:
        init = nn.initializers.normal(0.02)
        self.shared = nn.Embed(self.vocab_size, self.width, embedding_init=init)
        table = self.max_positions + POSITION_OFFSET
        self.encoder_positions = nn.Embed(table, self.width, embedding_init=init)
        self.decoder_positions = nn.Embed(table, self.width, embedding_init=init)
        self.encoder_embedding_norm = nn.LayerNorm(self.eps, dtype=self.dtype)
        self.decoder_embedding_norm = nn.LayerNorm(self.eps, dtype=self.dtype)
        self.encoder_layers = [
            bert.Layer(
                self.width,
                self.heads,
                self.mlp,
                self.dropout,
                self.attention_dropout,
                self.eps,
                self.dtype,
                activation_dropout=self.activation_dropout,
                init_std=self.init_std,
                name=f'encoder_layer_{i}',
            )
            for i in range(self.encoder_depth)
        ]
        self.decoder_layers = [
            DecoderLayer(
                self.width,
                self.heads,
                self.mlp,
                self.dropout,
                self.attention_dropout,
                self.activation_dropout,
                self.eps,
                self.dtype,
                self.init_std,
                name=f'decoder_layer_{i}',
            )
            for i in range(self.decoder_depth)
        ]
        self.detection = nn.Dense(self.detection_classes, dtype=self.dtype, kernel_init=bert.dense_init(self.init_std))
        self.embedding_dropout = nn.Dropout(self.dropout)

    def embed(self, tokens: jax.Array, positions: nn.Embed, norm: nn.LayerNorm, deterministic: bool) -> jax.Array:
        if tokens.shape[1] > self.max_positions:
            raise ValueError(f'{tokens.shape[1]} tokens exceed the {self.max_positions} positions of the model')
        x = self.shared(tokens) + positions(jnp.arange(tokens.shape[1]) + POSITION_OFFSET)
        return self.embedding_dropout(norm(x.astype(self.dtype)), deterministic=deterministic)

    def encode(self, tokens: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        chex.assert_rank([tokens, mask], 2)
        chex.assert_equal_shape([tokens, mask])
        x = self.embed(tokens, self.encoder_positions, self.encoder_embedding_norm, deterministic)
        for layer in self.encoder_layers:
            x = layer(x, mask.astype(bool), deterministic)
        return x

    def decode(
        self, decoder_tokens: jax.Array, memory: jax.Array, memory_mask: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """Every decoder position attends to itself and the ones before it (padded target positions are not
        masked: they never reach a real position's state, and the loss weights them 0)."""
        chex.assert_rank(decoder_tokens, 2)
        chex.assert_rank(memory, 3)
        x = self.embed(decoder_tokens, self.decoder_positions, self.decoder_embedding_norm, deterministic)
        everything = jnp.ones(decoder_tokens.shape, bool)
        for layer in self.decoder_layers:
            x = layer(x, everything, memory, memory_mask.astype(bool), deterministic)
        table = self.shared.embedding
        logits = jnp.einsum('btd,vd->btv', x.astype(jnp.float32), table.astype(jnp.float32))
        chex.assert_shape(logits, (*decoder_tokens.shape, self.vocab_size))
        return logits

    def detect(self, states: jax.Array, deterministic: bool = True) -> jax.Array:
        """Dropout, then the head (E2S2's encoder classifier)."""
        states = self.embedding_dropout(states, deterministic=deterministic)
        return self.detection(states).astype(jnp.float32)

    def __call__(
        self, tokens: jax.Array, mask: jax.Array, decoder_tokens: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(decoder logits (B, T, vocab), encoder states (B, L, width), detection logits (B, L, classes))."""
        memory = self.encode(tokens, mask, deterministic)
        return self.decode(decoder_tokens, memory, mask, deterministic), memory, self.detect(memory, deterministic)


def make(variant: str, vocab_size: int, **kwargs: Any) -> Bart:
    if variant not in VARIANTS:
        raise ValueError(f"unknown BART variant '{variant}'; valid: {', '.join(VARIANTS)}")
    width, encoder_depth, decoder_depth, heads, mlp = VARIANTS[variant]
    return Bart(vocab_size, width, encoder_depth, decoder_depth, heads, mlp, **kwargs)
