"""PreludeNet's evidence on the built-in lit scenes: short runlocal runs of each training setting, several seeds, and
a table of the end-of-run evaluation (depth RMSE, its spread over lightings, next-frame MSE, lighting invariance).

    python benchmarks/prelude_net_evidence.py --steps=300 --seeds=0,1,2 --workdir=/tmp/prelude

Settings (name: config overrides):
  random     loss.prednet_weight=0, depth_grad_scale 0: the depth decoders on a frozen random PredNet
  pretrained two stages: PredNet alone (loss.depth_weight=0), then the decoders on that frozen encoder
             (init_from the first run, loss.prednet_weight=0): the frozen-feature readout
  prelude    the default: PredNet loss for the encoder, depth loss for the decoders only, trained together
  end2end    PredNet loss + depth gradients through the encoder (hybrid=1)
  supervised depth loss only, end to end (no self-supervision)
Each run is `python -m jaxssl.main --config=configs/prelude_net.py:runlocal,...` in its own process; a finished
run (summary.json present) is not rerun.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from evidence_runs import last_eval, print_table

SETTINGS = {
    'random': ['--config.loss.prednet_weight=0'],
    'pretrained': ['--config.loss.prednet_weight=0'],
    'prelude': [],
    'end2end': ['--config.model.depth_grad_scale=1.0'],
    'supervised': ['--config.loss.prednet_weight=0', '--config.model.depth_grad_scale=1.0'],
}
FIRST_STAGE = {'pretrained': ['--config.loss.depth_weight=0']}  # its run is the second stage's init_from
COLUMNS = (
    'depth_rmse/infer', 'depth_rmse/predict', 'depth_rmse/infer/spread', 'depth_shift_rmse/infer',
    'next_frame_mse', 'invariance/r0', 'invariance/r1', 'invariance/r2',
)  # fmt: skip
BASELINES = ('depth_rmse/pixel_mean', 'depth_rmse/copy_last', 'copy_last_mse')  # the same in every run


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

    def train(workdir: str, seed: int, overrides: list[str]) -> None:
        if os.path.exists(os.path.join(workdir, 'summary.json')):
            return
        command = [
            sys.executable, '-m', 'jaxssl.main', '--config=configs/prelude_net.py:runlocal', f'--config.seed={seed}',
            f'--config.train.steps={args.steps}', f'--config.checkpoint.every={args.steps}', f'--workdir={workdir}',
            *overrides, *args.extra.split(),
        ]  # fmt: skip
        print('running', ' '.join(command[2:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    for name in args.settings.split(','):
        for seed in seeds:
            workdir = os.path.join(args.workdir, f'{name}_seed{seed}')
            overrides = list(SETTINGS[name])
            if name in FIRST_STAGE:
                first = os.path.join(args.workdir, f'{name}_stage1_seed{seed}')
                train(first, seed, FIRST_STAGE[name])
                overrides.append(f'--config.init_from={first}')
            train(workdir, seed, overrides)
            results.setdefault(name, []).append(last_eval(workdir))
    print(f'\n{args.steps} steps, seeds {args.seeds}: mean +- std over seeds\n')
    print_table(results, COLUMNS)
    first = next(iter(results.values()))[0]
    print('\nbaselines: ' + ', '.join(f'{k} {first[k]:.4f}' for k in BASELINES if k in first))


if __name__ == '__main__':
    main()
