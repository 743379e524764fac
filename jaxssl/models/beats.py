"""BEATs (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", ICML 2023): a Transformer over 16 x 16
log-mel patches, pretrained to predict an acoustic tokenizer's discrete labels of the masked patches.

The backbone is laid out as the reference's `beats/BEATs.py` and `beats/backbone.py` (microsoft/unilm), so that
released weights convert by name:
- patches: Conv2d(1 -> embed_dim, 16 x 16, stride 16, no bias) over the (frames, mel bins) spectrogram, tokens in
  time-major order (index = time patch * frequency patches + frequency patch); LayerNorm(embed_dim); a Linear to the
  Transformer width (`post_extract_proj`, torch's default init).
- encoder: padded tokens zeroed, plus fairseq's weight-normalised grouped positional convolution with GELU
  (wav2vec 2.0's, shared from jaxssl.models.wav2vec2), LayerNorm, dropout; post-norm blocks. With `deep_norm` each
  residual is scaled by alpha = (2 depth)^(1/4) before its LayerNorm, and the v, out, fc1 and fc2 kernels start
  Xavier-normal with gain (8 depth)^(-1/4) (q and k with gain 1); otherwise every Linear starts N(0, 0.02).
  Biases start at zero.
- attention: separate q / k / v projections with biases; softmax(q k^T / sqrt(d) + bias). The bias is a T5
  bidirectional bucketed relative position table (buckets of key - query over the token sequence, one embedding
  per bucket and head) computed once and shared by every block; with `gated_relative_position` each block scales it
  per head and query by gate = a (b grep_a - 1) + 2, where (a, b) = sigmoid of Linear(head_dim -> 8)(q), its 8
  outputs summed in two groups of 4 (the reference's `gru_rel_pos`). The reference's q / 32 ... (qk - max) * 32
  rescaling of the logits is the same softmax, so it is not repeated.
- `layer_grad_decay`: the gradient entering each block from above is multiplied by this ratio (fairseq's
  GradMultiply before every layer; the released models use 0.6); the forward pass is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models import norm_ema_quantizer, vit
from jaxssl.models.wav2vec2 import PositionalConv, scale_gradient

PATCH = (16, 16)  # (frames, mel bins)
# Named sizes: 'base' is every released BEATs model (BEATs_iter3*.pt); 'micro' is for tests and `runlocal` on a CPU
# (not a reference size).
VARIANTS: dict[str, dict[str, int]] = {
    'micro': dict(embed_dim=32, width=64, depth=2, heads=4, mlp=256, pos_conv_kernel=16, pos_conv_groups=4),
    'base': dict(embed_dim=512, width=768, depth=12, heads=12, mlp=3072, pos_conv_kernel=128, pos_conv_groups=16),
}
bert_init = nn.initializers.normal(0.02)  # fairseq's init_bert_params


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(query_len, key_len) int32 buckets of key - query, T5's bidirectional scheme as the reference's
    `_relative_positions_bucket`: half the buckets for positive offsets; within each half, offsets below a quarter
    of the buckets exactly, larger ones logarithmically up to `max_distance` (float32, truncated, as torch), the
    last bucket beyond it."""
    relative = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    scaled = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(np.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class Attention(nn.Module):
    """The reference's MultiheadAttention (self-attention, no incremental state), with its parameter names."""

    width: int
    heads: int
    dropout: float
    gated: bool
    kernel_inits: tuple[Any, Any, Any, Any]  # q, k, v, out
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array, key_valid: jax.Array, deterministic: bool) -> jax.Array:
        b, n, _ = x.shape
        head_dim = self.width // self.heads
        dense = lambda name, init: nn.Dense(self.width, dtype=self.dtype, kernel_init=init, name=name)
        q, k, v = (dense(f'{name}_proj', init)(x) for name, init in zip('qkv', self.kernel_inits[:3], strict=True))
        q, k, v = (t.reshape(b, n, self.heads, head_dim) for t in (q, k, v))
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        bias = position_bias[None]  # (1, heads, n, n)
        if self.gated:
            gates = nn.Dense(8, dtype=self.dtype, kernel_init=bert_init, name='grep_linear')(q)
            gates = jax.nn.sigmoid(gates.astype(jnp.float32).reshape(b, n, self.heads, 2, 4).sum(-1))
            grep_a = self.param('grep_a', nn.initializers.ones, (self.heads,))
            gate = gates[..., 0] * (gates[..., 1] * grep_a - 1.0) + 2.0  # (b, n, heads)
            bias = jnp.swapaxes(gate, 1, 2)[..., None] * bias
        logits = logits + bias
        # The reference fills padded keys with -inf; the finite minimum keeps an all-padding row from turning NaN.
        logits = jnp.where(key_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1), deterministic=deterministic)
        out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v).reshape(b, n, self.width)
        return nn.Dense(self.width, dtype=self.dtype, kernel_init=self.kernel_inits[3], name='out_proj')(out)


class Layer(nn.Module):
    """The reference's TransformerSentenceEncoderLayer in its post-norm form (layer_norm_first False): x = LN(alpha x +
    Dropout(Attention(x))), x = LN(alpha x + Dropout(fc2(Dropout(GELU(fc1(x)))))), alpha = (2 depth)^(1/4) with
    `deep_norm`, else 1."""

    width: int
    heads: int
    mlp: int
    depth: int  # of the whole encoder, for DeepNorm's constants
    deep_norm: bool
    gated: bool
    dropout: float
    attention_dropout: float
    activation_dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array, key_valid: jax.Array, deterministic: bool) -> jax.Array:
        if self.deep_norm:
            alpha = (2.0 * self.depth) ** 0.25
            # torch's xavier_normal_(gain): N(0, gain^2 2 / (fan_in + fan_out)), not truncated
            scaled = nn.initializers.variance_scaling((8.0 * self.depth) ** -0.5, 'fan_avg', 'normal')
            unit = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')
            inits = (unit, unit, scaled, scaled, scaled, scaled)  # q, k, v, out, fc1, fc2
        else:
            alpha, inits = 1.0, (bert_init,) * 6
        drop = lambda t, rate=self.dropout: nn.Dropout(rate)(t, deterministic=deterministic)
        norm = lambda name: nn.LayerNorm(1e-5, dtype=self.dtype, name=name)
        attention = Attention(self.width, self.heads, self.attention_dropout, self.gated, inits[:4], self.dtype,
                              name='self_attn')  # fmt: skip
        x = norm('self_attn_layer_norm')(x * alpha + drop(attention(x, position_bias, key_valid, deterministic)))
        h = nn.Dense(self.mlp, dtype=self.dtype, kernel_init=inits[4], name='fc1')(x)
        h = drop(nn.gelu(h.astype(jnp.float32), approximate=False).astype(self.dtype), self.activation_dropout)
        h = nn.Dense(self.width, dtype=self.dtype, kernel_init=inits[5], name='fc2')(h)
        return norm('final_layer_norm')(x * alpha + drop(h))


class Encoder(nn.Module):
    """The reference's TransformerEncoder (post-norm): tokens (B, n, width) and which are not padding (B, n) ->
    last hidden states and each block's under 'layer_i'. Positions are the tokens' order in the sequence given."""

    width: int
    depth: int
    heads: int
    mlp: int
    pos_conv_kernel: int
    pos_conv_groups: int
    num_buckets: int = 320
    max_distance: int = 800  # the released models' (BEATsConfig's default is 1280)
    deep_norm: bool = True
    gated_relative_position: bool = True
    layer_grad_decay: float = 1.0
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, valid: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        chex.assert_rank(x, 3)
        chex.assert_shape(valid, x.shape[:2])
        x = jnp.where(valid[..., None], x, 0.0)
        x = x + PositionalConv(self.width, self.pos_conv_kernel, self.pos_conv_groups, self.dtype, name='pos_conv')(
            x
        ).astype(x.dtype)
        x = nn.LayerNorm(1e-5, dtype=self.dtype, name='layer_norm')(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        # One table for every block: the reference computes it in block 0 and passes it on.
        table = self.param('relative_attention_bias', bert_init, (self.num_buckets, self.heads))
        buckets = relative_position_buckets(x.shape[1], x.shape[1], self.num_buckets, self.max_distance)
        bias = jnp.transpose(table[buckets], (2, 0, 1))  # (heads, n, n)
        intermediates = {}
        for i in range(self.depth):
            layer = Layer(
                self.width, self.heads, self.mlp, self.depth, self.deep_norm, self.gated_relative_position,
                self.dropout, self.attention_dropout, self.activation_dropout, self.dtype, name=f'layers_{i}',
            )  # fmt: skip
            x = layer(scale_gradient(x, self.layer_grad_decay), bias, valid, deterministic)
            intermediates[f'layer_{i}'] = x
        return x, intermediates


class BEATs(nn.Module):
    """Spectrograms (B, frames, mel bins) -> patch tokens (`embed`) -> contextual tokens (`encoder`); `__call__` runs
    both on the whole spectrogram, the patches that reach into the zero padding masked out (`token_valid`)."""

    embed_dim: int
    encoder: Encoder
    dropout_input: float = 0.0
    dtype: Any = jnp.float32

    def setup(self):
        self.patch_embedding = nn.Conv(
            self.embed_dim, PATCH, PATCH, padding='VALID', use_bias=False, kernel_init=vit.conv_init, dtype=self.dtype
        )
        self.layer_norm = nn.LayerNorm(1e-5, dtype=self.dtype)
        self.post_extract_proj = vit.torch_dense(self.encoder.width, self.embed_dim, self.dtype)
        self.input_dropout = nn.Dropout(self.dropout_input)

    def embed(self, spectrogram: jax.Array, deterministic: bool = True) -> jax.Array:
        """(B, frames, mel bins) -> (B, L, width) patch tokens in time-major order (frames and bins must divide
        by 16)."""
        chex.assert_rank(spectrogram, 3)
        _, frames, bins = spectrogram.shape
        if frames % PATCH[0] or bins % PATCH[1]:
            raise ValueError(f'{frames} frames x {bins} mel bins do not divide into {PATCH} patches')
        x = self.patch_embedding(spectrogram[..., None].astype(self.dtype))
        x = self.layer_norm(x.reshape(x.shape[0], -1, self.embed_dim))
        return self.input_dropout(self.post_extract_proj(x), deterministic=deterministic)

    def __call__(self, spectrogram: jax.Array, deterministic: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
        tokens = self.embed(spectrogram, deterministic)
        return self.encoder(tokens, token_valid(spectrogram), deterministic)


def token_valid(spectrogram: jax.Array) -> jax.Array:
    """(B, L) bool: patch tokens whose 16 frames all lie before the zero padding, time-major like the tokens. A clip
    of V frames keeps floor(V / 16) time patches, as the reference's convolution does on the unpadded clip; a patch
    that the padding cuts is left out."""
    _, frames, bins = spectrogram.shape
    time_patches, freq_patches = frames // PATCH[0], bins // PATCH[1]
    ends = (jnp.arange(time_patches) + 1) * PATCH[0]
    valid = ends[None, :] <= (jnp.abs(spectrogram).sum(axis=-1) != 0).sum(axis=-1)[:, None]
    return jnp.repeat(valid, freq_patches, axis=1)


class Pretrain(nn.Module):
    """BEATs's masked label prediction (the paper's section 3.2; its code is not released): the backbone encodes
    the visible patches only (MAE-style, in their order), a Transformer label predictor (an `Encoder` of
    `predictor_depth` blocks) reads the whole sequence with the encoded tokens in place and zeros at the masked
    positions, and a Linear gives the logits over the tokenizer's labels at the masked positions."""

    backbone: BEATs
    predictor: Encoder
    num_labels: int

    @nn.compact
    def __call__(
        self, spectrogram: jax.Array, visible_idx: jax.Array, masked_idx: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        """-> logits (B, masked, num_labels) float32."""
        take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(*idx.shape, *(1,) * (x.ndim - 2)), axis=1)
        tokens = self.backbone.embed(spectrogram, deterministic)
        valid = token_valid(spectrogram)
        encoded, _ = self.backbone.encoder(take(tokens, visible_idx), take(valid, visible_idx), deterministic)
        rows = jnp.arange(tokens.shape[0])[:, None]
        full = jnp.zeros_like(tokens).at[rows, visible_idx].set(encoded.astype(tokens.dtype))
        predicted, _ = self.predictor(full, valid, deterministic)
        head = nn.Dense(self.num_labels, dtype=self.backbone.dtype, kernel_init=bert_init, name='head')
        return head(take(predicted, masked_idx)).astype(jnp.float32)


class Tokenizer(nn.Module):
    """The reference's `Tokenizers` (beats/Tokenizers.py) up to its quantizer's input: the backbone on the whole
    spectrogram, then `quantize_layer` (Linear(width, width) - tanh - Linear(width, code_dim), torch's default
    init) and the L2 normalisation the quantizer starts with -> unit vectors (B, L, code_dim) float32. The codes are
    their nearest codebook rows (jaxssl.models.norm_ema_quantizer), the codebook being a method's extra state."""

    backbone: BEATs
    code_dim: int = 256

    @nn.compact
    def __call__(self, spectrogram: jax.Array, deterministic: bool = True) -> jax.Array:
        x, _ = self.backbone(spectrogram, deterministic)
        width, dtype = self.backbone.encoder.width, self.backbone.dtype
        x = jnp.tanh(vit.torch_dense(width, width, dtype, name='quantize_layer_0')(x))
        x = vit.torch_dense(self.code_dim, width, dtype, name='quantize_layer_2')(x)
        return norm_ema_quantizer.l2norm(x.astype(jnp.float32))


class TokenizerTraining(nn.Module):
    """The tokenizer and its estimator for BEATs's tokenizer iterations (the paper's section 3.3; this part of the
    code is not released): `encode` gives the tokenizer's unit vectors; `estimate` reads the quantized vectors
    (straight-through) with a Linear to the estimator's width, a Transformer `estimator` and a Linear to the
    teacher's width, the prediction of the teacher's last layer."""

    tokenizer: Tokenizer
    estimator: Encoder
    target_dim: int

    def setup(self):
        dtype = self.tokenizer.backbone.dtype
        self.estimator_in = vit.torch_dense(self.estimator.width, self.tokenizer.code_dim, dtype)
        self.estimator_out = vit.torch_dense(self.target_dim, self.estimator.width, dtype)

    def encode(self, spectrogram: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.tokenizer(spectrogram, deterministic)

    def estimate(self, quantized: jax.Array, valid: jax.Array, deterministic: bool = True) -> jax.Array:
        x, _ = self.estimator(self.estimator_in(quantized), valid, deterministic)
        return self.estimator_out(x).astype(jnp.float32)

    def __call__(self, spectrogram: jax.Array, deterministic: bool = True) -> jax.Array:  # for init
        z = self.encode(spectrogram, deterministic)
        return self.estimate(z, token_valid(spectrogram), deterministic)


def make_backbone(variant: str, dtype: Any = jnp.float32, dropout_input: float = 0.0, **encoder: Any) -> BEATs:
    """A BEATs backbone of a named size (micro, base); `encoder` overrides the Encoder's fields."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    unknown = set(encoder) - {f.name for f in dataclasses.fields(Encoder)}
    if unknown:
        raise TypeError(f'unknown BEATs encoder fields: {sorted(unknown)}')
    sizes = {k: v for k, v in VARIANTS[variant].items() if k != 'embed_dim'}
    encoder = Encoder(**{**sizes, **encoder}, dtype=dtype)
    return BEATs(VARIANTS[variant]['embed_dim'], encoder, dropout_input, dtype)
