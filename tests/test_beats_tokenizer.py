"""BEATs's self-distilled tokenizer: the NormEMA quantizer against a numpy transcription of the reference's update,
cosine k-means on clustered data, the training objective by hand, and the iteration chain on the one trainer:
a BEATs run teaches a tokenizer (sharded = one device), whose codes label the next BEATs run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharded_runs import assert_sharded_matches_one_device

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import base, beats, beats_tokenizer
from jaxssl.models import beats as beats_model
from jaxssl.models import norm_ema_quantizer as vq


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_ema_update(weight, usage, z, decay):
    """The reference's NormEMAVectorQuantizer forward in training mode, in numpy (every vector counts)."""
    codes = np.argmin((z**2).sum(1, keepdims=True) + (weight**2).sum(1) - 2 * z @ weight.T, axis=1)
    onehot = np.eye(len(weight))[codes]
    bins = onehot.sum(0)
    usage = decay * usage + (1 - decay) * bins
    empty = bins == 0
    means = unit((z.T @ onehot / np.where(empty, 1.0, bins)).T + 1e-30)
    means = np.where(empty[:, None], weight, means)
    return unit(decay * weight + (1 - decay) * means), usage, codes


def test_ema_update_and_codes_match_the_reference():
    rng = np.random.default_rng(0)
    codebook = unit(rng.normal(size=(16, 8)))
    z = unit(rng.normal(size=(40, 8)))
    usage = rng.uniform(size=16)
    want_codebook, want_usage, want_codes = reference_ema_update(codebook, usage, z, 0.9)
    codes = vq.nearest_codes(jnp.asarray(z), jnp.asarray(codebook))
    np.testing.assert_array_equal(codes, want_codes)
    assert len(np.unique(want_codes)) < 16  # some codes get no vector and only renormalise
    got = vq.ema_update(jnp.asarray(codebook), jnp.asarray(usage), jnp.asarray(z), codes, jnp.ones(40), 0.9)
    np.testing.assert_allclose(got[0], want_codebook, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want_usage, rtol=1e-6)
    # Zero-weight vectors (padding) move nothing: the same update as without them.
    extra = unit(rng.normal(size=(10, 8)))
    padded = jnp.asarray(np.concatenate([z, extra]))
    weights = jnp.asarray(np.r_[np.ones(40), np.zeros(10)])
    codes = vq.nearest_codes(padded, jnp.asarray(codebook))
    again = vq.ema_update(jnp.asarray(codebook), jnp.asarray(usage), padded, codes, weights, 0.9)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), again, got)


def test_cosine_kmeans_finds_the_directions_and_ignores_padding():
    rng = np.random.default_rng(1)
    directions = unit(rng.normal(size=(4, 16)))
    samples = unit(np.repeat(directions, 50, axis=0) + 0.05 * rng.normal(size=(200, 16)))
    outliers = unit(rng.normal(size=(30, 16)))  # padding: weight 0, never a starting mean
    data = jnp.asarray(np.concatenate([samples, outliers]))
    weights = jnp.asarray(np.r_[np.ones(200), np.zeros(30)])
    found = 0
    for seed in range(5):
        means, counts = vq.kmeans_init(data, weights, 4, jax.random.key(seed), iterations=10)
        means = np.asarray(means)
        np.testing.assert_allclose(np.linalg.norm(means, axis=1), 1.0, rtol=1e-5)
        assert float(counts.sum()) == 200.0
        # Converged Lloyd: each used mean is the normalised mean of the valid samples nearest to it, so the
        # zero-weight outliers moved nothing.
        nearest = np.argmax(samples @ means.T, axis=1)
        for k in np.unique(nearest):
            np.testing.assert_allclose(means[k], unit(samples[nearest == k].mean(0)), atol=1e-5)
        if sorted(np.asarray(counts).tolist()) == [50.0] * 4:  # a start in every cluster finds all four
            assert (means @ directions.T).max(axis=0).min() > 0.99
            found += 1
    assert found  # random starts land one per cluster with probability ~0.1 each; some of these seeds do


def test_objective_by_hand(tokenizer_method):
    method, params, _, extra, batch = tokenizer_method
    loss_fn = jax.jit(method.loss)
    loss, (metrics, new_extra) = loss_fn(params, extra, batch, jax.random.key(1), 0)
    z = np.asarray(method.model.apply({'params': params}, batch['spectrogram'], method=method.model.encode))
    valid = np.asarray(beats_model.token_valid(batch['spectrogram']))
    assert 0 < valid[0].sum() < valid.shape[1] and valid[1:].all()  # clip 0's padding patches leave every mean
    codebook = np.asarray(extra['codebook'])  # initialised by the fixture's first step
    codes = np.argmax(z @ codebook.T, axis=-1)
    commitment = np.mean((codebook[codes] - z) ** 2, axis=-1)[valid].mean()  # the MSE: a mean over the 256 values
    prediction = method.model.apply(
        {'params': params}, jnp.asarray(codebook[codes]), jnp.asarray(valid), method=method.model.estimate
    )
    target, _ = method.teacher.apply({'params': extra['teacher']}, batch['spectrogram'])
    cosine = np.sum(unit(np.asarray(prediction)) * unit(np.asarray(target)), axis=-1)[valid].mean()
    np.testing.assert_allclose(metrics['cosine'], cosine, rtol=1e-5)
    np.testing.assert_allclose(metrics['commitment'], commitment, rtol=1e-5)
    np.testing.assert_allclose(loss, 1 - cosine + commitment, rtol=1e-5)
    assert metrics['codes_used'] == len(np.unique(codes[valid]))
    # Later steps move the codebook by the EMA only.
    want, _ = vq.ema_update(*(jnp.asarray(a) for a in (codebook, extra['usage'])), jnp.asarray(z.reshape(-1, 256)),
                            jnp.asarray(codes.ravel()), jnp.asarray(valid.ravel(), jnp.float32), 0.99)  # fmt: skip
    np.testing.assert_allclose(new_extra['codebook'], want, rtol=1e-5, atol=1e-6)
    # The straight-through estimator: the cosine term reaches the tokenizer.
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, extra, batch, jax.random.key(1), 0)[1][0]['cosine']))(params)
    assert np.abs(grads['tokenizer']['quantize_layer_2']['kernel']).max() > 0


def test_first_step_draws_the_codebook_by_kmeans_on_its_batch(tokenizer_method):
    method, params, before, after, batch = tokenizer_method
    assert not bool(before['initialised']) and bool(after['initialised'])
    encode = jax.jit(lambda p, x: method.model.apply({'params': p}, x, method=method.model.encode))
    z = encode(params, batch['spectrogram']).reshape(-1, 256)
    weights = beats_model.token_valid(batch['spectrogram']).reshape(-1).astype(jnp.float32)
    start = base.stream(jax.random.key(2), 'kmeans')
    codebook, _ = vq.kmeans_init(z, weights, 256, start, 10)
    codes = vq.nearest_codes(z, codebook)
    want_codebook, want_usage = vq.ema_update(codebook, jnp.zeros(256), z, codes, weights, 0.99)
    np.testing.assert_allclose(after['codebook'], want_codebook, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after['usage'], want_usage, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(after['codebook'], axis=1), 1.0, rtol=1e-5)


def test_kmeans_never_starts_from_padding():
    rng = np.random.default_rng(2)
    valid = unit(rng.normal(size=(3, 8)))
    data = jnp.asarray(np.concatenate([valid, unit(rng.normal(size=(20, 8)))]))
    weights = jnp.asarray(np.r_[np.ones(3), np.zeros(20)])  # 3 samples for 5 codes, 20 rows of padding
    means, counts = vq.kmeans_init(data, weights, 5, jax.random.key(0), iterations=3)
    # Every mean is built from the 3 samples only: it lies in their span (the padding rows do not).
    coefficients, *_ = np.linalg.lstsq(valid.T, np.asarray(means).T, rcond=None)
    np.testing.assert_allclose(valid.T @ coefficients, np.asarray(means).T, atol=1e-5)
    assert float(counts.sum()) == 3.0


@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
    """A 2-step BEATs iteration-1 run: the teacher."""
    workdir = tmp_path_factory.mktemp('beats_iter1')
    overrides = ['train.steps=2', 'eval.at_end=false', 'train.tensorboard=false', 'mesh.data=1']
    config = load_config('configs/beats.py:runlocal', overrides)
    train.train(config, str(workdir))
    return str(workdir)


@pytest.fixture(scope='module')
def tokenizer_method(teacher_run):
    """(method, params, extra before and after the first step (k-means), 16 clips of the built-in words; clip 0
    ends after 40 frames, so 4 of its 6 time patches are padding)."""
    config = load_config('configs/beats_tokenizer.py:runlocal', [f'teacher.path={teacher_run}'])
    method = beats_tokenizer.Method(config)
    dataset, _ = method.dataset(0, 0, 1)
    spectrogram = np.array(next(iter(dataset))['spectrogram'][:16])
    spectrogram[0, 40:] = 0.0
    batch = {'spectrogram': jnp.asarray(spectrogram)}
    params, before = method.init(jax.random.key(0), batch)
    _, (_, after) = jax.jit(method.loss)(params, before, batch, jax.random.key(2), 0)
    return method, params, before, after, batch


@pytest.mark.slow
def test_tokenizer_run_sharded_matches_one_device_and_labels_the_next_iteration(teacher_run, tmp_path):
    keys = ('loss', 'cosine', 'commitment', 'codes_used')
    teacher = f'teacher.path={teacher_run}'
    assert_sharded_matches_one_device('configs/beats_tokenizer.py:runlocal', tmp_path, teacher, keys=keys)
    tokenizer_dir = str(tmp_path / 'sharded')
    overrides = [
        'tokenizer.kind=trained', f'tokenizer.path={tokenizer_dir}', 'tokenizer.codebook_size=256', 'mesh.data=1',
    ]  # fmt: skip
    config = load_config('configs/beats.py:runlocal', overrides)
    # The next iteration's objective runs on the stored tokenizer (its training loop is test_beats.py's), and its
    # labels are the stored tokenizer's codes.
    method = beats.Method(config)
    batch = jax.tree.map(jnp.asarray, method.example_batch(4))
    params, extra = method.init(jax.random.key(0), batch)
    loss, _ = jax.jit(method.loss)(params, extra, batch, jax.random.key(1), 0)
    assert np.isfinite(float(loss)) and float(loss) > 0
    z = method.tokenizer.apply({'params': extra['tokenizer']}, batch['spectrogram'])
    codes = np.argmax(np.asarray(z) @ np.asarray(extra['codebook']).T, axis=-1)
    np.testing.assert_array_equal(method.labels(extra, batch['spectrogram']), codes)
    np.testing.assert_allclose(np.linalg.norm(extra['codebook'], axis=1), 1.0, rtol=1e-5)
    assert len(np.unique(codes)) > 1
    with pytest.raises(ConfigError, match=r'tokenizer\.codebook_size'):  # the head must fit the stored codebook
        load_config('configs/beats.py:runlocal', ['tokenizer.kind=trained', f'tokenizer.path={tokenizer_dir}'])


def test_config_errors_name_the_key(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match=r'teacher\.path'):  # at the run's start, when the method is built
        beats_tokenizer.Method(load_config('configs/beats_tokenizer.py:runlocal'))
    with pytest.raises(ConfigError, match=r'teacher\.path'):
        beats_tokenizer.Method(load_config('configs/beats_tokenizer.py:runlocal', [f'teacher.path={tmp_path}']))
    with pytest.raises(ConfigError, match=r'model\.estimator_depth'):
        load_config('configs/beats_tokenizer.py:runlocal', [f'teacher.path={teacher_run}', 'model.estimator_depth=0'])
    with pytest.raises(ConfigError, match=r'tokenizer\.path'):
        load_config('configs/beats.py:runlocal', ['tokenizer.kind=trained'])
