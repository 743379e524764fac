"""POA's elastic student (Xu et al., ECCV 2024; alipay/POA poa/models/vision_transformer.py, poa/layers/
dynamic_ops.py; shared/reference/methods/simclr_vicreg_dino_poa_uni.md section 5) on the DINOv2 / UNI model.

A sub-network of the intact ViT (width D, depth L) is a pair (w, d): the first w channels of every token (w / head_dim
heads, MLP hidden mlp_hidden * w / D) and the blocks linspace(0, L - 1, d).astype(int). Every linear layer whose
input is narrowed multiplies its input by (full input width) / (active input width) (the reference's DynamicLinear),
LayerNorms normalise over the active channels, and the heads' first layer reads the first w channels of the cls
token. `POAModel.elastic` runs that sub-network on the intact parameters with static shapes: (w, d) are traced
values, inactive channels are zeroed and inactive blocks are skipped by a select, so one compiled step serves every
sub-network (at the intact network's cost). `extract` slices the parameters into a standalone, smaller `POAModel`
(linear kernels times D / w, biases not), whose outputs equal the elastic pass (tests/test_poa.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models import mae as mae_model
from jaxssl.models import uni as uni_model
from jaxssl.models import vit


def elastic_networks(
    width: int, depth: int, head_dim: int, min_width: int, min_depth: int, select_scale: float = 3.0
) -> list[tuple[int, int]]:
    """The reference's create_dynamic_networks: widths min_width..width in steps of head_dim, depths min_depth..depth;
    each (w, d) repeated round(ws * ds) times, ws and ds from linspace(select_scale, 1) over the widths and depths
    (small networks more often). The last entry is the intact network (once)."""
    widths = list(range(min_width, width + 1, head_dim))
    depths = list(range(min_depth, depth + 1))
    networks = []
    for w, ws in zip(widths, np.linspace(select_scale, 1, len(widths)), strict=True):
        for d, ds in zip(depths, np.linspace(select_scale, 1, len(depths)), strict=True):
            networks += [(w, d)] * int(np.round(ws * ds))
    return networks


def block_indices(depth: int, active: int) -> np.ndarray:
    """The blocks of a depth-`active` sub-network of a `depth`-block ViT: linspace(0, depth - 1, active) as int."""
    return np.linspace(0, depth - 1, active).astype(np.int64)


def block_masks(networks: Sequence[tuple[int, int]], depth: int) -> np.ndarray:
    """(len(networks), depth) bool: which blocks each network runs."""
    out = np.zeros((len(networks), depth), dtype=bool)
    for i, (_, d) in enumerate(networks):
        out[i, block_indices(depth, d)] = True
    return out


def _layer_norm(x: jax.Array, p: dict, mask: jax.Array, count: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the active channels (mask (D,), `count` of them); inactive channels stay 0."""
    x32 = x.astype(jnp.float32)
    mean = jnp.sum(x32 * mask, axis=-1, keepdims=True) / count
    var = jnp.sum(jnp.square((x32 - mean) * mask), axis=-1, keepdims=True) / count
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p['scale'] + p['bias']
    return (y * mask).astype(x.dtype)


def _linear(x: jax.Array, p: dict, scale: jax.Array, out_mask: jax.Array) -> jax.Array:
    """DynamicLinear on a zero-padded input: (x * full / active) @ kernel + bias, inactive outputs zeroed."""
    y = (x * scale.astype(x.dtype)) @ p['kernel'].astype(x.dtype)
    if 'bias' in p:
        y = y + p['bias'].astype(x.dtype)
    return y * out_mask.astype(x.dtype)


class POAModel(uni_model.UNIModel):
    """UNIModel (DINOv2's backbone, mask token, heads) with POA's elastic forward pass."""

    def elastic(
        self,
        groups: Sequence[jax.Array],
        width: jax.Array,
        blocks: jax.Array,
        train: bool = False,
        masks: jax.Array | None = None,
        patch_idx: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """As `__call__`, through the sub-network of `width` channels (a multiple of the head width) and the blocks
        where `blocks` (depth,) is True; cls tokens come back zero-padded to the full width."""
        if self.scan_layers:
            raise ValueError('the elastic pass reads unscanned block parameters (model.scan_layers=False)')
        chex.assert_shape(blocks, (self.depth,))
        params = self.variables['params']
        head_dim = self.width // self.heads
        width = jnp.asarray(width, jnp.float32)
        scale = self.width / width
        channels = (jnp.arange(self.width) < width).astype(jnp.float32)
        hidden = (jnp.arange(self.mlp_hidden) < width * (self.mlp_hidden / self.width)).astype(jnp.float32)
        head_on = jnp.arange(self.heads) < width / head_dim
        rates = np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32)
        no_scale = jnp.ones((), jnp.float32)

        def block(x: jax.Array, p: dict, rate: float) -> jax.Array:
            batch, tokens, _ = x.shape

            def residual(branch: jax.Array, name: str) -> jax.Array:
                if name in p:  # LayerScale
                    branch = branch * p[name].astype(branch.dtype)
                if train:
                    branch = vit.drop_path(branch, rate, self.make_rng('drop_path'))
                return branch

            y = _layer_norm(x, p['norm1'], channels, width, self.layer_norm_eps)
            qkv = (y * scale.astype(y.dtype)) @ p['attn']['qkv']['kernel'].astype(y.dtype)
            if 'q_bias' in p['attn']:
                bias = jnp.concatenate([p['attn']['q_bias'], jnp.zeros_like(p['attn']['q_bias']), p['attn']['v_bias']])
                qkv = qkv + bias.astype(qkv.dtype)
            qkv = qkv.reshape(batch, tokens, 3, self.heads, head_dim) * head_on[:, None].astype(qkv.dtype)
            out = vit.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention_impl)
            out = _linear(out.reshape(batch, tokens, self.width), p['attn']['proj'], scale, channels)
            x = x + residual(out, 'gamma_1')
            y = _layer_norm(x, p['norm2'], channels, width, self.layer_norm_eps)
            y = nn_gelu(_linear(y, p['mlp']['fc1'], scale, hidden))
            x = x + residual(_linear(y, p['mlp']['fc2'], scale, channels), 'gamma_2')
            return x

        def encode(images: jax.Array, image_masks: jax.Array | None) -> jax.Array:
            chex.assert_rank(images, 4)
            x = mae_model.patchify(images.astype(self.dtype), self.patch)
            proj = params['patch_embed']['proj']
            proj = {'kernel': proj['kernel'].reshape(-1, self.width), 'bias': proj['bias']}
            tokens = _linear(x, proj, no_scale, channels)  # pixels are never narrowed
            if image_masks is not None:
                token = params['mask_token'].astype(tokens.dtype) * channels
                tokens = jnp.where(image_masks[..., None], token, tokens)
            tokens = tokens + (self.position_table(images.shape[1]) * channels).astype(tokens.dtype)
            cls = jnp.broadcast_to(params['cls_token'].astype(tokens.dtype) * channels, (len(tokens), 1, self.width))
            x = jnp.concatenate([cls, tokens], axis=1)
            for i in range(self.depth):
                x = jnp.where(blocks[i], block(x, params['encoder'][f'block_{i:02d}'], float(rates[i])), x)
            return _layer_norm(x, params['encoder']['norm'], channels, width, self.layer_norm_eps)

        encoded = [encode(images, masks if i == 0 else None) for i, images in enumerate(groups)]
        h = jnp.concatenate([x[:, 0] for x in encoded], axis=0)
        # The heads' first layer is dynamic too: the first w inputs, scaled by D / w.
        logits = self.head(h * scale.astype(h.dtype))
        out = {'cls': h}
        if patch_idx is not None:
            patches = jnp.take_along_axis(encoded[0][:, 1:], patch_idx[..., None], axis=1)
            out['patch_logits'] = self.patch_head(patches * scale.astype(patches.dtype))
        return logits, out


def nn_gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU of vit.Mlp."""
    return jax.nn.gelu(x, approximate=False)


def extract(model: POAModel, params: Any, width: int, depth: int) -> tuple[POAModel, Any]:
    """A standalone (model, params) of the sub-network (width, depth) of `model`: the reference's
    tools/extract_elastic_net.py (kept blocks renumbered, q / k / v rows each sliced, linear kernels whose input is
    narrowed times D / w, biases as they are; position table the intact one's first w columns)."""
    full, head_dim = model.width, model.width // model.heads
    if width % head_dim or not 0 < width <= full or not 0 < depth <= model.depth:
        raise ValueError(f'no sub-network of width {width}, depth {depth} in a {full}-wide, {model.depth}-deep ViT')
    hidden = model.mlp_hidden * width // full
    s = full / width
    cut = lambda x: x[..., :width]

    def linear(p: dict, rows: int, cols: Any, scaled: bool = True) -> dict:
        out = {'kernel': p['kernel'][:rows][:, cols] * (s if scaled else 1.0)}
        if 'bias' in p:
            out['bias'] = p['bias'][cols]
        return out

    def block(p: dict) -> dict:
        qkv_cols = np.concatenate([np.arange(i * full, i * full + width) for i in range(3)])
        attn = {
            'qkv': {'kernel': p['attn']['qkv']['kernel'][:width][:, qkv_cols] * s},
            'proj': linear(p['attn']['proj'], width, slice(0, width)),
        }
        attn.update({k: cut(p['attn'][k]) for k in ('q_bias', 'v_bias') if k in p['attn']})
        out = {
            'norm1': jax.tree.map(cut, p['norm1']),
            'norm2': jax.tree.map(cut, p['norm2']),
            'attn': attn,
            'mlp': {
                'fc1': linear(p['mlp']['fc1'], width, slice(0, hidden)),
                'fc2': linear(p['mlp']['fc2'], hidden, slice(0, width)),
            },
        }
        out.update({k: cut(p[k]) for k in ('gamma_1', 'gamma_2') if k in p})
        return out

    def head(p: dict) -> dict:
        return dict(p, dense_0=dict(p['dense_0'], kernel=p['dense_0']['kernel'][:width] * s))

    encoder = {f'block_{k:02d}': block(params['encoder'][f'block_{i:02d}'])
               for k, i in enumerate(block_indices(model.depth, depth))}  # fmt: skip
    encoder['norm'] = jax.tree.map(cut, params['encoder']['norm'])
    proj = params['patch_embed']['proj']
    sub = {
        'patch_embed': {'proj': {'kernel': cut(proj['kernel']), 'bias': cut(proj['bias'])}},
        'cls_token': cut(params['cls_token']),
        'mask_token': cut(params['mask_token']),
        'encoder': encoder,
        'head': head(params['head']),
    }
    if 'ibot_head' in params:
        sub['ibot_head'] = head(params['ibot_head'])
    small = model.clone(
        parent=None, width=width, depth=depth, heads=width // head_dim, mlp_hidden=hidden, position_width=full
    )
    return small, sub


def make_model(variant: str, **overrides: Any) -> POAModel:
    """A POAModel with the encoder of a named ViT size ('micro', 'tiny', 'B', 'L', ...; '/patch' optional)."""
    spec = mae_model.decode_variant(variant)
    fields = {k: spec[k] for k in ('width', 'depth', 'heads', 'mlp_hidden', 'patch')}
    return POAModel(**fields, **overrides)
