"""SimCore (Kim, Bae, Yun, "Coreset Sampling from Open-Set for Fine-Grained Self-Supervised Learning", CVPR 2023):
pick from a large open set the images that look like a small target set, then pretrain on both.

The selection is the reference's `simcore_sampling` and `greedy` (sungnyun/openssl-simcore util/sampling.py):
1. Features of the target set X and of the open set U from a retrieval encoder (the same SSL method pretrained on X
   alone), L2-normalised.
2. k-means (sklearn's KMeans(n_clusters=K, random_state=0)) on the target's features, the centroids re-normalised;
   with K >= |X| every target feature is a centroid.
3. Rounds: every centroid, in turn, takes its most similar (cosine) open-set sample not taken in an earlier round
   (two centroids may take the same sample in one round). The round's utility is the mean over centroids of the
   taken samples' similarities.
4. Stopping: the utility of round `patience` (20) times `stop_thresh` (0.95) is a threshold; the first later round
   below it is dropped and the selection ends. The budget is 50 |X| samples with the stopping rule, else
   `ratio` |U|; a round that would pass it contributes a random part of its samples.
Then X and the selection S are pretrained on together, from the same initialisation as the retrieval run
(`input.coreset` in the image configs; jaxssl.data.images).

    python -m jaxssl.coreset --workdir=RUN --open_root=DIR [--open_split=train] [--out=FILE] [--clusters=100]
        [--no_stop --ratio=0.01] [--representation=NAME]

reads RUN's latest checkpoint and config (its training images are X), extracts features of X and of the images in
DIR/<split>/<class>/... (U), selects, and writes a JSON selection (default RUN/coreset.json) naming the open set and
the chosen images; pretraining reads it with --config.input.coreset=FILE.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def target_centroids(target: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """(K, D) unit centroids of the normalised target features: sklearn's KMeans(n_clusters, random_state=seed), or
    the features themselves when clusters >= |X|."""
    target = normalize(target)
    if clusters >= len(target):
        return target
    try:
        from sklearn.cluster import KMeans
    except ImportError as e:
        raise ImportError('SimCore clusters with scikit-learn: pip install "jaxssl[coreset]"') from e
    return normalize(KMeans(n_clusters=clusters, random_state=seed).fit(target).cluster_centers_)


def greedy_rounds(
    similarity: np.ndarray,
    budget: int,
    stop: bool = True,
    patience: int = 20,
    stop_thresh: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(sorted indices of the selected open-set samples, info) of the reference's greedy: `similarity` (K, N)
    between the centroids and the open set. info: 'rounds' kept, 'utilities' per round (the dropped one last when
    the stopping rule fired), 'threshold', 'reason' ('stopped', 'budget', or 'exhausted': every sample taken,
    where the reference would fail)."""
    k, n = similarity.shape
    budget = min(int(budget), n)
    # Each centroid's open set, most similar first; a centroid's pointer only moves forward, past taken samples.
    order = np.argsort(-similarity, axis=1, kind='stable').astype(np.int64 if n >= 2**31 else np.int32)
    pointers = np.zeros(k, np.int64)
    taken = np.zeros(n, bool)
    utilities: list[float] = []
    threshold, reason = 0.0, 'exhausted'
    rng = np.random.default_rng(seed)
    while taken.sum() < budget:
        picks = []
        for c in range(k):
            while pointers[c] < n and taken[order[c, pointers[c]]]:
                pointers[c] += 1
            if pointers[c] < n:
                picks.append((c, int(order[c, pointers[c]])))
                pointers[c] += 1
        if not picks:
            break
        utility = sum(float(similarity[c, i]) for c, i in picks) / k
        utilities.append(utility)
        if len(utilities) == patience:
            threshold = utility * stop_thresh
        if stop and utility < threshold:
            reason = 'stopped'
            break
        new = np.unique([i for _, i in picks])
        left = budget - int(taken.sum())
        if len(new) > left:
            new, reason = rng.choice(new, size=left, replace=False), 'budget'
        taken[new] = True
    rounds = len(utilities) - (reason == 'stopped')
    if reason == 'exhausted' and n > taken.sum() >= budget:
        reason = 'budget'
    info = {'rounds': rounds, 'utilities': utilities, 'threshold': threshold, 'reason': reason}
    return np.flatnonzero(taken), info


def simcore_select(
    target: np.ndarray,
    pool: np.ndarray,
    clusters: int = 100,
    stop: bool = True,
    patience: int = 20,
    stop_thresh: float = 0.95,
    ratio: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(sorted indices into `pool`, info) of SimCore's coreset for target features (|X|, D) from open-set features
    (|U|, D). The budget: 50 |X| with the stopping rule, else int(ratio |U|)."""
    if target.ndim != 2 or pool.ndim != 2 or target.shape[1] != pool.shape[1]:
        raise ValueError(f'target {target.shape} and open-set {pool.shape} features must be (N, D) of the same D')
    if clusters < 1:
        raise ValueError(f'clusters must be >= 1, got {clusters}')
    centroids = target_centroids(target, clusters, seed).astype(np.float32)
    similarity = centroids @ normalize(pool).astype(np.float32).T  # (K, |U|): float32, as |U| can be millions
    budget = 50 * len(target) if stop else int(ratio * len(pool))
    if budget < 1:
        raise ValueError(f'the budget is {budget} samples: raise ratio ({ratio}) or use the stopping rule')
    selected, info = greedy_rounds(similarity, budget, stop, patience, stop_thresh, seed)
    info.update(budget=budget, clusters=len(centroids), selected=len(selected))
    return selected, info


# --- the command line: features of a trained run ------------------------------------------------------------------
def _features(method: Any, restored: Any, mesh: Any, dataset: Any, representation: str | None) -> tuple:
    from jaxssl.evaluate import features

    out = features.extract(method, restored['params'], restored['extra'], dataset, mesh, False)
    names = [k for k, v in out.items() if k not in ('valid', 'index', 'tokens', 'label') and v.ndim == 2]
    name = representation or names[0]
    if name not in names:
        raise ValueError(f"the run has no representation '{name}'; it has {', '.join(names)}")
    valid = out['valid'] > 0
    return out[name][valid], out['index'][valid], name


def _progress(dataset: Any, images: int, name: str, every: int = 100) -> Any:
    """The dataset's batches, printing how many images were read every `every` batches (ImageNet takes a while)."""
    read = 0
    for i, batch in enumerate(dataset):
        read += len(batch['valid'])
        if (i + 1) % every == 0:
            print(f'  features: {min(read, images)} / {images} images of {name}', flush=True)
        yield batch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jaxssl.coreset', description=__doc__.split('\n\n')[0])
    parser.add_argument('--workdir', required=True, help='the retrieval run (pretrained on the target set)')
    parser.add_argument('--open_root', required=True, help='the open set: <open_root>/<split>/<class>/<image>')
    parser.add_argument('--open_split', default='train', help="its split folder ('' : open_root itself)")
    parser.add_argument('--out', default='', help='the selection JSON (default <workdir>/coreset.json)')
    parser.add_argument('--clusters', type=int, default=100)
    parser.add_argument('--no_stop', action='store_true', help='no stopping rule: a budget of ratio x |U|')
    parser.add_argument('--ratio', type=float, default=0.01)
    parser.add_argument('--patience', type=int, default=20)
    parser.add_argument('--stop_thresh', type=float, default=0.95)
    parser.add_argument('--representation', default=None, help="the method's feature (default: its first)")
    parser.add_argument('--max_images', type=int, default=0, help='read at most this many of each set (0: all)')
    args = parser.parse_args(argv)

    import jax

    from jaxssl import train
    from jaxssl.data import images as image_data
    from jaxssl.evaluate.__main__ import load_run_config

    config = load_run_config(args.workdir, [])
    method, mesh, restored, _ = train.restore_checkpoint(config, args.workdir)
    if method.input_key != 'image':
        raise SystemExit(f'{args.workdir} is a {config.method} run on {method.input_key}s: SimCore selects images')
    target_source = image_data.make_image_source(config)  # the run's training images (its classes, if it kept some)
    open_source = image_data.ImageFolderSource(os.path.join(args.open_root, args.open_split))

    def features_of(source: Any) -> tuple[np.ndarray, np.ndarray, str]:
        dataset, images = image_data.make_image_eval_dataset(
            config, split='', batch_size=config.eval.batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(), max_examples=args.max_images, source=source,
        )  # fmt: skip
        return _features(method, restored, mesh, _progress(dataset, images, repr(source)), args.representation)

    target, _, name = features_of(target_source)
    pool, pool_index, _ = features_of(open_source)
    print(f'features ({name}): target {target.shape}, open set {pool.shape} ({open_source!r})', flush=True)
    selected, info = simcore_select(
        target, pool, args.clusters, not args.no_stop, args.patience, args.stop_thresh, args.ratio, config.seed
    )
    indices = np.sort(np.asarray(pool_index)[selected]).astype(int)
    selection = {
        'open': {'data_root': args.open_root, 'split': args.open_split},
        'indices': indices.tolist(),
        'names': [open_source[int(i)]['name'] for i in indices],
        'info': {**info, 'representation': name, 'target_images': len(target), 'open_images': len(pool)},
    }
    out = args.out or os.path.join(args.workdir, 'coreset.json')
    with open(out, 'w') as f:
        json.dump(selection, f)
    counts = collections.Counter(os.path.basename(os.path.dirname(n)) for n in selection['names'])
    print(
        f'selected {len(indices)} of {len(pool)} open-set images in {info["rounds"]} rounds ({info["reason"]}; '
        f'budget {info["budget"]}); most from: {", ".join(f"{k} {v}" for k, v in counts.most_common(5))}\n'
        f'wrote {out}; pretrain on target + coreset with --config.input.coreset={out}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
