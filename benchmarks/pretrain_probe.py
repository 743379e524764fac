"""Evidence that pretraining helps: pretrain a method for a bounded CPU budget, then compare frozen-feature probes
(linear, kNN) of the pretrained encoder with the same encoder at its random init. Any config whose method has probes
works: VideoMAE V2 on the built-in moving digits (the default; motion and digit labels), MAE on the built-in MNIST
digits (`--config configs/mae.py:runlocal --config.model.variant=tiny/4 --steps 1000`).

    python benchmarks/pretrain_probe.py [--config FILE.py:ARGS] [--steps 600] [--workdir /tmp/probe_run]
        [--config.key=value ...]

Prints a table and writes <workdir>/probe_comparison.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp


def trivial_losses(method, batches: int = 4) -> dict[str, float]:
    """VideoMAE V2: the objective's loss for predictors that know nothing of the clip beyond the visible tubes: zeros,
    the mean target, and the mean of the visible 4-neighbours in the same temporal slice. A pretraining whose loss
    stays at these values has learned nothing the probes could use."""
    import numpy as np

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
        for shift in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            total += np.roll(grid * seen, shift, axis=(2, 3))
            count += np.roll(seen, shift, axis=(2, 3))
        neighbours = (total / np.maximum(count, 1)).reshape(size, tokens, dim)
        mean = targets[hidden].mean(axis=0)
        totals['zeros'].append(np.mean(np.square(targets).mean(-1)[hidden]))
        totals['mean'].append(np.mean(np.square(targets - mean).mean(-1)[hidden]))
        totals['neighbours'].append(np.mean(np.square(targets - neighbours).mean(-1)[hidden]))
    return {name: float(np.mean(values)) for name, values in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='configs/videomae_v2.py:runlocal')
    parser.add_argument('--steps', type=int, default=600)
    parser.add_argument('--workdir', default='/tmp/jaxssl_probe_run')
    args, rest = parser.parse_known_args()
    overrides = [item[len('--config.') :] for item in rest if item.startswith('--config.')]

    from jaxssl import sharding, train
    from jaxssl.config import load_config, method_module

    config = load_config(args.config, [f'train.steps={args.steps}', 'eval.at_end=false', *overrides])
    start = time.perf_counter()
    summary, state = train.train(config, args.workdir)
    pretrain_seconds = time.perf_counter() - start

    method = method_module(config).Method(config)
    mesh = sharding.make_mesh(config)
    example = jax.tree.map(jnp.asarray, method.example_batch(1))
    random_params, random_extra = method.init(jax.random.key(config.seed), example)  # the run's starting point
    start = time.perf_counter()
    pretrained = method.evaluate(state['params'], state['extra'], mesh)
    random_init = method.evaluate(random_params, random_extra, mesh)
    probe_seconds = time.perf_counter() - start

    baselines = trivial_losses(method) if config.method == 'videomae' else {}  # the tube-target diagnosis
    print(
        f'\npretraining: {summary["final_step"]} steps in {pretrain_seconds:.0f}s, '
        f'final loss {summary.get("final_loss")}'
        + ('; loss of trivial predictors (on hidden tubes): ' if baselines else '')
        + ', '.join(f'{name} {value:.4f}' for name, value in baselines.items())
    )
    print(f'{"probe":34s} {"random init":>12s} {"pretrained":>12s} {"gain":>8s}')
    for key in sorted(pretrained):
        gain = pretrained[key] - random_init[key]
        print(f'{key:34s} {random_init[key]:12.3f} {pretrained[key]:12.3f} {gain:+8.3f}')
    print(f'(probes took {probe_seconds:.0f}s)')
    result = dict(
        steps=summary['final_step'],
        pretrain_seconds=pretrain_seconds,
        final_loss=summary.get('final_loss'),
        trivial_losses=baselines,
        pretrained=pretrained,
        random_init=random_init,
    )
    with open(os.path.join(args.workdir, 'probe_comparison.json'), 'w') as f:
        json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
