"""CropMAE: mask counts, the unmasked first view, cross-attention, the loss on the masked local view only, the
global-to-local views, the recipe and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import masks
from jaxssl.config import ConfigError, load_config
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import cropmae as cropmae_method
from jaxssl.models import cropmae, mae

CONFIG = 'configs/cropmae.py'


def small_model(**overrides) -> cropmae.CropMAEPretrain:
    return cropmae.make_pretrain_model('micro/4', **overrides)


def setup_model(ratio: float = 0.95, batch: int = 2, seed: int = 0):
    model = small_model(dropout=0.0)
    rng = np.random.default_rng(seed)
    views = jnp.asarray(rng.normal(size=(batch, 2, 32, 32, 3)), jnp.float32)
    idx = masks.shuffle_masking_from_noise(rng.random((batch, 64)), ratio)
    params = mae.init_params(model, jax.random.key(seed), views, idx['ids_keep'], idx['ids_restore'])
    return model, params, views, idx


@pytest.mark.parametrize(
    ('tokens', 'ratio', 'kept'),
    [(196, 0.985, 2), (196, 0.95, 9), (196, 0.75, 49), (64, 0.95, 3)],
)
def test_visible_counts_follow_the_reference_rounding(tokens, ratio, kept):
    # int(L * (1 - r)): 196 * 0.015 = 2.94 -> 2 (CropMAE), 196 * 0.05 = 9.8 -> 9 (SiamMAE), 64 * 0.05 = 3.2 -> 3.
    assert masks.num_kept(tokens, ratio) == kept
    idx = masks.shuffle_masking(tokens, ratio, np.random.default_rng(0))
    assert idx['ids_keep'].shape == (kept,)
    assert masks.removed_mask(idx['ids_restore'], kept).sum() == tokens - kept


def test_first_view_is_unmasked_and_shared_encoder():
    model, params, views, idx = setup_model()
    prediction, inter = model.apply({'params': params}, views, idx['ids_keep'], idx['ids_restore'])
    assert prediction.shape == (2, 64, 4 * 4 * 3) and prediction.dtype == jnp.float32
    # The memory is the encoder on every token of view 0 (cls + 64, raster order), whatever the mask.
    assert inter['memory'].shape == (2, 65, 64) and inter['encoded'].shape == (2, 1 + 3, 64)
    whole, _ = model.apply({'params': params}, views[:, 0], method=model.encode)
    np.testing.assert_allclose(inter['memory'], whole, atol=1e-6)
    # Shared weights: view 1's visible tokens are the same encoder run on view 1 through its mask.
    seen, _ = model.apply({'params': params}, views[:, 1], idx['ids_keep'], method=model.encode)
    np.testing.assert_allclose(inter['encoded'], seen, atol=1e-6)
    # The decoder reads view 0: changing it changes the prediction of view 1.
    other, _ = model.apply({'params': params}, views.at[:, 0].multiply(-1.0), idx['ids_keep'], idx['ids_restore'])
    assert float(jnp.abs(other - prediction).max()) > 1e-4


def test_cross_attention_shapes_and_known_answer():
    attn = cropmae.MultiHeadAttention(width=8, heads=2)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
    memory = jnp.asarray(rng.normal(size=(3, 7, 8)), jnp.float32)
    params = attn.init(jax.random.key(0), x, memory)['params']
    assert 'bias' not in params['key']
    # Random q / v biases, so the check covers them.
    params = jax.tree.map(lambda p: p, params)
    params['query']['bias'] = jnp.asarray(rng.normal(size=8), jnp.float32)
    params['value']['bias'] = jnp.asarray(rng.normal(size=8), jnp.float32)
    out = attn.apply({'params': params}, x, memory)
    assert out.shape == (3, 5, 8)

    # numpy: per head, softmax(q k^T / sqrt(4)) v with q from x, k and v from the memory, then the output dense.
    def dense(name, inputs):
        bias = np.asarray(params[name]['bias']) if name != 'key' else 0.0  # softmax cancels a key bias
        return np.asarray(inputs) @ np.asarray(params[name]['kernel']) + bias

    q, k, v = (dense(n, i).reshape(3, -1, 2, 4) for n, i in (('query', x), ('key', memory), ('value', memory)))
    logits = np.einsum('bqhd,bkhd->bhqk', q, k) / 2.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    want = dense('out', np.einsum('bhqk,bkhd->bqhd', weights, v).reshape(3, 5, 8))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

    block = cropmae.CrossDecoderBlock(width=8, heads=2, ffn_hidden=16, dropout=0.1)
    variables = block.init(jax.random.key(0), x, memory)
    assert set(variables['params']) == {'cross_attn', 'self_attn', 'fc1', 'fc2', 'norm1', 'norm2', 'norm3'}
    y = block.apply(variables, x, memory)
    assert y.shape == (3, 5, 8)
    # Post-norm: the block ends with LayerNorm (unit affine at init), so every token has mean 0, variance ~1.
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-3)
    # Dropout 0.1 is active only in training.
    dropped = block.apply(variables, x, memory, True, rngs={'dropout': jax.random.key(1)})
    assert float(jnp.abs(dropped - y).max()) > 1e-4
    np.testing.assert_allclose(block.apply(variables, x, memory, False), y)


def test_masked_patch_mse_hand_case():
    # 1 image, 3 patches of 2 values; patches 0 and 2 masked: ((1 + 1) / 2 + (4 + 0) / 2) / 2 = 1.5.
    prediction = jnp.array([[[1.0, 1.0], [9.0, 9.0], [2.0, 0.0]]])
    target = jnp.zeros((1, 3, 2))
    mask = jnp.array([[1.0, 0.0, 1.0]])
    assert float(cropmae_method.masked_patch_mse(prediction, target, mask)) == pytest.approx(1.5)


def test_loss_is_on_the_local_view_masked_patches_only():
    model, params, views, idx = setup_model()
    batch = {'image': views, **{k: jnp.asarray(v) for k, v in idx.items()}}
    loss, metrics = cropmae_method.compute_loss(model, params, batch, train=False)
    prediction, _ = model.apply({'params': params}, views, idx['ids_keep'], idx['ids_restore'])

    def by_hand(image):
        patches = np.asarray(mae.patchify(image, 4), np.float64)
        target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
        per_patch = ((np.asarray(prediction, np.float64) - target) ** 2).mean(-1)
        removed = idx['ids_restore'] >= 3
        return per_patch[removed].mean()

    assert float(metrics['loss_patches']) == 2 * (64 - 3)
    np.testing.assert_allclose(float(loss), by_hand(views[:, 1]), rtol=1e-5)
    assert abs(by_hand(views[:, 0]) - float(loss)) > 1e-3  # the global view is not the target
    # The gradient reaches the prediction only at the local view's masked patches.
    grad = jax.grad(
        lambda p: cropmae_method.masked_patch_mse(p, mae.patchify(views[:, 1], 4), batch['ids_restore'] >= 3)
    )(prediction)
    visible = np.asarray(idx['ids_restore'] < 3)
    assert np.all(np.asarray(grad)[visible] == 0) and np.all(np.abs(np.asarray(grad)[~visible]).sum(-1) > 0)


def test_local_view_is_cut_from_the_global_view():
    # A horizontal ramp (value = column): without flips, the local view's values lie inside the global view's range.
    image = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (200, 200, 3)).copy()
    for seed in range(10):
        out = cropmae_method.cropmae_views(image, np.random.default_rng(seed), size=32, flip=False)
        assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
        pixels = (out * IMAGENET_STD + IMAGENET_MEAN) * 255.0
        glob, local = pixels[0, ..., 0], pixels[1, ..., 0]
        assert glob.min() - 1.5 <= local.min() and local.max() <= glob.max() + 1.5
        # The local crop covers 30-60% of the global crop's area, so it spans a narrower range of columns.
        assert np.ptp(local) < np.ptp(glob)


def test_recipe_and_runlocal():
    config = load_config(CONFIG)
    assert config.method == 'cropmae' and config.model.variant == 'S' and config.masking.ratio == 0.985
    assert cropmae.decode_variant('S') == dict(
        width=384, depth=12, heads=6, mlp_hidden=1536, dec_width=256, dec_depth=4, dec_heads=8, dec_mlp_hidden=2048,
        patch=16,
    )  # fmt: skip
    assert tuple(config.input.crop_scale) == (0.1, 1.0) and tuple(config.input.local_crop_scale) == (0.3, 0.6)
    assert config.input.global_batch == 2048 and config.optim.base_lr == 1e-4 and config.optim.warmup_epochs == 20
    assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.95, 0.05)
    assert config.model.dropout == 0.1 and config.loss.norm_pix_loss
    method = cropmae_method.Method(config)
    assert method.num_keep == 2 and method.num_tokens == 196
    local = cropmae_method.Method(load_config(f'{CONFIG}:runlocal'))
    assert local.num_keep == 3 and local.num_tokens == 64


@pytest.mark.parametrize(
    ('overrides', 'key'),
    [
        (['masking.ratio=0.985'], "'masking.ratio'"),  # keeps int(64 * 0.015) = 0 tokens at runlocal's grid
        (['input.local_crop_scale=(0.6, 0.3)'], "'input.local_crop_scale'"),
        (['input.num_sample=2'], "'input.num_sample'"),
        (["model.variant='huge'"], "'model.variant'"),
        (['model.dropout=1.5'], "'model.dropout'"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(f'{CONFIG}:runlocal', overrides)
    assert key in str(err.value)
