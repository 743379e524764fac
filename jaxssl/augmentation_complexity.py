"""The augmentation complexity kappa of masking (Zhai, Liu, Risteski, Kolter, Ravikumar, "Understanding
Augmentation-based Self-Supervised Representation Learning via RKHS Approximation and Regression", ICLR 2024).

The paper's bounds on what pretraining with an augmentation can learn depend on the augmentation kernel
K(x, x') = sum_a p(a | x) p(a | x') / p(a) and on kappa^2 = sup_x K(x, x): the stronger the augmentation, the
smaller kappa. For masking on a finite dataset of N token sequences (each position masked independently with
probability alpha) K has a closed form. With S the kept positions (each kept with probability 1 - alpha) and
c_i(S) = #{j : x_j agrees with x_i on S}, p(a) = w(S) c_i(S) / N for the view a of x_i, so

    K(x_i, x_k) = N E_S[ 1[x_i = x_k on S] / c_i(S) ],    K(x_i, x_i) = N E_S[ 1 / c_i(S) ].

Exact for short sequences (all 2^L kept sets), Monte Carlo over S otherwise. Properties (tested): 1 <= kappa^2
<= N; at alpha = 0 it is N / the multiplicity of x; at alpha = 1 it is 1; the mean of K over all pairs is 1.
kappa depends on N: report N with it. For crops or colour jitter p(a | x) is intractable; this covers masking.

    python -m jaxssl.augmentation_complexity [--patch=4] [--levels=2] [--images=1000] [--samples=4000]

prints kappa^2 of patch masking on the built-in MNIST digits (each patch quantised to `levels` grey levels is a
token) for mask rates 0 to 0.9.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

import numpy as np

EXACT_MAX_LENGTH = 16  # 2^16 kept sets; longer sequences are sampled


def _kept_sets(length: int, mask_rate: float, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept (M, L) bool, weights (M,) summing to 1): every subset with its probability, or `samples` draws."""
    if samples == 0:
        if length > EXACT_MAX_LENGTH:
            raise ValueError(f'exact enumeration needs length <= {EXACT_MAX_LENGTH}, got {length}: pass samples > 0')
        kept = np.array(list(itertools.product((False, True), repeat=length)), bool).reshape(-1, length)
        counts = kept.sum(1)
        return kept, (1 - mask_rate) ** counts * mask_rate ** (length - counts)
    kept = rng.random((samples, length)) >= mask_rate
    return kept, np.full(samples, 1 / samples)


def augmentation_kernel(tokens: np.ndarray, mask_rate: float, samples: int = 0, seed: int = 0) -> np.ndarray:
    """The (N, N) masking kernel K(x_i, x_k) of `tokens` (N, L) integers (exact, or `samples` Monte Carlo draws)."""
    tokens = np.asarray(tokens)
    kept, weights = _kept_sets(tokens.shape[1], mask_rate, samples, np.random.default_rng(seed))
    n = len(tokens)
    kernel = np.zeros((n, n))
    for keep, weight in zip(kept, weights, strict=True):
        agree = (tokens[:, None, keep] == tokens[None, :, keep]).all(-1)  # (N, N)
        kernel += weight * agree / agree.sum(1, keepdims=True)
    return n * kernel


def augmentation_complexity(
    tokens: np.ndarray, mask_rate: float, samples: int = 0, seed: int = 0
) -> tuple[float, np.ndarray]:
    """(kappa^2 = max_i K(x_i, x_i), the per-sample K(x_i, x_i) (N,)) of masking at `mask_rate` on `tokens` (N, L)
    integers; exact when `samples` is 0, else a Monte Carlo mean over `samples` kept sets. Only the agreement
    counts are formed (one np.unique of the kept columns per kept set), never the (N, N) kernel."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or len(tokens) == 0:
        raise ValueError(f'tokens must be a non-empty (N, L) array, got shape {tokens.shape}')
    if not 0 <= mask_rate <= 1:
        raise ValueError(f'mask_rate must be in [0, 1], got {mask_rate}')
    kept, weights = _kept_sets(tokens.shape[1], mask_rate, samples, np.random.default_rng(seed))
    n = len(tokens)
    inverse_counts = np.zeros(n)
    for keep, weight in zip(kept, weights, strict=True):
        # c_i(S): how many sequences agree with x_i on the kept positions (via the unique kept rows).
        _, inverse, counts = np.unique(tokens[:, keep], axis=0, return_inverse=True, return_counts=True)
        inverse_counts += weight / counts[inverse.ravel()]
    per_sample = n * inverse_counts
    return float(per_sample.max()), per_sample


def digit_patch_tokens(images: int, patch: int, levels: int) -> np.ndarray:
    """(N, L) tokens of the built-in MNIST digits: each patch x patch block quantised to `levels` grey levels,
    the block's pattern as one token."""
    from jaxssl.data import images as image_data

    source = image_data.DigitsSource('train')
    pixels = np.stack([np.asarray(source[i]['image']).reshape(28, 28) for i in range(min(images, len(source)))])
    quantised = np.minimum((pixels.astype(np.float64) / 256 * levels).astype(np.int64), levels - 1)
    n, h, w = quantised.shape
    blocks = quantised[:, : h - h % patch, : w - w % patch]
    blocks = blocks.reshape(n, h // patch, patch, w // patch, patch).transpose(0, 1, 3, 2, 4).reshape(n, -1, patch**2)
    # A block's digits in base `levels` -> one integer per block (unique per pattern).
    return (blocks * levels ** np.arange(patch**2)).sum(-1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m jaxssl.augmentation_complexity', description=__doc__.split('\n')[0]
    )
    parser.add_argument('--patch', type=int, default=4, help='patch side in pixels (a token per patch)')
    parser.add_argument('--levels', type=int, default=2, help='grey levels a pixel is quantised to')
    parser.add_argument('--images', type=int, default=1000, help='N: digits taken from the training split')
    parser.add_argument('--samples', type=int, default=4000, help='Monte Carlo kept sets per mask rate')
    parser.add_argument('--rates', default='0,0.1,0.3,0.5,0.7,0.75,0.9')
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tokens = digit_patch_tokens(args.images, args.patch, args.levels)
    n, length = tokens.shape
    print(f'N = {n} digits, L = {length} tokens ({args.patch}x{args.patch} patches, {args.levels} grey levels); '
          f'kappa^2 is at most N')  # fmt: skip
    print('mask rate | kappa^2 | mean K(x, x)')
    for rate in (float(r) for r in args.rates.split(',')):
        kappa2, per_sample = augmentation_complexity(tokens, rate, samples=args.samples)
        print(f'{rate:9.2f} | {kappa2:7.1f} | {per_sample.mean():.1f}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
