"""Input-pipeline throughput: clips/s of jaxssl.data.make_pretrain_dataset, with VideoMAE masks, on this machine.

Two workloads, each with 0 worker processes (threads only) and with worker processes:
  moving_digits  the runlocal config: 64x64 H.264 clips -> 8 frames, stride 4, 32x32 crops, 1 view;
  224            synthetic 224x224 H.264 videos (96 frames, keyframe every 32) -> 16 frames, stride 4, 224 crops,
                 4 views per clip (the reference pretraining recipe).
Usage: python benchmarks/input_throughput.py [--batches 10] [--workers 2] [--cache_dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from configs.videomae_v2 import get_config
from jaxssl.data import make_pretrain_dataset, moving_digits
from jaxssl.data.encode import write_mp4
from jaxssl.methods import videomae


def synthetic_videos(folder: str, count: int = 12, frames: int = 96, size: int = 224) -> str:
    """Smooth moving textures plus a moving square: compresses and decodes like real footage, not like noise."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    lines = []
    for v in range(count):
        rng = np.random.default_rng(v)
        (fx, fy), phase = rng.uniform(0.02, 0.08, 2).tolist(), rng.uniform(0, 6)
        clip = np.empty((frames, size, size, 3), np.uint8)
        for t in range(frames):
            for c in range(3):
                wave = np.sin(fx * xs + fy * ys + phase + 0.15 * t + c)
                clip[t, ..., c] = (127 + 100 * wave).astype(np.uint8)
            x = (5 * t + 40 * v) % (size - 40)
            clip[t, 60:100, x : x + 40] = 255
        path = os.path.join(folder, f'{v:03d}.mp4')
        write_mp4(path, clip, fps=24, gop=32, crf=23)
        lines.append(f'{v:03d}.mp4 0 -1\n')
    list_file = os.path.join(folder, 'list.txt')
    with open(list_file, 'w') as f:
        f.writelines(lines)
    return list_file


def measure(config, batches: int) -> float:
    transform = lambda sample, rng: {**sample, **videomae.sample_masks(config, rng)}
    it = iter(make_pretrain_dataset(config, seed=0, sample_transform=transform))
    next(it)  # start-up (worker processes, first batch) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * config.input.global_batch / (time.perf_counter() - start)
    it.close()  # stops worker processes now rather than in noisy interpreter-exit finalizers
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batches', type=int, default=10)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--cache_dir', default=moving_digits.DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    print(f'{os.cpu_count()} CPUs; clips/s after the first batch, {args.batches} batches of 8 clips')

    small = get_config('runlocal')
    small.input.cache_dir, small.input.moving_digits_size = args.cache_dir, 'tiny'
    with tempfile.TemporaryDirectory() as folder:
        big = get_config('variant=B')
        big.input.dataset, big.input.list_file, big.input.data_root = 'list', synthetic_videos(folder), folder
        big.input.global_batch = 8
        for name, config in (('moving_digits 8x32px x1 view', small), ('224px 16x224 x4 views', big)):
            for workers in (0, args.workers):
                config.input.num_workers = workers
                config.input.read_threads = 1 if workers else os.cpu_count() or 1
                rate = measure(config, args.batches)
                print(
                    f'{name:30s} workers={workers} threads={config.input.read_threads}: '
                    f'{rate:8.1f} clips/s ({rate * config.input.num_sample:8.1f} views/s)',
                    flush=True,
                )


if __name__ == '__main__':
    main()
