"""Known answers for VICReg's three terms, equality with an independent float64 numpy version, and the global-batch
version under shard_map on 8 fake CPU devices: the sharded loss and its gradients equal the single-device ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.losses import vicreg

AXES = ('data', 'fsdp')


def numpy_vicreg(z1, z2, sim=25.0, std=25.0, cov=1.0):
    """The reference's formulas with numpy's own statistics (np.var ddof=1, np.cov), in float64."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    d = z1.shape[1]
    inv = np.mean((z1 - z2) ** 2)
    hinge = lambda z: np.mean(np.maximum(0.0, 1.0 - np.sqrt(np.var(z, axis=0, ddof=1) + 1e-4)))
    off = lambda z: np.sum(np.cov(z, rowvar=False) ** 2) - np.sum(np.diag(np.cov(z, rowvar=False)) ** 2)
    var = hinge(z1) / 2 + hinge(z2) / 2
    covariance = off(z1) / d + off(z2) / d
    return sim * inv + std * var + cov * covariance, (inv, var, covariance)


def test_invariance_known_answers():
    z = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    assert float(vicreg.invariance_term(z, z)) == 0.0  # identical embeddings
    np.testing.assert_allclose(vicreg.invariance_term(np.zeros((2, 3)), np.full((2, 3), 2.0)), 4.0)
    # One entry of 2 * 2 differs by 3: 9 / 4.
    a = np.zeros((2, 2), np.float32)
    b = a.copy()
    b[1, 0] = 3.0
    np.testing.assert_allclose(vicreg.invariance_term(a, b), 9.0 / 4.0)


def test_variance_known_answers():
    # Zero variance in every dimension: the hinge is 1 - sqrt(1e-4) = 0.99 per dimension.
    collapsed = np.tile(np.array([[0.3, -2.0, 5.0]], np.float32), (5, 1))
    np.testing.assert_allclose(vicreg.variance_term(collapsed), 0.99, rtol=1e-6)
    # Rows +-a per dimension (N = 2): unbiased var 2 a^2. a = 0.5 -> std sqrt(0.5001); a = 2 -> std > 1, hinge 0.
    z = np.array([[0.5, 2.0], [-0.5, -2.0]], np.float32)
    np.testing.assert_allclose(vicreg.variance_term(z), (1 - np.sqrt(0.5001)) / 2, rtol=1e-6)
    # Every std at least 1: no penalty (the hinge does not push the variance further up).
    wide = np.array([[3.0, 1.0], [-3.0, -1.0], [0.0, 0.0]], np.float32)
    assert float(vicreg.variance_term(wide)) == 0.0


def test_covariance_known_answers():
    # Rows (a, b), (-a, -b): C_01 = 2ab / (2 - 1); off-diagonal squared sum 2 (2ab)^2, over D = 2: 4 a^2 b^2.
    z = np.array([[0.5, 0.25], [-0.5, -0.25]], np.float32)
    np.testing.assert_allclose(vicreg.covariance_term(z), 4 * 0.25 * 0.0625, rtol=1e-6)
    # Decorrelated dimensions (orthogonal centred columns), whatever their variances: 0.
    decorrelated = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], np.float32) * [3.0, 0.1]
    np.testing.assert_allclose(vicreg.covariance_term(decorrelated), 0.0, atol=1e-7)
    # The diagonal (the variances) does not count: a single dimension has no covariance term.
    np.testing.assert_allclose(vicreg.covariance_term(np.array([[1.0], [5.0], [2.0]], np.float32)), 0.0)


def test_total_weights_and_matches_numpy():
    # Identical, collapsed views: only the variance term, 25 * 0.99.
    collapsed = np.ones((4, 3), np.float32)
    loss, metrics = vicreg.vicreg(collapsed, collapsed)
    np.testing.assert_allclose(loss, 25 * 0.99, rtol=1e-6)
    assert float(metrics['invariance']) == 0.0 and float(metrics['covariance']) == 0.0
    rng = np.random.default_rng(3)
    z1, z2 = rng.normal(scale=0.7, size=(2, 6, 5)).astype(np.float32)
    want, terms = numpy_vicreg(z1, z2)
    loss, metrics = vicreg.vicreg(z1, z2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for key, value in zip(('invariance', 'variance', 'covariance'), terms, strict=True):
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5)
    assert min(terms) > 0  # every term contributes in this case
    np.testing.assert_allclose(vicreg.vicreg(z1, z2, 1.0, 2.0, 3.0)[0], numpy_vicreg(z1, z2, 1, 2, 3)[0], rtol=1e-5)
    # Invariances: the order of images, which view is first.
    perm = rng.permutation(6)
    np.testing.assert_allclose(vicreg.vicreg(z1[perm], z2[perm])[0], want, rtol=1e-5)
    np.testing.assert_allclose(vicreg.vicreg(z2, z1)[0], want, rtol=1e-5)


@pytest.mark.parametrize('shape', [(2, 4), (8, 1), (1, 8)])
def test_sharded_loss_and_gradients_equal_single_device(shape):
    """Mesh ('data', 'fsdp') over 8 fake CPU devices, the batch split over both axes as the trainer splits it."""
    assert jax.device_count() == 8
    mesh = jax.make_mesh(shape, ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
    rng = np.random.default_rng(1)
    # Scale 0.3: some stds below 1 (the hinge is active) so the variance term has a gradient too.
    z1, z2 = rng.normal(scale=0.3, size=(2, 32, 12)).astype(np.float32)
    weights = rng.normal(size=(12, 12)).astype(np.float32)

    # Gradients through a layer before the loss, as in training (parameters replicated, activations sharded).
    def single(w, a, b):
        return vicreg.vicreg(a @ w, b @ w)

    def sharded(w, a, b):
        return vicreg.global_vicreg(a @ w, b @ w, mesh)

    want, want_metrics = single(weights, z1, z2)
    want_grads = jax.grad(lambda *args: single(*args)[0], argnums=(0, 1, 2))(weights, z1, z2)
    a, b = jax.device_put(z1, batch), jax.device_put(z2, batch)
    got, got_metrics = jax.jit(sharded)(weights, a, b)
    got_grads = jax.jit(jax.grad(lambda *args: sharded(*args)[0], argnums=(0, 1, 2)))(weights, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, numpy_vicreg(z1 @ weights, z2 @ weights)[0], rtol=1e-5)
    for key in ('invariance', 'variance', 'covariance'):
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-6)
        assert float(want_metrics[key]) > 0
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(w).max()) > 1e-3  # the gradients compared are not trivially zero
    # Each term's gradient separately (a wrong factor in one could hide behind the others in the sum).
    for coeffs in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)):
        g_one = jax.grad(lambda w, c=coeffs: vicreg.vicreg(z1 @ w, z2 @ w, *c)[0])(weights)
        g_mesh = jax.jit(jax.grad(lambda w, c=coeffs: vicreg.global_vicreg(a @ w, b @ w, mesh, AXES, *c)[0]))
        np.testing.assert_allclose(g_mesh(weights), g_one, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(g_one).max()) > 1e-4


def test_global_without_mesh_and_uneven_split():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(2, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(vicreg.global_vicreg(z1, z2, None)[0], vicreg.vicreg(z1, z2)[0], rtol=1e-7)
    mesh = jax.make_mesh((8, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match='4 images do not split evenly over 8 devices'):
        vicreg.global_vicreg(z1, z2, mesh)
