"""Evidence for SimCore's selection on the built-in digits: a retrieval run pretrained on the digits 0 and 1 (the
target set) picks from the 1,000 held-out digits of all ten classes (the open set); prints which classes the coreset
holds, against a run of the same method at its random init.

    python benchmarks/coreset_digits.py [--config configs/simclr.py:runlocal] [--steps 300] [--clusters 10]
        [--patience 5] [--workdir /tmp/coreset_digits]
"""

from __future__ import annotations

import argparse
import collections
import json
import os


def write_open_set(root: str) -> None:
    """The digits' 'val' split as class folders of PNGs under root/val."""
    from PIL import Image

    from jaxssl.data import images as image_data

    source = image_data.DigitsSource('val')
    for i in range(len(source)):
        record = source[i]
        folder = os.path.join(root, 'val', f'digit_{record["label"]}')
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(record['image']).save(os.path.join(folder, f'{i:04d}.png'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='configs/simclr.py:runlocal')
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--workdir', default='/tmp/coreset_digits')
    # Sized to the 1,000-image open set: with the reference's 100 centroids and patience 20, up to 2,000 samples
    # are taken before the stopping rule can fire.
    parser.add_argument('--clusters', type=int, default=10)
    parser.add_argument('--patience', type=int, default=5)
    args = parser.parse_args()

    from jaxssl import coreset, train
    from jaxssl.config import load_config

    open_root = os.path.join(args.workdir, 'open')
    if not os.path.isdir(open_root):
        write_open_set(open_root)
    # Two selections per retrieval run: the reference's stopping rule (K and patience sized to the 1,000-image open
    # set: with K = 100 and patience 20 up to 2,000 samples go before the rule can fire), and a budget of 200 samples
    # (ratio 0.2, no rule), as many as the open set holds of the target's classes.
    selections = {
        f'stopping rule, K {args.clusters}, patience {args.patience}': [f'--clusters={args.clusters}',
                                                                         f'--patience={args.patience}'],
        'budget 200 (no rule), K 100': ['--clusters=100', '--no_stop', '--ratio=0.2'],
    }  # fmt: skip
    rows = []
    for name, steps in (('random init', 1), ('pretrained', args.steps)):
        run = os.path.join(args.workdir, f'run_{steps}')
        overrides = [f'train.steps={steps}', 'input.classes=(0, 1)', 'eval.at_end=false', 'train.tensorboard=false',
                     f'checkpoint.every={steps}']  # fmt: skip
        if not os.path.isdir(os.path.join(run, 'checkpoints')):
            train.train(load_config(args.config, overrides), run)
        for label, flags in selections.items():
            out = os.path.join(run, 'coreset.json')
            coreset.main([f'--workdir={run}', f'--open_root={open_root}', '--open_split=val', f'--out={out}', *flags])
            with open(out) as f:
                selection = json.load(f)
            counts = collections.Counter(os.path.basename(os.path.dirname(n))[-1] for n in selection['names'])
            rows.append((name, label, selection, counts))
    print(f'\n{args.config}, target: digits 0 and 1; open set: the 1,000 held-out digits (100 per class)')
    print('| retrieval run | selection | selected | rounds | end | 0 or 1 (precision) | by class 0-9 |')
    print('|---|---|---|---|---|---|---|')
    for name, label, selection, counts in rows:
        size, info = len(selection['indices']), selection['info']
        like = counts['0'] + counts['1']
        by_class = ' '.join(str(counts[str(k)]) for k in range(10))
        print(f"| {name} | {label} | {size} | {info['rounds']} | {info['reason']} | {like} ({like / max(size, 1):.3f}) "
              f'| {by_class} |')  # fmt: skip


if __name__ == '__main__':
    main()
