"""SimCLR: the view augmentations (known answers, determinism per seed), config errors naming the key, and a 2-step
runlocal run through train.train on one device and sharded over 8 fake CPU devices (data x FSDP) with equal
losses and parameters: the global-batch NT-Xent and the head's batch-statistics BN do not depend on the mesh."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import optim, train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import views
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import simclr

CONFIG = 'configs/simclr.py:runlocal'


def test_colour_ops_known_answers():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 0.9, size=(6, 5, 3)).astype(np.float32)
    grey = views.grayscale(image)
    np.testing.assert_allclose(grey[..., 0], image @ views.LUMA, rtol=1e-6)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    np.testing.assert_allclose(views.adjust_brightness(image, 0.5), image * 0.5, rtol=1e-6)
    np.testing.assert_allclose(views.adjust_contrast(image, 1.0), image, rtol=1e-6)
    flat = views.adjust_contrast(image, 0.0)  # every pixel becomes its channel's mean
    np.testing.assert_allclose(flat, np.broadcast_to(image.mean(axis=(0, 1)), image.shape), rtol=1e-5)
    np.testing.assert_allclose(views.adjust_saturation(image, 0.0), grey, rtol=1e-6)
    np.testing.assert_allclose(views.adjust_hue(image, 0.0), image, atol=1e-5)
    np.testing.assert_allclose(views.adjust_hue(grey, 0.3), grey, atol=1e-5)  # greys have no hue
    # A full turn is the identity; a quarter turn of a weakly coloured image (no clipping) keeps the luma.
    np.testing.assert_allclose(views.adjust_hue(image, 1.0), image, atol=1e-5)
    pale = 0.5 + 0.2 * (image - 0.5)
    # atol: YIQ's luma weights (0.299, ...) differ from tf's (0.2989, ...) in the fourth decimal.
    np.testing.assert_allclose(views.adjust_hue(pale, 0.25) @ views.LUMA, pale @ views.LUMA, atol=1e-4)
    assert not np.allclose(views.adjust_hue(pale, 0.25), pale, atol=1e-3)
    blurred = views.gaussian_blur(image, 1.0, 3)
    np.testing.assert_allclose(blurred.mean(), image.mean(), atol=2e-2)  # a normalised kernel keeps the level
    assert blurred.std() < image.std()
    np.testing.assert_allclose(views.gaussian_blur(np.full((5, 5, 3), 0.4, np.float32), 1.5, 3), 0.4, rtol=1e-6)


def test_views_deterministic_per_seed_and_different_between_draws():
    image = (np.random.default_rng(0).uniform(size=(28, 28, 3)) * 255).astype(np.uint8)
    make = lambda seed: views.simclr_view(image, np.random.default_rng(seed), size=16, blur_prob=0.5)
    a, b, c = make(1), make(1), make(2)
    assert a.shape == (16, 16, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Nothing random applied: the crop of the whole image, ImageNet-normalised.
    plain = views.simclr_view(
        image, np.random.default_rng(0), size=28, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False,
        jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
    )  # fmt: skip
    np.testing.assert_allclose(plain, (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-5, atol=1e-5)


def test_pipeline_gives_two_different_views_per_image_deterministically():
    config = load_config(CONFIG, ['input.global_batch=4'])
    method = simclr.Method(config)
    first = lambda: next(iter(method.dataset(seed=3, process_index=0, process_count=1)[0]))
    a, b = first(), first()
    assert a['image'].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'][0::2], a['label'][1::2])  # views of one image are adjacent
    assert not np.array_equal(a['image'][0], a['image'][1])


@pytest.mark.parametrize(
    'override, key',
    [
        ('input.num_sample=1', "'input.num_sample'"),
        ('loss.temperature=0.0', "'loss.temperature'"),
        ('optim.name=lamb', "'optim.name'"),
        ('model.scan_layers=true', "'model.scan_layers'"),
        ('input.jitter_prob=1.5', "'input.jitter_prob'"),
        ('model.head_layers=0', "'model.head_layers'"),
        ('model.variant=XL', "'model.variant'"),
        ('model.head_type=linear', "'model.head_type'"),
        ('model.head_kappa=0.0', "'model.head_kappa'"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIG, [override])


def test_batch_that_cannot_split_over_devices_names_the_key(tmp_path):
    """global_batch 4 gives 8 views (the trainer's own check passes) but 4 pairs cannot split over 8 devices."""
    config = load_config(CONFIG, ['input.global_batch=4', 'train.steps=1', 'train.tensorboard=false'])
    with pytest.raises(ConfigError, match=re.escape("'input.global_batch'")):
        train.train(config, str(tmp_path))


SMALL_EVAL = ['eval.max_train_clips=64', 'eval.max_test_clips=32', 'eval.batch_size=16', "eval.probes=('knn',)"]


def run(workdir, *overrides, config=CONFIG):
    config = load_config(config, ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', *overrides])
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp('simclr') / 'one', 'mesh.data=1', 'eval.at_end=false')


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, one_device):
    _, want_state, want_rows = one_device
    summary, state, rows = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['loss']) for r in rows)
    assert all(0.0 <= r['contrastive_acc'] <= 1.0 for r in rows)
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state['params'], want_state['params']
    )
    for key in ('label/cls/knn', 'label/mean_pool/knn'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0


@pytest.mark.slow
def test_resnet_backbone_sharded_matches_one_device(tmp_path):
    """The paper's backbone family (runlocal: a ResNet-18 of width 16 with the CIFAR stem): global-batch BatchNorm
    and NT-Xent give the same losses, parameters and running averages on one device and sharded; the probes read
    the pooled features with the running averages."""
    config = 'configs/simclr.py:runlocal,variant=resnet18'
    small = ['input.global_batch=16']
    _, want_state, want_rows = run(tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false', *small, config=config)
    summary, state, rows = run(
        tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *small, *SMALL_EVAL, config=config
    )
    assert summary['nonfinite_steps'] == 0
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    for part in ('params', 'extra'):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), state[part], want_state[part])
    assert np.abs(state['extra']['batch_stats']['backbone']['bn1']['mean']).max() > 0
    assert 0.0 <= summary['final_eval/label/pool/knn'] <= 1.0


def test_reweighting_head_and_no_head():
    """Xue et al.'s ReweightProjectionHead (z = h * [1 / kappa^i], a non-trainable buffer) on the cls token, and
    'none' (z = h): neither adds parameters; the loss still reaches the backbone."""
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    kappa = 1.3
    for head_type in ('reweight', 'none'):
        config = load_config(CONFIG, [f'model.head_type={head_type}', f'model.head_kappa={kappa}'])
        model = simclr.make_model(config)
        params = model.init(jax.random.key(0), images)['params']
        assert 'head' not in params
        z, intermediates = model.apply({'params': params}, images)
        h = np.asarray(intermediates['cls'], np.float64)
        weights = np.array([1 / kappa**i for i in range(h.shape[1])]) if head_type == 'reweight' else 1.0
        np.testing.assert_allclose(np.asarray(z), h * weights, rtol=1e-5, atol=1e-7)
    grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, images)[0] ** 2))(params)
    assert float(optim.global_norm(grads)) > 0
