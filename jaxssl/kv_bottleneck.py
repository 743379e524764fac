"""Discrete Key-Value Bottleneck (Träuble et al., "Discrete Key-Value Bottleneck", ICML 2023) on a frozen encoder, and
the class-incremental protocol it is evaluated with:

    python -m jaxssl.kv_bottleneck --workdir=DIR [--representation=NAME] [--classes_per_task=2] [--epochs=...]

A frozen representation z (D,) is split into C parts by fixed random projections P_c (D, d_k) with unit-norm columns
(or by chunks of z); each part selects its nearest key (squared Euclidean) in codebook c of J keys; the logits are
the mean over codebooks of the selected keys' values (J, classes): a decoder without parameters. Keys are fitted
once, without labels, by EMA k-means (decay 0.95, Laplace-smoothed counts, optional dead-key replacement) and then
frozen; only the values are trained (cross entropy with label smoothing, SGD without weight decay, gradient clipping),
so a gradient reaches only the values of the keys an input selects: learning new classes leaves the values other
inputs read untouched. At test time keys never selected in training are skipped.

Reference: ftraeuble/discrete_key_value_bottleneck (key_value_bottleneck/core.py KeyValueBottleneck, splitters.py,
utils.py) and the paper's CIFAR-10 configuration (shared/reference/methods/
tools_simcore_ctreduction_ssdd_ped_dkvb_advencoder_rkhs.md section 5). The CLI reads features of a training run
(jaxssl.evaluate.features over its evaluation splits), fits the keys on the unlabelled training features, trains the
values task by task (`classes_per_task` classes at a time, in label order for seeds 0 and 42 and in a seeded
random order otherwise, as the reference; no task labels, one head over all classes), and reports test accuracy over
all classes after every task, beside the reference's linear-probe baseline trained the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SPLITTERS = ('random_projection', 'chunk')
HIGHEST = jax.lax.Precision.HIGHEST  # full float32 matmuls (TF32 could flip near-tie key choices on GPUs)
PREDICT_ROWS = 256  # test features per call: the (C, rows, J) distance table is the memory bound


@dataclasses.dataclass(frozen=True)
class Bottleneck:
    """Sizes and key-fitting settings (defaults: the paper's CIFAR-10 configuration)."""

    codebooks: int = 256
    keys: int = 4096  # key-value pairs per codebook
    key_dim: int = 14
    splitter: str = 'random_projection'  # 'chunk': z cut into `codebooks` parts of D / codebooks (key_dim ignored)
    decay: float = 0.95  # EMA k-means
    eps: float = 1e-5  # Laplace smoothing of the EMA counts
    dead_threshold: float = 0.0  # keys whose EMA count falls below it are replaced by batch samples (0: never)


def init_state(rng: jax.Array, feature_dim: int, num_classes: int, b: Bottleneck) -> dict[str, jax.Array]:
    """Random projections, N(0, 1) keys (the reference's 'random' init: key averages = keys, counts 0), zero values."""
    if b.splitter not in SPLITTERS:
        raise ValueError(f"unknown splitter '{b.splitter}'; valid: {', '.join(SPLITTERS)}")
    key_dim = b.key_dim
    if b.splitter == 'chunk':
        if feature_dim % b.codebooks:
            raise ValueError(f'{feature_dim} features do not split into {b.codebooks} chunks')
        key_dim = feature_dim // b.codebooks
    proj_rng, key_rng = jax.random.split(rng)
    projection = jax.random.normal(proj_rng, (b.codebooks, feature_dim, key_dim))
    projection = projection / jnp.linalg.norm(projection, axis=1, keepdims=True)
    keys = jax.random.normal(key_rng, (b.codebooks, b.keys, key_dim))
    zeros = jnp.zeros((b.codebooks, b.keys))
    return {
        'projection': projection,
        'keys': keys,
        'keys_avg': keys,
        'cluster_size': zeros,
        'counts': zeros,
        'values': jnp.zeros((b.codebooks, b.keys, num_classes)),
    }


def split(z: jax.Array, projection: jax.Array, splitter: str) -> jax.Array:
    """(B, D) -> (C, B, d_k) key queries."""
    z = z.astype(jnp.float32)
    if splitter == 'chunk':
        c = projection.shape[0]
        return jnp.moveaxis(z.reshape(z.shape[0], c, -1), 1, 0)
    return jnp.einsum('bd,cdk->cbk', z, projection, precision=HIGHEST)


def nearest_keys(queries: jax.Array, keys: jax.Array, usable: jax.Array | None = None) -> jax.Array:
    """(C, B, d_k), (C, J, d_k) -> (C, B) index of the nearest key (squared Euclidean) among the `usable` ones."""
    dist = (
        jnp.sum(jnp.square(queries), -1)[..., None]
        - 2 * jnp.einsum('cbk,cjk->cbj', queries, keys, precision=HIGHEST)
        + jnp.sum(jnp.square(keys), -1)[:, None, :]
    )
    if usable is not None:
        dist = jnp.where(usable[:, None, :], dist, jnp.inf)
    return jnp.argmin(dist, axis=-1)


@functools.partial(jax.jit, static_argnames=('b',))
def fit_keys_step(state: dict, z: jax.Array, rng: jax.Array, b: Bottleneck) -> dict:
    """One EMA k-means step on a batch of features (the reference's update with `update_keys`)."""
    queries = split(z, state['projection'], b.splitter)
    onehot = jax.nn.one_hot(nearest_keys(queries, state['keys']), b.keys)  # (C, B, J)
    cluster_size = b.decay * state['cluster_size'] + (1 - b.decay) * onehot.sum(1)
    keys_avg = b.decay * state['keys_avg'] + (1 - b.decay) * jnp.einsum('cbk,cbj->cjk', queries, onehot)
    total = cluster_size.sum(-1, keepdims=True)
    smoothed = (cluster_size + b.eps) / (total + b.keys * b.eps) * total
    keys = keys_avg / smoothed[..., None]
    if b.dead_threshold > 0:  # dead keys take random samples of the batch; their EMA sums are left as they are
        pick = jax.random.randint(rng, (b.codebooks, b.keys), 0, queries.shape[1])
        samples = jnp.take_along_axis(queries, pick[..., None], axis=1)
        keys = jnp.where((cluster_size < b.dead_threshold)[..., None], samples, keys)
    return {**state, 'keys': keys, 'keys_avg': keys_avg, 'cluster_size': cluster_size}


def logits(values: jax.Array, indices: jax.Array) -> jax.Array:
    """(C, J, V), (C, B) -> (B, V): the mean over codebooks of the selected values."""
    return jnp.take_along_axis(values, indices[..., None], axis=1).mean(axis=0)


@functools.partial(jax.jit, static_argnames=('b',))
def _predict_rows(state: dict, z: jax.Array, b: Bottleneck) -> jax.Array:
    queries = split(z, state['projection'], b.splitter)
    used = state['counts'] > 0
    usable = jnp.where(used.any(axis=1, keepdims=True), used, True)
    return jnp.argmax(logits(state['values'], nearest_keys(queries, state['keys'], usable)), axis=-1)


def predict(state: dict, z: np.ndarray, b: Bottleneck) -> np.ndarray:
    """(N,) classes, PREDICT_ROWS rows at a time; keys never selected while training values are skipped (when any
    was counted)."""
    rows = range(0, len(z), PREDICT_ROWS)
    return np.concatenate([np.asarray(_predict_rows(state, jnp.asarray(z[i : i + PREDICT_ROWS]), b)) for i in rows])


def make_value_step(b: Bottleneck, lr: float, clip: float, label_smoothing: float, num_classes: int):
    """A jitted SGD step on the values only (no weight decay: the update stays on the selected keys' values)."""
    optimizer = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr))

    @jax.jit
    def step(state: dict, opt_state: Any, z: jax.Array, y: jax.Array) -> tuple[dict, Any, jax.Array]:
        indices = nearest_keys(split(z, state['projection'], b.splitter), state['keys'])
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), label_smoothing)
        loss_fn = lambda v: optax.softmax_cross_entropy(logits(v, indices), targets).mean()
        loss, grads = jax.value_and_grad(loss_fn)(state['values'])
        updates, opt_state = optimizer.update(grads, opt_state, state['values'])
        counts = state['counts'] + jax.nn.one_hot(indices, b.keys).sum(1)
        return {**state, 'values': optax.apply_updates(state['values'], updates), 'counts': counts}, opt_state, loss

    return optimizer, step


def batches(n: int, batch_size: int, rng: np.random.Generator):
    """A shuffled pass in batches; the last one may be smaller (a DataLoader without drop_last)."""
    order = rng.permutation(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def fit_keys(state: dict, features: np.ndarray, b: Bottleneck, epochs: int, batch_size: int, seed: int) -> dict:
    """EMA k-means over `epochs` passes of the (unlabelled) features; the keys are frozen afterwards."""
    rng, key = np.random.default_rng(seed), jax.random.fold_in(jax.random.key(seed), 1)  # not init_state's key
    for _ in range(epochs):
        for rows in batches(len(features), batch_size, rng):
            key, sub = jax.random.split(key)
            state = fit_keys_step(state, jnp.asarray(features[rows]), sub, b)
    return state


def make_linear_step(num_classes: int, lr: float, clip: float, label_smoothing: float):
    """The reference's linear-probe baseline: SGD (no weight decay) on a (D, classes) layer with bias, clipped and
    label-smoothed as the values are."""
    optimizer = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr))

    @jax.jit
    def step(params: dict, opt_state: Any, z: jax.Array, y: jax.Array):
        targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), label_smoothing)
        loss_fn = lambda p: optax.softmax_cross_entropy(z @ p['w'] + p['b'], targets).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, step


def class_incremental(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    tasks: Sequence[Sequence[int]],
    b: Bottleneck,
    *,
    key_epochs: int = 10,
    epochs: int = 2000,
    batch_size: int = 256,
    lr: float = 0.3,
    clip: float = 1.0,
    label_smoothing: float = 0.1,
    probe_lr: float = 1e-3,  # the reference's baseline lr
    seed: int = 0,
    key_features: np.ndarray | None = None,
    verbose: bool = False,
) -> dict[str, list[float]]:
    """Fits the keys on `key_features` (default: every training feature, without labels), then trains the values and
    a linear probe on `tasks` in order (each sees only its classes' training features), both over all classes; returns
    each one's test accuracy over all classes after every task."""
    (x_train, y_train), (x_test, y_test) = train, test
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if verbose:
        print(f'fitting keys: {key_epochs} passes over {len(x_train if key_features is None else key_features)} '
              f'features; then {len(tasks)} tasks of {epochs} epochs', flush=True)  # fmt: skip
    state = init_state(jax.random.key(seed), x_train.shape[1], num_classes, b)
    state = fit_keys(state, x_train if key_features is None else key_features, b, key_epochs, batch_size, seed)
    value_opt, value_step = make_value_step(b, lr, clip, label_smoothing, num_classes)
    # torch's nn.Linear init: U(+-1 / sqrt(fan_in)) for weights and bias.
    bound = 1 / np.sqrt(x_train.shape[1])
    w_rng, b_rng = jax.random.split(jax.random.fold_in(jax.random.key(seed), 2))
    probe = {
        'w': jax.random.uniform(w_rng, (x_train.shape[1], num_classes), minval=-bound, maxval=bound),
        'b': jax.random.uniform(b_rng, (num_classes,), minval=-bound, maxval=bound),
    }
    probe_opt, probe_step = make_linear_step(num_classes, probe_lr, clip, label_smoothing)
    value_state, probe_state = value_opt.init(state['values']), probe_opt.init(probe)
    rng = np.random.default_rng(seed)
    results = {'kv_bottleneck': [], 'linear_probe': []}
    for classes in tasks:
        rows = np.flatnonzero(np.isin(y_train, classes))
        x, y = x_train[rows], y_train[rows]
        for _ in range(epochs):
            for batch in batches(len(x), batch_size, rng):
                z, t = jnp.asarray(x[batch]), jnp.asarray(y[batch])
                state, value_state, _ = value_step(state, value_state, z, t)
                probe, probe_state, _ = probe_step(probe, probe_state, z, t)
        kv = predict(state, x_test, b)
        linear = np.argmax(np.asarray(jnp.asarray(x_test) @ probe['w'] + probe['b']), axis=1)
        results['kv_bottleneck'].append(float(np.mean(kv == y_test)))
        results['linear_probe'].append(float(np.mean(linear == y_test)))
        if verbose:
            print(f'after task {len(results["linear_probe"])} {list(classes)}: kv_bottleneck '
                  f'{results["kv_bottleneck"][-1]:.3f}, linear_probe {results["linear_probe"][-1]:.3f} (test accuracy '
                  f'over all {num_classes} classes)', flush=True)  # fmt: skip
    return results


def run_features(workdir: str, representation: str, overrides: Sequence[str], step: int | None):
    """((train features, labels), (test features, labels)) of a run's evaluation splits (eval.train_split, eval.split,
    capped by eval.max_train_clips / eval.max_test_clips)."""
    from jaxssl import train
    from jaxssl.config import ConfigError
    from jaxssl.evaluate import frozen
    from jaxssl.evaluate.__main__ import load_run_config

    config = load_run_config(workdir, overrides)
    method, mesh, restored, _ = train.restore_checkpoint(config, workdir, step)
    splits = frozen.extract_splits(method, restored['params'], restored['extra'], mesh, config.eval)
    out = []
    for name in ('train', 'test'):
        rows = splits[name]
        if representation not in rows:
            names = ', '.join(k for k in rows if k not in ('index', 'valid', 'label') and rows[k].ndim == 2)
            raise ConfigError(f"no representation '{representation}'; this method gives: {names}")
        keep = rows['valid'] > 0
        out.append((np.asarray(rows[representation][keep], np.float32), np.asarray(rows['label'][keep])))
    return tuple(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jaxssl.kv_bottleneck', description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', required=True, help='a training run whose frozen features are read')
    parser.add_argument('--representation', default='cls', help="one of the method's representations")
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
    parser.add_argument('--classes_per_task', type=int, default=2)
    parser.add_argument('--codebooks', type=int, default=256)
    parser.add_argument('--keys', type=int, default=4096)
    parser.add_argument('--key_dim', type=int, default=14)
    parser.add_argument('--key_epochs', type=int, default=10, help='EMA k-means passes over the training features')
    parser.add_argument(
        '--dead_threshold',
        type=float,
        default=-1.0,
        help="EMA count under which a key is re-seeded (default: 0.1 x batch / keys, the paper's)",
    )
    parser.add_argument('--epochs', type=int, default=2000, help='passes over each task')
    parser.add_argument('--batch_size', type=int, default=256)
    parser.add_argument('--lr', type=float, default=0.3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='', help='JSON results (default: DIR/kv_bottleneck.json)')
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [item for item in rest if not item.startswith('--config.')]
    if bad:
        parser.error(f'unrecognised arguments: {" ".join(bad)}')
    if args.classes_per_task < 1 or args.epochs < 1 or args.codebooks < 1 or args.keys < 1:
        parser.error('--classes_per_task, --epochs, --codebooks and --keys must be >= 1')

    from jaxssl.config import ConfigError

    try:
        train, test = run_features(args.workdir, args.representation, [r[len('--config.') :] for r in rest], args.step)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    classes = sorted(set(train[1].tolist()))
    if args.seed not in (0, 42):  # the reference keeps label order for these seeds and shuffles the classes otherwise
        classes = [int(k) for k in np.random.default_rng(args.seed).permutation(classes)]
    tasks = [classes[i : i + args.classes_per_task] for i in range(0, len(classes), args.classes_per_task)]
    dead = args.dead_threshold if args.dead_threshold >= 0 else 0.1 * args.batch_size / args.keys
    b = Bottleneck(codebooks=args.codebooks, keys=args.keys, key_dim=args.key_dim, dead_threshold=dead)
    results = class_incremental(train, test, tasks, b, key_epochs=args.key_epochs, epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr, seed=args.seed, verbose=True)  # fmt: skip
    results = {'tasks': tasks, 'representation': args.representation, **results}
    with open(args.out or os.path.join(args.workdir, 'kv_bottleneck.json'), 'w') as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
