"""CroCo v2: 2-D RoPE against numpy and its relative-position property, RoPE as a no-op option of the shared
attention, CroCo's masks, the loss on view 1's masked patches only, the decoder's use of view 2, the stand-in views
and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import masks
from jaxssl.config import ConfigError, load_config
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import croco as croco_method
from jaxssl.models import croco, vit

CONFIG = 'configs/croco.py'
PATCH, SIZE, TOKENS = 4, 16, 16  # micro/4 on 16 px: a 4 x 4 grid


def rope_numpy(t: np.ndarray, row: int, col: int, base: float = 100.0) -> np.ndarray:
    """One head vector rotated by hand: in each half (rows, then columns) of size m, dims j and j + m / 2 turn by
    pos * base^(-2j / m)."""
    out = np.empty_like(t)
    half = t.shape[-1] // 2
    for start, pos in ((0, row), (half, col)):
        for j in range(half // 2):
            angle = pos / base ** (2 * j / half)
            a, b = t[start + j], t[start + j + half // 2]
            out[start + j] = a * np.cos(angle) - b * np.sin(angle)
            out[start + j + half // 2] = b * np.cos(angle) + a * np.sin(angle)
    return out


def test_rope_2d_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 2, 8)).astype(np.float32)  # (B, N, heads, head_dim)
    positions = rng.integers(0, 14, size=(2, 3, 2))
    got = np.asarray(vit.rope_2d(jnp.asarray(x), jnp.asarray(positions)))
    for b in range(2):
        for n in range(3):
            for h in range(2):
                want = rope_numpy(x[b, n, h], *positions[b, n])
                np.testing.assert_allclose(got[b, n, h], want, rtol=1e-5, atol=1e-6)


def test_rope_2d_dot_products_depend_only_on_the_position_difference():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))

    def dot(p_q, p_k):
        rq = vit.rope_2d(q, jnp.asarray([[p_q]]))
        rk = vit.rope_2d(k, jnp.asarray([[p_k]]))
        return float(jnp.sum(rq * rk))

    # The same difference (2, -3) at three places gives one value; another difference gives another.
    same = [dot((3, 5), (1, 8)), dot((7, 3), (5, 6)), dot((2, 3), (0, 6))]
    np.testing.assert_allclose(same, same[0], rtol=1e-5)
    assert abs(dot((3, 5), (3, 8)) - same[0]) > 1e-3
    # A rotation: the norm stays.
    np.testing.assert_allclose(jnp.linalg.norm(vit.rope_2d(q, jnp.asarray([[[9, 4]]]))), jnp.linalg.norm(q), 1e-5)


def test_attention_without_positions_is_unchanged_and_positions_matter():
    attention = vit.Attention(32, 2)
    x = jax.random.normal(jax.random.key(0), (1, 6, 32))
    params = attention.init(jax.random.key(1), x)
    plain = attention.apply(params, x)
    grid = jnp.asarray(vit.grid_positions(2, 3))
    np.testing.assert_allclose(attention.apply(params, x, jnp.zeros_like(grid)), plain, rtol=1e-5, atol=1e-6)
    assert not np.allclose(attention.apply(params, x, grid), plain, atol=1e-4)
    np.testing.assert_array_equal(vit.grid_positions(2, 3), [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])


def test_masks_follow_randommask_by_hand():
    # num_mask = int(0.5 * 6) = 3; argsort(noise) = [1, 5, 3, 0, 4, 2]; masked where that value < 3: tokens 0, 3, 5.
    # (MAE would keep the three smallest noises, tokens 1, 3, 5: a different mask for the same noise.)
    idx = masks.croco_masking_from_noise(np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2]), 0.5)
    np.testing.assert_array_equal(idx['ids_keep'], [1, 2, 4])
    np.testing.assert_array_equal(idx['ids_restore'], [3, 0, 1, 4, 2, 5])
    np.testing.assert_array_equal(masks.removed_mask(idx['ids_restore'], 3), [1, 0, 0, 1, 0, 1])
    # 196 tokens at 0.9: int(176.4) = 176 masked, 20 visible (MAE's rounding would keep 19).
    assert croco.num_masked(196, 0.9) == 176 and croco.num_visible(196, 0.9) == 20
    # 0.999 of 64 masks int(63.9) = 63 and keeps 1, where MAE's int(64 * 0.001) would keep none: the Method counts
    # CroCo's way.
    method = croco_method.Method(load_config(f'{CONFIG}:runlocal', ['masking.ratio=0.999']))
    assert method.num_keep == 1 and method.example_batch(2)['ids_keep'].shape == (2, 1)
    batch = masks.croco_masking_from_noise(np.random.default_rng(0).random((3, 196)), 0.9)
    assert batch['ids_keep'].shape == (3, 20) and np.all(np.diff(batch['ids_keep'], axis=1) > 0)
    assert np.all(masks.removed_mask(batch['ids_restore'], 20).sum(axis=1) == 176)


@pytest.fixture(scope='module', params=['rope', 'cosine'])
def setup(request):
    model = croco.make_pretrain_model('micro/4', pos_embed=request.param)
    rng = np.random.default_rng(0)
    views = jnp.asarray(rng.normal(size=(2, 2, SIZE, SIZE, 3)), jnp.float32)
    idx = masks.croco_masking_from_noise(rng.random((2, TOKENS)), 0.75)
    params = croco.init_params(model, jax.random.key(0), views, idx['ids_keep'], idx['ids_restore'])
    apply = jax.jit(lambda p, v: model.apply({'params': p}, v, idx['ids_keep'], idx['ids_restore'])[0])
    return model, params, views, idx, apply


def test_loss_is_norm_pix_mse_on_view_1_masked_patches(setup):
    model, params, views, idx, apply = setup
    batch = {'image': views, **idx}
    loss, metrics = croco_method.compute_loss(model, params, batch, train=False)
    prediction = np.asarray(apply(params, views))
    image = np.asarray(views[:, 0])
    total, count = 0.0, 0
    for b in range(2):
        for token in range(TOKENS):
            if token in idx['ids_keep'][b]:
                continue
            r, c = divmod(token, SIZE // PATCH)
            target = image[b, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH].reshape(-1)
            target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
            total += np.mean((prediction[b, token] - target) ** 2)
            count += 1
    assert count == 2 * 12 and float(metrics['loss_patches']) == count
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_prediction_reads_view_2_and_only_view_1_visible_patches(setup):
    _, params, views, idx, apply = setup
    base = np.asarray(apply(params, views))
    # Another view 2 changes the prediction of view 1: the cross-attention uses it.
    other = views.at[:, 1].set(jnp.flip(views[:, 1], axis=1))
    assert not np.allclose(apply(params, other), base, atol=1e-4)
    # View 1's masked patches are never seen: changing them changes nothing.
    removed = np.asarray(masks.removed_mask(idx['ids_restore'], idx['ids_keep'].shape[1]), bool)
    pixel_mask = np.repeat(np.repeat(removed.reshape(2, 4, 4), PATCH, 1), PATCH, 2)[..., None]
    noisy = views.at[:, 0].set(jnp.where(pixel_mask, views[:, 0] + 5.0, views[:, 0]))
    np.testing.assert_allclose(apply(params, noisy), base, rtol=1e-5, atol=1e-5)


def test_decoder_block_has_the_reference_layout(setup):
    model, params, *_ = setup
    block = params['decoder_block_00']
    assert set(block) == {'norm1', 'attn', 'norm_y', 'norm2', 'cross_attn', 'norm3', 'mlp'}
    assert 'cls_token' not in params and 'pos_embed' not in str(jax.tree_util.tree_structure(params))
    assert params['mask_token'].shape == (1, 1, model.dec_width)


def test_stand_in_views_are_shifted_crops_of_one_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    pair = croco_method.croco_views(image, np.random.default_rng(3), size=16, max_shift=4, color_jitter=0.0)
    assert pair.shape == (2, 16, 16, 3) and pair.dtype == np.float32
    pixels = pair * IMAGENET_STD + IMAGENET_MEAN
    # Without jitter, some offset (dy, dx) within max_shift maps view 1 onto view 2 where they overlap.
    matches = [
        (dy, dx)
        for dy in range(-4, 5)
        for dx in range(-4, 5)
        if np.allclose(
            pixels[0, max(dy, 0) : 16 + min(dy, 0), max(dx, 0) : 16 + min(dx, 0)],
            pixels[1, max(-dy, 0) : 16 + min(-dy, 0), max(-dx, 0) : 16 + min(-dx, 0)],
            atol=1e-5,
        )
    ]
    assert len(matches) == 1
    jittered = croco_method.croco_views(image, np.random.default_rng(3), size=16, max_shift=4, color_jitter=0.4)
    assert not np.allclose(jittered, pair)


@pytest.mark.parametrize(
    ('override', 'key'),
    [
        ("model.variant='XL'", 'model.variant'),
        ("model.pos_embed='learned'", 'model.pos_embed'),
        ('model.rope_base=0.0', 'model.rope_base'),
        ('masking.ratio=1.0', 'masking.ratio'),
        ('input.max_shift=-1', 'input.max_shift'),
        ('input.num_sample=2', 'input.num_sample'),
        ('input.image_size=30', 'input.image_size'),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        croco_method.check_config(load_config(f'{CONFIG}:runlocal', [override]))


def test_recipe():
    c = load_config(CONFIG, [])
    assert (c.model.variant, c.model.pos_embed, c.model.rope_base, c.masking.ratio) == ('B+S', 'rope', 100.0, 0.9)
    assert (c.optim.base_lr, c.optim.b2, c.optim.weight_decay, c.input.global_batch) == (1.5e-4, 0.95, 0.05, 256)
    assert croco.decode_variant('L+B') == croco.decode_variant('L+B/16')
    assert croco.decode_variant('L+B')['dec_width'] == 768 and croco.decode_variant('B+S')['dec_depth'] == 8


def test_scanned_rematerialised_encoder_takes_positions():
    # The RoPE positions are broadcast to every layer of a scanned stack: same output as the unrolled stack.
    module = vit.Transformer(32, 2, 2, 64)
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    positions = jnp.asarray(vit.grid_positions(2, 3))[None].repeat(2, axis=0)
    params = module.init(jax.random.key(1), x, False, positions)['params']
    want, _ = module.apply({'params': params}, x, False, positions)
    scanned = vit.Transformer(32, 2, 2, 64, scan_layers=True, remat=True)
    got, _ = scanned.apply({'params': vit.stack_blocks(params, 2)}, x, False, positions)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(module.apply({'params': params}, x)[0], want, atol=1e-4)
