"""Mirror-BERT evidence: sentence-similarity and retrieval scores of the starting BERT, then of the same BERT after
identity fine-tuning through the trainer (jaxssl.evaluate.sentence: Lee similarity Spearman x 100, noisy-duplicate
retrieval top-1 %, per pooling).

    python benchmarks/mirror_bert_sts.py [--config configs/mirror_bert.py] [--workdir /tmp/mirror_bert_run]
        [--config.key=value ...]

Prints a table and writes <workdir>/sts_comparison.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax


def compare(config_spec: str, workdir: str, overrides: list[str]) -> dict:
    """{'before': scores of the initial params, 'after': scores after training, 'steps', 'final_loss', ...}."""
    from jaxssl import train
    from jaxssl.config import load_config
    from jaxssl.methods import mirror_bert

    config = load_config(config_spec, overrides)
    method = mirror_bert.Method(config)
    example = jax.tree.map(jax.numpy.asarray, method.example_batch(1))
    params, _ = method.init(jax.random.key(config.seed), example)
    start = time.perf_counter()
    before = method.evaluate(params, {}, None)
    summary, _ = train.train(config, workdir)
    after = {k.removeprefix('final_eval/'): v for k, v in summary.items() if k.startswith('final_eval/')}
    return dict(
        config=config_spec,
        overrides=overrides,
        steps=summary['final_step'],
        final_loss=summary['final_loss'],
        seconds=time.perf_counter() - start,
        before=before,
        after=after,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='configs/mirror_bert.py')
    parser.add_argument('--workdir', default='/tmp/mirror_bert_run')
    args, rest = parser.parse_known_args(argv)
    overrides = [r.removeprefix('--config.') for r in rest]
    result = compare(args.config, args.workdir, overrides)
    print(f'{"metric":28s} {"before":>8s} {"after":>8s}')
    for key in sorted(result['before']):
        print(f'{key:28s} {result["before"][key]:8.2f} {result["after"][key]:8.2f}')
    with open(os.path.join(args.workdir, 'sts_comparison.json'), 'w') as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
