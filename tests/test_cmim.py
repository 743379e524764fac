"""cMIM / A-MIM: the loss terms by known answers (scipy's Gaussian densities, a numpy Bernoulli likelihood, the
contrastive term written out by hand), the properties that define the contrastive term (no positive pair needed,
negatives averaged so the scale does not grow with the batch, bounded by log 2), the model's floor on log sigma and
per-sample embeddings, config errors, and 2 trainer steps on one device equal to the same steps sharded over 8."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.losses import mim as mim_loss
from jaxssl.methods import base, cmim
from jaxssl.models import mim as mim_model

SPEC = 'configs/cmim.py:runlocal'
QUIET = ['train.steps=2', 'train.log_every=1', 'train.tensorboard=false', 'eval.at_end=false']


def test_gaussian_and_prior_log_probs_match_scipy():
    rng = np.random.default_rng(0)
    z, mean = rng.normal(size=(2, 4, 5))
    log_scale = rng.uniform(-3, 1, size=(4, 5))
    want = stats.norm.logpdf(z, mean, np.exp(log_scale)).sum(axis=1)
    np.testing.assert_allclose(mim_loss.gaussian_log_prob(z, mean, log_scale), want, rtol=1e-5)
    np.testing.assert_allclose(mim_loss.prior_log_prob(jnp.asarray(z)), stats.norm.logpdf(z).sum(axis=1), rtol=1e-5)


def test_bernoulli_log_likelihood_sums_over_pixels():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3, size=(3, 4, 4, 1)).astype(np.float32)
    targets = rng.uniform(size=logits.shape).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = (targets * np.log(p) + (1 - targets) * np.log(1 - p)).reshape(3, -1).sum(axis=1)
    np.testing.assert_allclose(mim_loss.bernoulli_log_likelihood(logits, targets), want, rtol=1e-5)


def contrastive_by_hand(z: np.ndarray, tau: float) -> np.ndarray:
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = unit @ unit.T
    out = []
    for i in range(len(z)):
        negatives = np.mean([np.exp(s[i, j] / tau) for j in range(len(z)) if j != i])
        out.append(1 / tau - np.log(np.exp(1 / tau) + negatives))
    return np.array(out)


@pytest.mark.parametrize('tau', [0.1, 0.5, 2.0])
def test_contrastive_term_known_answer(tau):
    z = np.random.default_rng(2).normal(size=(6, 3))
    np.testing.assert_allclose(
        mim_loss.contrastive_log_prob(jnp.asarray(z), tau), contrastive_by_hand(z, tau), rtol=1e-5
    )
    # Cosine: the length of a sample does not matter.
    scaled = z * np.arange(1, 7)[:, None]
    np.testing.assert_allclose(mim_loss.contrastive_log_prob(scaled, tau), contrastive_by_hand(z, tau), rtol=1e-5)


def test_contrastive_term_is_bounded_and_needs_no_second_view():
    tau = 0.1
    # Copies of one sample: every negative is as close as the positive, the bound -log 2.
    same = np.tile([[1.0, 2.0, -1.0]], (5, 1))
    np.testing.assert_allclose(mim_loss.contrastive_log_prob(same, tau), -math.log(2), rtol=1e-5)
    # Orthogonal samples: -log(1 + exp(-1 / tau)), whatever the batch size (negatives averaged, not summed).
    for batch in (2, 4, 8):
        got = mim_loss.contrastive_log_prob(np.eye(8)[:batch], tau)
        np.testing.assert_allclose(got, -math.log1p(math.exp(-1 / tau)), rtol=1e-5)
    assert float(mim_loss.contrastive_log_prob(np.ones((1, 3)), tau)[0]) == 0.0  # a batch of one: no negatives
    zero = jnp.asarray([[0.0, 0.0], [1.0, 0.5]])  # a zero sample: finite gradient (the norm's would be NaN)
    assert np.isfinite(jax.grad(lambda z: mim_loss.contrastive_log_prob(z, tau).sum())(zero)).all()
    # Its gradient pushes samples apart: descending -log p lowers the similarity of two close samples.
    z = jnp.asarray([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.3]])
    grad = jax.grad(lambda z: -mim_loss.contrastive_log_prob(z, tau).sum())(z)
    moved = z - 0.01 * grad
    cos = lambda a, b: float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))
    assert cos(moved[0], moved[1]) < cos(z[0], z[1])


def test_loss_combines_the_terms_per_sample():
    rng = np.random.default_rng(3)
    mean, eps = rng.normal(size=(2, 4, 3))
    log_scale = rng.uniform(-2, 0, size=(4, 3))
    z = mean + np.exp(log_scale) * eps
    logits = rng.normal(size=(4, 2, 2, 1))
    targets = rng.uniform(size=logits.shape)
    p = 1 / (1 + np.exp(-logits))
    nll = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).reshape(4, -1).sum(axis=1)
    log_q = stats.norm.logpdf(z, mean, np.exp(log_scale)).sum(axis=1)
    log_prior = stats.norm.logpdf(z).sum(axis=1)
    contrastive = contrastive_by_hand(z, 0.1)
    for wc, wr, reduction in ((1.0, 1.0, 'sum'), (0.0, 1.0, 'sum'), (0.5, 2.0, 'sum'), (1.0, 1.0, 'mean')):
        loss, terms = mim_loss.mim_loss(
            logits, targets, z, mean, log_scale, temperature=0.1, contrastive_weight=wc, reconstruction_weight=wr,
            reconstruction_reduction=reduction,
        )  # fmt: skip
        rec = nll / 4 if reduction == 'mean' else nll  # 2 x 2 pixels a sample
        want = np.mean(wr * rec - 0.5 * (log_q + log_prior) - wc * contrastive)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        np.testing.assert_allclose(terms['reconstruction_nll'], rec.mean(), rtol=1e-5)
        # Logged with weight 0 too, so A-MIM and cMIM runs compare on it.
        np.testing.assert_allclose(terms['contrastive'], -contrastive.mean(), rtol=1e-5)


@pytest.fixture(scope='module')
def method():
    return cmim.Method(load_config(SPEC, ['model.widths=(4, 8)', 'model.hidden=16', 'model.latent=5']))


def test_model_floors_log_sigma_and_embeds_each_sample_alone(method):
    images = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
    params, _ = method.init(jax.random.key(0), {'image': images})
    low = jax.tree.map(lambda x: x, params)
    low['posterior']['bias'] = low['posterior']['bias'].at[5:].set(-50.0)  # the log-scale half
    pixels = method.pixels(jnp.asarray(images))
    _, log_scale = method.model.apply({'params': low}, pixels, method=mim_model.MIM.encode)
    np.testing.assert_array_equal(log_scale, mim_model.MIN_LOG_SCALE)
    logits, states = method.model.apply({'params': params}, jnp.zeros((3, 5)), method=mim_model.MIM.decode)
    assert logits.shape == (3, 32, 32, 1)  # model.channels = 1 under runlocal: grey digits
    assert [s.shape for s in states] == [(3, 16), (3, 8, 8, 8), (3, 16, 16, 4), (3, 32, 32, 4)]
    out = method.represent(params, {}, {'image': images})
    assert out['mean'].shape == (3, 5) and out['informative'].shape == (3, 5 + 16 + 8 + 4 + 4)
    np.testing.assert_array_equal(out['informative'][:, :5], out['mean'])
    alone = method.represent(params, {}, {'image': images[1:2]})  # no normalisation across the batch
    np.testing.assert_allclose(alone['informative'], out['informative'][1:2], rtol=1e-5, atol=1e-6)


def test_method_loss_samples_z_and_decodes_it(method):
    """The method's loss by hand: grey [0, 1] pixels, z = mean + sigma x eps with eps from the 'latent' stream,
    pixels decoded from z, the reconstruction summed over each sample's pixels (the config's 'sum')."""
    images = np.random.default_rng(5).normal(size=(4, 32, 32, 3)).astype(np.float32)
    params, _ = method.init(jax.random.key(0), {'image': images})
    rng = jax.random.key(7)
    loss, (metrics, _) = method.loss(params, {}, {'image': jnp.asarray(images)}, rng, jnp.asarray(0))
    grey = np.asarray(cmim.to_unit_range(jnp.asarray(images))).mean(axis=-1, keepdims=True)
    mean, log_scale = method.model.apply({'params': params}, grey, method=mim_model.MIM.encode)
    eps = np.asarray(jax.random.normal(base.stream(rng, 'latent'), mean.shape))
    z = np.asarray(mean) + np.exp(np.asarray(log_scale)) * eps
    logits, _ = method.model.apply({'params': params}, jnp.asarray(z, jnp.float32), method=mim_model.MIM.decode)
    p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    nll = -(grey * np.log(p) + (1 - grey) * np.log(1 - p)).reshape(4, -1).sum(axis=1)
    log_q = stats.norm.logpdf(z, mean, np.exp(log_scale)).sum(axis=1)
    want = np.mean(nll - 0.5 * (log_q + stats.norm.logpdf(z).sum(axis=1)) - contrastive_by_hand(z, 0.1))
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    np.testing.assert_allclose(metrics['reconstruction_nll'], nll.mean(), rtol=1e-4)


def test_pictures_show_inputs_reconstructions_and_prior_samples(method):
    images = np.zeros((1, 32, 32, 3), np.float32)
    params, _ = method.init(jax.random.key(0), {'image': images})
    picture = method.visualize(params, {})['reconstruction']
    count = method.config.eval.pictures
    assert picture.dtype == np.uint8 and picture.shape == (3 * 32 + 2 * 2, count * (32 + 2), 3)
    top, middle = picture[:32, :32].astype(int), picture[34:66, :32].astype(int)
    assert top.std() > 0 and (top[..., 0] == top[..., 2]).all()  # a grey digit of the eval split
    assert np.abs(middle - 128).max() <= 30  # an untrained decoder's sigmoid: near grey, not the digit


@pytest.mark.parametrize(
    'override, key',
    [
        ('input.image_size=34', "'input.image_size'"),
        ('model.widths=()', "'model.widths'"),
        ('model.latent=0', "'model.latent'"),
        ('model.channels=2', "'model.channels'"),
        ('loss.temperature=0.0', "'loss.temperature'"),
        ('loss.contrastive_weight=-1.0', "'loss.contrastive_weight'"),
        ('loss.reconstruction_weight=0.0', "'loss.reconstruction_weight'"),
        ('input.num_sample=2', "'input.num_sample'"),
        ('loss.reconstruction_reduction=max', "'loss.reconstruction_reduction'"),
        ('input.global_batch=1', "'input.global_batch'"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(SPEC, [override])


def run(workdir, *overrides):
    config = load_config(SPEC, [*QUIET, 'input.global_batch=16', 'model.widths=(4, 8)', 'model.hidden=16', *overrides])
    summary, state = train.train(config, str(workdir))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [row for row in map(json.loads, f) if 'loss' in row]
    return summary, jax.device_get(state), rows


def test_two_steps_sharded_equal_one_device(tmp_path):
    summary, state, rows = run(tmp_path / 'one', 'mesh.data=1')
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert all(r['contrastive'] > 0 and r['reconstruction_nll'] > 0 for r in rows)
    sharded, sharded_state, sharded_rows = run(tmp_path / 'eight', 'mesh.data=4', 'mesh.fsdp=2', 'sharding.min_size=0')
    assert jax.device_count() == 8 and sharded['final_step'] == 2
    for key in ('loss', 'contrastive', 'reconstruction_nll', 'log_q'):
        np.testing.assert_allclose([r[key] for r in sharded_rows], [r[key] for r in rows], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded_state['params'], state['params']
    )
