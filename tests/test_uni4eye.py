"""Uni4Eye: the Sobel gradient-map target, both branches' losses on the removed patches only (2-D and 3-D) against
numpy, one shared transformer for both input kinds, the stand-in volumes and config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from jaxssl import masks
from jaxssl.config import ConfigError, load_config
from jaxssl.data import volumes
from jaxssl.methods import uni4eye as method
from jaxssl.models import uni4eye

CONFIG = 'configs/uni4eye.py:runlocal'
LOSS = ml_collections.ConfigDict(dict(norm_pix_loss=True, sobel_size=5, pixel_weight=1.0, gradient_weight=1.0))


def numpy_gradient_map(x: np.ndarray, size: int) -> np.ndarray:
    """The 2-D Sobel kernels as full matrices through scipy, slice by slice; 'mirror' is OpenCV's REFLECT_101."""
    derivative, smoothing = method.SOBEL[size]
    kx, ky = np.outer(smoothing, derivative), np.outer(derivative, smoothing)
    out = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(*x.shape[:-3], x.shape[-1]):
        lead, channel = idx[:-1], idx[-1]
        plane = x[(*lead, slice(None), slice(None), channel)].astype(np.float64)
        gx = ndimage.correlate(plane, kx, mode='mirror')
        gy = ndimage.correlate(plane, ky, mode='mirror')
        out[(*lead, slice(None), slice(None), channel)] = 0.5 * np.abs(gx) + 0.5 * np.abs(gy)
    return out / method.sobel_gain(size)


def numpy_patches(x: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    """Token by token with explicit slices, (row-major grid order; each patch flattened with channel fastest)."""
    grid = [s // p for s, p in zip(x.shape[1:-1], patch, strict=True)]
    rows = []
    for cell in np.ndindex(*grid):
        window = tuple(slice(c * p, (c + 1) * p) for c, p in zip(cell, patch, strict=True))
        rows.append(x[(slice(None), *window)].reshape(x.shape[0], -1))
    return np.stack(rows, axis=1)


def numpy_norm_pix(patches: np.ndarray) -> np.ndarray:
    mean = patches.mean(-1, keepdims=True)
    return (patches - mean) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)


@pytest.mark.parametrize('size', [3, 5])
def test_gradient_map_matches_scipy_sobel(size):
    rng = np.random.default_rng(size)
    image = rng.normal(size=(2, 7, 9, 3)).astype(np.float32)
    volume = rng.normal(size=(1, 3, 8, 6, 1)).astype(np.float32)
    for x in (image, volume):
        np.testing.assert_allclose(method.gradient_map(jnp.asarray(x), size), numpy_gradient_map(x, size), atol=1e-5)
    assert method.sobel_gain(size) == {3: 4.0, 5: 48.0}[size]


def test_gradient_map_of_a_step_edge():
    # A vertical unit step: |G_x| reaches the gain next to the edge, G_y is 0, so the map peaks at 0.5; flat
    # regions (beyond the kernel's reach) are 0.
    x = np.zeros((1, 12, 12, 1), np.float32)
    x[:, :, 6:] = 1.0
    g = np.asarray(method.gradient_map(jnp.asarray(x), 3))[0, :, :, 0]
    np.testing.assert_allclose(g[:, 5:7], 0.5, atol=1e-6)
    np.testing.assert_allclose(g[:, :4], 0.0, atol=1e-6)
    np.testing.assert_allclose(g[:, 8:], 0.0, atol=1e-6)


@pytest.fixture(scope='module')
def setup():
    """A micro model (patch 4, 3-D cubes 2x4x4) with a 2-D and a 3-D batch and their masks."""
    model = uni4eye.make_pretrain_model('micro/4', depth_patch=2)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    volume = rng.normal(size=(2, 4, 8, 8, 1)).astype(np.float32)
    image_idx = masks.shuffle_masking_from_noise(rng.random((2, 16)), 0.75)
    volume_idx = masks.shuffle_masking_from_noise(rng.random((2, 8)), 0.75)
    inputs = (image, image_idx['ids_keep'], image_idx['ids_restore'])
    inputs += (volume, volume_idx['ids_keep'], volume_idx['ids_restore'])
    params = uni4eye.init_params(model, jax.random.key(0), *inputs)
    return model, params, inputs


def test_patchify_matches_explicit_slices():
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 8, 2))
    np.testing.assert_allclose(uni4eye.patchify(x, (2, 3, 4)), numpy_patches(x, (2, 3, 4)))
    np.testing.assert_allclose(uni4eye.patchify(x[:, 0], (3, 4)), numpy_patches(x[:, 0], (3, 4)))


@pytest.mark.parametrize('kind', ['2d', '3d'])
def test_both_branch_losses_on_removed_patches_match_numpy(setup, kind):
    model, params, inputs = setup
    x, ids_keep, ids_restore = inputs[:3] if kind == '2d' else inputs[3:]
    patch = model.patch_2d if kind == '2d' else model.patch_3d
    losses, count = method.input_losses(model, params, jnp.asarray(x), ids_keep, ids_restore, LOSS, train=False)
    predictions, _ = model.apply({'params': params}, x, ids_keep, ids_restore)
    removed = ids_restore >= ids_keep.shape[1]  # token j was hidden iff its shuffle position is past the kept ones
    assert int(count) == removed.sum() == 2 * (ids_restore.shape[1] - ids_keep.shape[1])
    targets = {'pixel': x, 'gradient': numpy_gradient_map(x, LOSS.sobel_size)}
    for branch, values in targets.items():
        target = numpy_norm_pix(numpy_patches(values, patch))
        error = ((np.asarray(predictions[branch]) - target) ** 2).mean(-1)
        np.testing.assert_allclose(losses[branch], error[removed].mean(), rtol=2e-5)
    # Every patch is predicted; only the removed ones enter the loss (the numpy mean above reads those only).
    assert predictions['pixel'].shape == (2, ids_restore.shape[1], int(np.prod(patch)) * x.shape[-1])


@pytest.mark.slow
def test_one_transformer_serves_both_input_kinds(setup):
    model, params, inputs = setup
    assert set(params) == {'patch_embed_2d', 'patch_embed_3d', 'cls_token', 'encoder', 'pixel_decoder',
                           'gradient_decoder'}  # fmt: skip

    def grads(kind):
        x, keep, restore = inputs[:3] if kind == '2d' else inputs[3:]
        fn = lambda p: sum(method.input_losses(model, p, jnp.asarray(x), keep, restore, LOSS, train=False)[0].values())
        return jax.jit(jax.grad(fn))(params)  # compiled: op-by-op the backward pass takes minutes

    def norm(tree):
        return float(sum(jnp.abs(leaf).sum() for leaf in jax.tree.leaves(tree)))

    for kind, own, other in (('2d', '2d', '3d'), ('3d', '3d', '2d')):
        g = grads(kind)
        # Each embedding and output head is used only by its own inputs; the transformers by both.
        assert norm(g[f'patch_embed_{own}']) > 0 and norm(g[f'patch_embed_{other}']) == 0
        for branch in ('pixel_decoder', 'gradient_decoder'):
            assert norm(g[branch][f'pred_{own}']) > 0 and norm(g[branch][f'pred_{other}']) == 0
            assert norm(g[branch]['decoder']) > 0
        assert norm(g['encoder']) > 0 and norm(g['cls_token']) > 0


def test_stand_in_volumes_and_config_errors():
    volume, label = volumes.sample_volume(np.random.default_rng(0), 8, 32)
    assert volume.shape == (8, 32, 32, 1) and volume.dtype == np.float32 and 0 <= label < 10
    np.testing.assert_allclose([volume.mean(), volume.std()], [0.0, 1.0], atol=1e-3)
    again, _ = volumes.sample_volume(np.random.default_rng(0), 8, 32)
    np.testing.assert_array_equal(volume, again)
    for override, key in (
        ('loss.sobel_size=4', 'loss.sobel_size'),
        ('input.volume_size=48', 'input.volume_size'),
        ('model.depth_patch=3', 'model.depth_patch'),
        ('loss.gradient_weight=-1.0', 'loss.gradient_weight'),
    ):
        with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
            load_config(CONFIG, [override])


def test_pictures_come_from_the_pixel_branch():
    config = load_config(CONFIG, ['eval.pictures=2'])
    m = method.Method(config)
    batch = m.example_batch(2)
    params, _ = m.init(jax.random.key(0), batch)
    pictures = m.visualize(params, {})['reconstruction']
    assert pictures.dtype == np.uint8 and pictures.ndim == 3 and pictures.shape[-1] == 3
    assert m.tokens_per_example() == 64 + 2 * 8 * 8  # 32x32 images in 4x4 patches, 8x32x32 volumes in 4x4x4 cubes
