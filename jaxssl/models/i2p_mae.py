"""I2P-MAE (Zhang, Wang, Qiao, Gao, Li, "Learning 3D Representations from 2D Pre-trained Models via Image-to-Point
Masked Autoencoders", CVPR 2023): Point-MAE's patches at three scales, an encoder that merges tokens scale by scale,
masks chosen at the coarsest scale with a 2-D model's help, and two targets: the masked tokens' points and, for the
visible tokens, the 2-D model's features at their points (jaxssl.models.point_views).

Laid out as the reference (ZrrSkywalker/I2P-MAE models/I2P_MAE.py, models/modules.py, cfgs i2p-mae.yaml):
- Scales (`hierarchy`): level 0 is G0 FPS centres of the points with their K0 nearest points; level l > 0 is G_l FPS
  centres of level l-1's centres with their K_l nearest level-(l-1) centres (512 x 16, 256 x 8, 64 x 8).
- Masks (`propagate_visible`): the coarsest level's visible set is chosen by the method; a finer token is visible
  iff it is among the K neighbours of a visible coarser token, so the finer levels see a varying number of tokens.
- Encoder, level by level: level 0 embeds its points with Point-MAE's mini-PointNet (128, 256, 512 -> C0); level l
  merges the K_l level-(l-1) tokens of each group with the same network on tokens (C, C, C_l -> C_l). The visible
  tokens (padded to a static bound, the padding hidden from attention) run through the level's blocks, each preceded
  by the level's position MLP (Linear(3, C), GELU, Linear(C, C)) of the centres, as Point-MAE's; then the encoded
  tokens replace their inputs (masked tokens keep their embeddings) for the next level's merge. Each level's
  LayerNorm applies to the outputs the decoder reads.
- Decoder: at the coarsest level, [the encoded visible tokens, a mask token per masked one] with a position MLP and
  one block; then PointNet++ feature propagation to level 1 (each level-1 centre's 3 nearest coarse centres,
  weights 1 / (d^2 + 1e-8)), concatenated with level 1's encoded tokens (zeros where masked), Conv-BN-GELU and one
  residual Conv-BN-GELU-Conv-BN block, GELU; a position MLP and one block; a LayerNorm.
- Heads on level 1: the 3-D head predicts each token's K1 neighbours (level-0 centres, relative to the token's
  centre); the 2-D head predicts the teacher's features at those K1 points in each of the 3 views.
Init as the reference: the encoder's Linear / 1x1 conv kernels N(0, 0.02) (timm's trunc_normal_, truncated at +-2,
i.e. never), zero biases; decoder blocks Xavier-uniform; the decoder's position MLPs, propagation convs and heads
torch's defaults; the mask token N(0, 0.02). BatchNorm momentum 0.1 in torch's terms, eps 1e-5.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models import point_mae, vit

VARIANTS: dict[str, dict[str, Any]] = {
    # cfgs/pre-training/i2p-mae.yaml: encoder [96, 192, 384] x [5, 5, 5], decoder [384, 192] x [1, 1], 6 heads
    'base': dict(dims=(96, 192, 384), depths=(5, 5, 5), heads=6, decoder_depths=(1, 1), embed_dims=(128, 256, 512)),
    # CPU-sized, for tests and `runlocal` (not a reference size)
    'micro': dict(dims=(32, 64, 64), depths=(1, 1, 1), heads=4, decoder_depths=(1, 1), embed_dims=(32, 64, 128)),
}


class Level(NamedTuple):
    """One scale: neighbourhoods relative to their centres (B, G, K, 3), centres (B, G, 3), the neighbours'
    indices into the finer level's centres (the points, at level 0) (B, G, K), and the neighbours' absolute
    coordinates (B, G, K, 3)."""

    neighbourhoods: jax.Array
    centres: jax.Array
    index: jax.Array
    absolute: jax.Array


def hierarchy(points: jax.Array, num_groups: tuple[int, ...], group_sizes: tuple[int, ...]) -> list[Level]:
    """The scales, finest first: level 0 groups the points, level l the centres of level l-1."""
    levels, source = [], points
    for g, k in zip(num_groups, group_sizes, strict=True):
        absolute, centres, index = point_mae.group_with_index(source, g, k)
        levels.append(Level(absolute - centres[:, :, None, :], centres, index, absolute))
        source = centres
    return levels


def propagate_visible(visible_top: jax.Array, levels: list[Level]) -> list[jax.Array]:
    """Visible masks (B, G_l) bool per level, finest first, from the coarsest level's: a level-(l-1) token is
    visible iff a visible level-l token lists it among its neighbours. (The reference scatters the masked coarse
    tokens' lists to flat index 0, which also makes the first cloud's token 0 visible; here they scatter nowhere.)"""
    masks = [visible_top]
    for level, finer in zip(levels[:0:-1], levels[-2::-1], strict=True):
        b, g_finer = finer.centres.shape[:2]
        target = jnp.where(masks[-1][..., None], level.index, g_finer)  # masked: the dropped slot g_finer
        visible = jnp.zeros((b, g_finer + 1), bool).at[jnp.arange(b)[:, None, None], target].set(True)
        masks.append(visible[:, :g_finer])
    return masks[::-1]


def visible_bounds(num_visible_top: int, num_groups: tuple[int, ...], group_sizes: tuple[int, ...]) -> list[int]:
    """The most tokens each level can have visible, finest first: the coarsest level's count, then at most K_l
    per visible level-l token."""
    bounds = [num_visible_top]
    for lv in range(len(num_groups) - 1, 0, -1):
        bounds.append(min(num_groups[lv - 1], group_sizes[lv] * bounds[-1]))
    return bounds[::-1]


def visible_first(visible: jax.Array, bound: int) -> tuple[jax.Array, jax.Array]:
    """(index (B, bound), valid (B, bound)): the visible tokens' indices in order, then masked ones as padding."""
    index = jnp.argsort(~visible, axis=1, stable=True)[:, :bound]
    return index, jnp.take_along_axis(visible, index, axis=1)


def interpolate(centres: jax.Array, source_centres: jax.Array, source: jax.Array) -> jax.Array:
    """PointNet++'s three-nearest-neighbour interpolation: (B, N, C) at centres (B, N, 3) from source (B, S, C) at
    source_centres (B, S, 3), weights 1 / (d^2 + 1e-8) normalised."""
    distances = jnp.sum((centres[:, :, None] - source_centres[:, None]) ** 2, axis=-1)
    nearest, index = jax.lax.top_k(-distances, 3)
    weights = 1.0 / (-nearest + 1e-8)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    neighbours = jax.vmap(lambda s, i: s[i])(source, index)  # (B, N, 3, C)
    return jnp.sum(neighbours * weights[..., None], axis=2)


class ConvNorm(nn.Module):
    """A 1x1 Conv1d (torch's default init) and BatchNorm1d over (B, N, C) tokens."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = vit.torch_dense(self.features, x.shape[-1], name='conv')(x)
        return nn.BatchNorm(not train, momentum=0.9, epsilon=1e-5, name='norm')(x)


class Propagation(nn.Module):
    """PointNetFeaturePropagation with one ConvBNReLURes1D block (GELU activations, as the reference's)."""

    features: int

    @nn.compact
    def __call__(self, centres, source_centres, own, source, train: bool) -> jax.Array:
        gelu = lambda x: nn.gelu(x, approximate=False)
        x = jnp.concatenate([own, interpolate(centres, source_centres, source)], axis=-1)
        x = gelu(ConvNorm(self.features, name='fuse')(x, train))
        y = ConvNorm(self.features, name='net2')(gelu(ConvNorm(self.features, name='net1')(x, train)), train)
        return gelu(y + x)


class I2PMAE(nn.Module):
    """Point clouds -> the level-1 tokens' 3-D and 2-D predictions (see `__call__`), or tokens (`encode`)."""

    dims: tuple[int, ...]
    depths: tuple[int, ...]
    heads: int
    decoder_depths: tuple[int, int]
    embed_dims: tuple[int, int, int] = (128, 256, 512)
    num_groups: tuple[int, ...] = (512, 256, 64)
    group_sizes: tuple[int, ...] = (16, 8, 8)
    feature_dim: int = 512  # the 2-D teacher's feature width
    views: int = 3
    drop_path_rate: float = 0.1

    def setup(self):
        normal_02 = point_mae.normal_02
        n = len(self.dims)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))  # torch.linspace over all encoder blocks
        starts = np.cumsum((0, *self.depths))
        self.token_embed = [
            point_mae.PatchEmbed(self.dims[0], self.embed_dims, name='token_embed_0'),
            *(point_mae.PatchEmbed(self.dims[lv], (self.dims[lv - 1],) * 2 + (self.dims[lv],), name=f'token_embed_{lv}')
              for lv in range(1, n)),
        ]  # fmt: skip
        self.encoder_pos_embeds = [
            point_mae.PositionMlp(d, hidden=d, name=f'encoder_pos_embeds_{lv}') for lv, d in enumerate(self.dims)
        ]
        self.encoder_blocks = [
            point_mae.Blocks(d, self.depths[lv], self.heads, 0.0, tuple(rates[starts[lv] : starts[lv + 1]]),
                             name=f'encoder_blocks_{lv}')
            for lv, d in enumerate(self.dims)
        ]  # fmt: skip
        self.encoder_norms = [nn.LayerNorm(1e-5, name=f'encoder_norms_{lv}') for lv in range(n)]
        decoder_dims = (self.dims[-1], self.dims[-2])
        decoder_rates = np.linspace(0.0, self.drop_path_rate, sum(self.decoder_depths))
        self.mask_token = self.param('mask_token', normal_02, (decoder_dims[0],))
        self.decoder_pos_embeds = [
            point_mae.PositionMlp(d, torch_default=True, hidden=d, name=f'decoder_pos_embeds_{i}')
            for i, d in enumerate(decoder_dims)
        ]
        self.h_decoder = [
            point_mae.Blocks(decoder_dims[0], self.decoder_depths[0], self.heads, 0.0,
                             tuple(decoder_rates[: self.decoder_depths[0]]), name='h_decoder_0'),
            point_mae.Blocks(decoder_dims[1], self.decoder_depths[1], self.heads, 0.0,
                             tuple(decoder_rates[self.decoder_depths[0]:]), name='h_decoder_1'),
        ]  # fmt: skip
        self.token_prop = Propagation(decoder_dims[1], name='token_prop_0')
        self.decoder_norm = nn.LayerNorm(1e-5, name='decoder_norm')
        k = self.group_sizes[1]
        self.rec_head_3d = vit.torch_dense(3 * k, decoder_dims[1], name='rec_head_3d')
        self.rec_head_2d = vit.torch_dense(self.feature_dim * k * self.views, decoder_dims[1], name='rec_head_2d')

    def encoder(
        self, levels: list[Level], visible: list[jax.Array], bounds: list[int], train: bool
    ) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        """Per level, finest first: (normed encoded tokens (B, bound, C), their indices, valid (B, bound))."""
        outputs, tokens = [], None
        for lv, level in enumerate(levels):
            if lv == 0:
                tokens = self.token_embed[0](level.neighbourhoods, train)
            else:  # merge the finer level's tokens (encoded where visible) in each group
                tokens = self.token_embed[lv](jax.vmap(lambda t, i: t[i])(tokens, level.index), train)
            index, valid = visible_first(visible[lv], bounds[lv])
            pos = self.encoder_pos_embeds[lv](vit.take_tokens(level.centres, index))
            x = self.encoder_blocks[lv](vit.take_tokens(tokens, index), pos, train, key_mask=valid)
            outputs.append((self.encoder_norms[lv](x), index, valid))
            tokens = vit.put_tokens(tokens, index, valid, x)
        return outputs

    def __call__(
        self, levels: list[Level], visible: list[jax.Array], bounds: list[int], train: bool = True
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """levels (see `hierarchy`), visible masks per level (see `propagate_visible`) and their static bounds.
        Returns (3-D predictions of every level-1 token (B, G1, K1, 3), 2-D predictions of the visible level-1
        tokens (B, bound1, K1, views x feature_dim) with their indices (B, bound1) and valid flags (B, bound1))."""
        encoded = self.encoder(levels, visible, bounds, train)
        top, top_visible = levels[-1], visible[-1]
        x_vis, vis_index, _ = encoded[-1]  # the coarsest level has exactly bounds[-1] visible tokens
        b, g = top_visible.shape
        masked_index, _ = visible_first(~top_visible, g - bounds[-1])
        order = jnp.concatenate([vis_index, masked_index], axis=1)
        centres = vit.take_tokens(top.centres, order)
        x = jnp.concatenate([x_vis, jnp.broadcast_to(self.mask_token, (b, g - bounds[-1], x_vis.shape[-1]))], 1)
        x = self.h_decoder[0](x, self.decoder_pos_embeds[0](centres), train)

        level = levels[-2]
        own, index, valid = encoded[-2]
        own = vit.put_tokens(jnp.zeros(level.centres.shape[:2] + own.shape[-1:], own.dtype), index, valid, own)
        x = self.token_prop(level.centres, centres, own, x, train)
        x = self.h_decoder[1](x, self.decoder_pos_embeds[1](level.centres), train)
        x = self.decoder_norm(x)
        k = self.group_sizes[1]
        predicted_3d = self.rec_head_3d(x).reshape(b, -1, k, 3)
        predicted_2d = self.rec_head_2d(vit.take_tokens(x, index)).reshape(b, index.shape[1], k, -1)
        return predicted_3d, predicted_2d, index, valid

    def encode(self, points: jax.Array) -> jax.Array:
        """The coarsest level's tokens (B, G, C) after its LayerNorm, nothing masked (the finer levels keep the
        tokens no coarse group lists masked, as the reference's evaluation), BatchNorm on its running averages."""
        chex.assert_rank(points, 3)
        levels = hierarchy(points, self.num_groups, self.group_sizes)
        top = jnp.ones(levels[-1].centres.shape[:2], bool)
        bounds = visible_bounds(self.num_groups[-1], self.num_groups, self.group_sizes)
        return self.encoder(levels, propagate_visible(top, levels), bounds, train=False)[-1][0]


def make_model(variant: str, **overrides: Any) -> I2PMAE:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    return I2PMAE(**{**VARIANTS[variant], **overrides})


def init_variables(model: I2PMAE, rng: jax.Array, points: jax.Array, num_visible_top: int) -> Any:
    """model.init with the reference's kernels: N(0, 0.02) in the encoder's blocks (Flax's Dense in vit.Block
    starts Xavier-uniform, the decoder blocks' init)."""
    init_rng, redraw_rng = jax.random.split(rng)
    levels = hierarchy(points, model.num_groups, model.group_sizes)
    top = jnp.arange(model.num_groups[-1]) < num_visible_top
    top = jnp.broadcast_to(top, levels[-1].centres.shape[:2])
    bounds = visible_bounds(num_visible_top, model.num_groups, model.group_sizes)
    variables = model.init(
        {'params': init_rng, 'drop_path': init_rng}, levels, propagate_visible(top, levels), bounds, train=False
    )
    params = dict(variables['params'])
    for lv in range(len(model.dims)):
        name = f'encoder_blocks_{lv}'
        params[name] = vit.redraw_kernels(params[name], jax.random.fold_in(redraw_rng, lv), point_mae.normal_02)
    return {'params': params, 'batch_stats': variables['batch_stats']}
