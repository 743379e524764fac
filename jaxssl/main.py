"""Command line: `python -m jaxssl.main --config=FILE.py[:ARG] [--workdir=DIR] [--config.key=value ...]`.

Trains (or resumes) the configured method. Config mistakes end with one line naming the key and the valid choices
(exit status 2), never a traceback; a run stopped by SIGTERM/SIGINT saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog='python -m jaxssl.main',
        description='Self-supervised pretraining with jaxssl.',
        epilog='Override any config field with --config.<key>=<value>, e.g. --config.input.global_batch=64.',
    )
    parser.add_argument(
        '--config', required=True, help="config file and argument, e.g. 'configs/videomae_v2.py:variant=L'"
    )
    parser.add_argument(
        '--workdir', default=None, help='checkpoints, logs and summaries (default: runs/<config>); reruns resume'
    )
    parser.add_argument('--coordinator_address', default=None, help='multi-process: host:port of process 0')
    parser.add_argument('--num_processes', type=int, default=None, help='multi-process: number of processes')
    parser.add_argument('--process_id', type=int, default=None, help='multi-process: this process')
    parser.add_argument('--distributed', choices=('auto', 'off'), default=None, help="'auto': detect TPU pod / SLURM")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith('--config.'):
            parser.error(f"unrecognised argument '{item}' (config fields are set as --config.<key>=<value>)")
        overrides.append(item[len('--config.') :])
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from jaxssl import distributed
    from jaxssl.config import ConfigError, load_config

    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    try:
        distributed.maybe_initialize(args.coordinator_address, args.num_processes, args.process_id, args.distributed)
    except distributed.DistributedError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    from jaxssl import train

    workdir = args.workdir or train.default_workdir(args.config)
    try:
        train.train(config, workdir)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except train.TrainingError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
