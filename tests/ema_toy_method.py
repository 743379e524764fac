"""A second, deliberately small method for the trainer tests: BYOL-style regression onto an EMA teacher.

It proves the trainer is generic: its own data (in-memory vectors through Grain), its own model, and extra state
(the EMA teacher) updated after every optimiser step. The global batch of each step is the same whatever the
number of processes (each process slices its rows out of it), so multi-process runs can be compared exactly.
"""

from __future__ import annotations

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.methods import base

NUM_EXAMPLES, DIM = 64, 8


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, runlocal=True)
    c = ml_collections.ConfigDict()
    c.method = 'ema_toy_method'  # not in jaxssl.methods: imported by its module name
    c.seed = 0
    c.input = ml_collections.ConfigDict(dict(global_batch=16, num_sample=1, noise=0.1))
    c.model = ml_collections.ConfigDict(dict(hidden=32, ema=0.9))
    c.optim = ml_collections.ConfigDict(
        dict(base_lr=0.05, min_lr=0.0, warmup_epochs=0, warmup_steps=2, epochs=1, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.05, clip_grad=1.0, no_decay=('.*bias',), lr_rules=())
    )  # fmt: skip
    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 6
    c.checkpoint.every = 2
    return c


class Net(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, name='encoder')(x)
        z = nn.Dense(DIM, name='projector')(nn.gelu(h))
        return nn.Dense(DIM, name='predictor')(z), z


class Method(base.Method):
    def __init__(self, config):
        super().__init__(config)
        self.net = Net(config.model.hidden)

    def dataset(self, seed, process_index, process_count):
        points = np.random.default_rng(1234).normal(size=(NUM_EXAMPLES, DIM)).astype(np.float32)
        noise, batch = self.config.input.noise, self.config.input.global_batch
        local = batch // process_count

        def views(index, rng):
            x = points[index]
            return {
                'a': x + noise * rng.normal(size=DIM).astype(np.float32),
                'b': x + noise * rng.normal(size=DIM).astype(np.float32),
            }

        ds = (
            grain.MapDataset.range(NUM_EXAMPLES)
            .shuffle(seed=seed)
            .repeat()
            .random_map(views, seed=seed)
            .batch(batch, drop_remainder=True)
            .map(lambda b: {k: v[process_index * local : (process_index + 1) * local] for k, v in b.items()})
        )
        return ds.to_iter_dataset(), NUM_EXAMPLES

    def example_batch(self, batch_size):
        return {'a': np.zeros((batch_size, DIM), np.float32), 'b': np.zeros((batch_size, DIM), np.float32)}

    def init(self, rng, batch):
        params = self.net.init(rng, batch['a'])['params']
        return params, {'teacher': params}

    def loss(self, params, extra, batch, rng, step):
        prediction, _ = self.net.apply({'params': params}, batch['a'])
        _, target = self.net.apply({'params': extra['teacher']}, batch['b'])
        normalise = lambda v: v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)
        loss = jnp.mean(jnp.sum((normalise(prediction) - jax.lax.stop_gradient(normalise(target))) ** 2, -1))
        return loss, ({'loss': loss}, extra)

    def update_extra(self, params, extra, step):
        m = self.config.model.ema
        return {'teacher': jax.tree.map(lambda t, p: m * t + (1 - m) * p, extra['teacher'], params)}

    def represent(self, params, extra, batch):
        _, z = self.net.apply({'params': params}, batch['a'])
        return {'projection': z}
