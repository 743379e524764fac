"""Run logging: JSON lines + TensorBoard event files in the workdir, and a compact console progress line.

Only process 0 writes; other processes get a writer that does nothing. The workdir may be local or `gs://...`
(see jaxssl.paths): objects cannot be appended to, so a remote metrics.jsonl is rewritten whole, at most every
`sync_seconds` and on close. TensorBoard writes to `gs://` itself when google-cloud-storage is installed (the
`gcs` extra); otherwise its events go to a local folder that the writer names when it starts.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import sys
import time
from typing import Any

import numpy as np

from jaxssl import paths

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


def write_text(workdir: str, name: str, text: str) -> None:
    """Writes workdir/name (config.json, summary.json, ...), local or remote."""
    paths.write_text(paths.join(workdir, name), text)


# Object stores tensorboardX can write to: the module each needs, and how to get it.
_TENSORBOARD_CLIENTS = {
    'gs': ('google.cloud.storage', 'pip install "jaxssl[gcs]" to write them to the bucket'),
    's3': ('boto3', 'pip install boto3 to write them to the bucket'),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (e.g. no 'google' at all)
        return False


def tensorboard_dir(workdir: str) -> tuple[str, str | None]:
    """(folder for TensorBoard events, a note when they cannot go into a remote workdir and are kept locally)."""
    folder = paths.join(workdir, 'tensorboard')
    if not paths.is_remote(workdir):
        return folder, None
    scheme = folder.partition('://')[0]
    module, hint = _TENSORBOARD_CLIENTS.get(scheme, (None, f'tensorboardX cannot write to {scheme}://'))
    if module and _importable(module):
        return folder, None
    local = os.path.join(os.path.expanduser('~/.cache/jaxssl/tensorboard'), folder.replace('://', '/', 1))
    return local, f'TensorBoard events for {workdir} are written locally to {local} ({hint})'


class _LocalLines:
    """Appends lines to a local file, flushed after each write."""

    def __init__(self, path: str):
        self._file = open(path, 'a')

    def write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _RemoteLines:
    """Appends lines to an object (gs://...): the whole file is uploaded again, at most every `sync_seconds` and on
    close, starting from what a previous run left there (a resumed run keeps its history)."""

    def __init__(self, path: str, sync_seconds: float):
        self._path = path
        self._text = paths.read_text(path) or ''
        self._sync_seconds = sync_seconds
        self._last_sync = -float('inf')
        self._dirty = False
        atexit.register(self.sync)  # a run that ends by an exception still uploads its last rows

    def write(self, text: str) -> None:
        self._text += text
        self._dirty = True
        if time.monotonic() - self._last_sync >= self._sync_seconds:
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            paths.write_text(self._path, self._text)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        atexit.unregister(self.sync)


class MetricWriter:
    """Writes scalars to workdir/metrics.jsonl and TensorBoard; prints progress lines."""

    def __init__(self, workdir: str | None, active: bool = True, tensorboard: bool = True, sync_seconds: float = 30):
        self.active = active and workdir is not None
        self.console = active
        self._jsonl = None
        self._tb = None
        if self.active:
            jsonl = paths.join(workdir, 'metrics.jsonl')
            if paths.is_remote(workdir):
                self._jsonl = _RemoteLines(jsonl, sync_seconds)
            else:
                os.makedirs(os.path.dirname(jsonl), exist_ok=True)
                self._jsonl = _LocalLines(jsonl)
            if tensorboard:
                from tensorboardX import SummaryWriter

                folder, note = tensorboard_dir(workdir)
                if note:
                    self.print(note)
                self._tb = SummaryWriter(folder)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({'step': step, 'time': time.time(), **clean}) + '\n')
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
