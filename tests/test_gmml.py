"""GMML: the group-corruption plan (connected rectangles, coverage, alignment, the paste / noise split), the on-device
fill (noise inside the mask, donor pixels from an image of the same view slot, nothing outside), the masked L1 vs
numpy, the RECHead as a ConvTranspose2d, config errors naming the key, and a 2-step runlocal run on 8 fake CPU
devices (data x FSDP) ending with the frozen probes."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxssl import masks, train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import gmml
from jaxssl.models import gmml as gmml_model

CONFIG = 'configs/gmml.py:runlocal'


def test_group_mask_is_few_connected_rectangles_covering_the_drawn_ratio():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        mask = masks.group_block_mask(32, 32, 0.75, rng)
        assert mask.shape == (32, 32) and mask.dtype == bool
        # Drawn until U(0.5, 0.75) of the pixels are covered; the last block (at most 8 x 8: randint(1, 9) is
        # exclusive) may overshoot.
        assert 0.5 * 1024 <= mask.sum() < 0.75 * 1024 + 64
        # Connected groups, not scattered pixels: over these seeds the smallest mean group is 61 px; a per-pixel
        # random mask of 60% coverage has groups of 12 px on average.
        _, groups = ndimage.label(mask)
        assert mask.sum() / groups >= 30
    # Deterministic per generator state.
    a = masks.group_block_mask(32, 32, 0.75, np.random.default_rng(7))
    np.testing.assert_array_equal(a, masks.group_block_mask(32, 32, 0.75, np.random.default_rng(7)))


def test_group_mask_replays_the_reference_draws():
    """The reference's loop, by hand: numpy randint's exclusive upper bounds, target U(min(.5, r), r) * H * W."""
    rng = np.random.default_rng(3)
    height, width, ratio, longest = 40, 24, 0.3, (12, 7)  # int(40 * 0.3), int(24 * 0.3)
    target = rng.uniform(0.3, 0.3) * height * width
    want = np.zeros((height, width), dtype=bool)
    while want.sum() < target:
        top, left = rng.integers(0, height - 1), rng.integers(0, width - 1)
        h, w = min(rng.integers(1, longest[0]), height - top), min(rng.integers(1, longest[1]), width - left)
        want[top : top + h, left : left + w] = True
    got = masks.group_block_mask(height, width, ratio, np.random.default_rng(3))
    np.testing.assert_array_equal(got, want)
    assert got.sum() >= 0.3 * height * width


def test_aligned_mask_is_whole_patches():
    mask = masks.group_block_mask(32, 32, 0.75, np.random.default_rng(0), align=4, max_block=0.5)
    cells = mask.reshape(8, 4, 8, 4).transpose(0, 2, 1, 3).reshape(64, 16)
    assert np.all(cells.all(axis=1) | ~cells.any(axis=1))


def test_corruption_plan_splits_paste_and_noise_at_the_reference_ratios():
    rng = np.random.default_rng(0)
    plans = [masks.gmml_corruption(32, rng) for _ in range(300)]
    paste = np.array([bool(p['paste']) for p in plans])
    cover = np.array([p['mask'].mean() for p in plans])
    assert abs(paste.mean() - 0.5) < 0.12  # p = 0.5; 300 draws: 4 sigma = 0.115
    assert np.all((cover[paste] >= 0.3) & (cover[paste] < 0.3 + 64 / 1024))  # exactly 30%, plus the last block
    assert np.all((cover[~paste] >= 0.5) & (cover[~paste] < 0.75 + 64 / 1024))
    assert masks.gmml_corruption(32, rng, replace_prob=0.0)['paste'] == np.False_


def test_corrupt_fills_noise_or_donor_pixels_inside_the_mask_only():
    n, views, size = 8, 2, 16
    # Image j is the constant j + 10 in every pixel, so a pasted pixel names its donor.
    images = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None] + 10, (n, size, size, 3))
    mask = np.zeros((n, size, size), dtype=bool)
    mask[:, 2:10, 4:12] = True
    paste = np.array([True, False] * 4)
    out = np.asarray(gmml.corrupt(images, jnp.asarray(mask), jnp.asarray(paste), jax.random.key(0), views))
    np.testing.assert_array_equal(out[~mask], np.asarray(images)[~mask])  # outside the mask: the clean image
    for i in range(n):
        inside = out[i][mask[i]]
        if paste[i]:
            donor = inside[0, 0] - 10
            np.testing.assert_array_equal(inside, donor + 10)  # one donor, its pixels at the same place
            assert donor % views == i % views  # from the same view slot
        else:
            assert abs(inside.mean()) < 0.3 and 0.7 < inside.std() < 1.3  # N(0, 1), far from the clean 10 + i


def test_masked_l1_matches_numpy_and_ignores_clean_pixels():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 3, 8, 8, 3)).astype(np.float32)
    mask = rng.random((3, 8, 8)) < 0.4
    got = gmml.reconstruction_l1(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), 'corrupted')
    want = np.abs(pred - target)[np.broadcast_to(mask[..., None], pred.shape)].mean()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(
        gmml.reconstruction_l1(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), 'all'),
        np.abs(pred - target).mean(),
        rtol=1e-6,
    )
    grad = jax.grad(lambda p: gmml.reconstruction_l1(p, jnp.asarray(target), jnp.asarray(mask), 'corrupted'))(
        jnp.asarray(pred)
    )
    assert np.all(np.asarray(grad)[~mask] == 0) and np.all(np.asarray(grad)[mask] != 0)


def test_reconstruction_head_is_a_patch_conv_transpose():
    head = gmml_model.ReconstructionHead(layers=0, patch=2, channels=3)
    tokens = jax.random.normal(jax.random.key(0), (2, 4, 5))  # a 2 x 2 grid of 5-wide tokens
    params = head.init(jax.random.key(1), tokens, (2, 2))['params']
    out = np.asarray(head.apply({'params': params}, tokens, (2, 2)))
    kernel = np.asarray(params['conv_transpose_kernel']).reshape(5, 2, 2, 3)  # (d, i, j, c)
    bias = np.asarray(params['conv_transpose_bias'])
    # torch ConvTranspose2d, kernel = stride = 2: out[y*2+i, x*2+j, c] = sum_d tok[y, x, d] K[d, c, i, j] + b[c]
    want = np.zeros((2, 4, 4, 3), np.float32)
    grid = np.asarray(tokens).reshape(2, 2, 2, 5)
    for y in range(2):
        for x in range(2):
            want[:, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2] = np.einsum('bd,dijc->bijc', grid[:, y, x], kernel) + bias
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    'override, key',
    [
        ('model.recons_blocks=(3,)', "'model.recons_blocks'"),
        ('corruption.noise_ratio=0.0', "'corruption.noise_ratio'"),
        ('corruption.align=16', "'corruption.align'"),
        ('loss.region=patches', "'loss.region'"),
        ('model.variant=XL', "'model.variant'"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIG, [override])


def test_runlocal_two_steps_sharded_and_evaluates(tmp_path):
    overrides = ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', 'mesh.data=2', 'mesh.fsdp=4']
    small_eval = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)"]
    config = load_config(CONFIG, [*overrides, 'sharding.min_size=0', *small_eval])
    summary, _ = train.train(config, str(tmp_path))
    with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['loss']) and r['loss'] > 0 for r in rows)
    assert all(0.3 <= r['corrupted_fraction'] < 0.85 for r in rows)
    for key in ('label/cls/knn', 'label/mean_pool/knn'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0
