"""VideoMAE V2 model: reference parameter counts, shapes, and a jitted forward + backward of the tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.config import load_config
from jaxssl.methods import videomae
from jaxssl.models import videomae as model_lib

# Encoder and encoder + decoder parameter counts of the reference models (shared/reference/videomae_v2.md).
REFERENCE_COUNTS = {
    'S': (21.9, 24.0),
    'B': (86.2, 94.2),
    'L': (303.9, 317.8),
    'H': (631.6, 645.7),
    'g': (1011.6, 1026.3),
}


@pytest.mark.parametrize('variant', sorted(REFERENCE_COUNTS))
def test_parameter_counts_match_reference(variant):
    model = model_lib.make_pretrain_model(variant)
    grid = model_lib.token_grid(16, 224, model.patch)
    per_frame = grid[1] * grid[2]
    visible = jax.ShapeDtypeStruct((1, grid[0] * (per_frame - int(0.9 * per_frame))), jnp.int32)
    targets = jax.ShapeDtypeStruct((1, np.prod(grid) // 2), jnp.int32)
    video = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), video, visible, targets)['params']
    encoder = model_lib.count_params({k: params[k] for k in ('patch_embed', 'encoder')})
    want_encoder, want_total = REFERENCE_COUNTS[variant]
    assert round(encoder / 1e6, 1) == want_encoder
    assert round(model_lib.count_params(params) / 1e6, 1) == want_total


def test_giant_sizes():
    spec = model_lib.decode_variant('g')
    assert (spec['patch'], spec['mlp_hidden'], spec['dec_mlp_hidden']) == (14, 6144, 2234)
    assert model_lib.decode_variant('B/8')['patch'] == 8
    with pytest.raises(ValueError, match='valid: micro, tiny, S, B'):
        model_lib.decode_variant('XL')


@pytest.fixture(scope='module')
def tiny():
    config = load_config('configs/videomae_v2.py:runlocal', ['model.dtype=float32', 'model.scan_layers=false'])
    model = videomae.make_model(config)
    batch = videomae.Method(config).example_batch(2)
    params = model.init(jax.random.key(0), batch['video'], batch['visible_idx'], batch['target_idx'])['params']
    return config, model, batch, params


def test_forward_shapes_and_intermediates(tiny):
    _, model, batch, params = tiny
    prediction, inter = model.apply({'params': params}, batch['video'], batch['visible_idx'], batch['target_idx'])
    assert prediction.shape == (2, 32, 2 * 8 * 8 * 3) and prediction.dtype == jnp.float32
    assert inter['encoded'].shape == (2, 8, 64)
    full, _ = model.apply({'params': params}, batch['video'], method=model.encode)
    assert full.shape == (2, 64, 64)


def test_jitted_forward_backward(tiny):
    _, model, batch, params = tiny

    @jax.jit
    def step(p, rng):
        return jax.value_and_grad(videomae.compute_loss, argnums=1, has_aux=True)(model, p, batch, rng)

    (loss, metrics), grads = step(params, jax.random.key(1))
    assert np.isfinite(float(loss)) and float(metrics['loss_tokens']) == 2 * 28
    # A random-init model predicting unit-variance targets: the loss is near 1.
    assert 0.5 < float(loss) < 2.0
    norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads)
    assert all(np.isfinite(n) and n > 0 for n in jax.tree.leaves(norms)), norms
    # A few SGD steps on one batch lower the loss: the gradient points the right way.
    loss_fn = jax.jit(lambda p: videomae.compute_loss(model, p, batch, train=False)[0])
    p = params
    for _ in range(5):
        p = jax.tree.map(lambda w, g: w - 0.5 * g, p, jax.grad(loss_fn)(p))
    assert float(loss_fn(p)) < float(loss_fn(params)) - 0.05


def test_bf16_scan_remat_model_runs(tiny):
    _, model, batch, params = tiny
    fast = dataclasses.replace(model, dtype=jnp.bfloat16, scan_layers=True, remat=True)
    stacked = dict(params, encoder=model_lib.vit.stack_blocks(params['encoder'], model.depth))
    stacked['decoder'] = model_lib.vit.stack_blocks(params['decoder'], model.dec_depth)
    grads = jax.jit(jax.grad(lambda p: videomae.compute_loss(fast, p, batch, jax.random.key(0))[0]))(stacked)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    want = videomae.compute_loss(model, params, batch, train=False)[0]
    got = videomae.compute_loss(fast, stacked, batch, train=False)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=0.05)


def test_flops_estimate_matches_xla_cost_analysis(tiny):
    """The analytic FLOPs used for MFU agree with XLA's count of the compiled forward pass (matmuls dominate)."""
    config, model, batch, params = tiny
    method = videomae.Method(config)

    def forward(p):
        return model.apply({'params': p}, batch['video'], batch['visible_idx'], batch['target_idx'])[0]

    cost = jax.jit(forward).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_per_example = cost['flops'] / 2
    assert 0.8 < method.flops_per_example() / 3 / xla_per_example < 1.2
