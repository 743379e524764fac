"""VideoMAE V2 pretraining model: tubelet ViT encoder on visible tokens + lightweight decoder on kept tokens.

Matches the reference PretrainVisionTransformer (OpenGVLab/VideoMAEv2, models/modeling_pretrain.py); see
shared/reference/videomae_v2.md. Token selection is by index, not by boolean mask, so every shape is static:
`visible_idx` (B, N_vis) lists the tokens the encoder sees and `target_idx` (B, N_tgt) the positions the
decoder reconstructs, both ascending (jaxssl.masks.mask_indices builds them from the reference's masks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import vit

# The size table lives here only: encoder width / depth / heads / MLP ratio, the pretraining decoder's
# width / depth / heads (its MLP ratio is the encoder's), and the default patch size.
_FIELDS = ('width', 'depth', 'heads', 'mlp_ratio', 'dec_width', 'dec_depth', 'dec_heads', 'patch')
_TABLE = {
    'micro': (64, 2, 4, 4.0, 32, 1, 2, 16),  # tests and `runlocal` on a CPU; not a reference size
    'tiny': (128, 4, 4, 4.0, 64, 2, 4, 16),  # CPU demos and quality checks; not a reference size
    'S': (384, 12, 6, 4.0, 192, 4, 3, 16),
    'B': (768, 12, 12, 4.0, 384, 4, 6, 16),
    'L': (1024, 24, 16, 4.0, 512, 4, 8, 16),
    'H': (1280, 32, 16, 4.0, 512, 4, 8, 16),
    # ViT-g/14: MLP ratio 48/11 gives hidden 6144 in the encoder and int(512 * 48 / 11) = 2234 in the decoder.
    'g': (1408, 40, 16, 48 / 11, 512, 4, 8, 14),
}
VARIANTS: dict[str, dict[str, Any]] = {name: dict(zip(_FIELDS, row, strict=True)) for name, row in _TABLE.items()}


def decode_variant(variant: str) -> dict[str, Any]:
    """'B', 'B/16' or 'g/14' -> VideoMAEPretrain size fields. Raises ValueError listing valid names."""
    size, _, patch = variant.partition('/')
    if size not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)} (optionally '/patch')")
    spec = dict(VARIANTS[size])
    if patch:
        if not patch.isdigit() or int(patch) < 1:
            raise ValueError(f"bad patch size in variant '{variant}'")
        spec['patch'] = int(patch)
    mlp_ratio = spec.pop('mlp_ratio')
    spec['mlp_hidden'] = int(spec['width'] * mlp_ratio)
    spec['dec_mlp_hidden'] = int(spec['dec_width'] * mlp_ratio)
    return spec


def token_grid(frames: int, image_size: int, patch: int, tubelet: int = 2) -> tuple[int, int, int]:
    """The (T', H', W') token grid of a clip, e.g. (8, 14, 14) for 16x224x224 with patch 16."""
    if frames % tubelet or image_size % patch:
        raise ValueError(f'{frames} frames x {image_size}px do not divide into tubelets {tubelet} x patches {patch}')
    return frames // tubelet, image_size // patch, image_size // patch


class VideoMAEPretrain(nn.Module):
    """Encoder on visible tokens; decoder on visible + mask tokens at `target_idx`; predicts target pixels.

    Output of `__call__`: predictions (B, N_tgt, tubelet * patch * patch * 3) in float32, vector order
    (p0 p1 p2 c) with channel fastest, plus intermediates {'encoded': encoder output on visible tokens}.
    """

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    dec_width: int
    dec_depth: int
    dec_heads: int
    dec_mlp_hidden: int
    patch: int = 16
    tubelet: int = 2
    channels: int = 3
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.0
    pos_embedding: str = 'sincos'
    drop_path_rate: float = 0.0
    scan_layers: bool = False
    scan_unroll: int = 1  # with scan_layers: layers per loop iteration, 0 = all (vit.Transformer)
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    patch_embed_impl: str = 'matmul'
    split_qkv: bool = False  # throughput levers (vit.Attention, vit.Mlp)
    approximate_gelu: bool = False
    recompute_gelu: bool = False

    def setup(self):
        common = dict(
            layer_norm_eps=self.layer_norm_eps,
            layer_scale_init=self.layer_scale_init,
            drop_path_rate=self.drop_path_rate,
            scan_layers=self.scan_layers,
            scan_unroll=self.scan_unroll,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            split_qkv=self.split_qkv,
            approximate_gelu=self.approximate_gelu,
            recompute_gelu=self.recompute_gelu,
        )
        self.patch_embed = vit.PatchEmbed(
            self.width, (self.tubelet, self.patch, self.patch), dtype=self.dtype, impl=self.patch_embed_impl
        )
        self.pos_embed = vit.PositionEmbedding(self.pos_embedding)
        self.encoder = vit.Transformer(self.width, self.depth, self.heads, self.mlp_hidden, **common)
        self.encoder_to_decoder = nn.Dense(self.dec_width, use_bias=False, dtype=self.dtype, kernel_init=vit.dense_init)
        self.mask_token = self.param('mask_token', vit.truncated_normal_init(0.02), (1, 1, self.dec_width))
        self.decoder = vit.Transformer(
            self.dec_width,
            self.dec_depth,
            self.dec_heads,
            self.dec_mlp_hidden,
            final_norm=False,  # the norm runs on the returned tokens only, below
            **common,
        )
        self.decoder_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype)
        self.decoder_head = nn.Dense(
            self.tubelet * self.patch * self.patch * self.channels,
            dtype=self.dtype,
            kernel_init=vit.dense_init,
        )

    def encode(
        self, video: jax.Array, visible_idx: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Encoder features (B, N_vis or N, width) of a (B, T, H, W, C) clip, on `visible_idx` tokens if given."""
        chex.assert_rank(video, 5)
        # Only the visible tokens are embedded: the embedding is per token, so this equals the reference's
        # embed-everything-then-select, without the work on the ~90% of tokens the encoder never sees.
        num_tokens = (video.shape[1] // self.tubelet) * (video.shape[2] // self.patch) * (video.shape[3] // self.patch)
        tokens = self.pos_embed(self.patch_embed(video, visible_idx), visible_idx, num_tokens)
        x, intermediates = self.encoder(tokens, train)
        return x, dict(intermediates, encoded=x)

    def __call__(
        self,
        video: jax.Array,
        visible_idx: jax.Array,
        target_idx: jax.Array,
        train: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        batch = video.shape[0]
        chex.assert_rank([visible_idx, target_idx], 2)
        chex.assert_axis_dimension(visible_idx, 0, batch)
        chex.assert_axis_dimension(target_idx, 0, batch)
        num_tokens = (video.shape[1] // self.tubelet) * (video.shape[2] // self.patch) ** 2
        encoded, intermediates = self.encode(video, visible_idx, train)
        x = self.encoder_to_decoder(encoded)
        # The decoder's position table (width dec_width) is added after the projection, as in the reference.
        pos = jnp.asarray(vit.sinusoid_table(num_tokens, self.dec_width)).astype(x.dtype)
        visible = x + pos[visible_idx]
        masked = self.mask_token.astype(x.dtype) + pos[target_idx]
        x, _ = self.decoder(jnp.concatenate([visible, masked], axis=1), train)
        x = self.decoder_norm(x[:, -target_idx.shape[1] :])
        prediction = self.decoder_head(x).astype(jnp.float32)
        return prediction, intermediates


def make_pretrain_model(variant: str, **overrides: Any) -> VideoMAEPretrain:
    """A VideoMAEPretrain of a named size ('S', 'B', 'L', 'H', 'g', 'micro'; '/patch' optional)."""
    fields = {f.name for f in dataclasses.fields(VideoMAEPretrain)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown VideoMAEPretrain fields: {sorted(unknown)}')
    return VideoMAEPretrain(**{**decode_variant(variant), **overrides})


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _head_init(stddev: float, scale: float) -> nn.initializers.Initializer:
    """timm's trunc_normal_(std) scaled by `scale`. Its bounds (+-2) are absolute, so at std .02 the cut never bites."""

    def init(key, shape, dtype=jnp.float32):
        bound = 2.0 / stddev
        return scale * stddev * jax.random.truncated_normal(key, -bound, bound, shape, dtype)

    return init


class VideoMAEClassifier(nn.Module):
    """Fine-tuning model: the pretraining encoder on all tokens, mean pooling, `fc_norm`, dropout, linear `head`.

    Matches the reference VisionTransformer of models/modeling_finetune.py. The shared parts keep
    VideoMAEPretrain's parameter names (`patch_embed`, `pos_embed`, `encoder`) so pretrained encoders load
    unchanged. With `use_mean_pooling` the encoder has no final norm (the reference drops `encoder.norm` and
    normalises the pooled vector with `fc_norm`); without it the encoder's `norm` runs and token 0 is pooled,
    as in the reference. Output: logits (B, num_classes) in float32, plus intermediates with 'encoded'
    (B, N, width) and 'pooled' (B, width), and the encoder's own.
    """

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    num_classes: int
    patch: int = 16
    tubelet: int = 2
    channels: int = 3
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.0
    pos_embedding: str = 'sincos'
    drop_path_rate: float = 0.0
    head_dropout: float = 0.0
    init_scale: float = 0.001  # the reference's head init multiplier
    use_mean_pooling: bool = True
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    patch_embed_impl: str = 'matmul'

    def setup(self):
        self.patch_embed = vit.PatchEmbed(
            self.width, (self.tubelet, self.patch, self.patch), dtype=self.dtype, impl=self.patch_embed_impl
        )
        self.pos_embed = vit.PositionEmbedding(self.pos_embedding)
        self.encoder = vit.Transformer(
            self.width,
            self.depth,
            self.heads,
            self.mlp_hidden,
            layer_norm_eps=self.layer_norm_eps,
            layer_scale_init=self.layer_scale_init,
            drop_path_rate=self.drop_path_rate,
            final_norm=not self.use_mean_pooling,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )
        if self.use_mean_pooling:
            self.fc_norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype)
        self.dropout = nn.Dropout(self.head_dropout)
        self.head = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=_head_init(0.02, self.init_scale),
            bias_init=nn.initializers.zeros,  # the reference's 0, times init_scale
        )

    def __call__(self, video: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        chex.assert_rank(video, 5)
        x, intermediates = self.encoder(self.pos_embed(self.patch_embed(video)), train)
        if self.use_mean_pooling:
            # Average in float32: a bf16 sum over ~1.5k tokens loses the low bits the head sees.
            pooled = self.fc_norm(x.astype(jnp.float32).mean(axis=1))
        else:
            pooled = x[:, 0]
        logits = self.head(self.dropout(pooled, deterministic=not train)).astype(jnp.float32)
        return logits, dict(intermediates, encoded=x, pooled=pooled)


def make_classifier(variant: str, num_classes: int, **overrides: Any) -> VideoMAEClassifier:
    """A VideoMAEClassifier of a named size ('S', 'B', 'L', 'H', 'g', 'micro'; '/patch' optional)."""
    fields = {f.name for f in dataclasses.fields(VideoMAEClassifier)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f'unknown VideoMAEClassifier fields: {sorted(unknown)}')
    spec = {k: v for k, v in decode_variant(variant).items() if not k.startswith('dec_')}
    return VideoMAEClassifier(**{**spec, 'num_classes': num_classes, **overrides})
