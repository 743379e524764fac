"""Representations of a frozen model over an evaluation dataset, gathered on every process."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxssl import sharding


def _fetch(tree: Any) -> Any:
    """Global arrays -> their full numpy values on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree)


def extract(
    method: Any, params: Any, extra: Any, dataset: Any, mesh: jax.sharding.Mesh, keep_tokens: bool = False
) -> dict[str, np.ndarray]:
    """Runs `method.represent` over `dataset` (batches with the method's input (B, V, ...) views under
    `method.input_key`, 'video' by default, plus 'valid' and labels).

    Returns {representation name: (N, D) features averaged over the V views, label name: (N,), 'valid': (N,)} over
    the clips of all processes; 'tokens' representations (N, T, D) are kept only with `keep_tokens`.
    """
    represent = jax.jit(method.represent)
    name = method.input_key
    inputs = (name, *method.represent_keys)
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in dataset:
        clips, views = batch[name].shape[:2]
        # Labels travel as global arrays beside the views, so rows line up however the batch is laid out on devices.
        rows = {k: batch[k].reshape(clips * views, *batch[k].shape[2:]) for k in inputs}
        rows.update({k: np.repeat(np.asarray(v), views, axis=0) for k, v in batch.items() if k not in inputs})
        rows = sharding.global_batch(rows, mesh)
        outputs = dict(represent(params, extra, {k: rows.pop(k) for k in inputs}))
        if not keep_tokens:
            outputs.pop('tokens', None)
        fetched = _fetch({**outputs, **rows})
        for key, value in fetched.items():
            value = np.asarray(value)
            grouped = value.reshape(-1, views, *value.shape[1:])
            chunks.setdefault(key, []).append(grouped.mean(axis=1) if key in outputs else grouped[:, 0])
    return {key: np.concatenate(parts) for key, parts in chunks.items()}
