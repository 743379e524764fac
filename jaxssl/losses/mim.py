"""The Mutual Information Machine's losses: A-MIM (Livne et al. 2019, as NVIDIA NeMo's MegatronAMIMHiddenLoss) and
cMIM's contrastive term (Livne 2024; the form of Livne's group's reference implementation, `compute_cmim_loss`).

Per sample, with one reparameterised draw z = mean + exp(log_scale) * eps from the encoder q(z|x) = N(mean, sigma^2):

    l_i = - w_rec log p(x_i|z_i) - 1/2 [log q(z_i|x_i) + log P(z_i)] - w_c log p(k=1|z_i, x_i)

log q is evaluated at the drawn z (not in closed form: there is no KL term), P = N(0, I), both summed over the latent
dimensions. The contrastive term needs no second view: the positive of z_i is z_i itself (cosine 1), its negatives
the other samples of the batch, whose exponentiated similarities are AVERAGED (shifted by -log(B - 1) inside the
log-sum-exp) rather than summed, so the term's scale does not grow with the batch:

    log p(k=1|z_i, x_i) = 1/tau - log(exp(1/tau) + mean_{j != i} exp(s_ij / tau)),   s_ij = cos(z_i, z_j)

It lies in [-log 2, 0): it only pushes the samples apart on the sphere. A batch of one gives 0.

log p(x|z) of images: independent Bernoulli pixels. The reference implementation's decoder is over tokens and it
AVERAGES the token cross entropy of each sample; `reconstruction_reduction='mean'` does the same over pixels, 'sum'
takes the true log-likelihood, which outweighs the contrastive term (at most log 2) by the pixel count.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """log N(z; mean, exp(log_scale)^2) summed over the last axis: (B, D) -> (B,)."""
    chex.assert_equal_shape((z, mean, log_scale))
    return jnp.sum(-0.5 * LOG_2PI - log_scale - 0.5 * jnp.square((z - mean) * jnp.exp(-log_scale)), axis=-1)


def prior_log_prob(z: jax.Array) -> jax.Array:
    """log N(z; 0, I) summed over the last axis: (B, D) -> (B,)."""
    return jnp.sum(-0.5 * LOG_2PI - 0.5 * jnp.square(z), axis=-1)


def bernoulli_log_likelihood(logits: jax.Array, targets: jax.Array, reduction: str = 'sum') -> jax.Array:
    """t log sigmoid(l) + (1 - t) log sigmoid(-l), targets in [0, 1], summed ('sum': log p(x|z)) or averaged
    ('mean') over each sample's pixels: (B, ...) -> (B,)."""
    chex.assert_equal_shape((logits, targets))
    logits = logits.astype(jnp.float32)
    per_pixel = targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits)
    per_pixel = per_pixel.reshape(per_pixel.shape[0], -1)
    return per_pixel.mean(axis=1) if reduction == 'mean' else per_pixel.sum(axis=1)


def contrastive_log_prob(z: jax.Array, temperature: float) -> jax.Array:
    """cMIM's log p(k=1|z_i, x_i) of each sample against the batch's other samples (averaged): (B, D) -> (B,)."""
    chex.assert_rank(z, 2)
    batch = z.shape[0]
    if batch == 1:
        return jnp.zeros((1,), jnp.float32)
    unit = z.astype(jnp.float32)
    # rsqrt of the clamped squared norm: a finite gradient even at z = 0, where the norm's gradient is NaN.
    unit = unit * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(unit), axis=1, keepdims=True), 1e-24))
    similarity = unit @ unit.T
    positive = jnp.diagonal(similarity) / temperature  # 1 / tau, computed as the reference computes it
    others = similarity / temperature - math.log(batch - 1)
    others = jnp.where(jnp.eye(batch, dtype=bool), -jnp.inf, others)
    # positive - log(exp(positive) + exp(lse)), written as -softplus(lse - positive): no cancellation of two
    # numbers near 1 / tau in float32.
    return -jax.nn.softplus(jax.nn.logsumexp(others, axis=1) - positive)


def mim_loss(
    logits: jax.Array,
    targets: jax.Array,
    z: jax.Array,
    mean: jax.Array,
    log_scale: jax.Array,
    *,
    temperature: float,
    contrastive_weight: float,
    reconstruction_weight: float,
    reconstruction_reduction: str = 'sum',
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the batch mean of l_i above, its terms' batch means). contrastive_weight 0 gives A-MIM; 1 gives cMIM. The
    contrastive term is computed (and logged) either way, so the two can be compared on it."""
    log_likelihood = bernoulli_log_likelihood(logits, targets, reconstruction_reduction)
    log_q = gaussian_log_prob(z, mean, log_scale)
    log_prior = prior_log_prob(z)
    contrastive = contrastive_log_prob(z, temperature)
    per_sample = -reconstruction_weight * log_likelihood - 0.5 * (log_q + log_prior) - contrastive_weight * contrastive
    terms = {
        'reconstruction_nll': -log_likelihood.mean(),
        'log_q': log_q.mean(),
        'log_prior': log_prior.mean(),
        'contrastive': -contrastive.mean(),
    }
    return per_sample.mean(), terms
