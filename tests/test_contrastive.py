"""Known answers for NT-Xent, its invariances, and the global-batch version under shard_map on 8 fake CPU devices:
the sharded loss and its gradients equal the single-device ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.losses import contrastive


def brute_force(z1, z2, temperature):
    """The paper's eq. 1 written out on the (2N, 2N) similarity matrix, in float64 numpy."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    sim = z @ z.T / temperature
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [sim[i, k] for k in range(2 * n) if k != i]
        losses.append(np.log(np.sum(np.exp(others))) - sim[i, positive])
    return np.mean(losses)


def test_two_pairs_hand_computed():
    """Two images, identical views, orthogonal to each other, temperature 1: each anchor's positive scores 1 and
    its two negatives (the other image's two views) score 0, so every anchor's loss is log(e + 2) - 1."""
    z = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    loss, metrics = contrastive.nt_xent(z, z, temperature=1.0)
    np.testing.assert_allclose(loss, np.log(np.e + 2) - 1, rtol=1e-6)
    assert float(metrics['contrastive_acc']) == 1.0
    # Temperature 0.5 doubles every logit: log(e^2 + 2) - 2. Unnormalised inputs give the same (cosine).
    loss, _ = contrastive.nt_xent(3 * z, 0.5 * z, temperature=0.5)
    np.testing.assert_allclose(loss, np.log(np.e**2 + 2) - 2, rtol=1e-6)


def test_two_pairs_swapped_views_hand_computed():
    """View 2 of image 0 equals view 1 of image 1 and vice versa: each anchor's positive scores 0 and a negative 1;
    the loss is log(e + 2) - 0 and no anchor ranks its positive first."""
    z1 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    loss, metrics = contrastive.nt_xent(z1, z1[::-1], temperature=1.0)
    np.testing.assert_allclose(loss, np.log(np.e + 2), rtol=1e-6)
    assert float(metrics['contrastive_acc']) == 0.0


def test_matches_brute_force_and_invariances():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 6, 5)).astype(np.float32)
    want = brute_force(z1, z2, 0.1)
    loss = lambda a, b: float(contrastive.nt_xent(a, b, 0.1)[0])
    np.testing.assert_allclose(loss(z1, z2), want, rtol=1e-5)
    perm = rng.permutation(6)
    np.testing.assert_allclose(loss(z1[perm], z2[perm]), want, rtol=1e-5)  # order of images
    np.testing.assert_allclose(loss(z2, z1), want, rtol=1e-5)  # which view is first
    scales = rng.uniform(0.1, 10, size=(6, 1)).astype(np.float32)
    np.testing.assert_allclose(loss(z1 * scales, z2), want, rtol=1e-5)  # cosine: per-vector scale
    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    np.testing.assert_allclose(loss(z1 @ rotation, z2 @ rotation), want, rtol=1e-5)  # rotation of the space
    # Pulling each positive pair together lowers the loss.
    assert loss(z1, 0.5 * (z1 + z2)) < want


@pytest.mark.parametrize('shape', [(2, 4), (8, 1), (1, 8)])
def test_sharded_loss_and_gradients_equal_single_device(shape):
    """Mesh ('data', 'fsdp') over 8 fake CPU devices, the batch split over both axes as the trainer splits it."""
    assert jax.device_count() == 8
    mesh = jax.make_mesh(shape, ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 32, 16)).astype(np.float32)
    weights = rng.normal(size=(16, 16)).astype(np.float32)

    # Gradients through a layer before the loss, as in training (parameters replicated, activations sharded).
    def single(w, a, b):
        return contrastive.nt_xent(a @ w, b @ w, 0.1)

    def sharded(w, a, b):
        return contrastive.global_nt_xent(a @ w, b @ w, 0.1, mesh)

    want, want_metrics = single(weights, z1, z2)
    want_grads = jax.grad(lambda *args: single(*args)[0], argnums=(0, 1, 2))(weights, z1, z2)
    a, b = jax.device_put(z1, batch), jax.device_put(z2, batch)
    got, got_metrics = jax.jit(sharded)(weights, a, b)
    got_grads = jax.jit(jax.grad(lambda *args: sharded(*args)[0], argnums=(0, 1, 2)))(weights, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, brute_force(z1 @ weights, z2 @ weights, 0.1), rtol=1e-5)
    np.testing.assert_allclose(got_metrics['contrastive_acc'], want_metrics['contrastive_acc'])
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(w).max()) > 1e-3  # the gradients compared are not trivially zero


def test_global_without_mesh_and_uneven_split():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(2, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(
        contrastive.global_nt_xent(z1, z2, 0.2, None)[0], contrastive.nt_xent(z1, z2, 0.2)[0], rtol=1e-7
    )
    mesh = jax.make_mesh((8, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match='4 images do not split evenly over 8 devices'):
        contrastive.global_nt_xent(z1, z2, 0.2, mesh)
