"""Global and local contrastive pretraining for medical image segmentation with limited annotations (Chaitanya,
Erdil, Karani, Konukoglu, NeurIPS 2020): a 2-D UNet pretrained on unlabelled volumes in two stages, then
fine-tuned on a few labelled ones.

Reference: krishnabits001/domain_specific_cl@e5aae80 (models.py, train_model/pretr_encoder_global_contrastive_loss
.py, pretr_decoder_local_contrastive_loss.py, ft_pretr_encoder_decoder_net_local_loss.py, utils.py, losses.py),
shared/reference/methods/text_eeg_misc_mcl_e2s2_speecht5_eegformer_medical_cmim_fst.md section 6.

Stage `global` trains the encoder and g1 (jaxssl.models.unet). Each volume is split into S depth partitions and
one slice is drawn from each; every term of the loss is, for an ordered positive pair (a, b) with s = cos / tau,
    l(a, b) = -log( e^s(a,b) / (e^s(a,b) + sum_{n in N(a)} e^s(a,n)) ),
summed and divided by the number of images in the batch. The variants (`loss.variant`):
- gd (G^D, the paper's proposal): each slice raw and once augmented. Positives: a slice and its augmentation, and
  the same partition of the next volume in the batch (cyclically, raw with raw and augmented with augmented: the
  reference's ring of volumes); N(a): every image of another partition.
- gd_minus (G^{D-}): raw and two augmentations per slice, positives among them only; N(a) as in gd.
- gr (G^R, SimCLR): two augmentations of a slice drawn uniformly from a volume; N(a): every other image.
Stage `local` freezes that encoder (`pretrained`: the global run) and trains the first `loss.decoder_blocks`
decoder blocks and g2. Two intensity-only views of each slice; at each of 13 fixed 3 x 3 regions of the decoder's
map, the positive is the same region in the other view and the negatives are 5 listed neighbouring regions in both
views of the same slice (L^R); the loss is the mean over anchors and regions.
Augmentations: the global stage's crop (a 100/192 window, resized back) then brightness U(-0.3, 0.3), contrast
U(0.7, 1.3) about the mean, clipped to [0, 1.5]; the local stage's intensity only. Adam 1e-3 throughout.

Evaluation (the paper's measure): UNets fine-tuned on `eval.labelled_volumes` labelled volumes, from the
pretrained weights (the encoder, and the local stage's decoder blocks) and from a random init side by side (Dice
loss with the background, the reference's augmentations), then the mean foreground Dice per test volume.

Where jaxssl differs, each deliberate:
- G^D's batch holds real volumes only. The reference's batch builder fills only two of its three 16-image blocks
  (stitch_batch_global_loss_gd stops early) and leaves 16 zero images in the batch, which its loss then treats
  as two more volumes of the ring. Its loop's terms are kept as they are, the doubled raw-augmented pairs too.
- Brightness and contrast are drawn per image. The reference draws one (brightness, contrast) per sub-batch.
- The local stage's examples are single slices drawn from a shuffled pass over the volumes (one random slice per
  volume per visit); the reference draws slices uniformly from all slices of all volumes.
- The evaluation reports the fine-tuned network at its last step, not at its best validation step, with its
  BatchNorm averages recomputed on its labelled slices (`_recalibrate`): after a short fine-tuning the decay-0.99
  averages still remember their initial values (0.99^300 = 5%), which costs the pretrained and the random
  networks different amounts; the reference's 10,001 steps forget them.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxssl import data
from jaxssl.config import ConfigError, check_choice
from jaxssl.data import slices
from jaxssl.methods import _segmentation as segmentation
from jaxssl.methods import base
from jaxssl.models.unet import GlobalHead, LocalHead, UNetDecoder, UNetEncoder

log = logging.getLogger(__name__)

STAGES = ('global', 'local')
VARIANTS = ('gd', 'gd_minus', 'gr')
VIEWS = {'gd': 2, 'gd_minus': 3, 'gr': 2}

# The 13 anchor regions and each one's 5 negative regions (models.py, 3 x 3 regions), as corners in quarters of
# the last valid corner im = map size - 4: 0, im/4, im/2, 3 im/4, im (0, 11, 22, 33, 44 on the reference's 48 x
# 48 map). The lists are the reference's, hand-written and not symmetric.
ANCHORS = ((0, 0), (0, 2), (0, 4), (2, 0), (2, 2), (2, 4), (4, 0), (4, 2), (4, 4), (1, 1), (1, 3), (3, 1), (3, 3))
NEGATIVES = (
    ((0, 2), (1, 1), (1, 2), (2, 0), (2, 1)),
    ((0, 0), (0, 4), (1, 1), (1, 3), (2, 2)),
    ((0, 2), (1, 2), (1, 3), (2, 3), (2, 4)),
    ((0, 0), (1, 1), (2, 2), (4, 0), (3, 1)),
    ((1, 1), (1, 3), (3, 1), (3, 3), (2, 0)),
    ((0, 4), (2, 2), (4, 4), (1, 3), (3, 3)),
    ((2, 0), (2, 1), (4, 2), (3, 1), (3, 2)),
    ((2, 2), (4, 0), (4, 4), (3, 1), (3, 3)),
    ((2, 3), (2, 4), (4, 2), (3, 3), (3, 2)),
    ((0, 0), (0, 2), (2, 0), (2, 2), (1, 3)),
    ((0, 2), (0, 4), (1, 1), (2, 2), (2, 4)),
    ((2, 0), (2, 2), (4, 0), (4, 2), (3, 3)),
    ((2, 2), (2, 4), (4, 2), (4, 4), (3, 1)),
)
# Every region the loss embeds: the anchors first, then the 4 that only appear as negatives.
REGIONS = ANCHORS + tuple(sorted({q for row in NEGATIVES for q in row} - set(ANCHORS)))


def check_config(config: ml_collections.ConfigDict) -> None:
    check_choice(config, 'stage', STAGES)
    check_choice(config, 'loss.variant', VARIANTS)
    check_choice(config, 'input.dataset', ('cardiac_phantoms', 'folder'))
    channels = tuple(config.model.channels)
    if len(channels) < 2 or any(not isinstance(w, int) or w < 1 for w in channels):
        raise ConfigError(f"bad value {channels} for 'model.channels': two or more positive widths, one per level")
    size = config.input.image_size
    if size % 2 ** (len(channels) - 1):
        raise ConfigError(
            f"'input.image_size' {size} must be divisible by 2^{len(channels) - 1} (one 2x2 pooling between the "
            "levels of 'model.channels')"
        )
    blocks = config.loss.decoder_blocks
    if not 1 <= blocks <= len(channels) - 1:
        raise ConfigError(f"bad value {blocks} for 'loss.decoder_blocks': must be in [1, {len(channels) - 1}]")
    if local_map_size(config) < 8:
        raise ConfigError(
            f"'loss.decoder_blocks' {blocks}: its map is {local_map_size(config)} px, too small for the 3x3 regions "
            '(8 or more)'
        )
    if config.loss.partitions < 2 and config.loss.variant != 'gr':
        raise ConfigError(f"bad value {config.loss.partitions} for 'loss.partitions': {config.loss.variant} needs >= 2")
    if config.stage == 'global' and config.loss.variant == 'gd' and config.input.global_batch < 2:
        raise ConfigError(f"'input.global_batch' {config.input.global_batch}: gd needs 2 or more volumes")
    if config.stage == 'local' and not config.pretrained:
        raise ConfigError("'pretrained' is empty: the local stage needs the global stage's workdir")
    if config.model.classes < 2:
        raise ConfigError(f"bad value {config.model.classes} for 'model.classes': must be >= 2")
    for key in ('labelled_volumes', 'finetune_steps', 'finetune_batch'):
        if config.eval[key] < 1:
            raise ConfigError(f"bad value {config.eval[key]} for 'eval.{key}': must be >= 1")


def local_map_size(config: ml_collections.ConfigDict) -> int:
    """The side of the map after `loss.decoder_blocks` decoder blocks."""
    levels = len(config.model.channels)
    return config.input.image_size // 2 ** (levels - 1 - config.loss.decoder_blocks)


def region_corners(map_size: int) -> np.ndarray:
    """(len(REGIONS), 2) top-left corners of the 3 x 3 regions on a (map_size, map_size) map."""
    im = map_size - 4
    steps = np.array([0, im // 4, im // 2, (3 * im) // 4, im])
    return np.array([(steps[r], steps[c]) for r, c in REGIONS])


def global_pairs(volumes: int, variant: str, partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(positive pair weights W (N, N), negative mask (N, N)) over the flattened batch of N = volumes x views x
    partitions images, index ((volume x views) + view) x partitions + partition. W[a, b] counts the terms of the
    ordered positive pair (a, b); negatives[a, n] marks N(a)."""
    views = VIEWS[variant]
    index = lambda v, view, p: (v * views + view) * partitions + p
    n = volumes * views * partitions
    weights = np.zeros((n, n), np.float32)
    if variant == 'gd':
        # models.py's loop over anchors: volume k and the next one in the batch (cyclically), same partition p:
        # (raw k, aug k), (raw k, raw k+1), (aug k, aug k+1), (raw k+1, aug k+1), both directions; so each
        # slice-augmentation pair is counted twice, once from each of its ring neighbours' terms.
        for k, p in itertools.product(range(volumes), range(partitions)):
            raw, aug = index(k, 0, p), index(k, 1, p)
            raw_next, aug_next = index((k + 1) % volumes, 0, p), index((k + 1) % volumes, 1, p)
            for a, b in ((raw, aug), (raw, raw_next), (aug, aug_next), (raw_next, aug_next)):
                weights[a, b] += 1
                weights[b, a] += 1
    else:  # the views of a slice with each other
        for k, p in itertools.product(range(volumes), range(partitions)):
            for i, j in itertools.permutations(range(views), 2):
                weights[index(k, i, p), index(k, j, p)] = 1
    part = np.arange(n) % partitions
    if variant == 'gr':
        negatives = ~np.eye(n, dtype=bool) & (weights == 0)
    else:
        negatives = part[:, None] != part[None]
    return weights, negatives


def pair_contrastive_loss(embeddings: jax.Array, positives: np.ndarray, negatives: np.ndarray,
                          temperature: float) -> jax.Array:  # fmt: skip
    """sum over positive pairs (a, b) of -s(a, b) + log(e^s(a, b) + sum_{n in N(a)} e^s(a, n)), divided by the
    number of images; s is the cosine similarity / temperature (vectors normalised as tf.nn.l2_normalize)."""
    z = embeddings.astype(jnp.float32)
    z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))
    s = z @ z.T / temperature
    negative_lse = jax.nn.logsumexp(jnp.where(negatives, s, -jnp.inf), axis=1, keepdims=True)
    terms = jnp.logaddexp(s, negative_lse) - s
    return jnp.sum(jnp.where(positives > 0, positives * terms, 0.0)) / z.shape[0]


def local_contrastive_loss(regions: jax.Array, temperature: float) -> jax.Array:
    """L^R: regions (B, 2, R, D) of the two views of B slices (REGIONS order). For each view, anchor region r and
    the other view's region r as the positive, against NEGATIVES[r] of both views; mean over the 2 B x 13 terms."""
    z = regions.astype(jnp.float32)
    z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))
    s = jnp.einsum('bvrd,bwmd->bvrwm', z, z) / temperature  # (B, view, region, view', region')
    anchors = np.arange(len(ANCHORS))
    positive = jnp.stack([s[:, 0, anchors, 1, anchors], s[:, 1, anchors, 0, anchors]], axis=1)  # (B, 2, 13)
    negative_index = np.array([[REGIONS.index(q) for q in row] for row in NEGATIVES])  # (13, 5)
    negative = s[:, :, anchors[:, None], :, negative_index]  # (13, 5, B, view, view'): indexed axes first
    negative = jnp.transpose(negative, (2, 3, 0, 4, 1)).reshape(*s.shape[:2], len(ANCHORS), -1)  # (B, 2, 13, 10)
    negative_lse = jax.nn.logsumexp(negative, axis=-1)
    return jnp.mean(jnp.logaddexp(positive, negative_lse) - positive)


class Method(base.Method):
    """Stage `global`: params {'encoder', 'global_head'}. Stage `local`: params {'decoder', 'local_head'}, extra
    {'encoder': the global run's frozen encoder}. Batches: 'image' (B, views, slices, S, S, 1)."""

    input_key = 'image'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        c = config
        channels = tuple(c.model.channels)
        self.encoder = UNetEncoder(channels)
        self.global_head = GlobalHead(c.model.global_hidden, c.model.embed_dim)
        self.decoder = UNetDecoder(channels, c.loss.decoder_blocks)
        self.local_head = LocalHead(c.model.embed_dim)
        self.corners = region_corners(local_map_size(c))
        self.segmenter = segmentation.Segmenter(channels, c.model.classes)
        # The same network whose BatchNorm averages become the statistics of the batch it sees (recalibration).
        self.calibrator = segmentation.Segmenter(channels, c.model.classes, momentum=0.0)
        if c.stage == 'local':
            self._check_pretrained()

    def _check_pretrained(self) -> None:
        from jaxssl.methods import _frozen_run

        run = _frozen_run.run_config(self.config.pretrained, 'pretrained', self.config.input.image_size)
        if run.get('method') != 'global_local' or run.get('stage') != 'global':
            raise ConfigError(f"'pretrained' {self.config.pretrained} is not a global_local run of stage 'global'")
        if tuple(run.model.channels) != tuple(self.config.model.channels):
            raise ConfigError(f"'model.channels' {tuple(self.config.model.channels)}: the pretrained run's are "
                              f'{tuple(run.model.channels)}')  # fmt: skip

    # --- data (host side) ----------------------------------------------------------------------------------------
    @property
    def views(self) -> int:
        return VIEWS[self.config.loss.variant] if self.config.stage == 'global' else 2

    @property
    def slices(self) -> int:
        """Slices per example: one per partition (gd, gd_minus), or one slice (gr, the local stage)."""
        c = self.config
        return c.loss.partitions if c.stage == 'global' and c.loss.variant != 'gr' else 1

    def view(self, volume: tuple[np.ndarray, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One volume's example (views, slices, S, S, 1): the global stage's partition slices, raw and augmented
        as its variant wants, or the local stage's one random slice in two intensity views."""
        image, _ = volume
        c = self.config
        jitter = functools.partial(slices.intensity, brightness=c.augment.brightness,
                                   contrast=tuple(c.augment.contrast), clip=tuple(c.augment.clip))  # fmt: skip
        if self.slices == 1:  # a random slice: the local stage, or G^R (uniformly drawn slices, cropped too)
            picked = image[rng.integers(0, len(image))][None]
        else:
            picked = image[slices.partition_slices(len(image), c.loss.partitions, rng)]
        if c.stage == 'local':
            views = [[jitter(x, rng) for x in picked] for _ in range(2)]
        else:
            augment = lambda x: jitter(slices.random_crop(x, rng), rng)
            raw = [list(picked)] if c.loss.variant != 'gr' else []
            views = raw + [[augment(x) for x in picked] for _ in range(self.views - len(raw))]
        return {'image': np.asarray(views, np.float32)[..., None]}

    def dataset(self, seed, process_index, process_count):
        # A volume with fewer slices than partitions is skipped and counted.
        return slices.make_volume_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, view=self.view,
            min_slices=self.slices,
        )  # fmt: skip

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.input.image_size
        shape = (batch_size, self.views, self.slices, size, size, 1)
        return {'image': np.random.default_rng(0).uniform(size=shape).astype(np.float32)}

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files())}

    # --- model ---------------------------------------------------------------------------------------------------
    def init(self, rng, batch):
        images = batch['image'].reshape(-1, *batch['image'].shape[-3:])
        keys = jax.random.split(base.stream(rng, 'global_local'), 4)
        encoder = self.encoder.init(keys[0], images)
        bottleneck, skips = self.encoder.apply(encoder, images)
        if self.config.stage == 'global':
            return {
                'encoder': encoder['params'],
                'global_head': self.global_head.init(keys[1], bottleneck)['params'],
            }, {}
        decoder = self.decoder.init(keys[2], bottleneck, skips)
        features = self.decoder.apply(decoder, bottleneck, skips)
        local_head = self.local_head.init(keys[3], features, self.corners)
        frozen = base.load_frozen(self.config.pretrained, 'pretrained', {'encoder': encoder['params']})
        return {'decoder': decoder['params'], 'local_head': local_head['params']}, {'encoder': frozen['encoder']}

    def _encode(self, encoder_params: Any, images: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """The encoder with batch statistics (the reference trains every stage so, the frozen encoder too); the
        running averages are not kept: no stage reads them, and fine-tuning starts its own."""
        (bottleneck, skips), _ = self.encoder.apply({'params': encoder_params}, images, True, mutable=['batch_stats'])
        return bottleneck, skips

    def loss(self, params, extra, batch, rng, step):
        c = self.config
        video = batch['image']
        b, _, parts = video.shape[:3]
        if c.stage == 'global':
            # (B, views, S, ...) flattened in the order global_pairs indexes.
            bottleneck, _ = self._encode(params['encoder'], video.reshape(-1, *video.shape[3:]))
            z = self.global_head.apply({'params': params['global_head']}, bottleneck)
            positives, negatives = global_pairs(b, c.loss.variant, parts)
            loss = pair_contrastive_loss(z, positives, negatives, c.loss.temperature)
        else:
            images_ = video.reshape(-1, *video.shape[3:])  # (B * 2, ...): the two views of a slice adjacent
            bottleneck, skips = self._encode(jax.lax.stop_gradient(extra['encoder']), images_)
            features, _ = self.decoder.apply({'params': params['decoder']}, bottleneck, skips, True,
                                             mutable=['batch_stats'])  # fmt: skip
            regions, _ = self.local_head.apply({'params': params['local_head']}, features, self.corners, True,
                                               mutable=['batch_stats'])  # fmt: skip
            loss = local_contrastive_loss(regions.reshape(b, 2, *regions.shape[1:]), c.loss.temperature)
        return loss, ({'loss': loss}, extra)

    def represent(self, params, extra, batch):
        """The global average of the encoder's bottleneck (batch statistics), (B, channels[-1])."""
        encoder = params['encoder'] if 'encoder' in params else extra['encoder']
        bottleneck, _ = self._encode(encoder, batch['image'])
        return {'bottleneck': bottleneck.mean(axis=(1, 2))}

    # --- evaluation: few-label fine-tuning -----------------------------------------------------------------------
    def pretrained_variables(self, params: Any, extra: Any) -> dict[str, Any]:
        """The segmenter's {'encoder', 'decoder'} params that pretraining provides (decoder blocks by name)."""
        if self.config.stage == 'global':
            return {'encoder': params['encoder']}
        return {'encoder': extra['encoder'], 'decoder': params['decoder']}

    def finetune(self, pretrained: dict[str, Any], volumes: list, seed: int) -> dict[str, Any]:
        """A UNet trained by the Dice loss on the slices of `volumes` (batches of eval.finetune_batch drawn with
        replacement, augmented), all weights, Adam at eval.finetune_lr, from `pretrained` where given and a random
        init elsewhere; one jitted step at a time (XLA:CPU, see base.Method.prepare). Returns its variables."""
        e, classes = self.config.eval, self.config.model.classes
        size = self.config.input.image_size
        image_stack = np.concatenate([image for image, _ in volumes])
        label_stack = np.concatenate([label for _, label in volumes])
        variables = self.segmenter.init(jax.random.key(seed), jnp.zeros((1, size, size, 1)))
        for name, params in pretrained.items():
            own = variables[name]['params']
            variables[name] = {**variables[name], 'params': {k: params.get(k, v) for k, v in own.items()}}
        tx = optax.adam(e.finetune_lr)
        opt_state = tx.init({name: v['params'] for name, v in variables.items()})
        rng = np.random.default_rng(seed)
        for step in range(1, e.finetune_steps + 1):
            rows = rng.integers(0, len(image_stack), e.finetune_batch)
            pairs = [slices.finetune_augment(image_stack[i], label_stack[i], classes, rng) for i in rows]
            batch_images = np.stack([p[0] for p in pairs])[..., None]
            batch_targets = np.stack([p[1] for p in pairs])
            variables, opt_state, loss = self._finetune_step(variables, opt_state, batch_images, batch_targets)
            if step % 1000 == 0:
                # Shown by default, as the other long host-side work (jaxssl.data.moving_digits' generation).
                log.warning('fine-tuning step %d/%d: Dice loss %.4f', step, e.finetune_steps, float(loss))
        return self._recalibrate(variables, jnp.asarray(image_stack[..., None]))

    @functools.partial(jax.jit, static_argnums=0)
    def _recalibrate(self, variables, images_):
        """The variables with every BatchNorm average set to its statistics over `images_` (all the labelled
        slices, unaugmented, in one batch)."""
        _, updated = self.calibrator.apply(variables, images_, train=True)
        return updated

    @functools.partial(jax.jit, static_argnums=0)
    def _finetune_step(self, variables, opt_state, images_, targets):
        tx = optax.adam(self.config.eval.finetune_lr)

        def objective(params):
            full = {name: {**variables[name], 'params': params[name]} for name in variables}
            logits, updated = self.segmenter.apply(full, images_, train=True)
            return segmentation.dice_loss(logits, targets), updated

        params = {name: v['params'] for name, v in variables.items()}
        (loss, updated), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return {name: {**updated[name], 'params': params[name]} for name in updated}, opt_state, loss

    def evaluate(self, params, extra, mesh):
        """'<init>/dice' (mean foreground Dice over the test volumes) and '<init>/dice/<class>' for the UNet
        fine-tuned from the pretrained weights and, with eval.baselines, from a random init."""
        e, seed = self.config.eval, self.config.seed
        train_volumes = segmentation.labelled_volumes(self.config, e.finetune_split, e.labelled_volumes,
                                                      'eval.labelled_volumes')  # fmt: skip
        test_volumes = segmentation.labelled_volumes(self.config, e.test_split, e.test_volumes, 'eval.test_volumes')
        starts = {'pretrained': self.pretrained_variables(jax.device_get(params), jax.device_get(extra))}
        if e.baselines:
            starts['random_init'] = {}
        results, names = {}, slices.class_names(self.config)
        for name, pretrained in starts.items():
            variables = self.finetune(pretrained, train_volumes, seed)
            results.update(segmentation.dice_report(self.segmenter, variables, test_volumes, names, name))
        return results
