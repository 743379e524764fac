"""Pseudo labels from a trained model: `python -m jaxssl.pseudo_labels --workdir=DIR --clusters=K [--out=FILE]`.

G-SimCLR's step between its two stages: the representation a run learnt (by default the 'latent' of configs/
gsimclr_dae.py's autoencoder) of every training image, clustered with k-means (jaxssl.kmeans) into K groups. Writes
an int32 .npy with one label per image of the run's training split, in source order (default DIR/pseudo_labels.npy);
configs/gsimclr.py reads it as input.pseudo_labels. Features come from the method's deterministic evaluation view of
the training split (input.split), so they are the same on every call. Any method with `eval_dataset` and
`represent` works, with --representation naming one of its representations.

UNFUSED's clustering (Sreyan88/LAPE gen_pseudo.py / clustering.py, DeepCluster's recipe) is
`--pca_whiten=128 --l2_normalize --iterations=20 --clusters=32`: the features are PCA-whitened to 128 dimensions
(faiss PCAMatrix with eigen_power -0.5, fit on the same features), each row L2-normalised, then k-means.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np


def load_labels(path: str, num_examples: int, how_to_make: str, examples: str = 'training examples') -> np.ndarray:
    """The int (N,) labels of the .npy that `input.pseudo_labels` names (`path`), one per example of the training
    source; a ConfigError naming the key, with `how_to_make` as the remedy, when there is no such file."""
    from jaxssl.config import ConfigError

    if not path or not os.path.isfile(path):
        raise ConfigError(f"input.pseudo_labels: '{path}' is not a file; {how_to_make}")
    labels = np.load(path)
    if labels.ndim != 1 or len(labels) != num_examples or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"input.pseudo_labels: '{path}' holds {labels.dtype} {labels.shape}; need one integer label for each "
            f'of the {num_examples} {examples}'
        )
    return labels


def whiten(x: np.ndarray, dims: int) -> np.ndarray:
    """(N, D) -> (N, dims): centred, projected on the covariance's top `dims` eigenvectors and each coordinate divided
    by the square root of its eigenvalue (faiss PCAMatrix(D, dims, eigen_power=-0.5)), so the output has identity
    covariance. Directions of (numerically) zero variance are an error rather than a division by zero."""
    if not 1 <= dims <= min(x.shape):
        raise ValueError(f'cannot whiten {x.shape} features to {dims} dimensions: need 1 <= dims <= min(N, D)')
    centred = x - x.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(x))
    top = np.argsort(eigenvalues)[::-1][:dims]
    if eigenvalues[top[-1]] <= 1e-12 * max(eigenvalues[top[0]], 1e-300):
        raise ValueError(f'the features span fewer than {dims} directions: lower --pca_whiten')
    return centred @ eigenvectors[:, top] / np.sqrt(eigenvalues[top])


def pseudo_labels(
    workdir: str,
    clusters: int,
    *,
    representation: str = 'latent',
    step: int | None = None,
    seed: int = 0,
    batch_size: int = 0,
    overrides: Sequence[str] = (),
    pca_whiten: int = 0,
    l2_normalize: bool = False,
    iterations: int = 300,
) -> np.ndarray:
    """int32 (N,) k-means labels of the run's training-split representations, indexed like its source."""
    import jax

    from jaxssl import kmeans, train
    from jaxssl.config import ConfigError
    from jaxssl.evaluate import features
    from jaxssl.evaluate.__main__ import load_run_config

    config = load_run_config(workdir, overrides)
    method, mesh, restored, _ = train.restore_checkpoint(config, workdir, step)
    dataset = method.eval_dataset(
        config.input.split, batch_size or config.eval.batch_size, 0, jax.process_index(), jax.process_count()
    )
    rows = features.extract(method, restored['params'], restored['extra'], dataset, mesh)
    if representation not in rows:
        names = ', '.join(k for k in rows if k not in ('index', 'valid') and rows[k].ndim == 2)
        raise ConfigError(f"no representation '{representation}'; this method gives: {names}")
    keep = rows['valid'] > 0  # padding of the last batch (and unreadable files, clustered by their zero view)
    index, x = rows['index'][keep], rows[representation][keep].astype(np.float64)
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        raise ValueError('the evaluation pass did not visit every training example exactly once')
    if pca_whiten:
        try:
            x = whiten(x, pca_whiten)
        except ValueError as e:
            raise ConfigError(f'--pca_whiten={pca_whiten}: {e}') from e
    if l2_normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels, _, _ = kmeans.kmeans(x, clusters, seed=seed, max_iter=iterations)
    out = np.empty(len(index), np.int32)
    out[index] = labels
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jaxssl.pseudo_labels', description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', required=True, help='the training run (its config.json and checkpoints)')
    parser.add_argument('--clusters', type=int, required=True, help='K: the reference uses its batch size, 64')
    parser.add_argument('--out', default='', help='the .npy to write (default: WORKDIR/pseudo_labels.npy)')
    parser.add_argument('--representation', default='latent')
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
    parser.add_argument('--seed', type=int, default=0, help="k-means' seed (the reference's random_state=0)")
    parser.add_argument('--batch_size', type=int, default=0, help='feature batch (default: eval.batch_size)')
    parser.add_argument('--pca_whiten', type=int, default=0, help='PCA-whiten to this many dimensions first (0: no)')
    parser.add_argument('--l2_normalize', action='store_true', help='L2-normalise each (whitened) row first')
    parser.add_argument('--iterations', type=int, default=300, help="k-means' Lloyd iterations at most (UNFUSED: 20)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [item for item in rest if not item.startswith('--config.')]
    if bad:
        parser.error(f'unrecognised arguments: {" ".join(bad)}')

    import jax

    from jaxssl.config import ConfigError

    try:
        labels = pseudo_labels(
            args.workdir,
            args.clusters,
            representation=args.representation,
            step=args.step,
            seed=args.seed,
            batch_size=args.batch_size,
            overrides=[item[len('--config.') :] for item in rest],
            pca_whiten=args.pca_whiten,
            l2_normalize=args.l2_normalize,
            iterations=args.iterations,
        )
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.workdir, 'pseudo_labels.npy')
    if jax.process_index() == 0:
        np.save(out, labels)
    sizes = np.bincount(labels, minlength=args.clusters)
    print(json.dumps({'out': out, 'examples': len(labels), 'clusters': args.clusters, 'smallest': int(sizes.min()),
                      'largest': int(sizes.max())}))  # fmt: skip
    return 0


if __name__ == '__main__':
    sys.exit(main())
