"""SimCLR model: a ViT backbone (the cls token after the final norm is the representation h) and the reference's
projection head g(h) = z on which NT-Xent is computed.

The reference backbone is a ResNet-50; this library's shared ViT is used instead (sizes from the ViT table in
jaxssl.models.mae, which holds the encoder sizes once). The head is google-research/simclr's (tf2/model.py,
shared/reference/methods/simclr_vicreg_dino_poa_uni.md): `proj_layers - 1` blocks of Dense (no bias) + BatchNorm +
ReLU, then Dense (no bias) + BatchNorm without a shift; Dense kernels ~ N(0, 0.01). v1 (the 2020 paper) has 2
layers, v2 3. BatchNorm always normalises with the statistics of the batch it sees: under jit with a batch sharded
over devices these are global-batch statistics (the reference's global BN). Its running averages would only serve
the head at test time, and the head is discarded after pretraining, so they are not kept.

`head_type` swaps the head for the alternatives Xue et al. study ("Investigating the Benefits of Projection Head for
Representation Learning", ICLR 2024): 'reweight', their fixed reweighting head z_i = h_i / kappa^i (no parameters),
or 'none' (the loss on h itself).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import mae as mae_model
from jaxssl.models import resnet, vit


class ProjectionHead(nn.Module):
    """h (B, D) -> z (B, out_dim) in float32."""

    hidden_dim: int = 2048
    out_dim: int = 128
    layers: int = 2
    bn_epsilon: float = 1e-5  # the reference's BATCH_NORM_EPSILON

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        chex.assert_rank(h, 2)
        x = h.astype(jnp.float32)
        init = nn.initializers.normal(0.01)
        for i in range(self.layers):
            last = i == self.layers - 1
            features = self.out_dim if last else self.hidden_dim
            x = nn.Dense(features, use_bias=False, kernel_init=init, name=f'dense_{i}')(x)
            # use_running_average=False: batch statistics always (see the module docstring).
            x = nn.BatchNorm(use_running_average=False, epsilon=self.bn_epsilon, use_bias=not last, name=f'bn_{i}')(x)
            if not last:
                x = nn.relu(x)
        return x


HEAD_TYPES = ('mlp', 'reweight', 'none')


class ReweightHead(nn.Module):
    """Xue et al.'s fixed reweighting head: z = h * (1, 1 / kappa, 1 / kappa^2, ...), a constant, not a parameter, so
    the contrastive loss weighs the representation's coordinates progressively less (the implicit layer-wise
    weighting their analysis finds a trained head to perform), while h itself is kept for downstream use."""

    kappa: float

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        chex.assert_rank(h, 2)
        weights = jnp.float32(self.kappa) ** -jnp.arange(h.shape[-1], dtype=jnp.float32)
        return h.astype(jnp.float32) * weights


def make_head(head_type: str, hidden_dim: int, out_dim: int, layers: int, kappa: float) -> nn.Module | None:
    """SimCLR's projection head ('mlp'), the fixed reweighting head ('reweight') or None ('none': z = h)."""
    if head_type == 'mlp':
        return ProjectionHead(hidden_dim, out_dim, layers)
    if head_type == 'reweight':
        return ReweightHead(kappa)
    if head_type == 'none':
        return None
    raise ValueError(f"unknown head type '{head_type}'; valid: {', '.join(HEAD_TYPES)}")


def apply_head(head: nn.Module | None, h: jax.Array) -> jax.Array:
    return h.astype(jnp.float32) if head is None else head(h)


class SimCLRModel(nn.Module):
    """Images (B, S, S, C) -> (z (B, out_dim) float32, {'cls': h (B, width), 'encoded': (B, 1 + L, width)})."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    patch: int = 16
    head_hidden: int = 2048
    head_out: int = 128
    head_layers: int = 2
    head_type: str = 'mlp'  # 'mlp' (the paper's), 'reweight' or 'none' (see the module docstring)
    head_kappa: float = 1.0  # the reweighting head's kappa
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.0  # > 0: LayerScale (DINOv2's 1e-5)
    drop_path_rate: float = 0.0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    # The sin-cos position table is built at this width and its first `width` columns are used (0: at `width`), so a
    # narrower ViT sliced out of a wider one (POA's sub-models) keeps the wide one's positions.
    position_width: int = 0

    def setup(self):
        self.patch_embed = vit.PatchEmbed(self.width, (self.patch, self.patch), dtype=self.dtype)
        self.cls_token = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, self.width))
        self.encoder = vit.Transformer(
            self.width,
            self.depth,
            self.heads,
            self.mlp_hidden,
            layer_norm_eps=self.layer_norm_eps,
            layer_scale_init=self.layer_scale_init,
            drop_path_rate=self.drop_path_rate,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        self.head = self.make_head()

    def make_head(self) -> nn.Module | None:
        """The head on the cls token; a hook so that methods sharing this backbone (VICReg's expander) swap it."""
        return make_head(self.head_type, self.head_hidden, self.head_out, self.head_layers, self.head_kappa)

    def position_table(self, image_size: int) -> jax.Array:
        """(L, width) fixed 2-D sin-cos positions of a square image's token grid (see `position_width`)."""
        grid = mae_model.token_grid(image_size, self.patch)
        return jnp.asarray(mae_model.sincos_2d_table(*grid, self.position_width or self.width)[:, : self.width])

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The backbone: (B, 1 + L, width) tokens after the final norm, cls first (fixed 2-D sin-cos positions)."""
        chex.assert_rank(images, 4)
        return self.encode_tokens(self.patch_embed(images), images.shape[1], train)

    def encode_tokens(
        self, tokens: jax.Array, image_size: int, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The backbone from patch embeddings (B, L, width) of a square image (methods that edit them, e.g. iBOT's
        mask tokens, call this): positions added, cls prepended, the transformer."""
        tokens = tokens + self.position_table(image_size).astype(tokens.dtype)
        cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
        x, intermediates = self.encoder(jnp.concatenate([cls, tokens], axis=1), train)
        return x, dict(intermediates, encoded=x)

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        encoded, intermediates = self.encode(images, train)
        h = encoded[:, 0]
        z = apply_head(self.head, h)
        chex.assert_rank(z, 2)
        return z, dict(intermediates, cls=h)


class ResNetWithHead(nn.Module):
    """Images (B, S, S, C) -> (z (B, out) float32, {'cls': h (B, features)}): a ResNet (jaxssl.models.resnet, the
    papers' backbone), whose pooled features h stand in for the ViT's cls token, and a head on them (SimCLR's
    projection head, VICReg's expander). The backbone's BatchNorm keeps running averages ('batch_stats')."""

    backbone: resnet.ResNet
    head: nn.Module | None

    def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Pooled backbone features (B, features) float32."""
        return self.backbone(images, train)

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        h = self.encode(images, train)
        z = apply_head(self.head, h)
        chex.assert_rank(z, 2)
        return z, {'cls': h}


def make_model(variant: str, **overrides: Any) -> SimCLRModel:
    """A SimCLRModel with the encoder of a named ViT size ('micro', 'tiny', 'B', 'L', 'H'; '/patch' optional)."""
    spec = mae_model.decode_variant(variant)
    fields = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return SimCLRModel(**fields, **overrides)
