"""SpeechT5's speech pre-training terms (microsoft/SpeechT5: speech_pretrain_criterion.py, text_to_speech_loss.py,
speech_dataset.py; shared/reference notes), each a per-batch mean as the reference optimises them:

- masked prediction: the cross entropy of the label-class logits at the masked frames, averaged over them;
- the decoder's log-mel reconstruction: L1 of the frames before and after the post-net (each a mean over the valid
  frames x bins) + the stop-flag BCE with pos_weight 5 (a mean over the valid frames). Targets are the utterance's
  frames trimmed to a multiple of the reduction factor r; the decoder reads every r-th frame (r - 1, 2r - 1, ...)
  shifted right behind a zero frame; the stop label is 1 at the last valid output frame;
- the quantizer's diversity: (G V - perplexity) / (G V), the perplexity of the noise-free code distribution
  averaged over every position;
and the text pre-training term (text_pretrain_criterion.py): the decoder's negative log-likelihood of the clean
sequence, averaged over its tokens (<s> and </s> included): `masked_prediction_loss` with the target tokens as the
mask.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

STOP_POS_WEIGHT = 5.0  # the reference's BCEWithLogitsLoss(pos_weight=5)


def decoder_inputs(mel: jax.Array, lengths: jax.Array, reduction: int) -> tuple[jax.Array, jax.Array]:
    """Log-mel targets (B, L, M) with their valid frames (B,) -> (the decoder's input frames (B, L // r, M): frames
    r - 1, 2r - 1, ... shifted right behind a zero frame; their mask (B, L // r), steps t < lengths // r)."""
    chex.assert_rank(mel, 3)
    steps = mel.shape[1] // reduction
    thinned = mel[:, reduction - 1 :: reduction][:, :steps]
    shifted = jnp.concatenate([jnp.zeros_like(thinned[:, :1]), thinned[:, :-1]], axis=1)
    return shifted, jnp.arange(steps)[None, :] < (lengths // reduction)[:, None]


def reconstruction_loss(
    before: jax.Array, after: jax.Array, stop_logits: jax.Array, mel: jax.Array, lengths: jax.Array, reduction: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1(before) + L1(after) + BCE(stop) over the valid output frames t < lengths - lengths mod r. `before` and
    `after` (B, T, M) and `stop_logits` (B, T) are the decoder's outputs, T = (L // r) r; `mel` (B, L, M)."""
    b, t, m = before.shape
    chex.assert_shape((after, mel[:, :t]), (b, t, m))
    chex.assert_shape(stop_logits, (b, t))
    valid_lengths = lengths - lengths % reduction
    frames = jnp.arange(t)[None, :]
    valid = (frames < valid_lengths[:, None]).astype(jnp.float32)
    target = mel[:, :t].astype(jnp.float32)
    count = jnp.maximum(valid.sum(), 1.0)

    def l1(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.abs(x.astype(jnp.float32) - target) * valid[..., None]) / (count * m)

    stop = (frames == valid_lengths[:, None] - 1).astype(jnp.float32)
    logits = stop_logits.astype(jnp.float32)
    bce = -(STOP_POS_WEIGHT * stop * jax.nn.log_sigmoid(logits) + (1 - stop) * jax.nn.log_sigmoid(-logits))
    terms = {'l1_before': l1(before), 'l1_after': l1(after), 'stop_bce': jnp.sum(bce * valid) / count}
    return terms['l1_before'] + terms['l1_after'] + terms['stop_bce'], terms


def masked_prediction_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean cross entropy over the masked frames (or target tokens), the accuracy there): logits (B, T, C), labels
    (B, T), mask (B, T)."""
    chex.assert_rank(logits, 3)
    chex.assert_equal_shape((labels, mask))
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weights = mask.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weights) / count
    return jnp.sum(nll * weights) / count, accuracy


def diversity_loss(probs: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """(G V - perplexity) / (G V) of the noise-free code probabilities (B, T, G, V), averaged over every position
    (the reference's, padding included) or over those with `weights` (B, T) 1 (the steps of the reference's
    collated batch, where ours are padded further to a fixed shape)."""
    chex.assert_rank(probs, 4)
    groups, entries = probs.shape[-2:]
    weights = jnp.ones(probs.shape[:2]) if weights is None else weights.astype(jnp.float32)
    chex.assert_shape(weights, probs.shape[:2])
    total = jnp.einsum('btgv,bt->gv', probs.astype(jnp.float32), weights)
    mean = total / jnp.maximum(weights.sum(), 1.0)
    ppl = jnp.sum(jnp.exp(-jnp.sum(mean * jnp.log(mean + 1e-7), axis=-1)))  # fairseq's log(p + 1e-7)
    return (groups * entries - ppl) / (groups * entries)
