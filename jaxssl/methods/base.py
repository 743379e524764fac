"""The method interface: everything the one trainer needs to know about a self-supervised method.

A method module `jaxssl/methods/<name>.py` defines `class Method(base.Method)` (and optionally a module-level
`check_config(config)` that config loading calls). The trainer only calls the methods below; it knows nothing
about models, modalities or losses. All jitted hooks are pure functions of their arguments.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from jaxssl import params_io
from jaxssl.config import ConfigError

PyTree = Any
Batch = dict[str, Any]


class Method:
    """Base class; subclasses override what they need."""

    # The batch key of the model input that `represent` reads and `eval_dataset` batches carry with a views axis
    # (video clips, tabular rows, audio frames, ...); the frozen-feature evaluators read the input under it.
    input_key: str = 'video'
    # Further per-view batch keys `represent` reads beside the input (e.g. a waveform's 'num_samples').
    represent_keys: tuple[str, ...] = ()

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self._mesh: jax.sharding.Mesh | None = None

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The device mesh the trainer runs on, for losses that name its axes (shard_map over the batch axes). The
        trainer hands it over with `use_mesh`; without one (tests, evaluators) it is built from the config on first
        use, which gives the same mesh on the same devices."""
        if self._mesh is None:
            from jaxssl import sharding

            self._mesh = sharding.make_mesh(self.config)
        return self._mesh

    def use_mesh(self, mesh: jax.sharding.Mesh) -> None:
        self._mesh = mesh

    # --- data (host side, numpy) -------------------------------------------------------------------------------
    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        """(a Grain IterDataset of host-local batches, examples per epoch). Batches are dicts of numpy arrays
        whose leading axis is the host-local batch; the trainer shards it over the mesh's batch axes."""
        raise NotImplementedError(f'{type(self).__name__} must define dataset()')

    def example_batch(self, batch_size: int) -> Batch:
        """A batch with the shapes and dtypes of real ones (values may be random): used to initialise."""
        raise NotImplementedError(f'{type(self).__name__} must define example_batch()')

    # --- model (device side, jitted) ---------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: Batch) -> tuple[PyTree, PyTree]:
        """(params, extra state). Extra state is anything beside params that is not trained by the optimiser:
        an EMA teacher, a queue, a codebook, batch statistics. Return {} when there is none."""
        raise NotImplementedError(f'{type(self).__name__} must define init()')

    def loss(
        self, params: PyTree, extra: PyTree, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], PyTree]]:
        """(scalar loss, (metrics, extra state after the forward pass)). Differentiated w.r.t. params only."""
        raise NotImplementedError(f'{type(self).__name__} must define loss()')

    def prepare(self, params: PyTree, extra: PyTree) -> PyTree:
        """Extra state of a freshly initialised run after host-driven work on it (e.g. KRR-ST's model pool trained
        for a while before the first step), called once by the trainer before step 1 (not on resume). Loops of
        training steps belong here rather than in `init`: XLA:CPU runs a convolution's gradients inside a
        compiled loop ~20x slower than as separate calls. Default: unchanged."""
        return extra

    def update_extra(self, params: PyTree, extra: PyTree, step: jax.Array) -> PyTree:
        """Extra state after the optimiser step (e.g. an EMA teacher follows the new params). Default: unchanged."""
        return extra

    def represent(self, params: PyTree, extra: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """Named representations (B, D) for evaluators (linear probe, kNN, ...)."""
        raise NotImplementedError(f'{type(self).__name__} must define represent()')

    def eval_dataset(self, split: str, batch_size: int, max_examples: int, process_index: int, process_count: int):
        """One deterministic pass over a labelled split: batches with the input under `input_key` (B, views, ...),
        'valid' and integer labels. Methods that define it get frozen-feature probes from `evaluate`."""
        raise NotImplementedError(f'{type(self).__name__} has no evaluation data')

    def evaluate(self, params: PyTree, extra: PyTree, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """Evaluation metrics of the current model. Called on every process (it may run sharded computations)
        every `eval.every` steps, at the end if `eval.at_end`, and by `python -m jaxssl.evaluate`.
        Default: frozen-feature probes (jaxssl.evaluate.frozen) when the method defines `eval_dataset` and its
        config has an eval.probes list; fine-tuning methods override this with their own metrics."""
        if type(self).eval_dataset is Method.eval_dataset or 'probes' not in self.config.eval:
            return {}
        from jaxssl.evaluate import frozen

        return frozen.evaluate(self, params, extra, mesh, self.config.eval)

    def visualize(self, params: PyTree, extra: PyTree) -> dict[str, np.ndarray]:
        """Pictures of what the model does (e.g. reconstructions): name -> uint8 (H, W, 3) image or (T, H, W, 3)
        animation. Written to <workdir>/pictures and TensorBoard at evaluation time. Default: none."""
        return {}

    def tokens_per_example(self) -> int | None:
        """Input tokens per example, for a tokens/s figure. None if the notion does not apply."""
        return None

    def host_metrics(self) -> dict[str, float]:
        """Host-side counters to log (e.g. files the input pipeline skipped)."""
        return {}

    def flops_per_example(self) -> float | None:
        """Analytic model FLOPs of one training example (forward + backward), for MFU. None if unknown."""
        return None


def stream(rng: jax.Array, name: str) -> jax.Array:
    """A named RNG stream ('dropout', 'drop_path', 'mask', ...) derived from a step key."""
    return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def load_frozen(path: str, key: str, shapes: Any, tree: str = 'params') -> Any:
    """The `shapes` subtrees (e.g. {'backbone': ...}) of a stored run's params (or `tree='extra'`: its method state)
    as a traced value: a host callback, so jit does not embed the weights in the program. ConfigError names `key`."""

    def load() -> Any:
        select = tuple(f'{name}/.*' if isinstance(value, dict) else name for name, value in shapes.items())
        try:
            loaded, _, _ = params_io.load_selected(path, shapes, select, tree)
        except ValueError as e:
            raise ConfigError(f"'{key}' {path}: {e}") from None
        return traverse_util.unflatten_dict(loaded, sep='/')

    return jax.pure_callback(load, shapes)
