"""The encoder and residual vector quantizer of EnCodec (Défossez et al., "High Fidelity Neural Audio Compression",
2022) at 24 kHz: MERT's acoustic teacher, whose 8 codebooks at 6 kbps label each 320-sample frame (75 Hz).

Laid out as transformers' `EncodecModel` (the encodec package's `encodec_model_24khz`, which MERT's
prepare_codecs_from_manifest.py calls), frozen, encoding only:
- SEANet encoder: Conv(1 -> 32, 7); then per ratio 2, 4, 5, 8: a residual block (ELU, Conv(C -> C / 2, 3), ELU,
  Conv(C / 2 -> C, 1), plus a 1x1 conv shortcut), ELU, Conv(C -> 2C, kernel 2 r, stride r); a 2-layer LSTM over
  the 512 channels with a skip; ELU, Conv(512 -> 128, 7). Every conv is causal: (kernel - stride) samples of
  reflect padding on the left, and on the right as many as make the last frame whole. Weight norm is folded into
  the kernels by the converter (jaxssl.models.encodec_weights).
- Residual VQ: each codebook (1024 x 128) takes the nearest entry (Euclidean) to what the previous ones left; 6
  kbps keeps the first floor(6000 / (75 x 10)) = 8.
No input normalisation (the 24 kHz model has none). Output codes (B, K, ceil(N / 320)).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

RATIOS = (2, 4, 5, 8)  # the encoder's strides, first to last (the config's upsampling_ratios reversed)
FILTERS = 32
DIMENSION = 128
KERNEL = 7
HOP = math.prod(RATIOS)  # 320 samples a frame
CODEBOOK_SIZE = 1024
FRAME_RATE = 75  # 24000 / 320


def codebooks_for_bandwidth(kbps: float) -> int:
    """The quantizers EnCodec keeps at a target bandwidth: floor(kbps x 1000 / (log2(1024) x 75)), at least 1."""
    return max(1, math.floor(kbps * 1000 / (math.log2(CODEBOOK_SIZE) * FRAME_RATE)))


def codec_frames(num_samples: int) -> int:
    """Frames the encoder gives for `num_samples`: ceil(N / 320) (the causal padding completes the last)."""
    return -(-num_samples // HOP)


def reflect_pad(x: jax.Array, left: int, right: int) -> jax.Array:
    """transformers' EncodecConv1d._pad1d in reflect mode on (B, T, C): a sequence no longer than the larger pad
    first gets zeros on the right to make the reflection possible, cut off again after."""
    extra = max(0, max(left, right) - x.shape[1] + 1)
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    x = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode='reflect')
    return x[:, : x.shape[1] - extra]


class CausalConv(nn.Module):
    """transformers' EncodecConv1d with use_causal_conv and reflect padding; x (B, T, C)."""

    features: int
    kernel: int
    stride: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        span = (self.kernel - 1) * self.dilation + 1
        left = span - self.stride
        length = x.shape[1]
        frames = math.ceil((length - span + left) / self.stride + 1) - 1
        right = frames * self.stride + span - left - length
        x = reflect_pad(x, left, right)
        return nn.Conv(
            self.features, (self.kernel,), (self.stride,), padding='VALID', kernel_dilation=(self.dilation,),
            precision=jax.lax.Precision.HIGHEST, name='conv',
        )(x)  # fmt: skip


class ResidualBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = CausalConv(self.channels // 2, 3, name='block_1')(jax.nn.elu(x))
        y = CausalConv(self.channels, 1, name='block_3')(jax.nn.elu(y))
        return CausalConv(self.channels, 1, name='shortcut')(x) + y


class LSTM(nn.Module):
    """torch.nn.LSTM (gates i, f, g, o; both biases) over time, `layers` deep, hidden = input size; x (B, T, C)."""

    layers: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        for layer in range(self.layers):
            w_ih = self.param(f'weight_ih_l{layer}', nn.initializers.lecun_normal(), (4 * channels, channels))
            w_hh = self.param(f'weight_hh_l{layer}', nn.initializers.lecun_normal(), (4 * channels, channels))
            b = self.param(f'bias_ih_l{layer}', nn.initializers.zeros, (4 * channels,))
            b = b + self.param(f'bias_hh_l{layer}', nn.initializers.zeros, (4 * channels,))
            inputs = jnp.einsum('btc,gc->btg', x, w_ih, precision=jax.lax.Precision.HIGHEST) + b

            def step(carry, gates_in, w_hh=w_hh):
                h, c = carry
                gates = gates_in + jnp.dot(h, w_hh.T, precision=jax.lax.Precision.HIGHEST)
                i, f, g, o = jnp.split(gates, 4, axis=-1)
                c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                return (h, c), h

            zeros = jnp.zeros((x.shape[0], channels), x.dtype)
            _, x = jax.lax.scan(step, (zeros, zeros), inputs.transpose(1, 0, 2))
            x = x.transpose(1, 0, 2)
        return x


class Encoder(nn.Module):
    """Waveforms (B, N) -> embeddings (B, ceil(N / 320), 128) float32."""

    @nn.compact
    def __call__(self, waveform: jax.Array) -> jax.Array:
        chex.assert_rank(waveform, 2)
        x = CausalConv(FILTERS, KERNEL, name='layers_0')(waveform.astype(jnp.float32)[..., None])
        channels, index = FILTERS, 1
        for ratio in RATIOS:
            x = ResidualBlock(channels, name=f'layers_{index}')(x)
            x = CausalConv(2 * channels, 2 * ratio, ratio, name=f'layers_{index + 2}')(jax.nn.elu(x))
            channels, index = 2 * channels, index + 3
        x = x + LSTM(name=f'layers_{index}')(x)
        x = CausalConv(DIMENSION, KERNEL, name=f'layers_{index + 2}')(jax.nn.elu(x))
        chex.assert_shape(x, (waveform.shape[0], codec_frames(waveform.shape[1]), DIMENSION))
        return x


def rvq_codes(embeddings: jax.Array, codebooks: jax.Array) -> jax.Array:
    """Residual VQ: embeddings (B, T, D), codebooks (K, V, D) -> codes (B, K, T) int32, each the argmin of
    |e|^2 - 2 x.e over what the previous codebooks left (transformers' EncodecEuclideanCodebook.quantize)."""

    def step(residual, codebook):
        scores = jnp.sum(codebook**2, axis=-1) - 2.0 * jnp.einsum(
            'btd,vd->btv', residual, codebook, precision=jax.lax.Precision.HIGHEST
        )
        codes = jnp.argmin(scores, axis=-1)
        return residual - codebook[codes], codes.astype(jnp.int32)

    _, codes = jax.lax.scan(step, embeddings.astype(jnp.float32), codebooks.astype(jnp.float32))
    return codes.transpose(1, 0, 2)


def encode(params: Any, waveform: jax.Array, codebooks: int) -> jax.Array:
    """Codes (B, codebooks, ceil(N / 320)) int32 of waveforms (B, N) at 24 kHz from converted params
    {'encoder': ..., 'codebooks': (K, 1024, 128)}; no gradient."""
    embeddings = Encoder().apply({'params': params['encoder']}, waveform)
    return jax.lax.stop_gradient(rvq_codes(embeddings, params['codebooks'][:codebooks]))


def param_shapes(num_codebooks: int = 32) -> Any:
    """The params tree's shapes ({'encoder': ..., 'codebooks': (num_codebooks, 1024, 128)})."""
    encoder = jax.eval_shape(lambda: Encoder().init(jax.random.key(0), jnp.zeros((1, HOP)))['params'])
    codebooks = jax.ShapeDtypeStruct((num_codebooks, CODEBOOK_SIZE, DIMENSION), jnp.float32)
    return {'encoder': encoder, 'codebooks': codebooks}
