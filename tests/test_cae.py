"""CAE: the loss by hand, the position table, the regressor's shapes and inputs, the stop-gradient alignment target,
the recipe and config errors. (Block masks: tests/test_masks.py; trainer runs: tests/test_cae_train.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import masks
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import cae
from jaxssl.models import cae as model_lib

CONFIG = 'configs/cae.py'


def test_loss_by_hand():
    prediction = np.array([[[1.0, 2.0], [0.0, 0.0]]])  # (B=1, m=2, P=2)
    target = np.array([[[0.0, 2.0], [1.0, -1.0]]])
    latent_pred = np.array([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])  # (1, 2, D=3)
    latent_target = np.array([[[1.0, -1.0, 1.0], [0.0, 0.0, 3.0]]])
    loss, metrics = cae.cae_loss(prediction, target, latent_pred, latent_target, align_weight=2.0)
    # Reconstruction: squared errors 1, 0, 1, 1 -> mean 0.75. Alignment: 0, 4, 0, 0, 0, 9 -> mean 13 / 6.
    assert metrics['loss_reconstruction'] == pytest.approx(0.75)
    assert metrics['loss_alignment'] == pytest.approx(13 / 6)
    assert loss == pytest.approx(0.75 + 2 * 13 / 6)


def test_sincos_table_is_row_first():
    # Width 8: omega = [1, 1/100]; token 6 of a 4x4 grid is row 1, column 2.
    table = model_lib.sincos_table(4, 4, 8)
    r, c, w = 1.0, 2.0, np.array([1.0, 0.01])
    want = np.concatenate([np.sin(r * w), np.cos(r * w), np.sin(c * w), np.cos(c * w)])
    np.testing.assert_allclose(table[6], want, rtol=1e-6)


class Tiny:
    """The micro/4 model on two 32-px images with block masks, and its jitted forward / encode (compiled once)."""

    def __init__(self):
        self.model = model = model_lib.make_pretrain_model('micro/4')
        rng = np.random.default_rng(0)
        ids = [masks.mask_to_ids(masks.block_masking((8, 8), 32, rng, min_block=4)) for _ in range(2)]
        self.ids = {k: np.stack([i[k] for i in ids]) for k in ids[0]}
        self.images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
        keep, masked = self.ids['ids_keep'], self.ids['ids_masked']
        self.params = jax.jit(lambda key: model_lib.init_params(model, key, self.images, keep, masked))(
            jax.random.key(0)
        )
        self.forward = jax.jit(lambda p, x: model.apply({'params': p}, x, keep, masked))
        self.encode = jax.jit(lambda p, x, i: model.apply({'params': p}, x, i, method=model.encode))


@pytest.fixture(scope='module')
def tiny():
    return Tiny()


def test_shapes_and_reference_init(tiny):
    params = tiny.params
    prediction, inter = tiny.forward(params, tiny.images)
    assert prediction.shape == (2, 32, 4 * 4 * 3) and prediction.dtype == jnp.float32
    assert inter['latent_pred'].shape == inter['latent_target'].shape == (2, 32, 64)
    assert inter['encoded'].shape == (2, 1 + 32, 64)
    # Layer scale 0.1 in the encoder, regressor and decoder; trunc_normal(0.02) tokens and patch kernel, zero bias.
    assert np.allclose(params['encoder']['block_00']['gamma_1'], 0.1)
    assert np.allclose(params['regressor_00']['gamma_2_cross'], 0.1)
    assert np.allclose(params['decoder']['block_00']['gamma_1'], 0.1)
    for leaf in (params['cls_token'], params['mask_token'], params['patch_embed']['proj']['kernel']):
        assert np.abs(leaf).max() <= 0.02 and np.std(leaf) > 0.005
    assert not np.any(params['patch_embed']['proj']['bias'])
    assert 'k_bias' not in params['regressor_00']['cross_attn'] and 'q_bias' in params['regressor_00']['cross_attn']
    assert 'bias' not in params['regressor_00']['norm1_k']  # softmax cancels it: zero gradient


def test_every_parameter_gets_a_gradient(tiny):
    # No parameter whose gradient is zero up to rounding (Adam would turn the noise into lr-sized steps).
    def loss(p):
        prediction, inter = tiny.forward(p, tiny.images)
        return jnp.mean(prediction**2) + jnp.mean((inter['latent_pred'] - inter['latent_target']) ** 2)

    grads = jax.grad(loss)(tiny.params)
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.abs(grad).max() > 1e-6, jax.tree_util.keystr(path)


def test_prediction_sees_only_visible_patches_and_target_only_masked(tiny):
    params, images, ids = tiny.params, tiny.images, tiny.ids
    grid = np.zeros((2, 64), np.float32)
    np.put_along_axis(grid, ids['ids_masked'], 1.0, axis=1)
    hidden = np.kron(grid.reshape(2, 8, 8), np.ones((4, 4)))[..., None]  # pixels of the masked patches
    changed = images + jnp.asarray(hidden) * 3.0
    (p0, i0), (p1, i1) = tiny.forward(params, images), tiny.forward(params, changed)
    np.testing.assert_allclose(p0, p1, atol=1e-6)
    np.testing.assert_allclose(i0['latent_pred'], i1['latent_pred'], atol=1e-6)
    assert np.abs(i0['latent_target'] - i1['latent_target']).max() > 1e-2


def test_target_is_the_current_encoder_on_the_masked_patches(tiny):
    _, inter = tiny.forward(tiny.params, tiny.images)
    encoded, _ = tiny.encode(tiny.params, tiny.images, tiny.ids['ids_masked'])
    np.testing.assert_allclose(inter['latent_target'], encoded[:, 1:], atol=1e-6)


def test_no_gradient_through_the_alignment_target(tiny):
    def term(p, key):
        _, inter = tiny.forward(p, tiny.images)
        return jnp.sum(inter[key] * jnp.arange(inter[key].size).reshape(inter[key].shape))

    target_grads = jax.grad(term)(tiny.params, 'latent_target')
    assert all(not np.any(g) for g in jax.tree.leaves(target_grads))
    # The prediction side does reach the encoder (so the check above can fail).
    pred_grads = jax.grad(term)(tiny.params, 'latent_pred')
    assert np.abs(pred_grads['encoder']['block_00']['mlp']['fc1']['kernel']).max() > 0


def test_projection_when_regressor_width_differs():
    model = model_lib.make_pretrain_model('micro/4', dec_width=32, dec_heads=2, dec_mlp_hidden=64)
    rng = np.random.default_rng(1)
    ids = masks.mask_to_ids(masks.block_masking((8, 8), 32, rng, min_block=4))
    ids = {k: v[None] for k, v in ids.items()}
    images = jnp.asarray(rng.normal(size=(1, 32, 32, 3)), jnp.float32)
    params = jax.jit(lambda key: model_lib.init_params(model, key, images, ids['ids_keep'], ids['ids_masked']))(
        jax.random.key(1)
    )
    _, inter = jax.jit(model.apply)({'params': params}, images, ids['ids_keep'], ids['ids_masked'])
    assert inter['latent_pred'].shape == inter['latent_target'].shape == (1, 32, 32)
    # The target goes through the same projection + norm as the visible latents.
    encoded, _ = jax.jit(lambda p, i: model.apply({'params': p}, images, i, method=model.encode))(
        params, ids['ids_masked']
    )
    dense, norm = params['encoder_to_regressor'], params['encoder_to_regressor_norm']
    y = encoded[:, 1:] @ dense['kernel'] + dense['bias']
    y = (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-6) * norm['scale'] + norm['bias']
    np.testing.assert_allclose(inter['latent_target'], y, atol=1e-5)


def test_method_loss_and_pictures_run():
    config = load_config(f'{CONFIG}:runlocal')
    method = cae.Method(config)
    assert (method.num_keep, method.num_masked) == (32, 32)
    batch = jax.tree.map(jnp.asarray, method.example_batch(2))
    assert batch['ids_masked'].shape == (2, 32) and batch['ids_restore'].shape == (2, 64)
    params, extra = jax.jit(method.init)(jax.random.key(0), batch)
    loss, (metrics, _) = jax.jit(method.loss)(params, extra, batch, jax.random.key(1), 0)
    want = float(metrics['loss_reconstruction']) + 2 * float(metrics['loss_alignment'])
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(want, rel=1e-6)
    full = method.predict_patches(params, np.asarray(batch['image']), jax.tree.map(np.asarray, batch))
    assert full.shape == (2, 64, 48)
    visible = np.take_along_axis(full, np.asarray(batch['ids_keep'])[..., None], axis=1)
    assert not np.any(visible)
    assert method.flops_per_example() > 0


def test_recipe():
    config = load_config(CONFIG)
    assert (config.model.variant, config.masking.ratio, config.masking.min_block) == ('B', 0.5, 16)
    assert (config.loss.align_weight, config.model.layer_scale_init, config.model.drop_path_rate) == (2.0, 0.1, 0.1)
    assert config.optim.base_lr * config.input.global_batch / 256 == pytest.approx(1.5e-3)
    assert (config.optim.b2, config.optim.clip_grad, config.optim.warmup_epochs) == (0.999, 3.0, 10)
    assert config.input.crop_scale == (0.08, 1.0)
    assert load_config(f'{CONFIG}:epochs=800').optim.warmup_epochs == 20
    assert load_config(f'{CONFIG}:variant=L').model.layer_scale_init == 1e-5
    # 98 of 196 tokens masked, as --num_mask_patches 98.
    assert 196 - masks.num_kept(196, config.masking.ratio) == 98


@pytest.mark.parametrize(
    ('overrides', 'needles'),
    [
        (['model.variant=S'], ["'model.variant'", 'micro, tiny, B, L']),
        (['masking.ratio=1.0'], ["'masking.ratio'"]),
        (['masking.min_block=0'], ["'masking.min_block'"]),
        (['masking.min_aspect=2.0'], ["'masking.min_aspect'"]),
        (['loss.align_weight=-1.0'], ["'loss.align_weight'"]),
    ],
)
def test_config_errors_name_the_key(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config(f'{CONFIG}:runlocal', overrides)
    message = str(err.value)
    assert '\n' not in message
    for needle in needles:
        assert needle in message
