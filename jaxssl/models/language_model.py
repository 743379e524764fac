"""Language models on jaxssl.models.bert's encoder: BERT's masked-LM head and GPT-1's next-token head, both decoding
with the word-embedding matrix (tied weights), laid out so transformers' BertForMaskedLM and OpenAIGPTLMHeadModel
weights load by name (jaxssl.models.language_model_weights).

- 'bert' head (BertLMPredictionHead): Dense(width) -> exact GELU -> LayerNorm -> hidden @ E^T + a per-token bias.
- 'gpt' head (OpenAIGPTLMHeadModel.lm_head): hidden @ E^T, nothing else.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import bert

HEADS = ('bert', 'gpt')


class LanguageModel(nn.Module):
    """(tokens, mask (B, L)[, positions (B, P)]) -> (logits (B, P, vocab) float32 at `positions`, or (B, L, vocab) at
    every position when None; the encoder's last hidden states (B, L, width))."""

    encoder: bert.BertEncoder
    head: str = 'bert'
    init_std: float = 0.02

    @nn.compact
    def __call__(
        self, tokens: jax.Array, mask: jax.Array, positions: jax.Array | None = None, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        if self.head not in HEADS:
            raise ValueError(f"unknown language-model head '{self.head}'; valid: {', '.join(HEADS)}")
        hidden, _ = self.encoder(tokens, mask, deterministic)
        # Decoding only the predicted positions keeps the (B, P, vocab) logits small for the masked LM.
        h = hidden if positions is None else jnp.take_along_axis(hidden, positions[..., None], axis=1)
        embedding = self.encoder.variables['params']['word_embeddings']['embedding']
        if self.head == 'bert':
            e = self.encoder
            h = nn.Dense(e.width, dtype=e.dtype, kernel_init=nn.initializers.normal(self.init_std), name='transform')(h)
            h = nn.LayerNorm(e.eps, dtype=e.dtype, name='transform_norm')(nn.gelu(h, approximate=False))
        logits = jnp.einsum('bpd,vd->bpv', h.astype(jnp.float32), embedding.astype(jnp.float32))
        if self.head == 'bert':
            logits = logits + self.param('bias', nn.initializers.zeros, (embedding.shape[0],))
        chex.assert_shape(logits, (*h.shape[:2], embedding.shape[0]))
        return logits, hidden


def make(variant: str, vocab_size: int, head: str, causal: bool, **kwargs: Any) -> LanguageModel:
    """A language model of a bert.VARIANTS size with the 'bert' (BERT: embedding LayerNorm, token types, eps 1e-12)
    or 'gpt' (GPT-1: neither, eps 1e-5, tanh GELU) layout; `causal` for next-token prediction. Dense kernels
    N(0, 0.02)."""
    gpt = head == 'gpt'
    layout = dict(
        embedding_norm=not gpt, type_vocab_size=0 if gpt else 2, eps=1e-5 if gpt else 1e-12, approximate_gelu=gpt
    )
    encoder = bert.make_encoder(variant, vocab_size, causal=causal, init_std=0.02, **layout, **kwargs)
    return LanguageModel(encoder, head)
