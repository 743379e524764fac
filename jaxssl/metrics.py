"""Run logging: JSON lines + TensorBoard event files in the workdir, and a compact console progress line.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

# Dense bf16 peak FLOP/s per device, by substrings of jax's device_kind (vendor spec sheets).
PEAK_BF16_FLOPS = {
    'H200': 989e12,
    'H100': 989e12,
    'A100': 312e12,
    'L4': 121e12,
    'TPU v6': 918e12,
    'TPU v5p': 459e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v4': 275e12,
}


def peak_flops(device_kind: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{secs:02d}s'


class MetricWriter:
    """Writes scalars to workdir/metrics.jsonl and TensorBoard; prints progress lines."""

    def __init__(self, workdir: str | None, active: bool = True, tensorboard: bool = True):
        self.active = active and workdir is not None
        self.console = active
        self._jsonl = None
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({'step': step, 'time': time.time(), **clean}) + '\n')
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 or [0, 1] float image to TensorBoard."""
        if self.active and self._tb is not None:
            self._tb.add_image(tag, np.asarray(image), step, dataformats='HWC')

    def print(self, message: str) -> None:
        if self.console:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
