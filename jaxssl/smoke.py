"""What `jaxssl.main` runs until the trainer lands: build the configured model and take one loss + gradient.

It proves the config, model, masks and objective fit together on this machine; it does not train.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from jaxssl.config import method_module
from jaxssl.models.videomae import count_params


def synthetic_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Random clips with masks drawn exactly as the input pipeline will draw them."""
    method = method_module(config)
    rng = np.random.default_rng(seed)
    samples = [method.sample_masks(config, rng) for _ in range(batch_size)]
    batch = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    shape = (batch_size, config.input.frames, config.input.image_size, config.input.image_size, 3)
    batch['video'] = rng.normal(size=shape).astype(np.float32)
    return batch


def run(config: ml_collections.ConfigDict, batch_size: int = 2) -> dict[str, float]:
    method = method_module(config)
    model = method.make_model(config)
    batch = synthetic_batch(config, batch_size, config.seed)
    key = jax.random.key(config.seed)
    params = jax.jit(lambda k: model.init(k, batch['video'], batch['visible_idx'], batch['target_idx'])['params'])(key)
    encoder = count_params({k: params[k] for k in ('patch_embed', 'encoder')})
    print(f'model {config.model.variant}: {count_params(params) / 1e6:.2f}M parameters ({encoder / 1e6:.2f}M encoder)')
    print(
        f'batch: {batch_size} clips of {config.input.frames}x{config.input.image_size}px, '
        f'{batch["visible_idx"].shape[1]} visible tokens, {batch["target_idx"].shape[1]} decoder targets, '
        f'{int(batch["target_weight"][0].sum())} loss tokens per clip'
    )

    def loss_fn(p):
        return method.compute_loss(model, p, batch, jax.random.fold_in(key, 1), True, config.loss.normalize_target)

    start = time.perf_counter()
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    grad_norm = float(jax.numpy.sqrt(sum(jax.numpy.vdot(g, g) for g in jax.tree.leaves(grads))))
    print(f'loss {float(loss):.4f}, gradient norm {grad_norm:.4f} ({time.perf_counter() - start:.1f}s incl. compile)')
    print('The training loop is not part of jaxssl yet; this run only checked one loss and gradient.')
    return {'loss': float(loss), 'grad_norm': grad_norm}
