"""KRR-ST: the outer loss and its gradients, the pool's SGD step and the ConvNet against a torch transcription of
the reference (distill.py, model_pool.py, models/convnet.py); the real views; the pool's initialisation and
updates; the sharded trainer run from a real teacher run with the evaluation's three sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import krr_st
from tests import sharded_runs

# A few-second configuration: 8 distilled 16 px images, a 2-block ConvNet, a pool of 3 models of 4 steps.
TINY = ('distill.num_images=8', 'input.image_size=16', 'model.channels=(8,16)', 'distill.pool_steps=4',
        'distill.pool_size=3', 'input.global_batch=16', 'eval.pretrain_epochs=3')  # fmt: skip


@pytest.fixture(scope='module')
def method():
    return krr_st.Method(load_config('configs/krr_st.py:runlocal', TINY))


def as_torch(a):
    return a if isinstance(a, torch.Tensor) else torch.tensor(np.asarray(a))


def torch_convnet(variables, images, train):
    """models/convnet.py's ConvNet.forward / embed with jaxssl's weights (NCHW), as torch functional calls."""
    p, stats = variables['params'], variables.get('batch_stats', {})
    x = images.permute(0, 3, 1, 2)
    i = 0
    while f'conv_{i}' in p:
        kernel = as_torch(p[f'conv_{i}']['kernel']).permute(3, 2, 0, 1)
        x = F.conv2d(x, kernel, as_torch(p[f'conv_{i}']['bias']), padding=1)
        norm, running = p[f'norm_{i}'], stats[f'norm_{i}']
        x = F.batch_norm(x, running['mean'], running['var'], as_torch(norm['scale']),
                         as_torch(norm['bias']), training=train, momentum=0.1, eps=1e-5)  # fmt: skip
        x = F.avg_pool2d(F.relu(x), 2, 2)
        i += 1
    embedding = x.reshape(x.shape[0], -1)
    fc = p['fc']
    return embedding, embedding @ as_torch(fc['kernel']) + as_torch(fc['bias'])


def random_variables(method, key):
    variables = method.fresh_model(key)['variables']
    stats = jax.tree.map(lambda x: jax.random.uniform(jax.random.key(1), x.shape, minval=0.5, maxval=1.5),
                         variables['batch_stats'])  # fmt: skip
    return {**variables, 'batch_stats': stats}


def test_outer_loss_and_gradients_equal_the_reference(method):
    """At the reference's ridge 1e-6 the solve amplifies float32 rounding of the features (conv in XLA vs torch)
    to ~1e-3 of the loss; a larger ridge keeps the comparison about the formula."""
    ridge = 1e-3
    rng = np.random.default_rng(0)
    variables = random_variables(method, jax.random.key(0))
    x_syn = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    y_syn = rng.normal(size=(8, method.target_dim)).astype(np.float32)
    x_real = rng.normal(size=(12, 16, 16, 3)).astype(np.float32)
    y_real = rng.normal(size=(12, method.target_dim)).astype(np.float32)

    def loss(x, y):
        syn, _ = method.net.apply(variables, x)
        real, _ = method.net.apply(variables, x_real)
        return krr_st.kernel_ridge_loss(syn, real, y, y_real, ridge)

    value, (gx, gy) = jax.value_and_grad(loss, argnums=(0, 1))(x_syn, y_syn)

    # distill.py's outer step, transcribed (model.eval(): BatchNorm on running statistics).
    stats = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), variables['batch_stats'])
    tx, ty = torch.tensor(x_syn, requires_grad=True), torch.tensor(y_syn, requires_grad=True)
    tv = {'params': variables['params'], 'batch_stats': stats}
    f_syn, _ = torch_convnet(tv, tx, train=False)
    f_syn = torch.cat([f_syn, torch.ones(f_syn.shape[0], 1)], dim=1)
    with torch.no_grad():
        f_real, _ = torch_convnet(tv, torch.tensor(x_real), train=False)
        f_real = torch.cat([f_real, torch.ones(f_real.shape[0], 1)], dim=1)
    k_rs, k_ss = f_real @ f_syn.T, f_syn @ f_syn.T
    lam = ridge * torch.trace(k_ss.detach())
    want = F.mse_loss(k_rs @ torch.linalg.solve(k_ss + lam * torch.eye(8), ty), torch.tensor(y_real))
    want_gx, want_gy = torch.autograd.grad(want, [tx, ty])

    np.testing.assert_allclose(value, want.item(), rtol=1e-4)
    np.testing.assert_allclose(gx, want_gx.numpy(), rtol=2e-3, atol=2e-3 * np.abs(want_gx.numpy()).max())
    np.testing.assert_allclose(gy, want_gy.numpy(), rtol=2e-3, atol=2e-3 * np.abs(want_gy.numpy()).max())


def test_kernel_ridge_head_interpolates_its_own_set():
    """With a tiny ridge, the head reproduces Y_s on X_s itself (the loss is 0 when the real batch is the set)."""
    rng = np.random.default_rng(1)
    features = jnp.asarray(rng.normal(size=(5, 20)), jnp.float32)
    targets = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    assert float(krr_st.kernel_ridge_loss(features, features, targets, targets, 1e-9)) < 1e-8
    assert float(krr_st.kernel_ridge_loss(features, features, targets, -targets, 1e-9)) > 1.0


def test_pool_sgd_steps_equal_torch_sgd(method):
    """Two pool updates (model_pool.py: model.train(), SGD(lr, momentum 0.9, weight_decay), MSE on the fc output)
    equal torch's, running statistics included."""
    rng = np.random.default_rng(2)
    model = method.fresh_model(jax.random.key(3))
    x = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    y = rng.normal(size=(8, method.target_dim)).astype(np.float32)

    params = jax.tree.map(lambda a: torch.tensor(np.array(a), requires_grad=True), model['variables']['params'])
    stats = jax.tree.map(lambda a: torch.tensor(np.array(a)), model['variables']['batch_stats'])
    optimizer = torch.optim.SGD(jax.tree.leaves(params), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(2):
        model = method.pool_step(model, x, y)
        optimizer.zero_grad()
        _, out = torch_convnet({'params': params, 'batch_stats': stats}, torch.tensor(x), train=True)
        F.mse_loss(out, torch.tensor(y)).backward()
        optimizer.step()
    got = model['variables']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-4, atol=1e-5),
                 got['params'], params)  # fmt: skip
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-6), got['batch_stats'], stats)


def test_crop_view_pads_black_and_crops_every_offset():
    """A white image padded by 4 black pixels: each view's white rectangle is the image seen at one of the 9 x 9
    crop offsets (top, left), and every offset occurs."""
    image = np.full((16, 16, 3), 255, np.uint8)
    white, black = (1.0 - IMAGENET_MEAN) / IMAGENET_STD, -IMAGENET_MEAN / IMAGENET_STD
    rectangle = lambda top, left: (max(0, 4 - top), min(15, 19 - top), max(0, 4 - left), min(15, 19 - left))
    expected = {rectangle(top, left) for top in range(9) for left in range(9)}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(800):
        view = krr_st.crop_view(image, rng, size=16, padding=4, flip=False)
        is_white = np.isclose(view, white).all(-1)
        assert (is_white | np.isclose(view, black).all(-1)).all()
        rows, cols = np.nonzero(is_white)
        seen.add((rows.min(), rows.max(), cols.min(), cols.max()))
        assert is_white.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert seen == expected


def test_crop_view_flips_half_the_time():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = 255  # left half white
    rng = np.random.default_rng(0)
    flipped = [krr_st.crop_view(image, rng, size=8, padding=0, flip=True)[0, 0, 0] < 0 for _ in range(400)]
    assert 0.4 < np.mean(flipped) < 0.6


def test_pool_starts_at_random_steps_and_equals_sequential_training(method):
    images = jnp.asarray(np.random.default_rng(3).normal(size=(8, 16, 16, 3)), jnp.float32)
    targets = jnp.asarray(np.random.default_rng(4).normal(size=(8, method.target_dim)), jnp.float32)
    fresh = method.fresh_pool(jax.random.key(5))
    pool = method.warm_up_pool(fresh, images, targets)
    steps = np.asarray(pool['steps'])
    assert ((steps >= 1) & (steps <= 3)).all() and len(set(steps)) > 1
    step = jax.jit(method.pool_step)
    for i, key in enumerate(jax.random.split(jax.random.key(5), 3)):
        model = method.fresh_model(key)
        for _ in range(steps[i]):
            model = step(model, images, targets)
        got = jax.tree.map(lambda x, i=i: x[i], {'variables': pool['variables'], 'momentum': pool['momentum']})
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, model)


def test_update_trains_the_drawn_model_or_resets_it(method):
    images = jnp.asarray(np.random.default_rng(3).normal(size=(8, 16, 16, 3)), jnp.float32)
    targets = jnp.asarray(np.random.default_rng(4).normal(size=(8, method.target_dim)), jnp.float32)
    pool = method.warm_up_pool(method.fresh_pool(jax.random.key(5)), images, targets)
    params, extra = {'images': images, 'targets': targets}, {'teacher': {}, 'pool': pool}
    step = jnp.asarray(7)
    index = int(method.pool_index(step))
    others = np.array([i for i in range(3) if i != index])

    updated = jax.jit(method.update_extra)(params, extra, step)['pool']
    assert int(updated['steps'][index]) == int(pool['steps'][index]) + 1
    one = jax.tree.map(lambda x: x[index], {'variables': pool['variables'], 'momentum': pool['momentum']})
    want = method.pool_step(one, images, targets)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[index], b, rtol=1e-5, atol=1e-6),
                 {'variables': updated['variables'], 'momentum': updated['momentum']}, want)  # fmt: skip
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[others], b[others]), updated['variables'],
                 pool['variables'])  # fmt: skip

    full = dict(pool, steps=pool['steps'].at[index].set(4))  # pool_steps reached: a fresh model, counter 0
    reset = jax.jit(method.update_extra)(params, {'teacher': {}, 'pool': full}, step)['pool']
    assert int(reset['steps'][index]) == 0
    moments = jax.tree.leaves(jax.tree.map(lambda x: x[index], reset['momentum']))
    assert all(not np.any(m) for m in moments)
    stats = jax.tree.map(lambda x: x[index], reset['variables']['batch_stats'])
    assert all(np.allclose(s['mean'], 0) and np.allclose(s['var'], 1) for s in stats.values())


@pytest.mark.parametrize(
    'override, key',
    [
        ('model.channels=()', 'model.channels'),
        ('input.image_size=18', 'input.image_size'),
        ('distill.pool_steps=1', 'distill.pool_steps'),
        ('distill.ridge=0.0', 'distill.ridge'),
        ('model.norm=layer', 'model.norm'),
        ('distill.teacher=/nonexistent', 'distill.teacher'),
        ('eval.pretrain_epochs=0', 'eval.pretrain_epochs'),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        load_config('configs/krr_st.py:runlocal', [*TINY, override])


def test_unknown_teacher_representation_is_named():
    config = load_config('configs/krr_st.py:runlocal', [*TINY, 'distill.teacher_representation=cls'])
    with pytest.raises(ConfigError, match=r'teacher_representation.*embedding'):
        krr_st.Method(config)


@pytest.mark.slow
def test_sharded_run_from_a_teacher_run_matches_one_device(tmp_path):
    """A 1-step SimCLR ResNet run teaches; 2 KRR-ST steps on 8 devices equal one device, and the evaluation
    reports the distilled set, the random subset and a random init side by side."""
    teacher = tmp_path / 'teacher'
    config = load_config('configs/simclr.py:runlocal,variant=resnet18', [
        'input.image_size=16', 'input.global_batch=8', 'train.steps=1', 'eval.at_end=false',
        'train.tensorboard=false'])  # fmt: skip
    train.train(config, str(teacher))
    summary, _ = sharded_runs.assert_sharded_matches_one_device(
        'configs/krr_st.py:runlocal', tmp_path, *TINY, f'distill.teacher={teacher}', atol=1e-5
    )
    for name in ('distilled', 'random_subset', 'random_init'):
        assert 0.0 <= summary[f'final_eval/{name}/label/embedding/knn'] <= 1.0
        assert np.isfinite(summary[f'final_eval/{name}/teacher_r2'])
    # Pretraining on a set with the teacher's targets predicts the teacher better than the untrained network.
    assert summary['final_eval/random_subset/teacher_r2'] > summary['final_eval/random_init/teacher_r2']
    images, targets = krr_st.load_set(str(tmp_path / 'sharded'))
    assert images.shape == (8, 16, 16, 3) and targets.shape == (8, 128) and np.isfinite(images).all()


def test_teacher_r2_is_one_minus_the_explained_residual():
    target = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    valid = np.array([1, 1, 0])
    assert krr_st.teacher_r2({'prediction': target, 'teacher': target, 'valid': valid}) == 1.0
    mean = np.broadcast_to(target[:2].mean(0), target.shape)
    assert krr_st.teacher_r2({'prediction': mean, 'teacher': target, 'valid': valid}) == 0.0
