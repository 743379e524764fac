"""Evidence that a pretraining method helps: pretrain for a bounded CPU budget, then compare frozen-feature probes
(linear, kNN) of the pretrained model with the same model at its random init. Methods whose evaluation also probes the
input itself (a 'raw' representation, e.g. T-JEPA's table rows) get a third comparison: pretrained vs raw features.
VideoMAE V2 runs also print the loss of trivial predictors, to tell a pretraining that learned nothing.

    python benchmarks/pretrain_probe.py [--config configs/videomae_v2.py:runlocal] [--steps 600] [--seeds 0,1,2]
        [--workdir /tmp/probe_run] [--config.key=value ...]

With several seeds, each seed pretrains its own run (<workdir>/seed_<s>, config.seed = s) and the table shows the mean
and the standard deviation over seeds. Prints a table and writes <workdir>/probe_comparison.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def trivial_losses(method, batches: int = 4) -> dict[str, float]:
    """VideoMAE V2: the objective's loss for predictors that know nothing of the clip beyond the visible tubes: zeros,
    the mean target, and the mean of the visible 4-neighbours in the same temporal slice. A pretraining whose loss
    stays at these values has learned nothing the probes could use."""
    from jaxssl.methods import videomae

    config, (slices, height, width) = method.config, method.grid
    dataset, _ = method.dataset(config.seed, 0, 1)
    totals = dict(zeros=[], mean=[], neighbours=[])
    for _, batch in zip(range(batches), dataset, strict=False):
        targets = np.asarray(
            videomae.patch_targets(
                jnp.asarray(batch['video']), method.model.patch, method.model.tubelet, config.loss.normalize_target
            )
        )
        size, tokens, dim = targets.shape
        visible = np.zeros((size, tokens), bool)
        np.put_along_axis(visible, batch['visible_idx'], True, axis=1)
        hidden = ~visible
        grid = targets.reshape(size, slices, height, width, dim)
        seen = visible.reshape(size, slices, height, width, 1)
        total, count = np.zeros_like(grid), np.zeros_like(seen, np.float32)
        # Shift by one position without wrapping around: a border tube has only the neighbours inside the grid.
        padded_grid = np.pad(grid * seen, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
        padded_seen = np.pad(seen.astype(np.float32), ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            window = np.s_[:, :, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            total += padded_grid[window]
            count += padded_seen[window]
        neighbours = (total / np.maximum(count, 1)).reshape(size, tokens, dim)
        mean = targets[hidden].mean(axis=0)
        totals['zeros'].append(np.mean(np.square(targets).mean(-1)[hidden]))
        totals['mean'].append(np.mean(np.square(targets - mean).mean(-1)[hidden]))
        totals['neighbours'].append(np.mean(np.square(targets - neighbours).mean(-1)[hidden]))
    return {name: float(np.mean(values)) for name, values in totals.items()}


def compare(config_spec: str, steps: int, seed: int, workdir: str, overrides: list[str]) -> dict:
    """Pretrains one run and probes it and its random init: {'pretrained': {...}, 'random_init': {...}, ...}."""
    from jaxssl import sharding, train
    from jaxssl.config import load_config, method_module

    config = load_config(config_spec, [f'train.steps={steps}', f'seed={seed}', 'eval.at_end=false', *overrides])
    start = time.perf_counter()
    summary, state = train.train(config, workdir)
    pretrain_seconds = time.perf_counter() - start

    method = method_module(config).Method(config)
    mesh = sharding.make_mesh(config)
    example = jax.tree.map(jnp.asarray, method.example_batch(1))
    random_params, random_extra = method.init(jax.random.key(config.seed), example)  # the run's starting point
    baselines = trivial_losses(method) if config.method == 'videomae' else {}  # the tube-target diagnosis
    start = time.perf_counter()
    pretrained = method.evaluate(state['params'], state['extra'], mesh)
    random_init = method.evaluate(random_params, random_extra, mesh)
    return dict(
        seed=seed,
        steps=summary['final_step'],
        final_loss=summary.get('final_loss'),
        trivial_losses=baselines,
        pretrain_seconds=pretrain_seconds,
        probe_seconds=time.perf_counter() - start,
        pretrained=pretrained,
        random_init=random_init,
    )


def raw_key(key: str) -> str | None:
    """'label/flatten/linear' -> 'label/raw/linear' (the same label and probe on the input features)."""
    parts = key.split('/')
    return '/'.join([*parts[:-2], 'raw', parts[-1]]) if len(parts) >= 3 and parts[-2] != 'raw' else None


def table(runs: list[dict]) -> str:
    """Mean (and std over seeds) of each probe: random init, pretrained, gain, and pretrained - raw where present."""
    stat = lambda kind, key: np.array([run[kind][key] for run in runs])
    show = lambda v: f'{v.mean():.3f}' + (f'±{v.std():.3f}' if len(v) > 1 else '')
    keys = sorted(runs[0]['pretrained'])
    has_raw = any(raw_key(k) in runs[0]['pretrained'] for k in keys)
    width = 12 if len(runs) == 1 else 13
    header = f'{"probe":34s} {"random init":>{width}s} {"pretrained":>{width}s} {"gain":>{width}s}'
    lines = [header + (f' {"vs raw":>{width}s}' if has_raw else '')]
    for key in keys:
        pretrained, random_init = stat('pretrained', key), stat('random_init', key)
        cells = [show(random_init), show(pretrained), show(pretrained - random_init)]
        raw = raw_key(key)
        if has_raw and raw in runs[0]['pretrained']:
            cells.append(show(pretrained - stat('pretrained', raw)))
        lines.append(f'{key:34s} ' + ' '.join(f'{cell:>{width}s}' for cell in cells))
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='configs/videomae_v2.py:runlocal')
    parser.add_argument('--steps', type=int, default=600)
    parser.add_argument('--seeds', default='0', help='comma-separated pretraining seeds (config.seed)')
    parser.add_argument('--workdir', default='/tmp/jaxssl_probe_run')
    args, rest = parser.parse_known_args()
    overrides = [item[len('--config.') :] for item in rest if item.startswith('--config.')]
    seeds = [int(s) for s in args.seeds.split(',')]

    runs = []
    for seed in seeds:
        workdir = args.workdir if len(seeds) == 1 else os.path.join(args.workdir, f'seed_{seed}')
        runs.append(compare(args.config, args.steps, seed, workdir, overrides))
        run = runs[-1]
        print(
            f'\nseed {seed}: {run["steps"]} steps in {run["pretrain_seconds"]:.0f}s, final loss {run["final_loss"]}, '
            f'probes {run["probe_seconds"]:.0f}s'
        )
        if run['trivial_losses']:
            shown = ', '.join(f'{name} {value:.4f}' for name, value in run['trivial_losses'].items())
            print(f'loss of trivial predictors (on hidden tubes): {shown}')
    print(f'\n{args.config} {" ".join(rest)}, {args.steps} steps, seeds {args.seeds}')
    print(table(runs))
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, 'probe_comparison.json'), 'w') as f:
        json.dump(dict(config=args.config, overrides=overrides, runs=runs), f, indent=2)


if __name__ == '__main__':
    main()
