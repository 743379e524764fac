"""CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021;
openai/CLIP model.py, trained as open_clip does): a ViT image tower and a causal text transformer, each ending in a
bias-free projection into one joint embedding space, and a learned logit scale.

Both towers use the same residual block (openai's ResidualAttentionBlock): x += attn(ln_1 x); x += mlp(ln_2 x), with
full q / k / v / out biases, LayerNorm eps 1e-5 and QuickGELU (x * sigmoid(1.702 x)) in the 4x MLP, which the OpenAI
weights need. The image tower: patch projection without bias, class token and learned positions, `ln_pre`, the
blocks, `ln_post` on the class token, then the projection. The text tower: token + learned positions, the blocks
under a causal mask, `ln_final`, the hidden state at the first end-of-text token, then the projection (OpenAI's
argmax over token ids finds the same token because EOT has the largest id; an explicit id works with any vocabulary).

Parameter names follow transformers' CLIPModel (q_proj, out_proj, fc1, layer_norm1, ...), so released weights load
by name (jaxssl.models.clip_weights). Inits follow openai's initialize_parameters for the text tower and the
projections; the image tower's blocks keep torch's defaults, as in openai's code (only the text blocks are re-drawn).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import vit

# name -> (embed_dim, image (width, depth, patch), text (width, depth, heads)); image heads = width / 64 (open_clip's
# head_width, 64 for these). B/32, B/16 and L/14 are the paper's ViTs; 'tiny' and 'micro' are for CPU runs at 32 px.
VARIANTS: dict[str, tuple[int, tuple[int, int, int], tuple[int, int, int]]] = {
    'B/32': (512, (768, 12, 32), (512, 12, 8)),
    'B/16': (512, (768, 12, 16), (512, 12, 8)),
    'L/14': (768, (1024, 24, 14), (768, 12, 12)),
    'tiny': (64, (128, 4, 4), (128, 4, 2)),
    'micro': (32, (64, 2, 4), (64, 2, 2)),
}
ACTIVATIONS = ('quick_gelu', 'gelu')
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # exp(.) = 1 / 0.07, the paper's initial temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # the paper clips the logit scale at 100 (optim.clamp in the config)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def uniform_init(bound: float) -> nn.initializers.Initializer:
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Block(nn.Module):
    """openai's ResidualAttentionBlock. `causal` masks attention to earlier tokens (the text tower).

    `init_std` (attn, out, fc): openai's text-tower stds for the q / k / v, output-projection (also MLP output) and
    MLP input kernels; None keeps torch's defaults (nn.MultiheadAttention's xavier_uniform over the fused (3w, w) qkv
    matrix, nn.Linear's uniform(+-1 / sqrt(fan_in)) elsewhere, zero attention biases) as the image tower has.
    """

    width: int
    heads: int
    causal: bool = False
    activation: str = 'quick_gelu'
    init_std: tuple[float, float, float] | None = None
    eps: float = 1e-5
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, w = x.shape
        hidden = 4 * w
        if self.init_std is None:
            qkv_init = uniform_init(math.sqrt(6 / (w + 3 * w)))
            out_init, fc1_init, fc2_init = vit.conv_init, vit.conv_init, vit.conv_init
        else:
            attn_std, proj_std, fc_std = self.init_std
            qkv_init, out_init = nn.initializers.normal(attn_std), nn.initializers.normal(proj_std)
            fc1_init, fc2_init = nn.initializers.normal(fc_std), nn.initializers.normal(proj_std)
        attn_bias, fc1_bias, fc2_bias = nn.initializers.zeros, vit.torch_bias_init(w), vit.torch_bias_init(hidden)
        dense = lambda features, name, kernel_init, bias_init: nn.Dense(
            features, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init, name=name
        )
        norm = lambda name: nn.LayerNorm(self.eps, dtype=self.dtype, name=name)

        y = norm('layer_norm1')(x)
        q, k, v = (
            dense(w, f'{name}_proj', qkv_init, attn_bias)(y).reshape(b, n, self.heads, w // self.heads)
            for name in 'qkv'
        )
        y = vit.dot_product_attention(q, k, v, self.attention_impl, is_causal=self.causal).reshape(b, n, w)
        x = x + dense(w, 'out_proj', out_init, attn_bias)(y)

        y = dense(hidden, 'fc1', fc1_init, fc1_bias)(norm('layer_norm2')(x))
        y = quick_gelu(y) if self.activation == 'quick_gelu' else nn.gelu(y, approximate=False)
        return x + dense(w, 'fc2', fc2_init, fc2_bias)(y)


class ImageTower(nn.Module):
    """Images (B, H, W, 3) -> (class token after post_layernorm (B, width), all tokens before it (B, 1 + N, width))."""

    width: int
    depth: int
    patch: int
    heads: int = 0  # 0: width / 64
    activation: str = 'quick_gelu'
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(images, 4)
        p = self.patch
        patches = einops.rearrange(images, 'b (h p) (w q) c -> b (h w) (p q c)', p=p, q=p)
        # The conv1 of openai's VisionTransformer (stride = kernel = patch, no bias), as one matrix product.
        x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, kernel_init=vit.conv_init, name='patch_embedding')(
            patches
        )
        scale = self.width**-0.5
        cls = self.param('class_embedding', nn.initializers.normal(scale), (self.width,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width)), x], axis=1)
        positions = self.param('position_embedding', nn.initializers.normal(scale), (x.shape[1], self.width))
        x = x + positions.astype(x.dtype)
        x = nn.LayerNorm(1e-5, dtype=self.dtype, name='pre_layrnorm')(x)  # transformers' spelling
        heads = self.heads or max(self.width // 64, 1)
        for i in range(self.depth):
            block = Block(self.width, heads, False, self.activation, None, dtype=self.dtype,
                          attention_impl=self.attention_impl, name=f'layers_{i}')  # fmt: skip
            x = block(x)
            # Every block's output, for methods that read the hidden states (GOPro): apply with
            # mutable=['intermediates'] to collect them; plain calls drop them.
            self.sow('intermediates', 'hidden_states', x)
        pooled = nn.LayerNorm(1e-5, dtype=self.dtype, name='post_layernorm')(x[:, 0])
        return pooled, x


class TextTower(nn.Module):
    """Token ids (B, L) -> (hidden state at the first `eot_id` after ln_final (B, width), all tokens (B, L, width)).

    A row without `eot_id` pools its last token (truncation always leaves an EOT, see jaxssl.data.captions).
    `token_embeddings` (B, L, width) replaces the token-embedding lookup (learned prompts, as CoOp's text encoder);
    `tokens` still places the end of text."""

    vocab_size: int
    context_length: int
    width: int
    depth: int
    heads: int
    eot_id: int
    activation: str = 'quick_gelu'
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, token_embeddings: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(tokens, 2)
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f'{length} tokens exceed the context length {self.context_length}')
        embed = nn.Embed(
            self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name='token_embedding'
        )
        positions = self.param('position_embedding', nn.initializers.normal(0.01), (self.context_length, self.width))
        if token_embeddings is None:
            token_embeddings = embed(tokens)
        chex.assert_shape(token_embeddings, (*tokens.shape, self.width))
        x = (token_embeddings + positions[:length]).astype(self.dtype)
        attn_std = self.width**-0.5
        init_std = (attn_std, attn_std * (2 * self.depth) ** -0.5, (2 * self.width) ** -0.5)
        for i in range(self.depth):
            block = Block(self.width, self.heads, True, self.activation, init_std, dtype=self.dtype,
                          attention_impl=self.attention_impl, name=f'layers_{i}')  # fmt: skip
            x = block(x)
        x = nn.LayerNorm(1e-5, dtype=self.dtype, name='final_layer_norm')(x)
        is_eot = tokens == self.eot_id
        eot = jnp.where(is_eot.any(axis=1), jnp.argmax(is_eot, axis=1), length - 1)
        return x[jnp.arange(x.shape[0]), eot], x


class CLIP(nn.Module):
    """The two towers, their projections and the logit scale. `__call__` returns (image embeddings (B, D), text
    embeddings (B, D), logit scale ()): unnormalised embeddings, as openai's encode_image / encode_text."""

    embed_dim: int
    image_width: int
    image_depth: int
    patch: int
    vocab_size: int
    context_length: int
    text_width: int
    text_depth: int
    text_heads: int
    eot_id: int
    image_heads: int = 0  # 0: image_width / 64
    activation: str = 'quick_gelu'
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        self.vision_model = ImageTower(
            self.image_width,
            self.image_depth,
            self.patch,
            self.image_heads,
            self.activation,
            self.dtype,
            self.attention_impl,
        )
        self.text_model = TextTower(
            self.vocab_size,
            self.context_length,
            self.text_width,
            self.text_depth,
            self.text_heads,
            self.eot_id,
            self.activation,
            self.dtype,
            self.attention_impl,
        )
        dense = lambda width, name: nn.Dense(
            self.embed_dim, use_bias=False, kernel_init=nn.initializers.normal(width**-0.5), name=name
        )
        self.visual_projection = dense(self.image_width, 'visual_projection')
        self.text_projection = dense(self.text_width, 'text_projection')
        self.logit_scale = self.param('logit_scale', nn.initializers.constant(LOGIT_SCALE_INIT), ())

    def encode_image(self, images: jax.Array) -> jax.Array:
        pooled, _ = self.vision_model(images)
        return self.visual_projection(pooled.astype(jnp.float32))

    def encode_text(self, tokens: jax.Array, token_embeddings: jax.Array | None = None) -> jax.Array:
        pooled, _ = self.text_model(tokens, token_embeddings)
        return self.text_projection(pooled.astype(jnp.float32))

    def image_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(pooled class token before the projection (B, width), projected embedding (B, D)) for probes."""
        pooled, _ = self.vision_model(images)
        pooled = pooled.astype(jnp.float32)
        return pooled, self.visual_projection(pooled)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale


def decode_variant(variant: str) -> dict[str, int]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown CLIP variant '{variant}'; valid: {', '.join(VARIANTS)}")
    embed, (image_width, image_depth, patch), (text_width, text_depth, text_heads) = VARIANTS[variant]
    return dict(
        embed_dim=embed,
        image_width=image_width,
        image_depth=image_depth,
        patch=patch,
        text_width=text_width,
        text_depth=text_depth,
        text_heads=text_heads,
    )


def make_model(variant: str, vocab_size: int, context_length: int, eot_id: int, **kwargs: Any) -> CLIP:
    return CLIP(
        **decode_variant(variant), vocab_size=vocab_size, context_length=context_length, eot_id=eot_id, **kwargs
    )
