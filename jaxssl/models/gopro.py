"""GOPro's trainable parts (Singha et al., BMVC 2023; mainaksingha01/GOPro trainers/gopro.py): the prompt learner and
the contrastive projector. CLIP itself stays frozen (jaxssl.models.clip).

Prompt learner: M learned context vectors (initialised from the token embeddings of "a photo of a") are shifted by
one vector per image, computed from the frozen image tower's hidden states after each of its L blocks (B, N, W):
    style_l   = Linear_l((mean_tokens + std_tokens) / 2)   (W -> text width; std is the population std, eps 2.3e-8)
    content_l = Linear_l(mean_tokens)
    v         = rho((style_l + content_l) / 2 over l)      (rho: Linear(L -> 1) across the layers)
The same v is added to every context vector (the reference builds one per context token with the same rho).
Projector: Linear(D -> D) + BatchNorm1d on the normalised image embedding (training-mode batch statistics).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import vit

STD_EPS = 2.3e-8  # the reference's AdaIN_trans.sigma: sqrt((sum of squares + 2.3e-8) / N)
BN_EPS = 1e-5  # torch BatchNorm1d's


def torch_dense(features: int, fan_in: int, name: str) -> nn.Dense:
    """nn.Linear's default init: kernel and bias ~ U(+-1 / sqrt(fan_in))."""
    return nn.Dense(features, kernel_init=vit.conv_init, bias_init=vit.torch_bias_init(fan_in), name=name)


class PromptLearner(nn.Module):
    """`context(hidden)`: frozen image-tower hidden states (L, B, N, W) -> per-image context vectors (B, M, T);
    `project(embeddings)`: (B, D) -> the contrastive projection (B, D). The M = `num_ctx` context vectors start as
    N(0, 0.02) (CoOp's random init); the method overwrites them with the embeddings of `model.ctx_init`'s words."""

    num_layers: int
    image_width: int
    text_width: int
    embed_dim: int
    num_ctx: int

    def setup(self):
        self.ctx = self.param('ctx', nn.initializers.normal(0.02), (self.num_ctx, self.text_width))
        self.style = [torch_dense(self.text_width, self.image_width, f'style_{i}') for i in range(self.num_layers)]
        self.content = [torch_dense(self.text_width, self.image_width, f'content_{i}') for i in range(self.num_layers)]
        self.rho = torch_dense(1, self.num_layers, 'rho')
        self.sim_dense = torch_dense(self.embed_dim, self.embed_dim, 'sim_dense')
        self.sim_scale = self.param('sim_bn_scale', nn.initializers.ones, (self.embed_dim,))
        self.sim_bias = self.param('sim_bn_bias', nn.initializers.zeros, (self.embed_dim,))

    def shift(self, hidden: jax.Array) -> jax.Array:
        """(L, B, N, W) -> the per-image shift v (B, T)."""
        chex.assert_rank(hidden, 4)
        chex.assert_axis_dimension(hidden, 0, self.num_layers)
        hidden = hidden.astype(jnp.float32)
        mean = hidden.mean(axis=2)
        std = jnp.sqrt((jnp.square(hidden - mean[:, :, None]).sum(axis=2) + STD_EPS) / hidden.shape[2])
        mixed = jnp.stack([
            (self.style[i]((mean[i] + std[i]) / 2) + self.content[i](mean[i])) / 2 for i in range(self.num_layers)
        ], axis=-1)  # fmt: skip
        return self.rho(mixed)[..., 0]

    def context(self, hidden: jax.Array) -> jax.Array:
        return self.ctx[None] + self.shift(hidden)[:, None]

    def project(self, embeddings: jax.Array) -> jax.Array:
        """Linear then BatchNorm1d with the batch's own statistics (biased variance), as in training mode; under a
        sharded batch the mean is over the global batch (torch's per-GPU statistics under DataParallel differ)."""
        x = self.sim_dense(embeddings.astype(jnp.float32))
        mean = x.mean(axis=0)
        var = jnp.square(x - mean).mean(axis=0)
        return (x - mean) * jax.lax.rsqrt(var + BN_EPS) * self.sim_scale + self.sim_bias

    def __call__(self, hidden: jax.Array, embeddings: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.context(hidden), self.project(embeddings)
