"""PredNet (Lotter, Kreiman, Cox, ICLR 2017) and PreludeNet's depth decoders on top of it.

PredNet, as the official Keras layer (coxlab/prednet@843b452 prednet.py). Layer l keeps a ConvLSTM state (R_l, C_l)
and an error E_l, all zero before the first frame, at 1 / 2^l of the input's resolution. Each time step:
- top-down, from the top layer: the gates i, f, o = hard_sigmoid(conv(x)) and the candidate tanh(conv(x)) of
  x = [R_l(t-1), E_l(t-1), Up(R_{l+1}(t))] (no Up term at the top; Up: 2x nearest), C_l = f C_l + i cand,
  R_l = o tanh(C_l). hard_sigmoid is Keras 2's, clip(0.2 x + 0.5, 0, 1); there are no peepholes;
- bottom-up: Ahat_l = ReLU(conv(R_l)), at l = 0 also capped at pixel_max (the frame prediction); E_l = [ReLU(Ahat_l -
  A_l), ReLU(A_l - Ahat_l)]; A_{l+1} = MaxPool2(ReLU(conv(E_l))); A_0 is the frame.
Every conv is 'same'-padded with a bias, Glorot-uniform kernels and zero biases (Keras's defaults). The four gate
convs of a layer run as one conv of 4 R_l outputs (i, f, c, o), each gate's block initialised as its own conv.

PreludeNet (Ziskind, Kim, Burachas 2022, "PRedictive Lateral bottom-Up and top-Down Encoder-decoder Network") adds a
decoder trained with depth labels; its code and wiring are not public (docs/methods.md). Here two top-down decoders
read the encoder's layers laterally at every step: `infer` reads [R_l(t), E_l(t)] (the prior and the error of frame
t: frame t has been seen) and `predict` reads R_l(t) (the state formed before frame t arrives: frames < t only), so
both target frame t's depth; predict's is the next-frame depth of what has been seen. Each decoder level is
ReLU(conv3x3([lateral_l, Up(d_{l+1})])), and a 3x3 conv reads depth out at full resolution. `depth_grad_scale`
alpha scales the depth gradient that reaches the encoder through the laterals (0: the encoder learns from the
PredNet loss only, the paper's self-supervised encoder; 1: end to end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models.wav2vec2 import scale_gradient  # fairseq's GradMultiply: x forward, gradient x scale

GLOROT_UNIFORM = nn.initializers.xavier_uniform()  # Keras's Conv2D default


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """Keras 2's hard sigmoid (the PredNet gates): clip(0.2 x + 0.5, 0, 1)."""
    return jnp.clip(0.2 * x + 0.5, 0.0, 1.0)


def gate_init(gates: int) -> Any:
    """A kernel initialiser for `gates` convs fused on the output axis: each block Glorot-uniform as a conv of its
    own, so the fused conv starts as the separate ones would."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        *rest, out = shape
        keys = jax.random.split(key, gates)
        return jnp.concatenate([GLOROT_UNIFORM(k, (*rest, out // gates), dtype) for k in keys], axis=-1)

    return init


def upsample(x: jax.Array) -> jax.Array:
    """2x nearest-neighbour upsampling of (B, H, W, C) (Keras's UpSampling2D)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pooling, stride 2, valid (Keras's MaxPooling2D)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')


def _conv(features: int, kernel: int, name: str, dtype: Any, init: Any = GLOROT_UNIFORM) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), padding='SAME', kernel_init=init, dtype=dtype, name=name)


class PredNet(nn.Module):
    """The PredNet stack. `stack_sizes[0]` is the input's channels; `r_stack_sizes` the ConvLSTM widths."""

    stack_sizes: Sequence[int] = (3, 48, 96, 192)
    r_stack_sizes: Sequence[int] = (3, 48, 96, 192)
    a_filter: int = 3
    ahat_filter: int = 3
    r_filter: int = 3
    pixel_max: float = 1.0
    dtype: Any = jnp.float32

    def setup(self):
        layers = len(self.stack_sizes)
        self.gates = [
            _conv(4 * r, self.r_filter, f'gates_{level}', self.dtype, gate_init(4))
            for level, r in enumerate(self.r_stack_sizes)
        ]
        self.ahat = [
            _conv(a, self.ahat_filter, f'ahat_{level}', self.dtype) for level, a in enumerate(self.stack_sizes)
        ]
        self.a = [
            _conv(self.stack_sizes[level + 1], self.a_filter, f'a_{level}', self.dtype) for level in range(layers - 1)
        ]

    def initial_state(self, batch: int, height: int, width: int) -> dict[str, list[jax.Array]]:
        """Zero R, C (R_l channels) and E (2 A_l channels) per layer."""
        shape = lambda level, c: (batch, height // 2**level, width // 2**level, c)
        return {
            'r': [jnp.zeros(shape(level, r)) for level, r in enumerate(self.r_stack_sizes)],
            'c': [jnp.zeros(shape(level, r)) for level, r in enumerate(self.r_stack_sizes)],
            'e': [jnp.zeros(shape(level, 2 * a)) for level, a in enumerate(self.stack_sizes)],
        }

    def __call__(self, state: dict[str, list[jax.Array]], frame: jax.Array) -> tuple[dict, jax.Array]:
        """One time step: (new state {'r', 'c', 'e'}, the frame prediction Ahat_0 (B, H, W, C)). The prediction is
        made from the state before `frame` (its R), and E compares it with `frame`."""
        layers = len(self.stack_sizes)
        r, c = [None] * layers, [None] * layers
        r_up = None
        for level in reversed(range(layers)):
            inputs = [state['r'][level], state['e'][level]] + ([] if r_up is None else [r_up])
            z = self.gates[level](jnp.concatenate(inputs, axis=-1)).astype(jnp.float32)
            i, f, cand, o = jnp.split(z, 4, axis=-1)
            c[level] = hard_sigmoid(f) * state['c'][level] + hard_sigmoid(i) * jnp.tanh(cand)
            r[level] = hard_sigmoid(o) * jnp.tanh(c[level])
            r_up = upsample(r[level]) if level > 0 else None
        e = []
        a = frame.astype(jnp.float32)
        prediction = None
        for level in range(layers):
            ahat = nn.relu(self.ahat[level](r[level]).astype(jnp.float32))
            if level == 0:
                ahat = jnp.minimum(ahat, self.pixel_max)
                prediction = ahat
            e.append(jnp.concatenate([nn.relu(ahat - a), nn.relu(a - ahat)], axis=-1))
            if level < layers - 1:
                a = max_pool(nn.relu(self.a[level](e[level]).astype(jnp.float32)))
        return {'r': r, 'c': c, 'e': e}, prediction


class DepthDecoder(nn.Module):
    """Top-down decoder of per-level laterals (finest first) to a depth map (B, H, W)."""

    widths: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, laterals: Sequence[jax.Array]) -> jax.Array:
        chex.assert_equal(len(laterals), len(self.widths))
        x = None
        for level in reversed(range(len(laterals))):
            inputs = laterals[level] if x is None else jnp.concatenate([laterals[level], upsample(x)], axis=-1)
            x = nn.relu(_conv(self.widths[level], 3, f'level_{level}', self.dtype)(inputs).astype(jnp.float32))
        return _conv(1, 3, 'depth', self.dtype)(x).astype(jnp.float32)[..., 0]


class PreludeNet(nn.Module):
    """PredNet over a clip plus the infer / predict depth decoders at every step.

    frames (B, T, H, W, C) in [0, pixel_max] -> {'prediction' (B, T, H, W, C) each step's frame prediction,
    'errors' (B, T, layers) each layer's mean |E|, 'infer' and 'predict' (B, T, H, W) depth, and with
    `return_states` 'r' [(B, T, h_l, w_l, R_l)] per layer}. The time loop is unrolled (T is short); XLA:CPU runs
    convolution gradients inside a compiled loop much slower than unrolled.
    """

    stack_sizes: Sequence[int] = (3, 48, 96, 192)
    r_stack_sizes: Sequence[int] = (3, 48, 96, 192)
    decoder_widths: Sequence[int] = (32, 48, 96, 192)
    filter_size: int = 3
    pixel_max: float = 1.0
    depth_grad_scale: float = 0.0
    dtype: Any = jnp.float32

    def setup(self):
        k = self.filter_size
        self.encoder = PredNet(self.stack_sizes, self.r_stack_sizes, k, k, k, self.pixel_max, self.dtype)
        self.infer = DepthDecoder(self.decoder_widths, self.dtype)
        self.predict = DepthDecoder(self.decoder_widths, self.dtype)

    def __call__(self, frames: jax.Array, return_states: bool = False) -> dict[str, Any]:
        chex.assert_rank(frames, 5)
        batch, steps, height, width, channels = frames.shape
        layers = len(self.stack_sizes)
        chex.assert_equal(channels, self.stack_sizes[0])
        if height % 2 ** (layers - 1) or width % 2 ** (layers - 1):
            raise ValueError(f'frames of {height} x {width} px: both must divide by 2^{layers - 1} ({layers} layers)')
        state = self.encoder.initial_state(batch, height, width)
        outputs: dict[str, list] = {'prediction': [], 'errors': [], 'infer': [], 'predict': [], 'r': []}
        for t in range(steps):
            state, prediction = self.encoder(state, frames[:, t])
            # The state's r is R(t), formed before frame t; e is E(t), frame t against its prediction.
            r = [scale_gradient(x, self.depth_grad_scale) for x in state['r']]
            e = [scale_gradient(x, self.depth_grad_scale) for x in state['e']]
            outputs['prediction'].append(prediction)
            outputs['errors'].append(jnp.stack([x.mean(axis=(1, 2, 3)) for x in state['e']], axis=-1))
            outputs['infer'].append(self.infer([jnp.concatenate(pair, axis=-1) for pair in zip(r, e, strict=True)]))
            outputs['predict'].append(self.predict(r))
            if return_states:
                outputs['r'].append(state['r'])
        result = {k: jnp.stack(v, axis=1) for k, v in outputs.items() if k != 'r'}
        if return_states:
            result['r'] = [jnp.stack([s[level] for s in outputs['r']], axis=1) for level in range(layers)]
        return result
