"""Selective reduction of CT slices before self-supervised pretraining (Wolf et al., "Less is More: Selective
Reduction of CT Data for Self-Supervised Pre-Training of Deep Learning Models with Contrastive Learning Improves
Downstream Classification Performance", Comput. Biol. Med. 2024): neighbouring slices of a volume are nearly the same
image, so keep one exemplar per run of similar slices and pretrain on the exemplars.

The paper's best strategy, Hash-6, as the released code (Wolfda95/Less_is_More PreTrain-Data_Reduction/
Hash_*_Volume.py and PreTrain-Data_Preprocessing):
1. Each slice min-max scaled to [0, 255] (interval_mapping with range + 1e-5, rounded and saturated as cv2.imwrite
   does) and stored as an 8-bit image; no HU windowing.
2. Its difference hash (imagehash.dhash, hash_size 8): greyscale, resized to 9 x 8 with Lanczos, 64 bits of "left
   pixel < right pixel" per row.
3. Per volume, slices in order: the first remaining slice is an exemplar; every remaining slice within Hamming
   distance `max_hamming` (6) of it, itself included, is removed; repeat until none remain.
The EveryN baseline of the paper (every n-th slice) is `--strategy=every_n`.

    python -m jaxssl.slice_reduction --volumes=DIR --out=DIR [--strategy=hash --max_hamming=6 | every_n --every=5]
        [--split=train]

DIR holds volumes: .npy arrays (slices, H, W), or folders of 2-D slice images (.png / .jpg / .tif, read in sorted
file-name order, as the reference's sorted glob). The kept slices are written as 8-bit PNGs to
<out>/<split>/<volume>/<volume>_<slice>.png, the class-folder layout every image config reads
(--config.input.data_root=<out>). Unreadable volumes and slices are skipped, counted and reported.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

STRATEGIES = ('hash', 'every_n', 'all')
SLICE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A slice min-max scaled to [0, 255] as the reference exports it: (x - min) / (range + 1e-5) x 255, rounded
    half to even and saturated (cv2.imwrite of a float image)."""
    image = np.asarray(image, np.float64)
    low, high = image.min(), image.max()
    scaled = (image - low) / (float(high - low) + 0.00001) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def dhash(image: np.ndarray, hash_size: int = 8) -> np.ndarray:
    """(hash_size^2,) bool: imagehash.dhash's bits of a 2-D uint8 (or RGB) image, row-major."""
    from PIL import Image

    pixels = np.asarray(
        Image.fromarray(np.asarray(image)).convert('L').resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS)
    )
    return (pixels[:, 1:] > pixels[:, :-1]).ravel()


def hash_exemplars(hashes: np.ndarray, max_hamming: int = 6) -> np.ndarray:
    """Indices of the exemplars of one volume's slice hashes (S, bits): the first remaining slice, then removal of
    every remaining slice within `max_hamming` bits of it (itself included), until none remain. Greedy and
    order-dependent, as the reference."""
    remaining = np.arange(len(hashes))
    kept = []
    while len(remaining):
        reference = remaining[0]
        kept.append(int(reference))
        distance = np.logical_xor(hashes[reference], hashes[remaining]).sum(axis=1)
        remaining = remaining[distance > max_hamming]
    return np.asarray(kept, np.int64)


def select(slices: list[np.ndarray], strategy: str, max_hamming: int = 6, every: int = 5) -> np.ndarray:
    """Indices of the slices (uint8 images, in volume order) that `strategy` keeps."""
    if strategy == 'all':
        return np.arange(len(slices))
    if strategy == 'every_n':
        return np.arange(0, len(slices), every)
    if strategy == 'hash':
        return hash_exemplars(np.stack([dhash(s) for s in slices]), max_hamming) if slices else np.zeros(0, np.int64)
    raise ValueError(f"unknown strategy '{strategy}'; valid: {', '.join(STRATEGIES)}")


def read_volume(path: str) -> tuple[list[np.ndarray], list[str], int]:
    """(uint8 slices, their names, unreadable slices) of a volume: a .npy (slices, H, W) array or a folder of slice
    images. Raises ValueError when the volume cannot be read at all."""
    if os.path.isdir(path):
        from PIL import Image

        slices, names, bad = [], [], 0
        for name in sorted(os.listdir(path)):
            if not name.lower().endswith(SLICE_EXTENSIONS):
                continue
            try:
                with Image.open(os.path.join(path, name)) as image:
                    array = np.asarray(image)
            except (OSError, ValueError):
                bad += 1
                continue
            slices.append(array if array.dtype == np.uint8 else to_uint8(array))
            names.append(os.path.splitext(name)[0])
        return slices, names, bad
    try:
        volume = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: {e}') from None
    if volume.ndim != 3 or not np.issubdtype(volume.dtype, np.number) or not np.isfinite(volume).all():
        raise ValueError(f'{path}: need a finite (slices, H, W) array, got {volume.dtype} {volume.shape}')
    stem = os.path.basename(path)[: -len('.npy')]
    return [to_uint8(s) for s in volume], [f'{stem}_{i:04d}' for i in range(len(volume))], 0


def list_volumes(root: str) -> list[str]:
    """The volumes under `root`: .npy files and sub-folders, sorted."""
    entries = sorted(os.listdir(root))
    return [os.path.join(root, e) for e in entries if e.endswith('.npy') or os.path.isdir(os.path.join(root, e))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jaxssl.slice_reduction', description=__doc__.split('\n\n')[0])
    parser.add_argument('--volumes', required=True, help='a folder of .npy volumes or of folders of slice images')
    parser.add_argument('--out', required=True, help='writes <out>/<split>/<volume>/<slice>.png')
    parser.add_argument('--split', default='train')
    parser.add_argument('--strategy', default='hash', choices=STRATEGIES)
    parser.add_argument('--max_hamming', type=int, default=6, help="hash: the paper's Hash-6")
    parser.add_argument('--every', type=int, default=5, help='every_n: keep every n-th slice')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.volumes):
        parser.error(f'--volumes {args.volumes}: not a directory')
    if args.max_hamming < 0 or args.every < 1:
        parser.error('--max_hamming must be >= 0 and --every >= 1')

    from PIL import Image

    volumes = list_volumes(args.volumes)
    if not volumes:
        parser.error(f'--volumes {args.volumes}: no .npy volumes or slice folders')
    total = kept_total = bad_slices = 0
    bad_volumes = []
    for i, path in enumerate(volumes):
        try:
            slices, names, bad = read_volume(path)
        except ValueError as e:
            bad_volumes.append(str(e))
            continue
        bad_slices += bad
        keep = select(slices, args.strategy, args.max_hamming, args.every)
        name = os.path.splitext(os.path.basename(path.rstrip('/')))[0]
        folder = os.path.join(args.out, args.split, name)
        os.makedirs(folder, exist_ok=True)
        for k in keep:
            Image.fromarray(slices[k]).save(os.path.join(folder, f'{names[k]}.png'))
        total, kept_total = total + len(slices), kept_total + len(keep)
        if (i + 1) % 50 == 0 or i + 1 == len(volumes):
            print(f'{i + 1}/{len(volumes)} volumes: kept {kept_total} of {total} slices', flush=True)
    print(
        f'{args.strategy}: kept {kept_total} of {total} slices ({kept_total / max(total, 1):.1%}) from '
        f'{len(volumes) - len(bad_volumes)} volumes into {os.path.join(args.out, args.split)}; skipped '
        f'{len(bad_volumes)} unreadable volumes and {bad_slices} unreadable slices'
    )
    for message in bad_volumes[:10]:
        print(f'  skipped: {message}')
    return 0 if kept_total else 1


if __name__ == '__main__':
    sys.exit(main())
