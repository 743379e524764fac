"""VICReg's loss (Bardes, Ponce, LeCun, ICLR 2022; facebookresearch/vicreg main_vicreg.py), on one device and over
the global batch of a device mesh.

For the embeddings Z, Z' (N, D) of two views of the same N images:
  invariance  = mean((Z - Z')^2)                                  (MSE over N * D)
  variance    = mean_j relu(1 - sqrt(Var_j(Z) + eps)) / 2 + the same for Z'   (unbiased variance per dimension)
  covariance  = sum_{i != j} C(Z)_ij^2 / D + the same for Z'      (C = centred Z^T Z / (N - 1); the two views'
                                                                   terms are summed, not halved, as the reference)
  loss        = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance

`global_vicreg` computes the same number and gradient when the batch is sharded over a mesh. The reference's
`FullGatherLayer` all-gathers the embeddings so that the variance and covariance are statistics of the GLOBAL batch;
here each device `lax.all_gather`s them inside `jax.shard_map` (all_gather's transpose is the reduce-scatter of the
gathered gradients, which is what FullGatherLayer's backward does by hand). The invariance term is a mean over
images, so it is summed per device and psum'ed. Every device then holds the same variance and covariance values;
they are `pmean`'ed, which marks them as replicated for shard_map and splits their cotangent over the devices so
that the reduce-scatter sums it back to exactly one copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

# Added to the variance before the square root: the reference's 0.0001, which keeps the gradient of the std finite
# when a dimension has collapsed (zero variance).
STD_EPS = 1e-4


def invariance_term(z1: jax.Array, z2: jax.Array) -> jax.Array:
    """Mean squared error between the two views' embeddings, over all N * D entries (F.mse_loss)."""
    chex.assert_equal_shape([z1, z2])
    return jnp.mean(jnp.square(z1 - z2))


def variance_term(z: jax.Array, eps: float = STD_EPS) -> jax.Array:
    """Mean over dimensions of the hinge relu(1 - std), the std of each dimension over the batch (unbiased). A
    collapsed batch (every row equal) gives 1 - sqrt(eps) per dimension."""
    chex.assert_rank(z, 2)
    centred = z - jnp.mean(z, axis=0)
    var = jnp.sum(jnp.square(centred), axis=0) / (z.shape[0] - 1)
    return jnp.mean(jax.nn.relu(1.0 - jnp.sqrt(var + eps)))


def covariance_term(z: jax.Array) -> jax.Array:
    """Sum of the squared off-diagonal entries of the (D, D) batch covariance (unbiased), divided by D."""
    chex.assert_rank(z, 2)
    n, d = z.shape
    centred = z - jnp.mean(z, axis=0)
    cov = jnp.dot(centred.T, centred, preferred_element_type=jnp.float32) / (n - 1)
    # The diagonal is subtracted rather than masked: the (D, D) mask would be another D^2 buffer at D = 8192.
    return (jnp.sum(jnp.square(cov)) - jnp.sum(jnp.square(jnp.diagonal(cov)))) / d


def _combine(
    invariance: jax.Array,
    variance: jax.Array,
    covariance: jax.Array,
    sim_coeff: float,
    std_coeff: float,
    cov_coeff: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, {'invariance': invariance, 'variance': variance, 'covariance': covariance}


def _statistics_terms(g1: jax.Array, g2: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """The variance (the two views averaged) and covariance (summed) terms of whole-batch embeddings."""
    return (variance_term(g1, eps) + variance_term(g2, eps)) / 2, covariance_term(g1) + covariance_term(g2)


def vicreg(
    z1: jax.Array,
    z2: jax.Array,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = STD_EPS,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VICReg of one batch on one device. z1, z2: (N, D) embeddings of view 1 and view 2 of the same N images (row i
    of each is image i), N >= 2. Returns (loss, {'invariance', 'variance', 'covariance'}: the unweighted terms)."""
    chex.assert_rank([z1, z2], 2)
    chex.assert_equal_shape([z1, z2])
    # float32 whatever the compute dtype: the covariance sums N products per entry and the hinge is near sqrt(eps).
    z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
    variance, covariance = _statistics_terms(z1, z2, eps)
    return _combine(invariance_term(z1, z2), variance, covariance, sim_coeff, std_coeff, cov_coeff)


def global_vicreg(
    z1: jax.Array,
    z2: jax.Array,
    mesh: Mesh | None,
    axes: Sequence[str] = ('data', 'fsdp'),
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = STD_EPS,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VICReg over the global batch of `mesh`: z1, z2 (N, D) sharded (or to be sharded) over the mesh `axes` on their
    leading axis; the value and its gradient equal `vicreg` on the whole batch. `mesh=None` (or a mesh of one device
    on those axes) runs `vicreg` directly. N must divide evenly over the axes' devices."""
    chex.assert_rank([z1, z2], 2)
    chex.assert_equal_shape([z1, z2])
    axes = tuple(axes)
    devices = 1 if mesh is None else math.prod(mesh.shape[a] for a in axes)
    if devices == 1:
        return vicreg(z1, z2, sim_coeff, std_coeff, cov_coeff, eps)
    if z1.shape[0] % devices:
        raise ValueError(f'{z1.shape[0]} images do not split evenly over {devices} devices on mesh axes {axes}')
    big_n, d = z1.shape

    def per_device(z1_local: jax.Array, z2_local: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        z1_local, z2_local = z1_local.astype(jnp.float32), z2_local.astype(jnp.float32)
        # The MSE is a mean over images: local sums, psum'ed, over the global count (the reference's local MSE,
        # averaged by DDP over equal local batches, is the same number).
        invariance = jax.lax.psum(jnp.sum(jnp.square(z1_local - z2_local)), axes) / (big_n * d)
        g1 = jax.lax.all_gather(z1_local, axes, tiled=True)
        g2 = jax.lax.all_gather(z2_local, axes, tiled=True)
        chex.assert_shape([g1, g2], (big_n, d))
        variance, covariance = _statistics_terms(g1, g2, eps)
        # Equal on every device; pmean makes that explicit to shard_map and gives each copy 1/devices of the
        # cotangent, which all_gather's reduce-scatter sums back to the gradient of one copy.
        return invariance, jax.lax.pmean(variance, axes), jax.lax.pmean(covariance, axes)

    spec = PartitionSpec(axes)
    terms = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=(PartitionSpec(),) * 3)(z1, z2)
    return _combine(*terms, sim_coeff, std_coeff, cov_coeff)
