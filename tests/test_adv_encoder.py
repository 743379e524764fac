"""AdvEncoder: the generator, the high-pass filter and InfoNCE against torch transcriptions of the reference
(model/adv_gan.py, utils/fr_util.py, utils/nce.py); the patch mask; the attack's forms; the sharded trainer run
against a real victim run, with the evaluation's fooling rates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import adv_encoder
from jaxssl.models.uap_generator import PatternGenerator
from tests import sharded_runs


@pytest.fixture(scope='module')
def victim(tmp_path_factory):
    """A 1-step SimCLR run of the micro ViT at 32 px (the runlocal generator's size); its 'cls' is attacked."""
    workdir = tmp_path_factory.mktemp('victim')
    config = load_config('configs/simclr.py:runlocal', [
        'input.global_batch=8', 'train.steps=1', 'eval.at_end=false', 'train.tensorboard=false'])  # fmt: skip
    train.train(config, str(workdir))
    return str(workdir)


def torch_generator(params, noise):
    """adv_gan.Generator.forward (training mode) with jaxssl's weights."""
    t = lambda a: torch.tensor(np.asarray(a))
    x = t(noise)[:, :, None, None]
    i = 0
    while f'deconv_{i}' in params:
        layer = params[f'deconv_{i}']
        stride, padding = (1, 0) if i == 0 else (2, 1)
        x = F.conv_transpose2d(x, t(layer['kernel']).permute(3, 2, 0, 1), t(layer['bias']), stride, padding)
        bn = params[f'bn_{i}']
        x = F.relu(F.batch_norm(x, None, None, t(bn['scale']), t(bn['bias']), training=True, eps=1e-5))
        i += 1
    out = torch.tanh(F.conv_transpose2d(x, t(params['out']['kernel']).permute(3, 2, 0, 1), t(params['out']['bias']),
                                        2, 1))  # fmt: skip
    reduced = F.conv2d(out.permute(1, 0, 2, 3), t(params['reduce']['kernel']).permute(3, 2, 0, 1),
                       t(params['reduce']['bias']), padding=1)  # fmt: skip
    return reduced.permute(1, 0, 2, 3)[0].permute(1, 2, 0).numpy()  # (S, S, 3)


def test_generator_equals_the_reference():
    noise = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    model = PatternGenerator((8, 4))
    variables = model.init(jax.random.key(0), noise)
    # Non-trivial biases and norm parameters, so every term is compared.
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), variables['params'])
    got, _ = model.apply({**variables, 'params': params}, noise, mutable=['batch_stats'])
    assert got.shape == (16, 16, 3)  # 4 x 2^2
    np.testing.assert_allclose(got, torch_generator(params, noise), rtol=1e-4, atol=1e-5)


def torch_high_frequency(images, r):
    """fr_util.generate_high (NCHW), its radial mask loop included."""
    rows = images.shape[2]
    mask = torch.zeros((rows, rows))
    for i in range(rows):
        for j in range(rows):
            mask[i, j] = 1.0 if np.sqrt((i - rows / 2) ** 2 + (j - rows / 2) ** 2) < r else 0
    bs, c, h, w = images.shape
    fd = torch.fft.fftshift(torch.fft.fftn(images.reshape(bs * c, h, w), dim=(-2, -1)))
    fd = torch.fft.ifftn(torch.fft.ifftshift(fd * (1.0 - mask)), dim=(-2, -1))
    return torch.real(fd).reshape(bs, c, h, w)


def test_high_frequency_equals_the_reference_and_removes_constants():
    images = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    want = torch_high_frequency(torch.tensor(images).permute(0, 3, 1, 2), 4).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(adv_encoder.high_frequency(jnp.asarray(images), 4), want, atol=1e-5)
    constant = jnp.full((1, 16, 16, 3), 0.7)
    np.testing.assert_allclose(adv_encoder.high_frequency(constant, 4), 0.0, atol=1e-6)


def test_info_nce_equals_the_reference():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    logits = F.normalize(torch.tensor(q), dim=-1) @ F.normalize(torch.tensor(k), dim=-1).T
    want = F.cross_entropy(logits / 0.1, torch.arange(6)).item()
    np.testing.assert_allclose(adv_encoder.info_nce(jnp.asarray(q), jnp.asarray(k), 0.1), want, rtol=1e-5)


def test_patch_mask_is_the_reference_square():
    mask = adv_encoder.patch_mask(64, 0.03, 14)[..., 0]
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (39, 49, 39, 49)  # 11 x 11, as the fact sheet
    assert mask.sum() == 121


@pytest.mark.parametrize('form', ['perturbation', 'patch'])
def test_patterns_stay_in_range_and_apply_as_the_form_says(victim, form):
    config = load_config(
        f'configs/adv_encoder.py:runlocal,form={form}', [f'attack.victim={victim}', 'attack.victim_representation=cls']
    )
    method = adv_encoder.Method(config)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    noise = jax.random.normal(jax.random.key(1), (64, 100))
    variables = method.generator.init(jax.random.key(0), noise)
    params = dict(variables['params'])
    params['out'] = {**params['out'], 'kernel': params['out']['kernel'] * 100}  # a saturated tanh: the clip matters
    extra = {'noise': noise, 'generator_stats': variables['batch_stats']}
    pattern, _ = method.pattern(params, extra)
    attacked = method.apply_pattern(images, pattern)
    pixels = adv_encoder.to_pixels(images)
    if form == 'perturbation':
        assert np.isclose(float(jnp.abs(pattern).max()), 10 / 255)
        np.testing.assert_allclose(attacked - pixels, jnp.broadcast_to(pattern, pixels.shape), atol=1e-6)
    else:
        assert float(pattern.min()) == 0.0 and float(pattern.max()) == 1.0
        inside = method.mask[..., 0] > 0
        np.testing.assert_allclose(attacked[:, ~inside], pixels[:, ~inside], atol=1e-6)
        np.testing.assert_allclose(attacked[:, inside], jnp.broadcast_to(pattern[inside], attacked[:, inside].shape))


@pytest.mark.parametrize(
    'override, key',
    [
        ('input.image_size=64', 'input.image_size'),
        ('attack.form=sticker', 'attack.form'),
        ('attack.epsilon=0.0', 'attack.epsilon'),
        ('attack.patch_margin=40', 'attack.patch_margin'),
        ('attack.victim=/nonexistent', 'attack.victim'),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        load_config('configs/adv_encoder.py:runlocal', [override])


def test_a_victim_is_required():
    with pytest.raises(ConfigError, match=r'attack\.victim'):
        adv_encoder.Method(load_config('configs/adv_encoder.py:runlocal'))


@pytest.mark.slow
def test_sharded_run_matches_one_device_and_reports_fooling_rates(victim, tmp_path):
    # The biases before each BatchNorm have a zero gradient up to rounding, which Adam's first steps scale to +-lr
    # (5e-5 here) whatever its sign: parameters agree to 1e-4 (2 steps), the logged losses to 1e-5.
    summary, _ = sharded_runs.assert_sharded_matches_one_device(
        'configs/adv_encoder.py:runlocal', tmp_path, f'attack.victim={victim}', 'attack.victim_representation=cls',
        'input.global_batch=16', 'generator.noise_batch=8', keys=('loss', 'info_nce', 'high_frequency'), atol=1e-4,
    )  # fmt: skip
    for probe in ('knn', 'linear'):
        for kind in ('clean', 'attacked', 'noise'):
            assert 0.0 <= summary[f'final_eval/{probe}/{kind}_accuracy'] <= 1.0
        assert 0.0 <= summary[f'final_eval/{probe}/attacked_fooling_rate'] <= 1.0
    assert -1.0 <= summary['final_eval/feature_cosine'] <= 1.0
    assert list((tmp_path / 'sharded' / 'pictures').glob('pattern_*.png'))
