"""How much Hash-N and EveryN keep of synthetic CT-like volumes (two blobs drifting across the slices over a noisy
background, as tests/test_slice_reduction.py), at a slow and a fast drift. Prints a table.

    python benchmarks/slice_reduction_synthetic.py [--volumes 20] [--slices 80]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, 'tests')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--volumes', type=int, default=20)
    parser.add_argument('--slices', type=int, default=80)
    args = parser.parse_args()

    from test_slice_reduction import drifting_volume

    from jaxssl import slice_reduction

    rows = [('hash', n) for n in (0, 3, 6, 12, 20)] + [('every_n', 5)]
    print('| drift (pixels / slice) | ' + ' | '.join(f'{s} {n}' for s, n in rows) + ' |')
    print('|---' * (len(rows) + 1) + '|')
    for speed in (0.2, 1.0):
        rng = np.random.default_rng(0)
        kept = np.zeros(len(rows))
        for _ in range(args.volumes):
            volume = drifting_volume(rng, slices=args.slices, speed=speed)
            slices = [slice_reduction.to_uint8(s) for s in volume]
            for j, (strategy, n) in enumerate(rows):
                kept[j] += len(slice_reduction.select(slices, strategy, max_hamming=n, every=n))
        total = args.volumes * args.slices
        print(f'| ~{speed} | ' + ' | '.join(f'{k / total:.1%}' for k in kept) + ' |')


if __name__ == '__main__':
    main()
