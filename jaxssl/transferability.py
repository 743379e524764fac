"""Rank pretrained models for a labelled task without fine-tuning them: LogME (You et al., ICML 2021; the fixed-point
solver of "Ranking and Tuning Pre-trained Models", 2021), SFDA (Shao et al., ECCV 2022), and PED (Li et al.,
"Exploring Model Transferability through the Lens of Potential Energy", ICCV 2023), which first moves each class's
features apart as a physical system relaxing its potential energy and then scores them with SFDA or LogME.

    python -m jaxssl.transferability --workdir=runs/a --workdir=runs/b [--representation=NAME] [--out=FILE]

Each workdir is a jaxssl training run. Its latest checkpoint's frozen features of the labelled evaluation split its
config names (`eval.train_split`, as the probes read it) are scored; the linear probe's test accuracy on
`eval.split` is printed beside the scores, and with 3 or more runs the weighted Kendall tau between each score and
the probe accuracy (the papers' measure of a ranking). Scores are written as JSON.

Numerics follow the reference code (thuml/LogME LogME.py, lixiaotong97/PED metrics.py) in float64:
- LogME: per class, a Bayesian linear model of the one-hot indicator on the features; alpha and beta by the fixed
  point (at most 11 rounds, until alpha / beta moves by <= 1e-3 relatively); the mean over classes of the log
  evidence / N. As the reference, the log-determinant runs over the min(N, D) singular values only; `exact=True`
  adds the -(D - k) / 2 log(alpha) it leaves out when N < D (then the evidence is the true one).
- SFDA: a regularised Fisher discriminant (shrinkage exp(-5 lambda_max) of the within-class covariance, lambda_max by
  3 rounds of power iteration), its class probabilities softened by a second softmax, each feature mixed toward the
  other classes' mean by its probability of the wrong class (ConfMix), a second discriminant with the same
  shrinkage; the score is the mean probability of the true class.
- PED: features standardised by reference statistics (`reference_mean` / `reference_std`, floored at 1e-3); per class
  the mean and the radius sqrt(sum of per-dimension variances); two classes overlapping (distance < nsigma (R_i +
  R_j)) push each other apart along the line between their means by min(dt^2 / 2 x c x overlap, overlap); every
  feature of a class moves with it. Steps repeat while the total movement stays above `exit_ratio` of the first
  step's, at most 6. The per-pair loop of the reference is summed in closed form.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


# --- LogME ---------------------------------------------------------------------------------------------------------
def logme(features: np.ndarray, labels: np.ndarray, exact: bool = False) -> float:
    """The LogME score of features (N, D) for integer labels (N,) in [0, C)."""
    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    if n > d:  # the reference's truncated SVD through the Gram matrix
        _, s, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s)
        keep = s > 1e-10
        s, vh = s[keep], vh[keep]
        u = (f @ vh.T) / s[None, :]
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    evidences = []
    for c in range(int(y.max()) + 1):
        target = (y == c).astype(np.float64)
        x2 = (u.T @ target) ** 2
        residual_x2 = float(target @ target - x2.sum())
        alpha = beta = 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + residual_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidence = (
            d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)
        )  # fmt: skip
        if exact:
            evidence -= (d - len(sigma)) / 2 * np.log(alpha)
        evidences.append(evidence / n)
    return float(np.mean(evidences))


# --- SFDA ----------------------------------------------------------------------------------------------------------
def _class_means(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    classes = int(y.max()) + 1
    counts = np.bincount(y, minlength=classes)
    return np.stack([x[y == c].sum(axis=0) for c in range(classes)]) / counts[:, None]


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    out = (1.0 - shrinkage) * cov
    out[np.diag_indices_from(out)] += shrinkage * np.trace(cov) / len(cov)
    return out


def _largest_eigenvalue(a: np.ndarray, rounds: int = 3) -> float:
    """The reference's iterative_A: power iteration from the row sums, a Rayleigh quotient of two iterates."""
    x = a.sum(axis=1)
    for _ in range(rounds):
        y = a @ x
        y = y / np.linalg.norm(y)
        x = a @ y
        x = x / np.linalg.norm(x)
    return float(x @ a @ y)


def _fisher_probabilities(x: np.ndarray, y: np.ndarray, shrinkage: float | None) -> tuple[np.ndarray, float]:
    """(class probabilities (N, C) of the regularised Fisher discriminant, its shrinkage)."""
    from scipy import linalg

    classes = int(y.max()) + 1
    priors = np.bincount(y, minlength=classes) / len(y)
    means = _class_means(x, y)
    within = sum(priors[c] * np.atleast_2d(np.cov(x[y == c].T, bias=True)) for c in range(classes))
    if shrinkage is None:
        shrinkage = max(float(np.exp(-5 * _largest_eigenvalue(within))), 1e-10)
    total = _shrunk(np.atleast_2d(np.cov(x.T, bias=True)), shrinkage)
    within = _shrunk(within, shrinkage)
    values, vectors = linalg.eigh(total - within, within)
    vectors = vectors[:, np.argsort(values)[::-1]]
    coef = means @ vectors @ vectors.T
    scores = x @ coef.T + (-0.5 * np.diag(means @ coef.T) + np.log(priors))
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return scores / scores.sum(axis=1, keepdims=True), shrinkage


def sfda(features: np.ndarray, labels: np.ndarray) -> float:
    """The SFDA score of features (N, D) for integer labels (N,) in [0, C) (every class present)."""
    x = np.array(features, np.float64)
    y = np.asarray(labels)
    probs, shrinkage = _fisher_probabilities(x, y, None)
    probs = np.exp(probs) / np.exp(probs).sum(axis=1, keepdims=True)  # the reference's softening
    means = _class_means(x, y)
    others = (means.sum(axis=0)[None, :] - means) / (len(means) - 1)
    right = probs[np.arange(len(y)), y][:, None]
    x = right * x + (1 - right) * others[y]  # ConfMix
    probs, _ = _fisher_probabilities(x, y, shrinkage)
    return float(probs[np.arange(len(y)), y].mean())


# --- PED -----------------------------------------------------------------------------------------------------------
def ped_step(
    features: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray, *, time_step: float, nsigma: float,
    constant: float,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """One step of the potential-energy descent: (moved features in the original units, total movement in the
    standardised units)."""
    x = (features - mean) / std
    classes = int(labels.max()) + 1
    means = _class_means(x, labels)
    radius = np.sqrt(np.stack([x[labels == c].var(axis=0).sum() for c in range(classes)]))
    offsets = means[:, None, :] - means[None, :, :]  # (C, C, D): mu_k - mu_j
    distance = np.linalg.norm(offsets, axis=-1)
    overlap = np.maximum(abs(nsigma) * (radius[:, None] + radius[None, :]) - distance, 0.0)
    step = np.minimum(0.5 * time_step**2 * constant * overlap, overlap)
    np.fill_diagonal(step, 0.0)
    with np.errstate(invalid='ignore', divide='ignore'):
        push = np.where(step[..., None] > 0, step[..., None] * offsets / distance[..., None], 0.0)
    shift = push.sum(axis=1)  # each class away from those it overlaps
    return (x + shift[labels]) * std + mean, float(np.abs(shift).sum())


def ped_transform(
    features: np.ndarray, labels: np.ndarray, reference_mean: np.ndarray, reference_std: np.ndarray, *,
    time_step: float = 0.1, nsigma: float = 0.6, constant: float = 1.0, exit_ratio: float = 0.5, max_steps: int = 6,
    eps: float = 1e-3,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """(the features after PED's descent, steps taken): the first step always, then more while a step moves the
    classes by more than `exit_ratio` of the first step's movement, at most `max_steps`."""
    x = np.array(features, np.float64)
    y = np.asarray(labels)
    std = np.maximum(np.asarray(reference_std, np.float64), eps)
    mean = np.asarray(reference_mean, np.float64)
    first, steps = None, 0
    while steps < max_steps:
        moved, movement = ped_step(x, y, mean, std, time_step=time_step, nsigma=nsigma, constant=constant)
        first = movement if first is None else first
        if first == 0 or not movement / first > exit_ratio:  # the reference's 0 / 0 is NaN: no step either
            break
        x, steps = moved, steps + 1
    return x, steps


def scores(features: np.ndarray, labels: np.ndarray, reference: np.ndarray | None = None, **ped: Any) -> dict:
    """LogME, SFDA and both after PED (standardised by `reference` features' statistics, default the features'
    own) of one model's features."""
    labels = np.unique(labels, return_inverse=True)[1]  # contiguous 0 .. C - 1, as the reference assumes
    reference = features if reference is None else reference
    moved, steps = ped_transform(features, labels, reference.mean(axis=0), reference.std(axis=0), **ped)
    return {
        'logme': logme(features, labels),
        'sfda': sfda(features, labels),
        'ped_logme': logme(moved, labels),
        'ped_sfda': sfda(moved, labels),
        'ped_steps': steps,
    }


# --- the CLI -------------------------------------------------------------------------------------------------------
def run_features(workdir: str, representation: str | None) -> tuple[np.ndarray, np.ndarray, float, str]:
    """(features and labels of the run's labelled training split, the linear probe's test accuracy, the
    representation's name) of a workdir's latest checkpoint."""
    from jaxssl import train
    from jaxssl.evaluate import frozen
    from jaxssl.evaluate.__main__ import load_run_config

    config = load_run_config(workdir, [])
    method, mesh, restored, _ = train.restore_checkpoint(config, workdir)
    e = config.eval
    splits = frozen.extract_splits(method, restored['params'], restored['extra'], mesh, e)
    label = e.label_keys[0]
    skip = (*e.label_keys, 'valid', 'index', 'tokens')
    names = [k for k, v in splits['train'].items() if k not in skip and v.ndim == 2]
    name = representation or names[0]
    if name not in names:
        raise ValueError(f"{workdir} has no representation '{name}'; it has {', '.join(names)}")
    keep = lambda split: {k: split[k] for k in (name, label, 'valid')}
    probe = frozen.run_probes(keep(splits['train']), keep(splits['test']), (label,), ('linear',), seed=0)
    valid = splits['train']['valid'] > 0
    return splits['train'][name][valid], splits['train'][label][valid], float(probe[f'{label}/{name}/linear']), name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jaxssl.transferability', description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', action='append', required=True, help='a training run (repeat for several)')
    parser.add_argument('--representation', default=None, help='a represent() name (default: the first by name)')
    parser.add_argument('--nsigma', type=float, default=0.6)
    parser.add_argument('--time_step', type=float, default=0.1)
    parser.add_argument('--out', default='', help='write the scores here as JSON')
    args = parser.parse_args(argv)
    from jaxssl.config import ConfigError

    results = {}
    for workdir in args.workdir:
        try:
            features, labels, accuracy, name = run_features(workdir, args.representation)
        except (ConfigError, ValueError) as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
        results[workdir] = {
            'representation': name, 'linear_probe': accuracy,
            **scores(features, labels, nsigma=args.nsigma, time_step=args.time_step),
        }  # fmt: skip
    keys = ('linear_probe', 'logme', 'sfda', 'ped_logme', 'ped_sfda')
    print(f'{"run":40s}' + ''.join(f'{k:>13s}' for k in keys))
    for workdir, row in results.items():
        print(f'{workdir[-40:]:40s}' + ''.join(f'{row[k]:13.4f}' for k in keys))
    if len(results) >= 3:
        from scipy.stats import weightedtau

        truth = [row['linear_probe'] for row in results.values()]
        taus = {k: float(weightedtau([row[k] for row in results.values()], truth)[0]) for k in keys[1:]}
        print('weighted Kendall tau against the linear probe: ' + ', '.join(f'{k} {v:.3f}' for k, v in taus.items()))
        results['weighted_tau'] = taus
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2, sort_keys=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
