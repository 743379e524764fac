"""T-JEPA: masks, loss, EMA target, gradient clamping, tokenizer and padding exactness (known answers), config errors
naming the key, and the trainer end to end: a 2-step runlocal run with evaluation, and the same run sharded over
8 fake CPU devices (data x FSDP) reproducing it."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import tjepa
from jaxssl.models import tjepa as tjepa_model

CONFIG = 'configs/tjepa.py'
# The reference's shares (scripts/launch_tjepa.sh).
CONTEXT, TARGET = (0.13628349247854785, 0.36819012681604135), (0.1556321308543076, 0.6222278244105446)


@pytest.fixture(scope='module')
def method():
    # No dropout in the unit tests: its random bits make compiling ~3x slower (the trainer tests keep it).
    overrides = ['model.variant=micro', 'model.dropout=0.0', 'model.predictor_dropout=0.0']
    return tjepa.Method(load_config(f'{CONFIG}:runlocal', overrides))


# --- masks ---------------------------------------------------------------------------------------------------------
def test_mask_bounds_follow_the_reference_rounding():
    assert tjepa.mask_bounds(8, CONTEXT) == (1, 3) and tjepa.mask_bounds(8, TARGET) == (1, 5)
    assert tjepa.mask_bounds(54, CONTEXT) == (7, 20) and tjepa.mask_bounds(54, TARGET) == (8, 34)  # Jannis: D = 54


def test_masks_sizes_disjointness_and_padding():
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(200):
        m = tjepa.sample_feature_masks(16, 8, CONTEXT, TARGET, 4, rng)
        assert m['context_idx'].shape == (16, 3) and m['target_idx'].shape == (16, 4, 5)
        n_ctx, n_tgt = m['context_valid'].sum(1), m['target_valid'].sum(2)
        # One size per batch (drawn once, as the reference's collator), within the bounds, fitting in the row.
        assert len(set(n_ctx)) == 1 and len(set(n_tgt.ravel())) == 1
        n_ctx, n_tgt = int(n_ctx[0]), int(n_tgt[0, 0])
        assert 1 <= n_ctx <= 3 and 1 <= n_tgt <= 5 and n_ctx + n_tgt <= 8
        sizes.add((n_ctx, n_tgt))
        assert not m['context_idx'][:, n_ctx:].any() and not m['target_idx'][..., n_tgt:].any()  # padding: index 0
        for row in range(16):
            context = m['context_idx'][row, :n_ctx]
            assert len(set(context)) == n_ctx and list(context) == sorted(context)
            for target in m['target_idx'][row, :, :n_tgt]:
                assert len(set(target)) == n_tgt and not set(target) & set(context)  # never the context
    assert {s[0] for s in sizes} == {1, 2, 3} and {s[1] for s in sizes} == {1, 2, 3, 4, 5}


def test_masks_known_answer_when_targets_fill_the_rest():
    """With one context feature and three target features out of four, every target set is the complement."""
    m = tjepa.sample_feature_masks(32, 4, (0.25, 0.25), (0.75, 0.75), 3, np.random.default_rng(1))
    assert m['context_valid'].all() and m['target_valid'].all()
    for context, targets in zip(m['context_idx'][:, 0], m['target_idx'], strict=True):
        for target in targets:
            np.testing.assert_array_equal(target, [f for f in range(4) if f != context])


def test_masks_are_independent_per_sample():
    m = tjepa.sample_feature_masks(4000, 8, (0.25, 0.25), (0.5, 0.5), 2, np.random.default_rng(2))
    contexts = m['context_idx'][:, :2]
    # 28 possible context pairs, each ~1/28 of the rows; each feature in the context of ~1/4 of the rows.
    pairs, counts = np.unique(contexts, axis=0, return_counts=True)
    assert len(pairs) == 28 and counts.min() > 80
    np.testing.assert_allclose(np.bincount(contexts.ravel(), minlength=8) / 4000, 0.25, atol=0.03)
    # The two target sets of a row are drawn independently: they differ in most rows.
    assert np.mean(np.any(m['target_idx'][:, 0] != m['target_idx'][:, 1], axis=1)) > 0.6


# --- loss, EMA, clamping -----------------------------------------------------------------------------------------
def test_latent_mse_known_answer():
    prediction = jnp.array([[[[1.0, 3.0], [5.0, 5.0]]]])  # (B=1, M=1, T=2, H=2)
    target = jnp.array([[[[0.0, 1.0], [0.0, 0.0]]]])
    # Only the first slot is real: ((1 - 0)^2 + (3 - 1)^2) / 2 = 2.5, the padded slot is ignored.
    assert float(tjepa.latent_mse(prediction, target, jnp.array([[[True, False]]]))) == 2.5
    both = float(tjepa.latent_mse(prediction, target, jnp.ones((1, 1, 2), bool)))
    assert both == pytest.approx(float(jnp.mean((prediction - target) ** 2)))  # torch MSELoss: element mean


def test_batch_standardised_targets():
    tokens = jnp.array([[[1.0, 10.0], [5.0, 0.0]], [[3.0, 10.0], [5.0, 2.0]]])  # (B=2, N=2, H=2)
    # Per position and channel over the 2 rows: (x - mean) / std; a constant channel becomes 0 (std 0 + eps).
    want = [[[-1.0, 0.0], [0.0, -1.0]], [[1.0, 0.0], [0.0, 1.0]]]
    np.testing.assert_allclose(tjepa.standardise_over_batch(tokens), want, atol=1e-5)


def test_ema_momentum_and_update(method):
    assert float(tjepa.ema_momentum(0, 100, 0.996, 1.0)) == pytest.approx(0.996)
    assert float(tjepa.ema_momentum(50, 100, 0.996, 1.0)) == pytest.approx(0.998)
    assert float(tjepa.ema_momentum(100, 100, 0.996, 1.0)) == pytest.approx(1.0)
    params = {'encoder': {'w': jnp.full(3, 2.0)}, 'predictor': {'w': jnp.ones(2)}}
    extra = {'target_encoder': {'w': jnp.zeros(3)}}
    new = method.update_extra(params, extra, jnp.int32(0))
    np.testing.assert_allclose(new['target_encoder']['w'], 0.004 * 2.0, rtol=1e-5)  # (1 - 0.996) x 2
    last = method.update_extra(params, extra, jnp.int32(method.total_steps))
    np.testing.assert_allclose(last['target_encoder']['w'], 0.0, atol=1e-7)  # m = 1: frozen


def test_clamp_gradient():
    f = lambda tree: jnp.sum(tjepa.clamp_gradient(tree, 1.0)['a'] * jnp.array([3.0, -0.5, -7.0]))
    tree = {'a': jnp.ones(3)}
    assert float(f(tree)) == pytest.approx(-4.5)
    np.testing.assert_allclose(jax.grad(f)(tree)['a'], [1.0, -0.5, -1.0])


def test_gradients_reach_encoder_and_predictor_not_the_target(method):
    batch = method.example_batch(4)
    batch['row'][:, :4] = np.random.default_rng(0).random((4, 4))
    batch = jax.tree.map(jnp.asarray, batch)
    params, extra = jax.jit(method.init)(jax.random.key(0), batch)
    jax.tree.map(np.testing.assert_array_equal, params['encoder'], extra['target_encoder'])  # starts as a copy
    loss = lambda p, e: method.loss(p, e, batch, jax.random.key(1), 0)[0]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, extra)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[1]))  # stop-gradient on the target
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0]['predictor'])) > 0
    encoder = jax.tree.leaves(grads[0]['encoder'])
    assert max(float(jnp.abs(g).max()) for g in encoder) > 0
    assert max(float(jnp.abs(g).max()) for g in encoder) <= 1.0  # clamped to +-1 elementwise


# --- model ---------------------------------------------------------------------------------------------------------
def test_tokenizer_known_values():
    tokenizer = tjepa_model.Tokenizer(num_numerical=2, cardinalities=(3, 2), width=4, reg_tokens=1)
    rows = jnp.array([[0.5, 2.0, 2.0, 1.0]])
    params = tokenizer.init(jax.random.key(0), rows)['params']
    assert jax.tree.map(jnp.shape, params) == {'weight': (3, 4), 'bias': (4, 4), 'category_embeddings': (5, 4)}
    bound = 1 / np.sqrt(4)  # kaiming_uniform(a=sqrt(5)) on (n, 4): uniform(+-1/2)
    assert float(jnp.abs(params['weight']).max()) <= bound and float(jnp.abs(params['bias']).max()) <= bound
    w, b, e = (np.asarray(params[k]) for k in ('weight', 'bias', 'category_embeddings'))
    position = np.arange(5)[:, None]
    angle = position / 100.0 ** (2 * (np.arange(4) // 2) / 4)
    table = np.where(np.arange(4) % 2 == 0, np.sin(angle), np.cos(angle))  # interleaved sin / cos, base 100
    want = np.stack([w[0], 0.5 * w[1] + b[0], 2.0 * w[2] + b[1], e[2] + b[2], e[3 + 1] + b[3]]) + table
    np.testing.assert_allclose(tokenizer.apply({'params': params}, rows)[0], want, rtol=1e-6, atol=1e-6)


def test_predictor_table_is_ijepa_sincos():
    table = tjepa_model.sincos_table(3, 4)
    omega = np.array([1.0, 0.01])
    np.testing.assert_allclose(table[2], np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]), rtol=1e-6)


def test_padding_is_exact(method):
    """Padded context / target slots hidden by the key mask leave the real tokens' outputs unchanged."""
    rng = np.random.default_rng(3)
    rows = np.concatenate([rng.random((2, 4)), rng.integers(0, 4, (2, 4))], axis=1).astype(np.float32)
    real = jnp.array([[0, 3, 6], [0, 2, 8]])  # [REG] + two features
    padded = jnp.array([[0, 3, 6, 1, 1], [0, 2, 8, 1, 1]])
    mask = jnp.array([[True] * 3 + [False] * 2] * 2)
    encoder, predictor = method.encoder, method.predictor
    params = jax.jit(encoder.init)(jax.random.key(0), rows, padded, mask)['params']
    encode = jax.jit(encoder.apply)
    short, _ = encode({'params': params}, rows, real)
    long, _ = encode({'params': params}, rows, padded, mask)
    np.testing.assert_allclose(long[:, :3], short, rtol=1e-5, atol=1e-5)
    targets = jnp.array([[[4, 5, 0]], [[1, 7, 0]]])
    target_mask = jnp.array([[[True, True, False]], [[True, True, False]]])
    pred_params = jax.jit(predictor.init)(jax.random.key(1), long, padded, mask, targets, target_mask)['params']
    predict = jax.jit(predictor.apply)
    want = predict({'params': pred_params}, short, real, jnp.ones((2, 3), bool), targets[..., :2], target_mask[..., :2])
    got = predict({'params': pred_params}, long, padded, mask, targets, target_mask)
    np.testing.assert_allclose(got[:, :, :2], want, rtol=1e-5, atol=1e-5)


def test_represent_names_and_raw_features(method):
    batch = {'row': jnp.array([[0.1, 0.2, 0.3, 0.4, 4.0, 3.0, 5.0, 0.0]])}  # fair: 4 numerical, cardinalities 5,4,6,6
    params, extra = jax.jit(method.init)(jax.random.key(0), jax.tree.map(jnp.asarray, method.example_batch(1)))
    features = jax.jit(method.represent)(params, extra, batch)
    width = method.encoder.width
    assert {k: v.shape for k, v in features.items()} == {
        'flatten': (1, 9 * width),
        'mean_pool': (1, width),
        'reg': (1, width),
        'raw': (1, 4 + 21),
    }
    raw = np.asarray(features['raw'][0])
    np.testing.assert_allclose(raw[:4], [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    assert list(np.flatnonzero(raw[4:])) == [4, 5 + 3, 9 + 5, 15 + 0]


# --- config errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ('overrides', 'key'),
    [
        (['masking.context_share=(0.5, 0.2)'], "'masking.context_share'"),
        (['model.variant=huge'], "'model.variant'"),
        (['eval.encoder=student'], "'eval.encoder'"),
        (['input.pretrain_rows=test'], "'input.pretrain_rows'"),
        (['loss.target_norm=layer'], "'loss.target_norm'"),
        (['input.table=table.parquet'], "'input.table'"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(f'{CONFIG}:runlocal', overrides)


def test_table_dependent_errors_name_the_key(tmp_path):
    config = load_config(f'{CONFIG}:runlocal,table=wine', ['masking.target_share=(0.95, 1.0)'])
    with pytest.raises(ConfigError, match=r"'masking\.context_share' and 'masking\.target_share'"):
        tjepa.Method(config)
    missing = load_config(f'{CONFIG}:runlocal,table={tmp_path}/nothing.csv', ['input.target=y'])
    with pytest.raises(ConfigError, match=r"'input\.table'.*not found"):
        tjepa.Method(missing)


# --- the trainer ---------------------------------------------------------------------------------------------------
def smoke_config(**overrides):
    items = [
        'train.steps=2',
        'input.global_batch=16',
        'train.tensorboard=false',
        'checkpoint.async_save=false',
        "eval.probes=('knn',)",
        'eval.max_train_clips=256',
        'eval.max_test_clips=64',
        'eval.batch_size=32',
        'train.log_every=1',
    ]
    return load_config(
        f'{CONFIG}:runlocal', ['model.variant=micro', *items, *(f'{k}={v}' for k, v in overrides.items())]
    )


@pytest.fixture(scope='module')
def single_device_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('tjepa') / 'run')
    summary, state = train.train(smoke_config(**{'mesh.data': 1}), workdir)
    return summary, jax.device_get(state), workdir


def test_runlocal_trains_and_evaluates(single_device_run):
    summary, state, workdir = single_device_run
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    assert rows[0]['context_features'] >= 1 and rows[0]['target_features'] >= 1
    evaluation = {k[len('final_eval/') :]: v for k, v in summary.items() if k.startswith('final_eval/')}
    assert set(evaluation) == {f'label/{rep}/knn' for rep in ('flatten', 'mean_pool', 'reg', 'raw')}
    assert all(0.4 < v <= 1.0 for v in evaluation.values())  # fair's majority class is 68% of the rows
    # The target encoder moved (EMA of a trained encoder) but stayed close to it after 2 steps.
    moved = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), state['extra']['target_encoder'], state['params']['encoder']
    )
    assert 0 < max(jax.tree.leaves(moved)) < 0.1


def test_sharded_run_matches_one_device(tmp_path, single_device_run):
    want_summary, want_state, _ = single_device_run
    overrides = {'mesh.data': 8, 'eval.at_end': 'false'}
    summary, state = train.train(smoke_config(**overrides), str(tmp_path / 'sharded'))
    assert summary['final_loss'] == pytest.approx(want_summary['final_loss'], rel=1e-4)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    jax.tree.map(close, jax.device_get(state['params']), want_state['params'])
    jax.tree.map(close, jax.device_get(state['extra']), want_state['extra'])
