"""I2P-MAE (Zhang et al., CVPR 2023) pretraining: a hierarchical point-cloud MAE guided by a frozen 2-D model.

The objective is the reference's `I2P_MAE.forward` (ZrrSkywalker/I2P-MAE models/I2P_MAE.py, cfgs/pre-training/
i2p-mae.yaml), step by step:
1. Three scales of groups (jaxssl.models.i2p_mae.hierarchy): 512 x 16 of the 2,048 points, 256 x 8 and 64 x 8 of
   the finer centres.
2. The cloud seen along its three axes as 224 x 224 depth-like images (jaxssl.models.point_views.project), and a
   frozen CLIP ViT-B/16 on them: 14 x 14 projected patch features and the class token's attention to the patches.
3. 2-D-guided masking: each of the 64 coarse centres' saliency is the attention map, bicubically upsampled, read at
   the centre's pixel and averaged over the views; an order of the 64 is drawn by multinomial(softmax(saliency))
   without replacement (Gumbel top-k here, the same distribution) and the first 64 - int(0.8 x 64) = 13 stay
   visible, so salient centres tend to be kept. (The saliencies are attention probabilities, ~1 / 196 each, so the
   softmax is near uniform and the masks nearly random, as in the reference.) Finer tokens are visible iff a visible
   coarser token lists them (`mask.type` 'guided'; 'rand' draws the coarse mask uniformly, the reference's
   rand_mask).
4. The hierarchical encoder and decoder (jaxssl.models.i2p_mae) up to the 256 level-1 tokens.
5. loss = Chamfer-L2 of the masked level-1 tokens' 8 neighbours (level-0 centres relative to the token's centre),
     pooled over all their points
   + `loss.weight_2d` (1) x MSE of the visible level-1 tokens' predicted teacher features at those 8 points in the
     3 views (the 512-d CLIP features of the upsampled maps at each point's pixel), averaged over all elements.
The mini-PointNets' and the propagation's BatchNorm statistics over the global batch live in the extra state
('batch_stats') next to the frozen teacher ('clip'); the reference's are per GPU.

Teachers (`teacher.kind`): 'clip', the paper's: a CLIP in `teacher.path` (a transformers CLIPModel folder such as
openai/clip-vit-base-patch16, or a jaxssl CLIP training workdir) at `teacher.image_size`; 'random_clip': a randomly
initialised, frozen CLIP of `teacher.variant`, a stand-in for CPU tests and runlocal (no weights ship offline).

Batch layout: 'points' (B, num_points, 3) float32 (jaxssl.data.points), 'label' (unused here).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import points as point_data
from jaxssl.methods import _points, base
from jaxssl.methods import clip as clip_method
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import clip as clip_model
from jaxssl.models import i2p_mae, point_mae, point_views, vit

MASK_TYPES = ('guided', 'rand')
TEACHERS = ('clip', 'random_clip')


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the scales, masks, model or teacher cannot use."""
    m, t = config.model, config.teacher
    check_choice(config, 'model.variant', i2p_mae.VARIANTS)
    check_range(config, 'model.drop_path_rate', 0.0, 1.0)
    point_data.check_points_input_config(config)
    levels = len(i2p_mae.VARIANTS[m.variant]['dims'])
    groups, sizes = tuple(m.num_groups), tuple(m.group_sizes)
    if len(groups) != levels or len(sizes) != levels:
        raise ConfigError(
            f"'model.num_groups' and 'model.group_sizes' need {levels} entries (one per scale of the "
            f"'{m.variant}' variant); got {groups} and {sizes}"
        )
    sources = (config.input.num_points, *groups[:-1])  # what each scale groups: the points, then the finer centres
    for lv, (g, k, n) in enumerate(zip(groups, sizes, sources, strict=True)):
        if not 1 <= k <= n or not 1 <= g <= n:
            raise ConfigError(
                f"'model.num_groups' {groups} / 'model.group_sizes' {sizes}: scale {lv} groups {n} "
                f'{"points" if lv == 0 else "centres"} into {g} groups of {k}; each must be between 1 and {n}'
            )
    check_choice(config, 'mask.type', MASK_TYPES)
    check_range(config, 'mask.ratio', 0.0, 1.0)
    masked = int(config.mask.ratio * groups[-1])
    if not 1 <= masked < groups[-1]:
        raise ConfigError(
            f"'mask.ratio' {config.mask.ratio} masks {masked} of the {groups[-1]} coarsest groups: need at least "
            'one masked and one visible'
        )
    check_choice(config, 'teacher.kind', TEACHERS)
    check_choice(config, 'teacher.dtype', DTYPES)
    if t.kind == 'random_clip':
        check_choice(config, 'teacher.variant', clip_model.VARIANTS)
    if not isinstance(t.image_size, int) or t.image_size < 16:
        raise ConfigError(f"bad value {t.image_size!r} for 'teacher.image_size': an integer >= 16 (pixels)")
    if config.loss.weight_2d < 0:
        raise ConfigError(f"bad value {config.loss.weight_2d} for 'loss.weight_2d': must be >= 0")


def guided_visible(rng: jax.Array, saliency: jax.Array, num_visible: int) -> jax.Array:
    """(B, G) bool: the first `num_visible` of an order drawn as torch.multinomial(softmax(saliency), G, replacement
    False), by Gumbel top-k (argsort of saliency + Gumbel noise: the same distribution over orders)."""
    keys = saliency + jax.random.gumbel(rng, saliency.shape)
    order = jnp.argsort(-keys, axis=1)
    return jnp.zeros(saliency.shape, bool).at[jnp.arange(saliency.shape[0])[:, None], order[:, :num_visible]].set(True)


def random_visible(rng: jax.Array, batch: int, groups: int, num_visible: int) -> jax.Array:
    """(B, G) bool: `num_visible` groups per cloud drawn uniformly (the reference's rand_mask)."""
    return jnp.argsort(jax.random.uniform(rng, (batch, groups)), axis=1) < num_visible


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class Method(_points.PointMethod):
    """I2P-MAE pretraining for the trainer; extra state {'batch_stats', 'clip': the frozen teacher's image tower}."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m, t = config.model, config.teacher
        if t.kind == 'clip' and not t.path:
            raise ConfigError(
                "'teacher.path' is empty: I2P-MAE's teacher is a CLIP (a transformers CLIPModel folder such as "
                "openai/clip-vit-base-patch16, or a jaxssl CLIP workdir); 'teacher.kind=random_clip' runs on a "
                'random one (tests)'
            )
        own = ml_collections.ConfigDict({
            'model': {'pretrained': '', 'variant': t.variant, 'activation': 'quick_gelu', 'dtype': t.dtype,
                      'attention_impl': ''},
            'text': {'tokenizer': '', 'context_length': 8},
            'input': {'image_size': t.image_size},
        })  # fmt: skip
        path = t.path if t.kind == 'clip' else ''
        clip, _, self._context_length, self._load_clip = clip_method.frozen_clip(
            path, 'teacher.path', own, 'teacher.image_size', text=False
        )
        if self._load_clip is None:
            logging.warning('teacher.kind is random_clip: I2P-MAE is guided by a random, frozen CLIP (tests only)')
        if t.image_size % clip.patch:
            raise ConfigError(f"bad value {t.image_size} for 'teacher.image_size': not a multiple of {clip.patch}")
        self.clip = clip
        self.tower = clip_model.ImageTower(
            clip.image_width, clip.image_depth, clip.patch, clip.image_heads, clip.activation, clip.dtype,
            clip.attention_impl,
        )  # fmt: skip
        if self.tower.depth < 2:
            raise ConfigError(f"'teacher.path' {t.path}: the CLIP's image tower needs >= 2 blocks (saliency)")
        self.model = i2p_mae.make_model(
            m.variant, num_groups=tuple(m.num_groups), group_sizes=tuple(m.group_sizes),
            drop_path_rate=m.drop_path_rate, feature_dim=clip.embed_dim, views=len(point_views.VIEWS),
        )  # fmt: skip
        self.num_visible = m.num_groups[-1] - int(config.mask.ratio * m.num_groups[-1])
        self.bounds = i2p_mae.visible_bounds(self.num_visible, self.model.num_groups, self.model.group_sizes)

    # --- the teacher --------------------------------------------------------------------------------------------
    def _teacher_params(self, rng: jax.Array) -> Any:
        """The image tower and projection of the CLIP: loaded on the host (a callback, so jit does not embed the
        weights in the program) or drawn at random."""
        size = self.config.teacher.image_size
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        tokens = jnp.zeros((1, self._context_length), jnp.int32)
        full = lambda: self.clip.init(rng, images, tokens)['params']
        keep = lambda p: {'vision_model': p['vision_model'], 'visual_projection': p['visual_projection']}
        if self._load_clip is None:
            return keep(full())
        shapes = jax.eval_shape(full)
        return jax.pure_callback(lambda: keep(self._load_clip(shapes)), keep(shapes))

    def teacher_views(self, clip: Any, points: jax.Array) -> tuple[list[point_views.Frame], jax.Array, jax.Array]:
        """(per view its frame, features (V, B, h, w, D), saliency (V, B, h, w)) of the frozen teacher."""
        size = self.config.teacher.image_size
        projected = [point_views.project(point_views.view(points, v), size) for v in range(len(point_views.VIEWS))]
        images = jnp.concatenate([image for image, _ in projected])
        features, saliency = point_views.clip_maps(self.tower, clip, images)
        views = len(projected)
        split = lambda x: jax.lax.stop_gradient(x.reshape(views, -1, *x.shape[1:]))
        return [frame for _, frame in projected], split(features), split(saliency)

    def view_samples(self, points: jax.Array, frames: list[point_views.Frame], maps: jax.Array) -> jax.Array:
        """(V, B, N, C): each view's maps (V, B, h, w, C) at the points (B, N, 3)."""
        size = self.config.teacher.image_size
        return jnp.stack([
            point_views.sample_at(point_views.view(points, v), frame, maps[v], size) for v, frame in enumerate(frames)
        ])  # fmt: skip

    # --- training -----------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        model_rng, teacher_rng = jax.random.split(rng)
        variables = i2p_mae.init_variables(self.model, model_rng, batch['points'], self.num_visible)
        return variables['params'], {'batch_stats': variables['batch_stats'], 'clip': self._teacher_params(teacher_rng)}

    def loss(self, params, extra, batch, rng, step):
        points = batch['points']
        m = self.model
        levels = i2p_mae.hierarchy(points, m.num_groups, m.group_sizes)
        frames, features, saliency = self.teacher_views(extra['clip'], points)
        b, top_groups = levels[-1].centres.shape[:2]
        if self.config.mask.type == 'guided':
            centre_saliency = self.view_samples(levels[-1].centres, frames, saliency[..., None])[..., 0].mean(0)
            top = guided_visible(base.stream(rng, 'mask'), centre_saliency, self.num_visible)
        else:
            top = random_visible(base.stream(rng, 'mask'), b, top_groups, self.num_visible)
        visible = i2p_mae.propagate_visible(top, levels)
        (predicted_3d, predicted_2d, index, valid), updated = m.apply(
            {'params': params, 'batch_stats': extra['batch_stats']}, levels, visible, self.bounds, train=True,
            rngs={'drop_path': base.stream(rng, 'drop_path')}, mutable=['batch_stats'],
        )  # fmt: skip
        level = levels[-2]
        k = m.group_sizes[1]
        chamfer = point_mae.chamfer_l2_per_set(predicted_3d.reshape(-1, k, 3), level.neighbourhoods.reshape(-1, k, 3))
        loss_3d = masked_mean(chamfer, ~visible[-2].reshape(-1))
        targets = self.view_samples(vit.take_tokens(level.absolute, index).reshape(b, -1, 3), frames, features)
        targets = jnp.concatenate(list(targets), axis=-1).reshape(predicted_2d.shape)  # views side by side
        squared = jnp.mean((predicted_2d - targets) ** 2, axis=(2, 3))
        loss_2d = masked_mean(squared, valid)
        loss = loss_3d + self.config.loss.weight_2d * loss_2d
        extra = {'batch_stats': jax.lax.stop_gradient(updated['batch_stats']), 'clip': extra['clip']}
        metrics = {
            'loss': loss, 'chamfer_l2': loss_3d, 'feature_mse': loss_2d,
            'visible_level1': jnp.mean(jnp.sum(visible[-2], axis=1).astype(jnp.float32)),
        }  # fmt: skip
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """The coarsest tokens, nothing masked: max-pooled ('max', the reference's linear-SVM feature) and max- and
        mean-pooled, concatenated ('pooled')."""
        tokens = self.model.apply(
            {'params': params, 'batch_stats': extra['batch_stats']}, batch['points'], method=self.model.encode
        )
        top = jnp.max(tokens, axis=1)
        return {'max': top, 'pooled': jnp.concatenate([top, jnp.mean(tokens, axis=1)], axis=-1)}

    def tokens_per_example(self) -> int:
        return sum(self.bounds)

    def flops_per_example(self) -> float:
        """Forward + backward (3x) of the encoder at its visible-token bounds, the decoder and heads (token
        embeddings, BatchNorms and the propagation's small convs left out), plus the frozen teacher's forward on
        the 3 views."""
        m = self.model
        block = lambda n, width: 2 * n * 12 * width * width + 4 * n * n * width
        encoder = sum(d * block(n, w) for d, n, w in zip(m.depths, self.bounds, m.dims, strict=True))
        top, fine = m.num_groups[-1], m.num_groups[-2]
        k, views = m.group_sizes[1], len(point_views.VIEWS)
        decoder = block(top, m.dims[-1]) + block(fine, m.dims[-2])
        heads = 2 * fine * m.dims[-2] * 3 * k + 2 * self.bounds[-2] * m.dims[-2] * m.feature_dim * k * views
        tower = self.tower
        patches = (self.config.teacher.image_size // tower.patch) ** 2 + 1
        teacher = views * tower.depth * block(patches, tower.width)
        return 3.0 * (encoder + decoder + heads) + teacher
