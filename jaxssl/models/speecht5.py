"""SpeechT5's shared encoder-decoder with its speech-encoder and text pre/post-nets (Ao et al., "SpeechT5: Unified-Modal
Encoder-Decoder Pre-Training for Spoken Language Processing", ACL 2022; microsoft/SpeechT5, base = t5_transformer_base).

Laid out as the reference (and transformers' SpeechT5, whose weights `speecht5_to_flax` converts):
- speech-encoder pre-net: wav2vec 2.0's convolutional feature encoder (jaxssl.models.wav2vec2, 'group' mode, no conv
  bias, 20 ms frames), its gradient scaled by `feature_grad_mult` (0.1), LayerNorm over the 512 channels, Linear to
  the width, dropout, masked frames replaced by a learned `mask_emb`, then + the weight-normalised grouped positional
  convolution (kernel 128, 16 groups, GELU) of the masked frames and + fairseq's fixed sinusoids (halves sin | cos,
  the first frame at position 2 as after a padding index of 1, padded frames 0).
- text-encoder pre-net: the shared token embedding (not scaled) + alpha x espnet's interleaved sinusoids (the ViTs'
  vit.sinusoid_table: positions from 0; alpha a learned scalar, 1 at init), dropout.
- encoder: LayerNorm at its input (base is post-norm: no final LayerNorm), dropout, post-norm blocks
  (jaxssl.models.bert.Layer) whose self-attention adds relative positions on the keys: one table of
  2 x `max_relative` rows of head_dim, shared by every head and block, indexed by query minus key clipped to
  [-max_relative, max_relative - 1]. LayerDrop (0.05) skips a whole block per batch.
- text-decoder pre-net: the shared embedding (not scaled) + fairseq's sinusoids by token position (pads 0), dropout.
- decoder: post-norm blocks with causal self-attention, cross-attention to the encoder and a GELU MLP
  (jaxssl.models.bart.DecoderLayer: the same block), no relative positions (the reference builds a decoder table
  but never uses it), no final LayerNorm; LayerDrop as the encoder's.
- text-decoder post-net: the shared embedding as the output projection (tied, no bias).
- speech-decoder pre-net: Tacotron's pre-net (2 x Linear 256 + ReLU + dropout 0.5), Linear to the width, + alpha x
  espnet sinusoids, dropout, then the L2-normalised 512-d x-vector concatenated and ReLU(Linear) back to the width.
- speech-decoder post-net: Linear to `reduction` (2) x 80 log-mel bins and to 2 stop logits per step; Tacotron 2's
  residual post-net (5 x Conv1d kernel 5 without bias + BatchNorm, tanh on all but the last, dropout 0.5).
- cross-modal quantizer (`quantize`, `mix_codes`): fairseq's Gumbel quantizer (2 codebooks of 100 entries of
  width / 2, no projection after it) on the encoder's output; at a share of the time steps, the same steps for every
  example of the batch, the output is replaced by its codevectors before the decoder reads it.
- HuBERT-style head (`label_logits`): final_proj to 256, cosine against one U(0, 1) embedding per label class over
  logit_temp 0.1 (jaxssl.models.mert's), on the encoder's output before the quantizer mix.
Left to the caller (the method): the quantizer's temperature, max(2 x 0.999995^step, 0.5), and the code mix, which
the reference applies in evaluation too (with the argmax codes).
Differences from the reference: Tacotron's pre-net dropout follows `deterministic` (the reference keeps it on at
evaluation and inference too); with padded waveforms (the reference's pre-training crops every batch to its shortest
utterance, so it has none) padded frames are zeroed before the positional convolution, a frame counts as valid only
if its whole receptive field is, and the first convolution's channel norm takes its statistics over valid frames;
flax's BatchNorm keeps the biased running variance where torch keeps the unbiased one.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import bart, bert, vit
from jaxssl.models import mert as mert_model
from jaxssl.models import wav2vec2 as w2v

PAD_ID = 1  # fairseq's <pad>: the sinusoid tables' padding index
# fairseq's init_bert_params, applied to the whole model after construction: every Linear N(0, 0.02) with zero bias
# (the quantizer's projection included); convolutions keep torch's default, uniform(+-1 / sqrt(fan_in)).
BERT_INIT = nn.initializers.normal(0.02)
TORCH_CONV_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')

# Named sizes: the reference's base (t5_transformer_base); CPU-sized 'micro' (runlocal: the encoder of wav2vec 2.0's and
# MERT's micro) and 'tiny' (tests), not reference sizes.
VARIANTS: dict[str, dict[str, int]] = {
    'base': dict(width=768, encoder_depth=12, decoder_depth=6, heads=12, mlp=3072, conv_channels=512),
    'micro': dict(
        width=64, encoder_depth=2, decoder_depth=2, heads=4, mlp=256, conv_channels=128, prenet_units=32,
        postnet_channels=32,
    ),
    'tiny': dict(
        width=32, encoder_depth=2, decoder_depth=2, heads=4, mlp=64, conv_channels=32, prenet_units=16,
        postnet_channels=16,
    ),
}  # fmt: skip


def fairseq_sinusoids(positions: jax.Array, width: int) -> jax.Array:
    """fairseq's SinusoidalPositionalEmbedding rows for integer `positions` (...,): [sin(p w) | cos(p w)] with
    w_k = exp(-k ln(10000) / (width / 2 - 1)); position PAD_ID (a padded step) gives zeros."""
    half = width // 2
    rates = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    angles = positions.astype(jnp.float32)[..., None] * rates
    rows = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.where((positions == PAD_ID)[..., None], 0.0, rows)


def fairseq_positions(valid: jax.Array) -> jax.Array:
    """fairseq's make_positions: valid steps numbered PAD_ID + 1, PAD_ID + 2, ... in order, padded steps PAD_ID."""
    count = jnp.cumsum(valid.astype(jnp.int32), axis=-1)
    return jnp.where(valid, count + PAD_ID, PAD_ID)


def relative_indices(length: int, max_relative: int) -> jax.Array:
    """(length, length) rows of the relative-key table: query minus key, clipped to [-max, max - 1], shifted by max."""
    offsets = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
    return jnp.clip(offsets, -max_relative, max_relative - 1) + max_relative


class SpeechT5(nn.Module):
    """Waveforms or tokens -> encoder states; tokens + encoder states -> next-token logits (see the module doc)."""

    vocab_size: int
    width: int = 768
    encoder_depth: int = 12
    decoder_depth: int = 6
    heads: int = 12
    mlp: int = 3072
    conv_channels: int = 512
    max_relative: int = 160
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.05
    feature_grad_mult: float = 0.1
    eps: float = 1e-5
    dtype: Any = jnp.float32
    # speech decoder: log-mel frames in, `reduction` frames out per step
    mel_bins: int = 80
    reduction: int = 2
    prenet_units: int = 256
    prenet_layers: int = 2
    prenet_dropout: float = 0.5
    speaker_dim: int = 512
    postnet_layers: int = 5
    postnet_channels: int = 256
    postnet_kernel: int = 5
    postnet_dropout: float = 0.5
    # cross-modal quantizer: G codebooks of V entries (width / G each) on the encoder's output
    codebooks: int = 2
    codebook_entries: int = 100
    # HuBERT-style head: final_proj to final_dim, cosine / logit_temp against one embedding per label class
    label_classes: int = 504  # 500 k-means units + fairseq's 4 special symbols (the reference's dict)
    final_dim: int = 256
    logit_temp: float = 0.1

    def setup(self):
        self.feature_extractor = w2v.FeatureEncoder(self.conv_channels, 'group', False, dtype=self.dtype)
        self.feature_norm = nn.LayerNorm(self.eps)
        self.post_extract_proj = nn.Dense(self.width, dtype=self.dtype, kernel_init=BERT_INIT)
        self.mask_emb = self.param('mask_emb', nn.initializers.uniform(1.0), (self.width,))
        self.pos_conv = w2v.PositionalConv(self.width, self.pos_conv_kernel, self.pos_conv_groups, self.dtype)
        self.text_position_scale = self.param('text_position_scale', nn.initializers.ones, ())
        # fairseq's init_bert_params: N(0, 0.02) embeddings with the padding row zeroed.
        self.shared = nn.Embed(self.vocab_size, self.width, embedding_init=padded_normal_init, name='shared')
        self.relative_keys = nn.Embed(
            2 * self.max_relative, self.width // self.heads, embedding_init=nn.initializers.normal(0.02)
        )
        self.encoder_norm = nn.LayerNorm(self.eps, dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout)
        self.encoder_layers = [
            bert.Layer(
                self.width, self.heads, self.mlp, self.dropout, self.attention_dropout, self.eps, self.dtype,
                activation_dropout=self.activation_dropout, init_std=0.02, name=f'encoder_layer_{i}',
            )
            for i in range(self.encoder_depth)
        ]  # fmt: skip
        self.speech_prenet_layers = [
            nn.Dense(self.prenet_units, kernel_init=BERT_INIT) for _ in range(self.prenet_layers)
        ]
        self.speech_prenet_final = nn.Dense(self.width, dtype=self.dtype, kernel_init=BERT_INIT)
        self.prenet_drop = nn.Dropout(self.prenet_dropout)
        self.postnet_drop = nn.Dropout(self.postnet_dropout)
        self.speech_position_scale = self.param('speech_position_scale', nn.initializers.ones, ())
        self.speaker_projection = nn.Dense(self.width, dtype=self.dtype, kernel_init=BERT_INIT)
        self.feat_out = nn.Dense(self.mel_bins * self.reduction, kernel_init=BERT_INIT)
        self.prob_out = nn.Dense(self.reduction, kernel_init=BERT_INIT)
        self.postnet_convs = [
            nn.Conv(self.mel_bins if i == self.postnet_layers - 1 else self.postnet_channels, (self.postnet_kernel,),
                    padding=[((self.postnet_kernel - 1) // 2,) * 2], use_bias=False, kernel_init=TORCH_CONV_INIT)
            for i in range(self.postnet_layers)
        ]  # fmt: skip
        # torch's BatchNorm1d: momentum 0.1 (flax's 0.9), eps 1e-5
        self.postnet_norms = [nn.BatchNorm(momentum=0.9, epsilon=1e-5) for _ in range(self.postnet_layers)]
        # init_bert_params re-initialises the quantizer's projection to N(0, 0.02) (fairseq's own init is N(0, 1)).
        entries = self.codebooks * self.codebook_entries
        self.quantizer_weight_proj = nn.Dense(entries, kernel_init=BERT_INIT)
        self.quantizer_codevectors = self.param(
            'quantizer_codevectors', nn.initializers.uniform(1.0), (entries, self.width // self.codebooks)
        )
        self.final_proj = nn.Dense(self.final_dim, kernel_init=BERT_INIT)
        self.label_embs = self.param('label_embs', nn.initializers.uniform(1.0), (self.label_classes, self.final_dim))
        self.decoder_layers = [
            bart.DecoderLayer(
                self.width, self.heads, self.mlp, self.dropout, self.attention_dropout, self.activation_dropout,
                self.eps, self.dtype, init_std=0.02, name=f'decoder_layer_{i}',
            )
            for i in range(self.decoder_depth)
        ]  # fmt: skip

    def speech_prenet(
        self, waveform: jax.Array, num_samples: jax.Array, mask: jax.Array | None, deterministic: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Waveforms (B, N) with their valid samples (B,) and the frames to mask (B, T) or None -> (the encoder's
        input (B, T, width), the valid frames (B, T), the feature penalty (B,): each example's mean square of the
        conv features over its valid frames; the reference's, over its unpadded batches, is their frame-weighted
        mean)."""
        chex.assert_rank(waveform, 2)
        features = w2v.scale_gradient(self.feature_extractor(waveform, num_samples), self.feature_grad_mult)
        valid = w2v.valid_frames(num_samples, features.shape[1])
        weights = valid.astype(jnp.float32)
        squares = jnp.einsum('btc,bt->b', jnp.square(features.astype(jnp.float32)), weights)
        penalty = squares / (jnp.maximum(weights.sum(axis=1), 1.0) * features.shape[-1])
        x = self.drop(self.post_extract_proj(self.feature_norm(features)), deterministic=deterministic)
        if mask is not None:
            chex.assert_shape(mask, x.shape[:2])
            x = jnp.where(mask[..., None], self.mask_emb.astype(x.dtype), x)
        x = jnp.where(valid[..., None], x, 0.0)
        x = x + self.pos_conv(x).astype(x.dtype)
        x = x + fairseq_sinusoids(fairseq_positions(valid), self.width).astype(x.dtype)
        return x, valid, penalty

    def text_prenet(self, tokens: jax.Array, deterministic: bool) -> jax.Array:
        """Token ids (B, L) -> the encoder's input (B, L, width): embedding + alpha x espnet sinusoids."""
        chex.assert_rank(tokens, 2)
        x = self.shared(tokens) + self.text_position_scale * vit.sinusoid_table(tokens.shape[1], self.width)
        return self.drop(x.astype(self.dtype), deterministic=deterministic)

    def encode(
        self, x: jax.Array, valid: jax.Array, deterministic: bool = True, return_layers: bool = False
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """A pre-net's output (B, T, width) and its valid steps (B, T) -> the encoder's last states (B, T, width)
        (and, with `return_layers`, every block's output)."""
        x = self.drop(self.encoder_norm(x), deterministic=deterministic)
        table = self.relative_keys(relative_indices(x.shape[1], self.max_relative)).astype(self.dtype)
        layers = []
        for layer in self.encoder_layers:
            x = self._layerdrop(layer(x, valid, deterministic, relative_keys=table), x, deterministic)
            layers.append(x)
        return (x, layers) if return_layers else x

    def decode(
        self, tokens: jax.Array, mask: jax.Array, memory: jax.Array, memory_mask: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Decoder input ids (B, L) with their mask, the encoder states and mask -> (last states (B, L, width),
        next-token logits (B, L, vocab) float32 through the tied embedding)."""
        chex.assert_rank(tokens, 2)
        x = self.shared(tokens) + fairseq_sinusoids(fairseq_positions(mask), self.width)
        x = self.drop(x.astype(self.dtype), deterministic=deterministic)
        for layer in self.decoder_layers:
            x = self._layerdrop(layer(x, mask, memory, memory_mask, deterministic), x, deterministic)
        return x, self.shared.attend(x.astype(jnp.float32))

    def speech_decoder_prenet(self, frames: jax.Array, speaker: jax.Array | None, deterministic: bool) -> jax.Array:
        """Previous log-mel frames (B, L, mel_bins) and x-vectors (B, speaker_dim) or None -> the decoder's input:
        Tacotron's pre-net (Linear + ReLU + dropout 0.5 per layer; the reference keeps this dropout on at inference
        too, here it follows `deterministic`), Linear to the width, + alpha x espnet sinusoids, dropout; then the
        L2-normalised x-vector concatenated and ReLU(Linear(width + speaker_dim -> width))."""
        chex.assert_rank(frames, 3)
        x = frames
        for layer in self.speech_prenet_layers:
            x = self.prenet_drop(nn.relu(layer(x)), deterministic=deterministic)
        x = self.speech_prenet_final(x) + self.speech_position_scale * vit.sinusoid_table(x.shape[1], self.width)
        x = self.drop(x.astype(self.dtype), deterministic=deterministic)
        if speaker is None:
            return x
        chex.assert_shape(speaker, (x.shape[0], self.speaker_dim))
        unit = speaker / jnp.maximum(jnp.linalg.norm(speaker, axis=-1, keepdims=True), 1e-12)
        both = jnp.concatenate([x, jnp.broadcast_to(unit[:, None].astype(x.dtype), (*x.shape[:2], unit.shape[-1]))], -1)
        return nn.relu(self.speaker_projection(both))

    def decode_speech(
        self,
        frames: jax.Array,
        mask: jax.Array,
        memory: jax.Array,
        memory_mask: jax.Array,
        speaker: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Previous frames (B, L, mel_bins) with their mask, the encoder states and mask -> (frames before the
        post-net (B, L x reduction, mel_bins), after it (the same), stop logits (B, L x reduction)), float32. The
        post-net's BatchNorm uses batch statistics unless `deterministic` (apply with mutable=['batch_stats']),
        taken over the valid frames; its convolutions read zeros past each row's valid frames (as past the end of
        the reference's batches, which are cut to their shortest utterance)."""
        x = self.speech_decoder_prenet(frames, speaker, deterministic)
        for layer in self.decoder_layers:
            x = self._layerdrop(layer(x, mask, memory, memory_mask, deterministic), x, deterministic)
        x = x.astype(jnp.float32)
        b = x.shape[0]
        before = self.feat_out(x).reshape(b, -1, self.mel_bins)
        valid = jnp.repeat(mask, self.reduction, axis=1)[..., None]
        y = before
        for i, (conv, norm) in enumerate(zip(self.postnet_convs, self.postnet_norms, strict=True)):
            y = norm(conv(jnp.where(valid, y, 0.0)), use_running_average=deterministic, mask=valid)
            if i < self.postnet_layers - 1:
                y = jnp.tanh(y)
            y = self.postnet_drop(y, deterministic=deterministic)
        return before, before + y, self.prob_out(x).reshape(b, -1)

    def quantize(
        self, states: jax.Array, temperature: jax.Array | None, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encoder states (B, T, width) -> (their codevectors (B, T, width), codes (B, T, G), the noise-free softmax
        (B, T, G, V) for the diversity loss): a hard Gumbel-softmax at `temperature` (straight-through) in
        training, the argmax in evaluation."""
        b, t, _ = states.shape
        logits = self.quantizer_weight_proj(states.astype(jnp.float32))
        logits = logits.reshape(b, t, self.codebooks, self.codebook_entries)
        table = self.quantizer_codevectors.reshape(self.codebooks, self.codebook_entries, -1)
        return w2v.gumbel_codevectors(logits, table, temperature, None if deterministic else self.make_rng('gumbel'))

    def label_logits(self, states: jax.Array) -> jax.Array:
        """Encoder states (B, T, width) -> logits over the label classes (B, T, label_classes) float32:
        cos(final_proj(x), label embedding) / logit_temp (the reference's HuBERT head, every class a candidate)."""
        return mert_model.cosine_logits(self.final_proj(states.astype(jnp.float32)), self.label_embs, self.logit_temp)

    def _layerdrop(self, new: jax.Array, old: jax.Array, deterministic: bool) -> jax.Array:
        """LayerDrop: the block's output, or its input with probability `layerdrop` (one draw per block and batch)."""
        if deterministic or self.layerdrop <= 0:
            return new
        return jnp.where(jax.random.uniform(self.make_rng('layerdrop')) > self.layerdrop, new, old)

    def speech_to_text(
        self, waveform: jax.Array, num_samples: jax.Array, tokens: jax.Array, token_mask: jax.Array
    ) -> jax.Array:
        """Waveforms and decoder input ids -> next-token logits (evaluation mode)."""
        x, valid, _ = self.speech_prenet(waveform, num_samples, None, True)
        return self.decode(tokens, token_mask, self.encode(x, valid), valid)[1]

    def __call__(self, waveform: jax.Array, num_samples: jax.Array, tokens: jax.Array, token_mask: jax.Array):
        """Init: every part once (speech and text pre-nets, encoder, both decoders) -> next-token logits."""
        x, valid, _ = self.speech_prenet(waveform, num_samples, None, True)
        memory = self.encode(x, valid)
        self.label_logits(memory)
        self.quantize(memory, None)
        self.text_prenet(tokens, True)
        frames = jnp.zeros((waveform.shape[0], 2, self.mel_bins))
        speaker = jnp.ones((waveform.shape[0], self.speaker_dim))
        self.decode_speech(frames, jnp.ones(frames.shape[:2], bool), memory, valid, speaker)
        return self.decode(tokens, token_mask, memory, valid)[1]


def padded_normal_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """N(0, 0.02) rows with the padding row zeroed (fairseq's init_bert_params on an Embedding with padding_idx)."""
    return (jax.random.normal(key, shape, dtype) * 0.02).at[PAD_ID].set(0.0)


def make(variant: str, vocab_size: int, **kwargs: Any) -> SpeechT5:
    if variant not in VARIANTS:
        raise ValueError(f"unknown SpeechT5 variant '{variant}'; valid: {', '.join(VARIANTS)}")
    return SpeechT5(vocab_size, **{**VARIANTS[variant], **kwargs})


def code_positions(rng: jax.Array, length: int, share: float, steps: jax.Array | int | None = None) -> jax.Array:
    """(length,) bool: floor(share x steps) of the first `steps` time steps (default: all `length`; may be traced:
    the batch's own length, which the reference's collater pads to) drawn without replacement (the reference's
    randperm), the steps whose encoder output the codevectors replace, for every example of the batch alike."""
    steps = length if steps is None else steps
    keys = jnp.where(jnp.arange(length) < steps, jax.random.uniform(rng, (length,)), 2.0)
    rank = jnp.argsort(jnp.argsort(keys))  # a uniform random order of the first `steps`, the rest after them
    return rank < jnp.floor(share * jnp.asarray(steps, jnp.float32)).astype(jnp.int32)


def mix_codes(states: jax.Array, vectors: jax.Array, positions: jax.Array) -> jax.Array:
    """The encoder's output (B, T, width) with the time steps in `positions` ((T,) for every example alike, or
    (B, T)) replaced by their codevectors."""
    chex.assert_equal_shape((states, vectors))
    positions = jnp.broadcast_to(positions, states.shape[:2])
    return jnp.where(positions[..., None], vectors.astype(states.dtype), states)
