"""Point-MAE (Pang, Wang, Tay, Liu, Tian, Yuan, "Masked Autoencoders for Point Cloud Self-supervised Learning",
ECCV 2022): a point cloud cut into local patches, most of them masked, the rest encoded by a Transformer, and the
masked patches' points reconstructed under the Chamfer distance.

Laid out as the reference (Pang-Yatian/Point-MAE, models/Point_MAE.py):
- Grouping (`Group`): G centres by farthest point sampling (pointnet2's kernel: from the first point, each next the
  farthest from those chosen; points within sqrt(1e-3) of the origin are never chosen), each with its K nearest
  points (itself included) expressed relative to the centre.
- Patch embedding (`Encoder`, a mini-PointNet shared by all patches): per point Linear(3 -> 128), BatchNorm, ReLU,
  Linear(128 -> 256); max over the patch, concatenated to every point; Linear(512 -> 512), BatchNorm, ReLU,
  Linear(512 -> width); max over the patch. (BatchNorm momentum 0.1 in torch's terms, eps 1e-5.)
- Encoder (`MaskTransformer`): the visible patches' tokens; before every block, pos_embed(centre) (Linear(3 ->
  128), GELU, Linear(128 -> width)) is added; pre-norm blocks (no qkv bias, LayerNorm eps 1e-5, exact GELU, MLP
  ratio 4, drop path linear to 0.1); a final LayerNorm.
- Decoder: [visible tokens, a mask token per masked patch], its own position MLP added before each of its blocks, a
  LayerNorm on the masked tokens, then Conv1d(width -> 3 K) as a Linear: each masked patch's K points.
Init as the reference: the encoder's Linear and 1x1 conv kernels N(0, 0.02) with zero biases, the decoder blocks'
Xavier-uniform, the decoder's position MLP and head torch's default, the mask token N(0, 0.02).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models import vit

VARIANTS: dict[str, dict[str, Any]] = {
    # the reference's pretrain.yaml: 64 groups of 32 points, 12 x 384 encoder, 4-block decoder, 6 heads
    'base': dict(width=384, depth=12, heads=6, decoder_depth=4, decoder_heads=6, embed_dims=(128, 256, 512)),
    # CPU-sized, for tests and `runlocal` (not a reference size; a mini-PointNet 4x narrower)
    'micro': dict(width=64, depth=2, heads=4, decoder_depth=1, decoder_heads=4, embed_dims=(32, 64, 128)),
}
normal_02 = nn.initializers.normal(0.02)


def farthest_point_sample(points: jax.Array, num: int) -> jax.Array:
    """(B, num) int32 indices: pointnet2's furthest_point_sample. The first point is index 0; each next one is the
    point farthest (squared distance) from the chosen ones, ties to the lowest index; points with |p|^2 <= 1e-3
    are skipped by the kernel, so they are never chosen after the first."""
    chex.assert_rank(points, 3)
    points = points.astype(jnp.float32)
    candidate = jnp.sum(points**2, axis=-1) > 1e-3
    b, n, _ = points.shape

    def step(i, state):
        chosen, nearest = state
        last = jnp.take_along_axis(points, chosen[:, i - 1][:, None, None], axis=1)  # (B, 1, 3)
        nearest = jnp.minimum(nearest, jnp.sum((points - last) ** 2, axis=-1))
        scores = jnp.where(candidate, nearest, -1.0)
        return chosen.at[:, i].set(jnp.argmax(scores, axis=-1).astype(jnp.int32)), nearest

    chosen = jnp.zeros((b, num), jnp.int32)
    chosen, _ = jax.lax.fori_loop(1, num, step, (chosen, jnp.full((b, n), 1e10, jnp.float32)))
    return chosen


def group_with_index(points: jax.Array, num_groups: int, group_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(neighbourhoods (B, G, K, 3) in absolute coordinates, centres (B, G, 3), indices (B, G, K) of the neighbours
    in `points`): FPS centres and each one's K nearest points, nearest first (knn_cuda's order)."""
    centres = jnp.take_along_axis(points, farthest_point_sample(points, num_groups)[..., None], axis=1)
    distances = jnp.sum((centres[:, :, None, :] - points[:, None, :, :]) ** 2, axis=-1)  # (B, G, N)
    _, nearest = jax.lax.top_k(-distances, group_size)
    return jnp.take_along_axis(points[:, None], nearest[..., None], axis=2), centres, nearest


def group(points: jax.Array, num_groups: int, group_size: int) -> tuple[jax.Array, jax.Array]:
    """(neighbourhoods (B, G, K, 3) relative to their centres, centres (B, G, 3)): see `group_with_index`."""
    neighbourhoods, centres, _ = group_with_index(points, num_groups, group_size)
    return neighbourhoods - centres[:, :, None, :], centres


def chamfer_l2_per_set(predicted: jax.Array, target: jax.Array) -> jax.Array:
    """(P,): each pair of (K, 3) point sets' ChamferDistanceL2: the mean squared distance to the nearest point of the
    other set, both ways, summed."""
    distances = jnp.sum((predicted[:, :, None, :] - target[:, None, :, :]) ** 2, axis=-1)  # (P, K, K)
    return jnp.mean(jnp.min(distances, axis=2), axis=1) + jnp.mean(jnp.min(distances, axis=1), axis=1)


def chamfer_l2(predicted: jax.Array, target: jax.Array) -> jax.Array:
    """ChamferDistanceL2 of (P, K, 3) point sets: the mean over all points of the squared distance to the nearest
    point of the other set, both ways, summed."""
    return jnp.mean(chamfer_l2_per_set(predicted, target))


class PatchEmbed(nn.Module):
    """The mini-PointNet: patches (B, G, K, C) -> tokens (B, G, width); `dims` the hidden widths (the
    reference's 128, 256, 512 for points, C = 3). I2P-MAE's token merging is the same network on groups of
    tokens."""

    width: int
    dims: tuple[int, int, int] = (128, 256, 512)

    @nn.compact
    def __call__(self, patches: jax.Array, train: bool) -> jax.Array:
        dense = lambda features, name: nn.Dense(features, kernel_init=normal_02, name=name)
        norm = lambda name: nn.BatchNorm(not train, momentum=0.9, epsilon=1e-5, name=name)
        b, g, k, c = patches.shape
        x = patches.reshape(b * g * k, c)
        first, second, third = self.dims
        x = dense(second, 'first_conv_3')(nn.relu(norm('first_conv_1')(dense(first, 'first_conv_0')(x))))
        x = x.reshape(b * g, k, second)
        x = jnp.concatenate([jnp.broadcast_to(x.max(axis=1, keepdims=True), x.shape), x], axis=-1)
        x = dense(third, 'second_conv_0')(x.reshape(b * g * k, 2 * second))
        x = dense(self.width, 'second_conv_3')(nn.relu(norm('second_conv_1')(x)))
        return x.reshape(b, g, k, self.width).max(axis=2)


class PositionMlp(nn.Module):
    """Linear(3 -> hidden), GELU, Linear(hidden -> width) of the centres."""

    width: int
    kernel_init: Any = normal_02
    torch_default: bool = False
    hidden: int = 128

    @nn.compact
    def __call__(self, centres: jax.Array) -> jax.Array:
        if self.torch_default:
            first = vit.torch_dense(self.hidden, 3, name='0')
            second = vit.torch_dense(self.width, self.hidden, name='2')
        else:
            first = nn.Dense(self.hidden, kernel_init=self.kernel_init, name='0')
            second = nn.Dense(self.width, kernel_init=self.kernel_init, name='2')
        return second(nn.gelu(first(centres), approximate=False))


class Blocks(nn.Module):
    """Pre-norm blocks with the position embedding added before each: x = block(x + pos). Drop-path rates rise
    linearly to `drop_path_rate` (torch.linspace(0, rate, depth)), or are given per block (`rates`); `key_mask`
    (B, N) hides padding tokens from attention."""

    width: int
    depth: int
    heads: int
    drop_path_rate: float
    rates: tuple[float, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, pos: jax.Array, train: bool, key_mask: jax.Array | None = None) -> jax.Array:
        rates = self.rates or tuple(np.linspace(0.0, self.drop_path_rate, self.depth))
        for i in range(self.depth):
            block = vit.Block(self.width, self.heads, 4 * self.width, layer_norm_eps=1e-5, qkv_bias=False,
                              name=f'blocks_{i}')  # fmt: skip
            x, _ = block(x + pos, float(rates[i]), train and rates[i] > 0, key_mask=key_mask)  # train: drop path
        return x


class PointMAE(nn.Module):
    """Point clouds (B, N, 3) -> Chamfer loss of the masked patches, or encoded tokens (see `encode`)."""

    width: int
    depth: int
    heads: int
    decoder_depth: int
    decoder_heads: int
    embed_dims: tuple[int, int, int] = (128, 256, 512)
    num_groups: int = 64
    group_size: int = 32
    drop_path_rate: float = 0.1

    def setup(self):
        self.patch_embed = PatchEmbed(self.width, self.embed_dims, name='encoder')
        self.pos_embed = PositionMlp(self.width, name='pos_embed')
        self.blocks = Blocks(self.width, self.depth, self.heads, self.drop_path_rate, name='blocks')
        self.norm = nn.LayerNorm(1e-5, name='norm')
        self.mask_token = self.param('mask_token', normal_02, (self.width,))
        self.decoder_pos_embed = PositionMlp(self.width, torch_default=True, name='decoder_pos_embed')
        self.decoder = Blocks(self.width, self.decoder_depth, self.decoder_heads, self.drop_path_rate, name='decoder')
        self.decoder_norm = nn.LayerNorm(1e-5, name='decoder_norm')
        self.increase_dim = vit.torch_dense(3 * self.group_size, self.width, name='increase_dim')

    def tokens(self, neighbourhoods: jax.Array, centres: jax.Array, index: jax.Array, train: bool) -> jax.Array:
        """The encoder on the patches at `index` (B, V): (B, V, width) after the final LayerNorm."""
        tokens = self.patch_embed(neighbourhoods, train)
        take = lambda x: vit.take_tokens(x, index)
        x = self.blocks(take(tokens), self.pos_embed(take(centres)), train)
        return self.norm(x)

    def __call__(
        self, points: jax.Array, visible_idx: jax.Array, masked_idx: jax.Array, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """points (B, N, 3); visible_idx (B, V), masked_idx (B, M) partition the G patches. Returns (Chamfer-L2
        loss, {'predicted': (B, M, K, 3), 'target': (B, M, K, 3)})."""
        neighbourhoods, centres = group(points, self.num_groups, self.group_size)
        x_vis = self.tokens(neighbourhoods, centres, visible_idx, train)
        take = vit.take_tokens
        b, m = masked_idx.shape
        x = jnp.concatenate([x_vis, jnp.broadcast_to(self.mask_token, (b, m, self.width))], axis=1)
        pos = self.decoder_pos_embed(jnp.concatenate([take(centres, visible_idx), take(centres, masked_idx)], 1))
        x = self.decoder_norm(self.decoder(x, pos, train)[:, -m:])
        predicted = self.increase_dim(x).reshape(b, m, self.group_size, 3)
        target = take(neighbourhoods, masked_idx)
        loss = chamfer_l2(predicted.reshape(b * m, self.group_size, 3), target.reshape(b * m, self.group_size, 3))
        return loss, {'predicted': predicted, 'target': target}

    def encode(self, points: jax.Array) -> jax.Array:
        """Every patch's token (B, G, width), nothing masked, BatchNorm on its running averages."""
        neighbourhoods, centres = group(points, self.num_groups, self.group_size)
        index = jnp.broadcast_to(jnp.arange(self.num_groups), (points.shape[0], self.num_groups))
        return self.tokens(neighbourhoods, centres, index, train=False)


def make_model(variant: str, **overrides: Any) -> PointMAE:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    return PointMAE(**{**VARIANTS[variant], **overrides})


def init_variables(model: PointMAE, rng: jax.Array, points: jax.Array, visible: jax.Array, masked: jax.Array) -> Any:
    """model.init with the reference's kernels: N(0, 0.02) in the encoder's blocks (Flax's Dense in vit.Block
    starts Xavier-uniform, the decoder's init)."""
    init_rng, redraw_rng = jax.random.split(rng)
    variables = model.init({'params': init_rng, 'drop_path': init_rng}, points, visible, masked, train=False)
    params = dict(variables['params'])
    params['blocks'] = vit.redraw_kernels(params['blocks'], redraw_rng, normal_02)
    return {'params': params, 'batch_stats': variables['batch_stats']}
