"""wav2vec 2.0 (Baevski et al., NeurIPS 2020) pretraining, from scratch or continued from released weights (XLSR-53
adapted to a new language, as the Ainu wav2vec 2.0 of the seed papers).

The objective is fairseq's `Wav2Vec2Model.forward` + `criterions/wav2vec_criterion.py` (infonce):
- per reference GPU batch, in the Grain pipeline (`crop_and_mask`, on each host batch): every utterance is cut at a
  random start to the batch's shortest (fairseq's collater without padding); spans of `mask.length` latent frames
  start at max(mask.min_spans, int(mask.prob * T / length + U[0, 1))) distinct frames of each utterance
  (`span_mask`); then each keeps a random subset of its masked frames of the batch's smallest count
  (require_same_masks);
- at each masked frame t, InfoNCE over the cosine similarities / `loss.logit_temp` between final_proj(c_t) and the
  quantized target q_t against `loss.num_negatives` distractors q_j drawn uniformly from the other masked frames of
  the same utterance (`sample_negatives`); a distractor with the target's codes is excluded (fairseq's neg_is_pos);
- + `loss.diversity_weight` x (G V - perplexity) / (G V), the perplexity of the noise-free code distribution averaged
  over the masked frames, summed over the G codebooks;
- + `loss.feature_penalty_weight` x mean(feature encoder output ^ 2);
- all per masked frame. fairseq computes the diversity and feature penalty per GPU and weights each GPU's by its
  masked frames; `loss.reference_batches` splits the global batch into that many equal groups for both, and for the
  crop and the mask-count trimming (0: one group per device of the mesh).
- the Gumbel temperature decays per update: max(t0 * decay ^ (step + start_step), t_min) (`quantizer.temperature`);
  continuing a released model starts at its end of training (start_step -1: the floor), not re-heated to t0.

Batch layout: 'waveform' (B, N) float32 and 'num_samples' (B,) int32 (jaxssl.data.audio's waveform input, equal
within a reference batch after the crop), 'time_mask' (B, T) bool (T = frame_counts(N)), 'label' (unused here).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import audio
from jaxssl.methods import _audio, base
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import wav2vec2 as w2v
from jaxssl.models import wav2vec2_weights


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, masks, loss or input cannot use."""
    if not config.model.pretrained:
        check_choice(config, 'model.variant', w2v.VARIANTS)
    check_encoder_config(config, 'wav2vec 2.0')
    if config.loss.num_negatives < 1:
        raise ConfigError(f"bad value {config.loss.num_negatives} for 'loss.num_negatives': must be >= 1")
    if not config.loss.logit_temp > 0:
        raise ConfigError(f"bad value {config.loss.logit_temp} for 'loss.logit_temp': must be > 0")
    t0, t_min, decay = config.quantizer.temperature
    if not 0 < t_min <= t0 or not 0 < decay <= 1:
        raise ConfigError(f"bad 'quantizer.temperature' {tuple(config.quantizer.temperature)}: need 0 < min <= start")


def check_encoder_config(config: ml_collections.ConfigDict, name: str) -> None:
    """The keys every method on wav2vec 2.0's encoder and batches shares (wav2vec 2.0, MERT, SpeechT5): the encoder's
    dtype, dropouts (those the config has) and feature_grad_mult, the waveform input, the span masks,
    `loss.reference_batches`."""
    m = config.model
    check_choice(config, 'model.dtype', DTYPES)
    for key in ('dropout', 'attention_dropout', 'dropout_input', 'dropout_features', 'layerdrop'):
        if key in m:
            check_range(config, f'model.{key}', 0.0, 1.0)
    if m.feature_grad_mult < 0:
        raise ConfigError(f"bad value {m.feature_grad_mult} for 'model.feature_grad_mult': must be >= 0")
    audio.check_audio_input_config(config)
    if config.input.features != 'waveform':
        raise ConfigError(f"'input.features' must be 'waveform' for {name} (its encoder reads the samples)")
    frames = int(w2v.frame_counts(config.input.max_samples))
    check_range(config, 'mask.prob', 0.0, 1.0)
    if config.mask.length < 1 or config.mask.min_spans < 0:
        raise ConfigError("'mask.length' must be >= 1 and 'mask.min_spans' >= 0")
    if frames < config.mask.length + 2:
        raise ConfigError(
            f"'input.max_samples' ({config.input.max_samples}) gives {frames} latent frames: too few for spans of "
            f"'mask.length' {config.mask.length}"
        )
    if config.input.dataset == 'folder' and w2v.frame_counts(config.input.min_samples) < config.mask.length + 2:
        raise ConfigError(
            f"'input.min_samples' ({config.input.min_samples}) lets through files too short to mask spans of "
            f"'mask.length' {config.mask.length} frames (320 samples each; the recipes skip files under 2-3 s)"
        )
    groups, micro_batch = config.loss.reference_batches, config.input.global_batch // config.train.grad_accum
    if groups < 0 or (groups and micro_batch % groups):
        raise ConfigError(
            f"'loss.reference_batches' ({groups}) must be >= 0 and divide the micro-batch 'input.global_batch' / "
            f"'train.grad_accum' ({micro_batch})"
        )


def span_mask(
    frames: int, valid: int, rng: np.random.Generator, prob: float, length: int, min_spans: int
) -> np.ndarray:
    """One utterance's masked latent frames (frames,) bool, fairseq's compute_mask_indices row ('static' spans,
    overlaps allowed, num_mask_ver 2): n = max(min_spans, int(prob * valid / length + U)) distinct starts drawn
    from [0, valid - length) (from [0, n + 1) when that is too short), spans of `length` clipped to the `valid`
    frames before the padding."""
    mask = np.zeros(frames, bool)
    if valid <= 1:
        return mask
    count = max(min_spans, int(prob * valid / float(length) + rng.random()))
    span = length
    if valid - span <= count:
        span = valid - count - 1
    starts = rng.choice(valid - span, count, replace=False)
    chosen = (starts[:, None] + np.arange(length)).ravel()
    mask[chosen[chosen < valid]] = True
    return mask


def crop_and_mask(
    batch: dict[str, np.ndarray], rng: np.random.Generator, *, groups: int, mask: Any, keep_starts: bool = False
) -> dict[str, np.ndarray]:
    """One host batch of `groups` reference batches (consecutive rows) -> the batch cut and masked as fairseq's
    collater (pad=False: each utterance cut at a start drawn uniformly to the group's shortest) and
    compute_mask_indices (`span_mask` per row over the common length, then require_same_masks: rows with more masked
    frames keep a uniform random subset of the group's smallest count). Adds 'time_mask' (B, T), and with
    `keep_starts` 'crop_start' (B,) int32, the sample each cut starts at."""
    waveform, lengths = batch['waveform'].copy(), batch['num_samples'].copy()
    starts = np.zeros(len(waveform), np.int32)
    frames = int(w2v.frame_counts(waveform.shape[1]))
    time_mask = np.zeros((len(waveform), frames), bool)
    for rows in np.split(np.arange(len(waveform)), groups):
        size = int(lengths[rows].min())
        for i in rows:
            start = starts[i] = int(rng.integers(0, lengths[i] - size + 1))
            waveform[i, :size] = waveform[i, start : start + size]
            waveform[i, size:] = 0
        lengths[rows] = size
        valid = int(w2v.frame_counts(size))
        chosen = [np.flatnonzero(span_mask(frames, valid, rng, mask.prob, mask.length, mask.min_spans)) for _ in rows]
        target = min(len(c) for c in chosen)
        for i, c in zip(rows, chosen, strict=True):
            time_mask[i, rng.choice(c, target, replace=False) if len(c) > target else c] = True
    out = {**batch, 'waveform': waveform, 'num_samples': lengths, 'time_mask': time_mask}
    return {**out, 'crop_start': starts} if keep_starts else out


def sample_negatives(mask: jax.Array, num: int, rng: jax.Array) -> jax.Array:
    """(B, T, num) frame indices of distractors: for each masked frame, uniform draws from the other masked frames of
    its row, fairseq's sample_negatives on the masked frames (randint over n - 1, shifted past the target's own
    rank). Rows with fewer than 2 masked frames, and unmasked frames, get arbitrary (masked-out) indices."""
    b, t = mask.shape
    counts = mask.sum(axis=1)
    masked_first = jnp.argsort(~mask, axis=1, stable=True)  # the masked frames in order, then the others
    rank = jnp.cumsum(mask, axis=1) - 1  # a masked frame's position among its row's masked frames
    high = jnp.maximum(counts - 1, 1)[:, None, None]
    draws = jnp.floor(jax.random.uniform(rng, (b, t, num)) * high).astype(jnp.int32)
    draws = draws + (draws >= rank[..., None])
    draws = jnp.minimum(draws, jnp.maximum(counts - 1, 0)[:, None, None])
    return jnp.take_along_axis(masked_first[:, None, :], draws.reshape(b, 1, t * num), axis=2).reshape(b, t, num)


def contrastive_logits(
    predictions: jax.Array, targets: jax.Array, codes: jax.Array, negatives: jax.Array, temperature: float
) -> jax.Array:
    """(B, T, 1 + K) logits: the cosine similarity of each frame's prediction with its target (column 0) and with the
    targets at `negatives` (B, T, K), over `temperature`; a distractor whose codes equal the target's is -inf."""
    normalize = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
    p, q = normalize(predictions), normalize(targets)
    positive = jnp.sum(p * q, axis=-1, keepdims=True)
    similarity = jnp.einsum('btd,bsd->bts', p, q)  # every frame against every target of its utterance
    distractors = jnp.take_along_axis(similarity, negatives, axis=2)
    b = jnp.arange(codes.shape[0])[:, None, None]
    same_codes = jnp.all(codes[b, negatives] == codes[:, :, None, :], axis=-1)
    distractors = jnp.where(same_codes, -jnp.inf, distractors / temperature)
    return jnp.concatenate([positive / temperature, distractors], axis=-1)


def perplexity(probs: jax.Array, weights: jax.Array) -> jax.Array:
    """exp of the entropy of the `weights`-averaged code distribution, summed over codebooks: probs (N, G, V),
    weights (N,). fairseq's prob_perplexity (its log(p + 1e-7))."""
    mean = jnp.sum(probs * weights[:, None, None], axis=0) / jnp.maximum(jnp.sum(weights), 1)
    return jnp.sum(jnp.exp(-jnp.sum(mean * jnp.log(mean + 1e-7), axis=-1)))


def gumbel_temperature(quantizer: ml_collections.ConfigDict, step: jax.Array, start_step: int) -> jax.Array:
    """fairseq's set_num_updates: max(t0 * decay ^ updates, t_min)."""
    t0, t_min, decay = quantizer.temperature
    updates = jnp.asarray(step, jnp.float32) + start_step
    return jnp.maximum(t0 * jnp.exp(updates * math.log(decay)), t_min)  # 0.999995 is not exact in float32


def wav2vec2_loss(
    outputs: dict[str, jax.Array], mask: jax.Array, negatives: jax.Array, groups: int, loss_config: Any
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The criterion per masked frame, and metrics (fairseq's accuracy counts a frame whose logits are all equal as
    wrong)."""
    c = loss_config
    b, t = mask.shape
    logits = contrastive_logits(outputs['predictions'], outputs['targets'], outputs['codes'], negatives, c.logit_temp)
    nce = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
    weights = mask.astype(jnp.float32)
    masked = jnp.maximum(weights.sum(), 1)
    contrastive = jnp.sum(nce * weights) / masked
    # Per reference batch, weighted by its masked frames (fairseq adds coef x term x sample_size per GPU).
    group_weights = weights.reshape(groups, -1).sum(axis=1) / masked
    probs = outputs['probs'].reshape(groups, -1, *outputs['probs'].shape[2:])
    entries = probs.shape[-2] * probs.shape[-1]
    ppl = jax.vmap(perplexity)(probs, weights.reshape(groups, -1))
    diversity = jnp.sum(group_weights * (entries - ppl) / entries)
    penalty = jnp.sum(group_weights * outputs['features_pen'].reshape(groups, -1).mean(axis=1))
    loss = contrastive + c.diversity_weight * diversity + c.feature_penalty_weight * penalty
    top, bottom = jnp.argmax(logits, axis=-1) == 0, jnp.argmin(logits, axis=-1) == 0
    # fairseq's code_perplexity: of the noise-free argmax codes.
    codes = jax.nn.one_hot(jnp.argmax(outputs['probs'], -1), probs.shape[-1]).reshape(b * t, *probs.shape[-2:])
    metrics = {
        'loss': loss,
        'contrastive': contrastive,
        'diversity': diversity,
        'features_pen': penalty,
        'accuracy': jnp.sum((top & ~bottom) * weights) / masked,
        'prob_perplexity': jnp.mean(ppl),
        'code_perplexity': perplexity(codes, weights.reshape(-1)),
        'masked_fraction': weights.sum() / b / t,
    }
    return loss, metrics


def reference_groups(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """Reference GPU batches in the global batch (the unit of fairseq's per-batch crops and require_same_masks):
    `loss.reference_batches`, or one per device."""
    return config.loss.reference_batches or mesh.devices.size


def groups_per_host(groups: int) -> int:
    """This process's share of the reference batches; ConfigError when they do not split over the processes."""
    processes = jax.process_count()
    if groups % processes:
        raise ConfigError(f'{groups} reference batches cannot be split over {processes} processes')
    return groups // processes


def bucketed_order(
    config: ml_collections.ConfigDict, groups: int, source: Any, seed: int, process_index: int, process_count: int
) -> Any:
    """fairseq's size-sorted batches when `input.bucket_by_length` (None otherwise): `audio.length_bucket_order`
    with one bucket per reference batch (`groups` in the global batch) of the source's lengths, capped at
    max_samples; lengths are process 0's, so that every host reads the same order."""
    c = config.input
    if not c.bucket_by_length:
        return None
    lengths = np.minimum(source.lengths(c.sample_rate), c.max_samples)
    if process_count > 1:  # one reading of the headers for all: a failed read on one host must not split orders
        from jax.experimental import multihost_utils

        lengths = np.asarray(multihost_utils.broadcast_one_to_all(lengths))
    try:
        return audio.length_bucket_order(
            lengths, c.global_batch, c.global_batch // groups,
            min_length=max(c.min_samples, math.ceil(audio.MIN_SECONDS * c.sample_rate)),
            seed=seed, process_index=process_index, process_count=process_count,
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"'input.bucket_by_length': {e}") from None


class Method(_audio.AudioMethod):
    """wav2vec 2.0 pretraining for the trainer."""

    input_key = 'waveform'
    represent_keys = ('num_samples',)

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        overrides = dict(
            dropout=m.dropout,
            attention_dropout=m.attention_dropout,
            dropout_input=m.dropout_input,
            dropout_features=m.dropout_features,
            layerdrop=m.layerdrop,
            feature_grad_mult=m.feature_grad_mult,
            dtype=DTYPES[m.dtype],
        )
        self._pretrained = None
        if m.pretrained:
            try:
                fields, self._pretrained = wav2vec2_weights.load(m.pretrained)
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"'model.pretrained' {m.pretrained}: {e}") from None
            self.model = w2v.Wav2Vec2(**{**fields, **overrides})
            normalized = fields['extractor_mode'] == 'layer'  # fairseq's recipes: layer norm <=> normalize=True
            if normalized != config.input.normalize_waveform:
                raise ConfigError(
                    f"'input.normalize_waveform' is {config.input.normalize_waveform} but {m.pretrained} has a "
                    f'{fields["extractor_mode"]}-norm feature encoder, which the reference recipes train on '
                    f'{"standardised" if normalized else "raw"} waveforms (large / XLSR: configs/wav2vec2.py:'
                    'variant=large,continue; base: variant=base,continue)'
                )
        else:
            self.model = w2v.make_model(m.variant, **overrides)
        self.frames = int(w2v.frame_counts(config.input.max_samples))
        start = config.quantizer.start_step
        self.start_step = start if start >= 0 else (1_000_000_000 if m.pretrained else 0)

    def groups(self) -> int:
        return reference_groups(self.config, self.mesh)

    def reading_order(self, source: Any, seed: int, process_index: int, process_count: int) -> Any:
        """With `input.bucket_by_length`, fairseq's length-sorted batches: each reference batch (one device's rows)
        is a bucket of utterances of similar length (up to max_samples), so the crop to the shortest loses little."""
        return bucketed_order(self.config, self.groups(), source, seed, process_index, process_count)

    def batch_transform(self) -> Any:
        return functools.partial(crop_and_mask, groups=groups_per_host(self.groups()), mask=self.config.mask)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        n = self.config.input.max_samples
        batch = {
            'waveform': rng.normal(size=(batch_size, n)).astype(np.float32),
            'num_samples': np.full(batch_size, n, np.int32),
        }
        return crop_and_mask(batch, rng, groups=1, mask=self.config.mask)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        if self._pretrained is not None:
            return jax.tree.map(jnp.asarray, self._pretrained), {}
        return w2v.init_params(self.model, rng, batch['waveform']), {}

    def loss(self, params, extra, batch, rng, step):
        mask = batch['time_mask']
        groups = self.groups() if mask.shape[0] % self.groups() == 0 else 1  # 1: a batch smaller than the mesh
        temperature = gumbel_temperature(self.config.quantizer, step, self.start_step)
        outputs = self.model.apply(
            {'params': params},
            batch['waveform'],
            batch['num_samples'],
            mask,
            temperature=temperature,
            deterministic=False,
            rngs={k: base.stream(rng, k) for k in ('dropout', 'gumbel', 'layerdrop')},
        )
        negatives = sample_negatives(mask, self.config.loss.num_negatives, base.stream(rng, 'negatives'))
        loss, metrics = wav2vec2_loss(outputs, mask, negatives, groups, self.config.loss)
        return loss, ({**metrics, 'temperature': temperature}, extra)

    def represent(self, params, extra, batch):
        """The context vectors averaged over the utterance's frames, of the last block ('mean_pool') and of the
        middle one ('mid_pool'; wav2vec 2.0's middle layers hold the most phonetic information), and the last
        block's frames ('tokens')."""
        hidden, layers = self.model.apply(
            {'params': params}, batch['waveform'], batch['num_samples'], method=self.model.encode
        )
        return pooled_frames(hidden, layers, batch['num_samples'], self.model.depth)

    def tokens_per_example(self) -> int:
        return self.frames

    def flops_per_example(self) -> float:
        m, t = self.model, self.frames
        c = m.conv_channels
        entries = m.codebooks * m.codebook_entries
        heads = 2 * t * (c * m.width + m.width * m.final_dim + m.codevector_dim * m.final_dim + c * entries)
        return 3.0 * (encoder_flops(m, self.config.input.max_samples) + heads + 2 * t * t * m.final_dim)


def pooled_frames(hidden: jax.Array, layers: dict[str, jax.Array], num_samples: jax.Array, depth: int) -> dict:
    """The representations of a wav2vec 2.0-style encoder: the last block's frames averaged over each clip's
    valid frames ('mean_pool'), the middle block's ('mid_pool'), and the last block's frames ('tokens')."""
    frame_valid = w2v.valid_frames(num_samples, hidden.shape[1])
    weights = frame_valid[..., None] / jnp.maximum(frame_valid.sum(axis=1), 1)[:, None, None]
    pool = lambda x: jnp.sum(x.astype(jnp.float32) * weights, axis=1)
    middle = layers[f'layer_{(depth - 1) // 2}']
    return {'mean_pool': pool(hidden), 'mid_pool': pool(middle), 'tokens': hidden.astype(jnp.float32)}


def encoder_flops(model: w2v.Wav2Vec2, num_samples: int) -> float:
    """Forward FLOPs of the feature encoder, positional conv and Transformer blocks on `num_samples` samples."""
    t, c = int(w2v.frame_counts(num_samples)), model.conv_channels
    conv, length, channels = 0.0, num_samples, 1
    for kernel, stride in w2v.KERNELS_STRIDES:
        length = (length - kernel) // stride + 1
        conv += 2 * length * kernel * channels * c
        channels = c
    blocks = model.depth * (2 * t * (4 * model.width**2 + 2 * model.width * model.mlp) + 4 * t * t * model.width)
    pos = 2 * t * model.pos_conv_kernel * model.width * model.width / model.pos_conv_groups
    return conv + blocks + pos
