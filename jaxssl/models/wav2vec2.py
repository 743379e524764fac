"""wav2vec 2.0 (Baevski et al., "wav2vec 2.0: A Framework for Self-Supervised Learning of Speech Representations",
NeurIPS 2020): a convolutional waveform encoder, a Transformer context network over masked latent frames, and a
Gumbel-softmax product quantizer of the unmasked latents for the targets.

Laid out as fairseq's `Wav2Vec2Model` (and transformers' `Wav2Vec2ForPreTraining`, whose weights
`jaxssl.models.wav2vec2_weights` converts):
- feature encoder: 1-D convolutions (channels, kernel, stride), no padding, GELU after each; 'group' mode (base)
  has no conv bias and a per-channel GroupNorm after the first convolution only (its statistics over the valid
  samples of a zero-padded waveform), 'layer' mode (large / XLSR) a conv
  bias and a LayerNorm over channels after every convolution. Kaiming-normal kernels (fan in).
- LayerNorm over the latent channels -> the quantizer's input (after `dropout_features`), and a Linear to the
  Transformer width (after `dropout_input`); masked frames are replaced by the learned `mask_emb` (U(0, 1)).
- context network: padded frames zeroed, plus a weight-normalised grouped convolution (kernel 128, 16 groups, the
  norm over each kernel position, the last output of the even kernel dropped) with GELU; then a LayerNorm and
  dropout and post-norm blocks (base), or pre-norm blocks and a final LayerNorm (large, `norm_first`). Blocks are
  jaxssl.models.bert's Layer (GELU MLP; attention, output and MLP dropout); every Linear in them N(0, 0.02), zero bias
  (fairseq's init_bert_params). LayerDrop skips a whole block with probability `layerdrop` per batch.
- quantizer: Linear(latent channels -> G * V) with N(0, 1) weights and zero bias; a hard Gumbel-softmax with
  straight-through gradients in training (temperature from the caller), the argmax in evaluation; G codebooks of V
  entries of codevector_dim / G (U(0, 1)), concatenated; then `project_q` to final_dim.
- `final_proj`: the context vectors to final_dim for the contrastive comparison.
`feature_grad_mult` scales the feature encoder's gradient (0.1 for base) and leaves its output unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import bert, vit

# fairseq's conv_feature_layers: [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2, a 400-sample receptive
# field and a 320-sample (20 ms) stride.
KERNELS_STRIDES = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))

# Named sizes: the reference's base (wav2vec2_base_librispeech.yaml) and large (wav2vec2_large_librivox.yaml, the
# architecture of XLSR-53), and a CPU-sized 'micro' for tests and `runlocal` (not a reference size). micro's codebooks
# have 32 entries: with 320 the built-in words' codes stay unpredictable (the contrastive loss at chance) for every
# CPU budget tried unless the codebook collapses to a dozen codes (docs/methods.md, wav2vec 2.0 section).
VARIANTS: dict[str, dict[str, Any]] = {
    'micro': dict(
        conv_channels=128, extractor_mode='group', conv_bias=False, width=64, depth=2, heads=4, mlp=256,
        norm_first=False, final_dim=32, codevector_dim=32, codebook_entries=32,
    ),
    'base': dict(
        conv_channels=512, extractor_mode='group', conv_bias=False, width=768, depth=12, heads=12, mlp=3072,
        norm_first=False, final_dim=256, codevector_dim=256,
    ),
    'large': dict(
        conv_channels=512, extractor_mode='layer', conv_bias=True, width=1024, depth=24, heads=16, mlp=4096,
        norm_first=True, final_dim=768, codevector_dim=768,
    ),
}  # fmt: skip
EXTRACTOR_MODES = ('group', 'layer')
bert_init = nn.initializers.normal(0.02)
kaiming_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')  # torch's kaiming_normal_, gain sqrt(2)


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
    """x unchanged, its gradient times `scale` (fairseq's GradMultiply); 0 stops it."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return jax.lax.stop_gradient(x)
    # sg(x) + scale (x - sg(x)) is x exactly in the forward pass (scale x + (1 - scale) sg(x) is not, in bf16).
    stopped = jax.lax.stop_gradient(x)
    return stopped + scale * (x - stopped)


def frame_counts(num_samples: Any, kernels_strides: tuple[tuple[int, int], ...] = KERNELS_STRIDES) -> Any:
    """Latent frames from waveform samples: floor((n - kernel) / stride + 1) through each convolution (numpy ints,
    python ints or jax arrays; counts below the receptive field give 0)."""
    n = num_samples
    for kernel, stride in kernels_strides:
        n = (n - kernel) // stride + 1
    return n * (n > 0)


class ChannelNorm(nn.Module):
    """fairseq's Fp32GroupNorm(C, C): each channel normalised over time (biased variance, eps 1e-5), with a scale
    and shift per channel; the statistics are taken over the `valid` (B, T) steps only, so zero padding does not
    change an utterance (over every step, as the reference, when all are valid)."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        scale = self.param('scale', nn.initializers.ones, (self.channels,))
        bias = self.param('bias', nn.initializers.zeros, (self.channels,))
        x = x.astype(jnp.float32)
        weights = valid[..., None].astype(jnp.float32)
        count = jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
        mean = jnp.sum(x * weights, axis=1, keepdims=True) / count
        var = jnp.sum(jnp.square(x - mean) * weights, axis=1, keepdims=True) / count
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def valid_frames(num_samples: jax.Array, frames: int) -> jax.Array:
    """(B, frames) bool: the latent frames that lie wholly within each waveform's valid samples."""
    return jnp.arange(frames)[None, :] < frame_counts(num_samples)[:, None]


class FeatureEncoder(nn.Module):
    """Waveform (B, N) and its valid samples (B,) -> latent frames (B, T, channels) float32."""

    channels: int
    mode: str = 'group'
    conv_bias: bool = False
    kernels_strides: tuple[tuple[int, int], ...] = KERNELS_STRIDES
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, waveform: jax.Array, num_samples: jax.Array) -> jax.Array:
        x = waveform[..., None].astype(self.dtype)
        for i, (kernel, stride) in enumerate(self.kernels_strides):
            x = nn.Conv(
                self.channels, (kernel,), (stride,), padding='VALID', use_bias=self.conv_bias,
                kernel_init=kaiming_normal, bias_init=vit.torch_bias_init(x.shape[-1] * kernel), dtype=self.dtype,
                name=f'conv_{i}',
            )(x)  # fmt: skip
            if self.mode == 'layer':
                x = nn.LayerNorm(1e-5, dtype=jnp.float32, name=f'norm_{i}')(x)
            elif i == 0:
                steps = frame_counts(num_samples, self.kernels_strides[:1])
                x = ChannelNorm(self.channels, name='norm_0')(x, jnp.arange(x.shape[1]) < steps[:, None])
            x = nn.gelu(x, approximate=False)
        return x.astype(jnp.float32)


class PositionalConv(nn.Module):
    """fairseq's conv_pos: a grouped Conv1d (kernel k, padding k // 2) under weight norm over dim 2 (one gain per
    kernel position), the extra last output of an even kernel dropped, GELU. Init: N(0, sqrt(4 / (k D))) directions
    with gains equal to their norms (so the initial weight is the direction), zero bias."""

    width: int
    kernel: int = 128
    groups: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        std = (4.0 / (self.kernel * self.width)) ** 0.5
        shape = (self.kernel, self.width // self.groups, self.width)
        direction = self.param('weight_v', nn.initializers.normal(std), shape)
        gain = self.param('weight_g', lambda _, v: jnp.sqrt(jnp.sum(v**2, axis=(1, 2))), direction)
        bias = self.param('bias', nn.initializers.zeros, (self.width,))
        weight = gain[:, None, None] * direction / jnp.sqrt(jnp.sum(direction**2, axis=(1, 2), keepdims=True))
        pad = self.kernel // 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), weight.astype(self.dtype), (1,), [(pad, pad)],
            dimension_numbers=('NWC', 'WIO', 'NWC'), feature_group_count=self.groups,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        if self.kernel % 2 == 0:
            y = y[:, :-1]
        return nn.gelu(y + bias, approximate=False)


def gumbel_codevectors(
    logits: jax.Array, table: jax.Array, temperature: jax.Array | None, rng: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """fairseq's GumbelVectorQuantizer after its projection: logits (B, T, G, V) and codebooks (G, V, d) -> (the
    chosen entries concatenated (B, T, G d), codes (B, T, G) int32, the noise-free softmax (B, T, G, V) float32).
    With an `rng`: a hard Gumbel-softmax at `temperature` with straight-through gradients; without: the argmax."""
    probs = jax.nn.softmax(logits, axis=-1)
    entries = logits.shape[-1]
    if rng is None:
        codes = jnp.argmax(logits, axis=-1)
        weights = jax.nn.one_hot(codes, entries, dtype=jnp.float32)
    else:
        soft = jax.nn.softmax((logits + jax.random.gumbel(rng, logits.shape)) / temperature, axis=-1)
        codes = jnp.argmax(soft, axis=-1)
        weights = jax.nn.one_hot(codes, entries, dtype=jnp.float32) - jax.lax.stop_gradient(soft) + soft
    b, t = logits.shape[:2]
    vectors = jnp.einsum('btgv,gvd->btgd', weights, table).reshape(b, t, -1)
    return vectors, codes.astype(jnp.int32), probs


class Wav2Vec2(nn.Module):
    """Waveforms -> context vectors, quantized targets and the quantizer's statistics (see `__call__`)."""

    conv_channels: int
    extractor_mode: str
    conv_bias: bool
    width: int
    depth: int
    heads: int
    mlp: int
    norm_first: bool
    final_dim: int
    codevector_dim: int
    codebooks: int = 2  # G
    codebook_entries: int = 320  # V
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    dropout_input: float = 0.0
    dropout_features: float = 0.0
    layerdrop: float = 0.0
    feature_grad_mult: float = 1.0
    eps: float = 1e-5
    dtype: Any = jnp.float32
    activation_dropout: float = 0.0
    # Fine-tuning for CTC (fairseq's Wav2VecCtc): no quantizer nor final_proj, a Linear head to `vocab_size` letters
    # after `final_dropout`.
    pretraining: bool = True
    vocab_size: int = 0
    final_dropout: float = 0.0

    def setup(self):
        self.feature_extractor = FeatureEncoder(
            self.conv_channels, self.extractor_mode, self.conv_bias, dtype=self.dtype
        )
        self.feature_norm = nn.LayerNorm(self.eps)
        # torch's default Linear init for the layers outside fairseq's init_bert_params
        self.post_extract_proj = vit.torch_dense(self.width, self.conv_channels, self.dtype)
        self.mask_emb = self.param('mask_emb', nn.initializers.uniform(1.0), (self.width,))
        self.input_dropout = nn.Dropout(self.dropout_input)
        self.features_dropout = nn.Dropout(self.dropout_features)
        self.context_dropout = nn.Dropout(self.dropout)
        self.pos_conv = PositionalConv(self.width, self.pos_conv_kernel, self.pos_conv_groups, self.dtype)
        self.encoder_norm = nn.LayerNorm(self.eps, dtype=self.dtype)
        self.layers = [
            bert.Layer(
                self.width, self.heads, self.mlp, self.dropout, self.attention_dropout, self.eps, self.dtype,
                self.norm_first, self.activation_dropout, name=f'layers_{i}',
            )
            for i in range(self.depth)
        ]  # fmt: skip
        if self.vocab_size:
            self.final_dropout_layer = nn.Dropout(self.final_dropout)
            # fairseq's Linear(): xavier_uniform weight, zero bias
            self.lm_head = nn.Dense(self.vocab_size, kernel_init=nn.initializers.xavier_uniform(), name='lm_head')
        if not self.pretraining:
            return
        entries = self.codebooks * self.codebook_entries
        self.weight_proj = nn.Dense(entries, kernel_init=nn.initializers.normal(1.0), name='quantizer_weight_proj')
        self.codevectors = self.param(
            'quantizer_codevectors', nn.initializers.uniform(1.0), (entries, self.codevector_dim // self.codebooks)
        )
        self.project_q = vit.torch_dense(self.final_dim, self.codevector_dim, self.dtype)
        self.final_proj = vit.torch_dense(self.final_dim, self.width, self.dtype)

    def latents(self, waveform: jax.Array, num_samples: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the feature encoder's output (B, T, C) before the LayerNorm, its LayerNorm)."""
        raw = scale_gradient(self.feature_extractor(waveform, num_samples), self.feature_grad_mult)
        return raw, self.feature_norm(raw)

    def context(
        self, x: jax.Array, frame_valid: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The context network on projected (and masked) frames (B, T, width): last hidden states and each block's
        under 'layer_i'."""
        x = jnp.where(frame_valid[..., None], x, 0.0)
        x = x + self.pos_conv(x).astype(x.dtype)
        if not self.norm_first:
            x = self.encoder_norm(x)
        x = self.context_dropout(x, deterministic=deterministic)
        intermediates = {}
        for i, layer in enumerate(self.layers):
            y = layer(x, frame_valid, deterministic)
            if not deterministic and self.layerdrop > 0:  # one die per block and batch, as fairseq's np.random
                keep = jax.random.uniform(self.make_rng('layerdrop')) > self.layerdrop
                y = jnp.where(keep, y, x)
            x = intermediates[f'layer_{i}'] = y
        if self.norm_first:
            x = self.encoder_norm(x)
        return x, intermediates

    def quantize(
        self, latents: jax.Array, temperature: jax.Array | None, deterministic: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """LayerNormed latents (B, T, C) -> (codevectors (B, T, codevector_dim), codes (B, T, G) int32, the softmax
        probabilities without noise (B, T, G, V) float32 for the perplexities). Gumbel noise when not
        `deterministic`."""
        b, t, _ = latents.shape
        logits = self.weight_proj(latents.astype(jnp.float32)).reshape(b, t, self.codebooks, self.codebook_entries)
        table = self.codevectors.reshape(self.codebooks, self.codebook_entries, -1)
        return gumbel_codevectors(logits, table, temperature, None if deterministic else self.make_rng('gumbel'))

    def __call__(
        self,
        waveform: jax.Array,
        num_samples: jax.Array,
        time_mask: jax.Array,
        *,
        temperature: jax.Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        """Pretraining forward pass. waveform (B, N), its valid samples (B,) (zero padding after them), time_mask
        (B, T) bool (T = frame_counts(N)).

        Returns 'predictions' final_proj(context) and 'targets' project_q(codevectors), (B, T, final_dim) float32;
        'codes' (B, T, G); 'probs' (B, T, G, V); 'features_pen' (B,) the mean squared feature-encoder output over
        each example's valid frames (fairseq's features_pen is the mean over an unpadded batch)."""
        hidden, latents, features_pen = self.masked_context(waveform, num_samples, time_mask, deterministic)
        vectors, codes, probs = self.quantize(
            self.features_dropout(latents, deterministic=deterministic), temperature, deterministic
        )
        return {
            'predictions': self.final_proj(hidden).astype(jnp.float32),
            'targets': self.project_q(vectors).astype(jnp.float32),
            'codes': codes,
            'probs': probs,
            'features_pen': features_pen,
        }

    def masked_context(
        self, waveform: jax.Array, num_samples: jax.Array, time_mask: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The pretraining encoder (shared with HuBERT-style models such as MERT): waveform (B, N), its valid samples
        (B,), time_mask (B, T) bool -> (last hidden states (B, T, width), LayerNormed latents (B, T, C),
        features_pen (B,) the mean squared feature-encoder output over each example's valid frames)."""
        chex.assert_rank([waveform, num_samples, time_mask], [2, 1, 2])
        frame_valid = valid_frames(num_samples, time_mask.shape[1])
        raw, latents = self.latents(waveform, num_samples)
        chex.assert_shape(latents, (*time_mask.shape, self.conv_channels))
        weights = frame_valid.astype(jnp.float32)
        features_pen = jnp.einsum('btc,bt->b', jnp.square(raw), weights)
        features_pen = features_pen / jnp.maximum(weights.sum(axis=1), 1.0) / self.conv_channels
        x = self.input_dropout(self.post_extract_proj(latents), deterministic=deterministic)
        x = jnp.where(time_mask[..., None], self.mask_emb.astype(x.dtype), x)
        hidden, _ = self.context(x, frame_valid, deterministic)
        return hidden, latents, features_pen

    def ctc_logits(
        self,
        waveform: jax.Array,
        num_samples: jax.Array,
        time_mask: jax.Array | None = None,
        channel_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Fine-tuning forward pass (fairseq's Wav2VecEncoder): letter logits (B, T, vocab_size) float32. With masks
        (training), masked frames (B, T) become mask_emb and then masked channels (B, width) are zeroed, the order of
        fairseq's apply_mask."""
        if not self.vocab_size:
            raise ValueError('ctc_logits needs a model with vocab_size > 0')
        _, latents = self.latents(waveform, num_samples)
        frame_valid = valid_frames(num_samples, latents.shape[1])
        x = self.input_dropout(self.post_extract_proj(latents), deterministic=deterministic)
        if time_mask is not None:
            x = jnp.where(time_mask[..., None], self.mask_emb.astype(x.dtype), x)
        if channel_mask is not None:
            x = jnp.where(channel_mask[:, None, :], 0.0, x).astype(x.dtype)
        hidden, _ = self.context(x, frame_valid, deterministic)
        hidden = self.final_dropout_layer(hidden, deterministic=deterministic)
        return self.lm_head(hidden.astype(jnp.float32))

    def encode(self, waveform: jax.Array, num_samples: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Unmasked, deterministic context vectors (B, T, width) and each block's; the representation."""
        _, latents = self.latents(waveform, num_samples)
        frame_valid = valid_frames(num_samples, latents.shape[1])
        return self.context(self.post_extract_proj(latents), frame_valid, deterministic=True)


def init_params(model: Wav2Vec2, rng: jax.Array, waveform: jax.Array) -> Any:
    """model.init, then fairseq's init_bert_params on the Transformer blocks: N(0, 0.02) Linear kernels (biases are
    zero already)."""
    init_rng, bert_rng = jax.random.split(rng)
    b, n = waveform.shape
    lengths = jnp.full((b,), n)
    if model.pretraining:
        mask = jnp.zeros((b, int(frame_counts(n))), bool)
        params = dict(model.init(init_rng, waveform, lengths, mask, method=model.__call__)['params'])
    else:
        params = dict(model.init(init_rng, waveform, lengths, method=model.ctc_logits)['params'])
    for i, key in enumerate(jax.random.split(bert_rng, model.depth)):
        params[f'layers_{i}'] = vit.redraw_kernels(params[f'layers_{i}'], key, bert_init)
    return params


def make_model(variant: str, **overrides: Any) -> Wav2Vec2:
    """A wav2vec 2.0 of a named size (micro, base, large) with field overrides (dropouts, dtype, ...)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Wav2Vec2)}
    if unknown:
        raise TypeError(f'unknown Wav2Vec2 fields: {sorted(unknown)}')
    return Wav2Vec2(**{**VARIANTS[variant], **overrides})
