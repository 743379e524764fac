"""A trained jaxssl image run used as a frozen network inside another method: KRR-ST's teacher, AdvEncoder's victim.

The run is rebuilt from its workdir's config.json (its method's `represent` gives the features) and its latest
checkpoint's params and method state are read by a host callback at initialisation (base.load_frozen), so they
live in the extra state without being embedded in the compiled program.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxssl.config import ConfigError, method_module
from jaxssl.methods import base


def run_config(path: str, key: str, image_size: int) -> ml_collections.ConfigDict:
    """The config of the run in workdir `path` (the config key `key` names it), which must take `image_size`."""
    if not os.path.isdir(os.path.join(path, 'checkpoints')):
        raise ConfigError(f"'{key}' {path} is not a training workdir (no checkpoints/ in it)")
    try:
        with open(os.path.join(path, 'config.json')) as f:
            run = ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise ConfigError(f"'{key}' {path}: cannot read its config.json ({e})") from None
    size = run.get('input', {}).get('image_size')
    if size != image_size:
        raise ConfigError(f"'input.image_size' {image_size}: the run in {path} ('{key}') takes {size}")
    return run


class FrozenImageRun:
    """The image run in workdir `path` as a frozen feature extractor: `features(state, images)` is its
    `represent(...)[representation]` on ImageNet-normalised (N, S, S, 3) images, float32 (N, dim). Gradients flow
    to the images (an attack needs them), never to the run's weights, which are not parameters of the caller."""

    def __init__(self, path: str, key: str, image_size: int, representation: str = '', representation_key: str = ''):
        self.path, self.key = path, key
        run = run_config(path, key, image_size)
        self.method = method_module(run).Method(run)
        example = jax.tree.map(jnp.asarray, self.method.example_batch(1))
        params, extra = jax.eval_shape(self.method.init, jax.random.key(0), example)
        self.shapes = {'params': params, 'extra': extra}
        probe = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
        outputs = jax.eval_shape(self.method.represent, params, extra, {self.method.input_key: probe})
        flat = {k: v for k, v in outputs.items() if len(v.shape) == 2}
        self.representation = representation or (next(iter(flat)) if len(flat) == 1 else '')
        if self.representation not in flat:
            raise ConfigError(
                f"bad value '{representation}' for '{representation_key}': the (N, D) representations of {path} are "
                f'{", ".join(sorted(flat))}'
            )
        self.dim = flat[self.representation].shape[-1]

    def state(self) -> dict[str, Any]:
        """The run's {'params', 'extra'} as traced values read from its latest checkpoint."""
        extra = self.shapes['extra']
        return {
            'params': base.load_frozen(self.path, self.key, self.shapes['params']),
            'extra': base.load_frozen(self.path, self.key, extra, 'extra') if extra else {},
        }

    def features(self, state: dict[str, Any], images: jax.Array) -> jax.Array:
        state = jax.lax.stop_gradient(state)
        outputs = self.method.represent(state['params'], state['extra'], {self.method.input_key: images})
        return outputs[self.representation].astype(jnp.float32)
