"""NeRF-MAE's evidence on the built-in rooms: short runlocal pretraining runs against the same network at its
random init, several seeds, and a table of the end-of-run evaluation (the voxel-labelling probe on frozen
multi-level features, PSNR of the reconstruction, alpha MSE on masked voxels).

    python benchmarks/nerf_mae_evidence.py --steps=300 --seeds=0,1,2 --workdir=/tmp/nerf_mae

Settings:
  random      the network at its init (one step at lr 0, so nothing moves), evaluated like the others
  pretrained  `--steps` steps of NeRF-MAE pretraining
Each run is `python -m jaxssl.main --config=configs/nerf_mae.py:runlocal,...` in its own process; a finished run
(summary.json present) is not rerun.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
from evidence_runs import last_eval, print_table

SETTINGS = {
    'random': ['--config.optim.base_lr=0', '--config.train.steps=1', '--config.checkpoint.every=1'],
    'pretrained': [],
}
COLUMNS = (
    'voxel_probe/miou', 'voxel_probe/accuracy', 'voxel_probe/input/miou', 'psnr/all', 'psnr/masked',
    'alpha_mse/masked',
)  # fmt: skip
BASELINES = ('psnr/all/mean_colour', 'psnr/masked/mean_colour', 'alpha_mse/masked/mean_alpha')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--seeds', default='0,1,2')
    parser.add_argument('--settings', default=','.join(SETTINGS))
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--extra', default='', help='overrides for every run, space separated')
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(',')]
    results: dict[str, list[dict[str, float]]] = {}
    for name in args.settings.split(','):
        for seed in seeds:
            workdir = os.path.join(args.workdir, f'{name}_seed{seed}')
            if not os.path.exists(os.path.join(workdir, 'summary.json')):
                command = [
                    sys.executable, '-m', 'jaxssl.main', '--config=configs/nerf_mae.py:runlocal',
                    f'--config.seed={seed}', f'--config.train.steps={args.steps}',
                    f'--config.checkpoint.every={args.steps}', f'--workdir={workdir}', *SETTINGS[name],
                    *args.extra.split(),
                ]  # fmt: skip
                print('running', ' '.join(command[2:]), flush=True)
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            results.setdefault(name, []).append(last_eval(workdir))
    print(f'\n{args.steps} steps, seeds {args.seeds}: mean +- std over seeds\n')
    print_table(results, COLUMNS)
    if 'pretrained' in results and 'random' in results:
        gains = [
            p['voxel_probe/miou'] - r['voxel_probe/miou']
            for p, r in zip(results['pretrained'], results['random'], strict=True)
        ]
        print(f'\nvoxel probe mIoU gain over random init: {np.mean(gains):+.3f} +- {np.std(gains):.3f} per seed')
    first = next(iter(results.values()))[0]
    print('baselines: ' + ', '.join(f'{k} {first[k]:.4f}' for k in BASELINES if k in first))


if __name__ == '__main__':
    main()
