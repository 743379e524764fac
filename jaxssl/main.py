"""Command line: `python -m jaxssl.main --config=configs/videomae_v2.py:runlocal [--config.key=value ...]`.

Config mistakes end with one line naming the key and the valid choices (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxssl.config import ConfigError, load_config


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog='python -m jaxssl.main',
        description='Self-supervised pretraining with jaxssl.',
        epilog='Override any config field with --config.<key>=<value>, e.g. --config.input.global_batch=64.',
    )
    parser.add_argument(
        '--config',
        required=True,
        help="config file and argument, e.g. 'configs/videomae_v2.py:variant=L'",
    )
    parser.add_argument('--workdir', default=None, help='directory for checkpoints, logs and summaries')
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith('--config.'):
            parser.error(f"unrecognised argument '{item}' (config fields are set as --config.<key>=<value>)")
        overrides.append(item[len('--config.') :])
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    from jaxssl import smoke

    smoke.run(config)
    return 0


if __name__ == '__main__':
    sys.exit(main())
