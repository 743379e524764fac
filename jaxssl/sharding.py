"""Device mesh, parameter/state shardings by rules (FSDP on the largest divisible dimension), batch sharding.

The same code serves 1 CPU, fake CPU devices in tests, one GPU and TPU pod slices: the mesh has axes
('data', 'fsdp'); the batch is split over both; parameters are sharded over 'fsdp' only.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxssl import rules as rules_lib
from jaxssl.config import ConfigError

AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> tuple[int, ...]:
    """Resolves config.mesh (one axis may be -1 = the remaining devices) against the device count."""
    sizes = [int(config.mesh[axis]) for axis in AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError("only one of 'mesh.data' and 'mesh.fsdp' may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or device_count % known:
        raise ConfigError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} does not fit {device_count} devices ('mesh.data', 'mesh.fsdp')"
        )
    sizes = [device_count // known if s == -1 else s for s in sizes]
    return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The ('data', 'fsdp') mesh; a mesh smaller than the machine uses the first devices (single process only)."""
    shape = mesh_shape(config, jax.device_count())
    devices = jax.devices()
    if math.prod(shape) < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(
                f'mesh {dict(zip(AXES, shape, strict=True))} must use all {len(devices)} devices of a multi-process run'
            )
        devices = devices[: math.prod(shape)]
    # Auto axis types: jax.make_mesh defaults to Explicit, with which FSDP-sharded Linen layers fail to compile.
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def leaf_spec(
    name: str, shape: tuple[int, ...], mesh: Mesh, rules: rules_lib.Rules = (), min_size: int = 2**14
) -> PartitionSpec:
    """A rule's spec if one matches, else FSDP over the largest dimension divisible by the 'fsdp' axis.

    Leaves under `min_size` elements stay replicated: sharding them saves little memory and costs collectives.
    """
    explicit = rules_lib.first_match(rules, name)
    if explicit is not None:
        return PartitionSpec(*explicit)
    fsdp = mesh.shape['fsdp']
    if fsdp == 1 or not shape or math.prod(shape) < min_size:
        return PartitionSpec()
    first = 1 if rules_lib.is_scanned(name) else 0  # keep the layer axis whole: scan slices it per step
    candidates = [(size, axis) for axis, size in enumerate(shape) if axis >= first and size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = 'fsdp'
    return PartitionSpec(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: rules_lib.Rules = (), min_size: int = 2**14) -> Any:
    """NamedShardings for every leaf of a (params, optimizer state, ...) pytree of ShapeDtypeStructs."""
    return rules_lib.map_with_names(
        lambda name, leaf: NamedSharding(mesh, leaf_spec(name, tuple(leaf.shape), mesh, rules, min_size)),
        abstract_state,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax arrays sharded over the batch axes (works on one or many hosts)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
