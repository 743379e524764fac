"""Evaluate a training run's checkpoint: `python -m jaxssl.evaluate --workdir=DIR [--step=N] [--config.key=value ...]`.

Loads DIR/config.json (the resolved config the run saved) with any overrides, restores the params of the latest (or
given) checkpoint onto the current devices, runs the method's evaluation (probes for pretraining methods) and its
pictures, prints the metrics and writes DIR/eval_<step>.json and DIR/pictures/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import ml_collections


def load_run_config(workdir: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    from jaxssl.config import ConfigError, apply_override, check_trainer_config, method_module

    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
        raise ConfigError(f"no config.json in '{workdir}': is it a jaxssl training workdir?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    for item in overrides:
        key, _, value = item.partition('=')
        apply_override(config, key, value)
    check = getattr(method_module(config), 'check_config', None)
    if check is not None:
        check(config)
    check_trainer_config(config)
    config.lock()
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jaxssl.evaluate', description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [item for item in rest if not item.startswith('--config.')]
    if bad:
        parser.error(f'unrecognised arguments: {" ".join(bad)}')

    from jaxssl import train
    from jaxssl.config import ConfigError

    try:
        config = load_run_config(args.workdir, [item[len('--config.') :] for item in rest])
        metrics = train.evaluate_checkpoint(config, args.workdir, args.step)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == '__main__':
    sys.exit(main())
