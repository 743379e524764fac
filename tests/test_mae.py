"""MAE: known answers for the random masking, the 2-D sin-cos table, patchify and the (norm-pix) loss; reference
parameter counts; a jitted forward / backward of the tiny model; the config and its errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import masks
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import mae
from jaxssl.models import mae as model_lib
from jaxssl.models import vit

CONFIG = 'configs/mae.py'


# --- masks ----------------------------------------------------------------------------------------------------------
def test_mask_from_noise_by_hand():
    # argsort([.5, .1, .9, .3]) = [1, 3, 0, 2]: tokens 1 and 3 (the smallest noise) are kept, in that order.
    got = masks.shuffle_masking_from_noise(np.array([0.5, 0.1, 0.9, 0.3]), 0.5)
    assert got['ids_keep'].tolist() == [1, 3] and got['ids_restore'].tolist() == [2, 0, 3, 1]
    assert masks.removed_mask(got['ids_restore'], 2).tolist() == [1, 0, 1, 0]
    assert got['ids_keep'].dtype == got['ids_restore'].dtype == np.int32
    # Kept tokens come in noise order, not raster order: [.3, .1] keeps 1 then 0.
    assert masks.shuffle_masking_from_noise(np.array([0.3, 0.1, 0.9]), 0.3)['ids_keep'].tolist() == [1, 0]


@pytest.mark.parametrize(
    ('tokens', 'ratio', 'kept'), [(196, 0.75, 49), (196, 0.95, 9), (196, 0.985, 2), (64, 0.75, 16)]
)
def test_kept_count_is_the_references_rounding(tokens, ratio, kept):
    sample = masks.shuffle_masking(tokens, ratio, np.random.default_rng(0))
    assert masks.num_kept(tokens, ratio) == kept == len(sample['ids_keep'])
    assert masks.removed_mask(sample['ids_restore'], kept).sum() == tokens - kept
    with pytest.raises(ValueError, match='keep at least one'):
        masks.num_kept(tokens, 0.999)


def test_restore_inverts_the_shuffle():
    rng = np.random.default_rng(1)
    noise = rng.random((3, 16))
    got = masks.shuffle_masking_from_noise(noise, 0.75)
    ids_shuffle = np.argsort(noise, axis=-1)
    np.testing.assert_array_equal(got['ids_keep'], ids_shuffle[:, :4])
    np.testing.assert_array_equal(
        np.take_along_axis(ids_shuffle, got['ids_restore'], axis=1), np.tile(np.arange(16), (3, 1))
    )
    # Kept tokens are exactly those with mask 0, and they have the smallest noise of their row.
    mask = masks.removed_mask(got['ids_restore'], 4)
    for row in range(3):
        assert sorted(np.flatnonzero(mask[row] == 0)) == sorted(got['ids_keep'][row])
        assert noise[row, got['ids_keep'][row]].max() < noise[row, mask[row] == 1].min()


def test_masks_are_uniform_and_independent_per_sample():
    rng = np.random.default_rng(2)
    draws = np.stack([masks.removed_mask(masks.shuffle_masking(16, 0.75, rng)['ids_restore'], 4) for _ in range(4000)])
    kept = 1 - draws
    # Every position is kept with probability 4/16, within 4 binomial standard deviations (sd ~ 0.0068).
    np.testing.assert_allclose(kept.mean(axis=0), 0.25, atol=0.03)
    # Consecutive samples (as a batch holds them) are independent: P(kept in both) = 1/16.
    both = (kept[0::2] * kept[1::2]).mean()
    assert abs(both - 1 / 16) < 0.01
    assert not any(np.array_equal(draws[i], draws[i + 1]) for i in range(0, 40, 2))
    # The kept order is random: almost never ascending (1 in 4! = 24 by chance).
    orders = [masks.shuffle_masking(16, 0.75, rng)['ids_keep'] for _ in range(480)]
    assert 5 < sum(bool(np.all(np.diff(o) > 0)) for o in orders) < 40
    same_seed = [masks.shuffle_masking(16, 0.75, np.random.default_rng(9))['ids_keep'] for _ in range(2)]
    np.testing.assert_array_equal(*same_seed)


# --- 2-D sin-cos positions -------------------------------------------------------------------------------------------
def test_sincos_2d_known_values():
    table = model_lib.sincos_2d_table(2, 3, 8)  # omega = [1, 1/100]
    assert table.shape == (6, 8) and table.dtype == np.float32
    row, col = 1, 2  # token 5
    want = [np.sin(col), np.sin(col / 100), np.cos(col), np.cos(col / 100)]
    want += [np.sin(row), np.sin(row / 100), np.cos(row), np.cos(row / 100)]
    np.testing.assert_allclose(table[row * 3 + col], want, rtol=1e-6)
    np.testing.assert_allclose(table[0], [0, 0, 1, 1, 0, 0, 1, 1])
    # The column fills the first half: moving right changes only it.
    np.testing.assert_array_equal(table[1, 4:], table[0, 4:])
    assert not np.allclose(table[1, :4], table[0, :4])
    with pytest.raises(ValueError, match='divisible by 4'):
        model_lib.sincos_2d_table(2, 2, 6)


def test_sincos_2d_frequencies_at_reference_width():
    table = model_lib.sincos_2d_table(14, 14, 768)
    # omega_k = 10000^(-k / 192): channel 191 (the last sin of the column half) has omega = 10000^(-191/192).
    np.testing.assert_allclose(table[13, 191], np.sin(13 * 10000.0 ** (-191 / 192)), rtol=1e-6)
    np.testing.assert_allclose(table[14 * 5, 384 + 192], np.cos(5.0), rtol=1e-6)  # row 5, col 0: cos(5 * omega_0)


# --- patchify and loss -----------------------------------------------------------------------------------------------
def test_patchify_order_and_inverse():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    patches = np.asarray(model_lib.patchify(jnp.asarray(images), 2))
    assert patches.shape == (2, 4, 12)
    # Token 1 is the top-right patch; within it the order is (row, col, channel), channel fastest.
    hp, wp, p, c = 0, 1, 2, 3
    for i in range(2):
        for j in range(2):
            for ch in range(3):
                assert patches[1, hp * 2 + wp, (i * p + j) * c + ch] == images[1, hp * p + i, wp * p + j, ch]
    np.testing.assert_array_equal(model_lib.unpatchify(patches, (2, 2), 2), images)


def test_loss_by_hand():
    # A 2x2 image with patch 1: 4 patches of 3 values. Patch values [1, 2, 3] have mean 2 and unbiased variance 1,
    # so the norm-pix target is [-1, 0, 1] / sqrt(1 + 1e-6); a zero prediction costs 2/3 / (1 + 1e-6) per patch.
    image = np.array([[[1, 2, 3], [4, 4, 4]], [[0, 0, 6], [2, 2, 2]]], np.float32)[None]
    targets = np.asarray(mae.patch_targets(jnp.asarray(image), 1))
    np.testing.assert_allclose(targets[0, 0], np.array([-1, 0, 1]) / np.sqrt(1 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(targets[0, 1], [0, 0, 0])  # a flat patch: 0 / sqrt(1e-6)
    np.testing.assert_allclose(targets[0, 2], np.array([-2, -2, 4]) / np.sqrt(12 + 1e-6), rtol=1e-6)  # var 12
    prediction = jnp.zeros((1, 4, 3))
    mask = jnp.array([[1.0, 1.0, 0.0, 0.0]])  # patches 0 and 1 removed: only they count
    want = (2 / 3 / (1 + 1e-6) + 0.0) / 2
    np.testing.assert_allclose(float(mae.masked_patch_mse(prediction, jnp.asarray(targets), mask)), want, rtol=1e-6)
    # Without norm-pix the target is the (normalised) input itself.
    raw = np.asarray(mae.patch_targets(jnp.asarray(image), 1, normalize=False))
    np.testing.assert_array_equal(raw[0, 0], [1, 2, 3])
    want_raw = (np.mean(np.square([1, 2, 3])) + 16) / 2
    np.testing.assert_allclose(float(mae.masked_patch_mse(prediction, jnp.asarray(raw), mask)), want_raw, rtol=1e-6)


def test_loss_averages_over_removed_patches_of_the_whole_batch():
    rng = np.random.default_rng(3)
    prediction, target = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 4))
    mask = np.array([[1, 0, 1, 0, 0], [1, 1, 1, 1, 0]], np.float32)
    per_patch = ((prediction - target) ** 2).mean(-1)
    want = per_patch[mask == 1].mean()  # the reference: (loss * mask).sum() / mask.sum()
    got = mae.masked_patch_mse(jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


# --- model -----------------------------------------------------------------------------------------------------------
# Trainable parameters of the reference models (transformers' ViTMAEForPreTraining built on the meta device with the
# mae_vit_{base,large,huge} shapes: 111,655,680 of 111,907,840 for B; the rest are the fixed position tables) and
# of their encoders (cls token, patch embedding, blocks, norm). jaxssl has no attention key bias (softmax cancels
# it), one per block: width * depth + 512 * 8 fewer.
REFERENCE_COUNTS = {'B': (85_647_360, 111_655_680), 'L': (303_099_904, 329_239_296), 'H': (630_435_840, 656_613_964)}


@pytest.mark.parametrize('variant', sorted(REFERENCE_COUNTS))
def test_parameter_counts_match_reference(variant):
    model = model_lib.make_pretrain_model(variant)
    spec = model_lib.decode_variant(variant)
    tokens = (224 // spec['patch']) ** 2
    shapes = (
        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, masks.num_kept(tokens, 0.75)), jnp.int32),
        jax.ShapeDtypeStruct((1, tokens), jnp.int32),
    )
    params = jax.eval_shape(lambda k, *args: model_lib.init_params(model, k, *args), jax.random.key(0), *shapes)
    encoder = vit_count({k: params[k] for k in ('patch_embed', 'cls_token', 'encoder')})
    want_encoder, want_total = REFERENCE_COUNTS[variant]
    k_bias_encoder = spec['width'] * spec['depth']
    assert encoder == want_encoder - k_bias_encoder
    assert vit_count(params) == want_total - k_bias_encoder - 512 * 8
    assert (spec['dec_width'], spec['dec_depth'], spec['dec_heads'], spec['dec_mlp_hidden']) == (512, 8, 16, 2048)


def vit_count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_variants():
    assert model_lib.decode_variant('H')['patch'] == 14 and model_lib.decode_variant('B/8')['patch'] == 8
    with pytest.raises(ValueError, match='valid: micro, tiny, Ti, S, B, L, H'):
        model_lib.decode_variant('Q')


@pytest.fixture(scope='module')
def tiny():
    config = load_config(f'{CONFIG}:runlocal')
    method = mae.Method(config)
    batch = jax.tree.map(jnp.asarray, method.example_batch(2))
    params, _ = jax.jit(method.init)(jax.random.key(0), batch)
    return config, method, batch, params


def test_reference_initialisation(tiny):
    _, method, _, params = tiny
    model = method.model
    kernel = np.asarray(params['patch_embed']['proj']['kernel'])  # (4, 4, 3, 64)
    fan_in, width = 4 * 4 * 3, model.width
    bound = np.sqrt(6 / (fan_in + width))  # xavier_uniform on the (width, p*p*3) view
    assert kernel.shape == (4, 4, 3, width) and np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound and abs(kernel.std() - bound / np.sqrt(3)) < 0.1 * bound
    bias_bound = 1 / np.sqrt(fan_in)  # torch's Conv2d default, which the reference keeps
    assert np.abs(params['patch_embed']['proj']['bias']).max() <= bias_bound
    for name in ('cls_token', 'mask_token'):
        assert 0.01 < float(np.std(params[name])) < 0.03  # N(0, 0.02)
    assert float(np.abs(params['decoder_embed']['bias']).max()) == 0.0
    np.testing.assert_array_equal(params['encoder']['norm']['scale'], 1.0)


def test_forward_shapes_and_intermediates(tiny):
    _, method, batch, params = tiny
    model = method.model
    prediction, inter = jax.jit(model.apply)(
        {'params': params}, batch['image'], batch['ids_keep'], batch['ids_restore']
    )
    assert prediction.shape == (2, 64, 4 * 4 * 3) and prediction.dtype == jnp.float32
    assert inter['encoded'].shape == (2, 1 + 16, 64)
    features = jax.jit(method.represent)(params, {}, {'image': batch['image']})
    assert features['cls'].shape == (2, 64) and features['mean_pool'].shape == (2, 64)
    assert features['tokens'].shape == (2, 64, 64)


def test_encoder_sees_only_the_kept_tokens(tiny):
    """Changing a removed patch's pixels changes no encoder output; changing a kept one does."""
    _, method, batch, params = tiny
    model = method.model
    image = np.array(batch['image'])
    ids_keep, ids_restore = np.asarray(batch['ids_keep']), np.asarray(batch['ids_restore'])
    removed = int(np.flatnonzero(masks.removed_mask(ids_restore[0], 16))[0])
    kept = int(ids_keep[0, 0])

    @jax.jit
    def encoded(img):
        return model.apply({'params': params}, img, batch['ids_keep'], method=model.encode)[0]

    base = encoded(image)
    for token, changes in ((removed, False), (kept, True)):
        edited = image.copy()
        row, col = divmod(token, 8)
        edited[0, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 1.0
        assert bool(jnp.any(jnp.abs(encoded(edited)[0] - base[0]) > 1e-6)) is changes
        np.testing.assert_array_equal(encoded(edited)[1], base[1])  # the other sample is untouched


def test_jitted_forward_backward_learns(tiny):
    _, method, batch, params = tiny
    model = method.model
    step = jax.jit(
        lambda p: jax.value_and_grad(mae.compute_loss, argnums=1, has_aux=True)(model, p, batch, None, False)
    )
    (loss, metrics), grads = step(params)
    assert float(metrics['loss_patches']) == 2 * 48
    assert 0.5 < float(loss) < 3.0  # random init on unit-variance targets
    norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads)
    assert all(np.isfinite(n) and n > 0 for n in jax.tree.leaves(norms)), norms
    # A few gradient steps on one batch lower the loss: the gradient points the right way.
    p = params
    for _ in range(5):
        p = jax.tree.map(lambda w, g: w - 0.5 * g, p, step(p)[1])
    assert float(step(p)[0][0]) < float(loss) - 0.05


def test_bf16_scan_remat_model_runs(tiny):
    _, method, batch, params = tiny
    model = method.model
    fast = dataclasses.replace(model, dtype=jnp.bfloat16, scan_layers=True, remat=True)
    stacked = dict(params, encoder=vit.stack_blocks(params['encoder'], model.depth))
    stacked['decoder'] = vit.stack_blocks(params['decoder'], model.dec_depth)
    (got, grads) = jax.jit(jax.value_and_grad(lambda p: mae.compute_loss(fast, p, batch, None, False)[0]))(stacked)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    want = jax.jit(lambda p: mae.compute_loss(model, p, batch, train=False)[0])(params)
    np.testing.assert_allclose(float(got), float(want), rtol=0.05)


def test_flops_estimate_matches_xla_cost_analysis(tiny):
    _, method, batch, params = tiny
    model = method.model

    def forward(p):
        return model.apply({'params': p}, batch['image'], batch['ids_keep'], batch['ids_restore'])[0]

    cost = jax.jit(forward).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 0.8 < method.flops_per_example() / 3 / (cost['flops'] / 2) < 1.2


def test_reconstruction_panels(tiny):
    _, _, batch, _ = tiny
    image = np.asarray(batch['image'][0])
    target = np.asarray(model_lib.patchify(image[None], 4)[0])
    ids_restore = np.asarray(batch['ids_restore'][0])
    # A perfect norm-pix prediction reconstructs the input exactly (up to clipping to [0, 1]).
    panels = mae.reconstruction_panels(image, np.asarray(mae.norm_pix(jnp.asarray(target))), ids_restore, 16, 4, True)
    assert panels.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(panels[2], panels[0], atol=1e-4)
    np.testing.assert_allclose(panels[3], panels[0], atol=1e-4)
    removed = masks.removed_mask(ids_restore, 16).astype(bool)
    masked_patches = model_lib.patchify(panels[1][None], 4)[0]
    np.testing.assert_array_equal(masked_patches[removed], mae.GREY)


# --- config ----------------------------------------------------------------------------------------------------------
def test_recipe():
    config = load_config(CONFIG)
    assert (config.model.variant, config.masking.ratio, config.loss.norm_pix_loss) == ('B', 0.75, True)
    assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.9, 0.95, 0.05)
    assert (config.optim.base_lr, config.input.global_batch, config.optim.warmup_epochs) == (1.5e-4, 4096, 40)
    assert config.optim.base_lr * config.input.global_batch / 256 == pytest.approx(2.4e-3)
    assert config.optim.epochs == 800 and load_config(f'{CONFIG}:epochs=1600').optim.epochs == 1600
    assert (config.input.crop_scale, config.input.hflip, config.input.interpolation) == ((0.2, 1.0), True, 'bicubic')
    h = load_config(f'{CONFIG}:variant=H')
    assert h.model.remat and model_lib.decode_variant(h.model.variant)['patch'] == 14
    # The reference decays the 3-D cls and mask tokens; biases and norms (1-D) never decay.
    from jaxssl import optim

    params = {'cls_token': np.zeros((1, 1, 4)), 'mask_token': np.zeros((1, 1, 4)), 'norm': {'bias': np.zeros(4)}}
    assert optim.decay_mask(params, [(p, True) for p in config.optim.no_decay]) == {
        'cls_token': True,
        'mask_token': True,
        'norm': {'bias': False},
    }


@pytest.mark.parametrize(
    ('overrides', 'needles'),
    [
        (['model.variant=Q'], ["'model.variant'", 'micro, tiny, Ti, S, B, L, H']),
        (['input.image_size=30'], ["'input.image_size'", 'not divisible by patch']),
        (['masking.ratio=1.0'], ["'masking.ratio'"]),
        (['masking.ratio=0.99'], ["'masking.ratio'", 'keep at least one']),
        (['model.dtype=float16'], ["'model.dtype'"]),
        (['model.drop_path_rate=-0.1'], ["'model.drop_path_rate'"]),
        (['masking.ratoi=0.5'], ["'masking.ratoi'", "did you mean 'ratio'"]),
    ],
)
def test_config_errors_name_the_key(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config(f'{CONFIG}:runlocal', overrides)
    message = str(err.value)
    assert '\n' not in message
    for needle in needles:
        assert needle in message
