"""VICReg: the expander's shapes and init, the config (reference recipe, errors naming the key), and a 2-step runlocal
run through train.train on one device and sharded over 8 fake CPU devices (data x FSDP) with equal losses and
parameters: the global-batch variance / covariance and the expander's batch-statistics BN do not depend on the mesh."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import optim, train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import vicreg
from jaxssl.models import vicreg as vicreg_model

CONFIG = 'configs/vicreg.py:runlocal'


def test_expander_layers_and_init():
    expander = vicreg_model.Expander(hidden_dim=48, out_dim=40, layers=3)
    y = jax.random.normal(jax.random.key(0), (16, 24))
    variables = expander.init(jax.random.key(1), y)
    params = variables['params']
    shapes = jax.tree.map(jnp.shape, params)
    # Linear (with bias) + BN + ReLU twice, then Linear without bias: the reference's Projector.
    assert shapes == {
        'dense_0': {'kernel': (24, 48), 'bias': (48,)},
        'bn_0': {'scale': (48,), 'bias': (48,)},
        'dense_1': {'kernel': (48, 48), 'bias': (48,)},
        'bn_1': {'scale': (48,), 'bias': (48,)},
        'dense_2': {'kernel': (48, 40)},
    }
    # PyTorch's nn.Linear default: U(+-1/sqrt(fan_in)).
    kernel = np.asarray(params['dense_1']['kernel'])
    assert np.abs(kernel).max() <= 1 / np.sqrt(48) + 1e-7
    np.testing.assert_allclose(kernel.std(), 1 / np.sqrt(3 * 48), rtol=0.1)
    z, _ = expander.apply(variables, y, mutable=['batch_stats'])
    assert z.shape == (16, 40) and z.dtype == jnp.float32
    # BN with batch statistics: the input's offset and scale do not change z.
    z_shifted, _ = expander.apply(variables, 3.0 * y + 5.0, mutable=['batch_stats'])
    np.testing.assert_allclose(z_shifted, z, rtol=1e-3, atol=1e-4)


def test_reference_recipe():
    config = load_config('configs/vicreg.py')
    assert (config.model.head_hidden, config.model.head_out, config.model.head_layers) == (8192, 8192, 3)
    assert (config.loss.sim_coeff, config.loss.std_coeff, config.loss.cov_coeff, config.loss.std_eps) == (
        25.0, 25.0, 1.0, 1e-4,
    )  # fmt: skip
    assert config.optim.name == 'lars' and config.optim.weight_decay == 1e-6
    assert config.input.global_batch == 2048 and config.optim.epochs == 1000 and config.optim.warmup_epochs == 10
    np.testing.assert_allclose(optim.peak_learning_rate(config), 1.6)  # 0.2 x 2048 / 256
    # The cosine ends at 0.001 x the peak, as the reference's.
    schedule = optim.learning_rate_schedule(config, total_steps=1000, steps_per_epoch=1)
    np.testing.assert_allclose(schedule(1000), 1.6e-3, rtol=1e-5)


@pytest.mark.parametrize(
    'override, key',
    [
        ('input.num_sample=1', "'input.num_sample'"),
        ('loss.std_coeff=-1.0', "'loss.std_coeff'"),
        ('loss.cov_coeff=-0.5', "'loss.cov_coeff'"),
        ('loss.std_eps=0.0', "'loss.std_eps'"),
        ('optim.name=lamb', "'optim.name'"),
        ('model.scan_layers=true', "'model.scan_layers'"),
        ('model.head_layers=0', "'model.head_layers'"),
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


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path):
    _, want_state, want_rows = run(tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false')
    summary, state, rows = run(tmp_path / 'sharded', 'mesh.data=2', 'mesh.fsdp=4', 'sharding.min_size=0', *SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['loss']) for r in rows)
    for r in rows:
        # The logged terms are the unweighted ones and the loss is their 25 / 25 / 1 combination.
        np.testing.assert_allclose(r['loss'], 25 * r['invariance'] + 25 * r['variance'] + r['covariance'], rtol=1e-5)
        assert 0.0 < r['variance'] < 1.0 and r['invariance'] > 0 and r['covariance'] > 0
    for key in ('loss', 'invariance', 'variance', 'covariance'):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want_rows], rtol=1e-5)
    # atol 2e-6: FSDP sums in another order, and LARS's trust ratio turns that rounding into differences of ~1e-6
    # on parameters of ~1e-3 after two steps (measured 1.4e-6 with the tests' LLVM optimisation level 0).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), state['params'], want_state['params']
    )
    for key in ('cls/knn', 'mean_pool/knn'):
        assert 0.0 <= summary[f'final_eval/label/{key}'] <= 1.0


def test_resnet_backbone_with_the_expander_trains_and_probes(tmp_path):
    """facebookresearch/vicreg's backbone: torchvision's ResNet with zero_init_residual, the expander on its pooled
    features; its running averages are state and the probes read them."""
    config = 'configs/vicreg.py:runlocal,variant=resnet18'
    model = vicreg.make_model(load_config(config))
    params = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))['params']
    assert params['head']['dense_0']['kernel'].shape == (128, 256)  # 8 x width 16 pooled features -> the expander
    assert np.all(params['backbone']['layer1_0']['bn2']['scale'] == 0)  # each block starts as the identity
    summary, state, rows = run(tmp_path / 'run', 'input.global_batch=16', *SMALL_EVAL, config=config)
    assert summary['nonfinite_steps'] == 0 and all(np.isfinite(r['loss']) for r in rows)
    assert np.abs(state['extra']['batch_stats']['backbone']['bn1']['mean']).max() > 0
    assert 0.0 <= summary['final_eval/label/pool/knn'] <= 1.0
