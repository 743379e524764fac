"""Pseudo labels from a trained model: `python -m jaxssl.pseudo_labels --workdir=DIR --clusters=K [--out=FILE]`.

G-SimCLR's step between its two stages: the representation a run learnt (by default the 'latent' of configs/
gsimclr_dae.py's autoencoder) of every training image, clustered with k-means (jaxssl.kmeans) into K groups. Writes
an int32 .npy with one label per image of the run's training split, in source order (default DIR/pseudo_labels.npy);
configs/gsimclr.py reads it as input.pseudo_labels. Features come from the method's deterministic evaluation view of
the training split (input.split), so they are the same on every call. Any method with `eval_dataset` and
`represent` works, with --representation naming one of its representations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np


def pseudo_labels(
    workdir: str,
    clusters: int,
    *,
    representation: str = 'latent',
    step: int | None = None,
    seed: int = 0,
    batch_size: int = 0,
    overrides: Sequence[str] = (),
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
    labels, _, _ = kmeans.kmeans(x, clusters, seed=seed)
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
