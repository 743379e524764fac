"""T-JEPA (Thimonier et al., "T-JEPA: Augmentation-Free Self-Supervised Learning for Tabular Data", arXiv 2410.05016;
reference jose-melo/t-jepa @ 98dda99): from the encoded tokens of a random subset of a row's features (the context),
a predictor regresses the tokens that an EMA target encoder gives other features of the same row (the targets).

Batch layout (pretraining): 'row' (B, D) float32 (scaled numerical features, then category indices; see
jaxssl.data.tabular); 'context_idx' (B, C) and 'context_valid' (B, C): the context features, padded to the largest
context size C; 'target_idx' (B, M, T) and 'target_valid' (B, M, T): M target sets, padded to T. Feature indices are
0 .. D-1; the model's token positions are R + index after R [REG] tokens, which are always in the context and never
targets. The masks are drawn per batch in the Grain pipeline by `sample_feature_masks`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import optim
from jaxssl.config import ConfigError, check_choice, check_range
from jaxssl.data import tabular
from jaxssl.methods import base
from jaxssl.models import tjepa as tjepa_model


def mask_bounds(num_features: int, share: tuple[float, float]) -> tuple[int, int]:
    """(min, max) features of a mask from its (min, max) share of the row, rounded as the reference."""
    return int(np.round(num_features * share[0])), int(np.round(num_features * share[1]))


def sample_feature_masks(
    batch_size: int,
    num_features: int,
    context_share: tuple[float, float],
    target_share: tuple[float, float],
    num_targets: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """One batch's context and target feature sets (the reference's MaskCollator, one context set per row).

    Per batch: the context and target sizes are min + round((max - min) * U), redrawn together until context + target
    fit in the row. Per row, independently: a random context set, then `num_targets` target sets, each drawn from the
    features outside the context (target sets may overlap one another, never the context). Sets are sorted and padded
    to the largest sizes with index 0 and valid False.
    """
    ctx_lo, ctx_hi = mask_bounds(num_features, context_share)
    tgt_lo, tgt_hi = mask_bounds(num_features, target_share)
    while True:
        num_context = ctx_lo + int(np.round((ctx_hi - ctx_lo) * rng.random()))
        num_target = tgt_lo + int(np.round((tgt_hi - tgt_lo) * rng.random()))
        if num_context + num_target <= num_features:
            break
    order = rng.permuted(np.tile(np.arange(num_features), (batch_size, 1)), axis=1)
    context = np.sort(order[:, :num_context], axis=1)
    rest = order[:, num_context:]
    targets = np.stack([np.sort(rng.permuted(rest, axis=1)[:, :num_target], axis=1) for _ in range(num_targets)], 1)
    context_idx = np.zeros((batch_size, ctx_hi), np.int32)
    target_idx = np.zeros((batch_size, num_targets, tgt_hi), np.int32)
    context_idx[:, :num_context] = context
    target_idx[..., :num_target] = targets
    return {
        'context_idx': context_idx,
        'context_valid': np.arange(ctx_hi) < np.full((batch_size, 1), num_context),
        'target_idx': target_idx,
        'target_valid': np.arange(tgt_hi) < np.full((batch_size, num_targets, 1), num_target),
    }


def latent_mse(prediction: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean squared error over the elements of the real target tokens: the reference's MSELoss (element mean) on
    unpadded (B * M, T, H) tensors, which all have the same T within a batch."""
    per_token = jnp.mean(jnp.square(prediction - target), axis=-1)
    return jnp.sum(per_token * valid) / jnp.maximum(jnp.sum(valid), 1)


def standardise_over_batch(tokens: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Each position and channel of (B, N, H) tokens centred and scaled over the (global) batch. Not in the reference:
    an option (loss.target_norm='batch') that removes what a position alone predicts, so that the loss is carried by
    what varies from row to row (docs/methods.md, T-JEPA: the predictor otherwise learns position means only)."""
    mean = jnp.mean(tokens, axis=0, keepdims=True)
    return (tokens - mean) / (jnp.std(tokens, axis=0, keepdims=True) + eps)


def ema_momentum(step: jax.Array, total_steps: int, start: float, end: float) -> jax.Array:
    """The reference's momentum schedule: linear from `start` at step 0 to `end` after all steps, one value per step."""
    return start + (end - start) * jnp.asarray(step, jnp.float32) / max(total_steps, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def clamp_gradient(tree: Any, limit: float) -> Any:
    """Identity whose gradient is clamped to [-limit, limit] elementwise: the reference's per-parameter hooks
    `grad.clamp(-1, 1)` on the context encoder, applied to the full gradient of each parameter."""
    return tree


def _clamp_fwd(tree, limit):
    return tree, None


def _clamp_bwd(limit, _, grads):
    return (jax.tree.map(lambda g: jnp.clip(g, -limit, limit), grads),)


clamp_gradient.defvjp(_clamp_fwd, _clamp_bwd)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model or masks cannot use (the table is checked when a run starts)."""
    tabular.check_input_config(config)
    check_choice(config, 'model.variant', tjepa_model.VARIANTS)
    if config.model.reg_tokens < 0:
        raise ConfigError(f"bad value {config.model.reg_tokens} for 'model.reg_tokens': must be >= 0")
    check_range(config, 'model.dropout', 0.0, 1.0)
    check_range(config, 'model.predictor_dropout', 0.0, 1.0)
    for key in ('masking.context_share', 'masking.target_share', 'model.ema'):
        value = config
        for part in key.split('.'):
            value = value[part]
        if len(value) != 2 or not 0 <= value[0] <= value[1] <= 1:
            raise ConfigError(f"bad value {tuple(value)} for '{key}': (min, max) with 0 <= min <= max <= 1")
    if config.masking.num_targets < 1:
        raise ConfigError(f"bad value {config.masking.num_targets} for 'masking.num_targets': must be >= 1")
    check_choice(config, 'eval.encoder', ('target', 'context'))
    check_choice(config, 'loss.target_norm', ('none', 'batch'))


def check_masks(config: ml_collections.ConfigDict, num_features: int) -> None:
    """The mask sizes the table's feature count gives must be drawable (the reference asserts the same)."""
    ctx_lo, _ = mask_bounds(num_features, config.masking.context_share)
    tgt_lo, _ = mask_bounds(num_features, config.masking.target_share)
    if ctx_lo < 1:
        raise ConfigError(f"'masking.context_share' gives no context feature for a table of {num_features} features")
    if tgt_lo < 1:
        raise ConfigError(f"'masking.target_share' gives no target feature for a table of {num_features} features")
    if ctx_lo + tgt_lo > num_features:
        raise ConfigError(
            f"'masking.context_share' and 'masking.target_share' minimums ({ctx_lo} + {tgt_lo} features) exceed the "
            f'{num_features} features of the table'
        )


class Method(base.Method):
    """T-JEPA pretraining on a table for the one trainer."""

    input_key = 'row'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        try:
            self.data = tabular.prepare(tabular.load_table(config.input), config.input)
        except tabular.TableError as e:
            raise ConfigError(f"'input.table': {e}") from None
        table = self.data.table
        self.num_features = table.num_features
        check_masks(config, self.num_features)
        spec = tjepa_model.decode_variant(config.model.variant)
        m = config.model
        self.reg_tokens = m.reg_tokens
        self.encoder = tjepa_model.Encoder(
            num_numerical=self.data.num_numerical,
            cardinalities=table.cardinalities,
            width=spec['width'],
            depth=spec['depth'],
            heads=spec['heads'],
            mlp=spec['mlp'],
            reg_tokens=m.reg_tokens,
            dropout=m.dropout,
            eps=m.layer_norm_eps,
        )
        self.predictor = tjepa_model.Predictor(
            width=spec['width'],
            pred_width=spec['pred_width'],
            depth=spec['pred_depth'],
            heads=spec['pred_heads'],
            mlp=spec['pred_mlp'],
            num_positions=m.reg_tokens + self.num_features,
            dropout=m.predictor_dropout,
            eps=m.layer_norm_eps,
        )
        # The momentum schedule spans the whole run, so it needs the run's length, as the reference's does.
        self.total_steps, _ = optim.training_steps(config, len(self.data.pretrain_rows))

    # --- data -------------------------------------------------------------------------------------------------
    def sample_masks(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        k = self.config.masking
        return sample_feature_masks(
            batch_size, self.num_features, tuple(k.context_share), tuple(k.target_share), k.num_targets, rng
        )

    def _add_masks(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        # Labels stay out of the training batches: pretraining is self-supervised.
        return {'row': batch['row'], **self.sample_masks(len(batch['row']), rng)}

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        print(self.data.table.report(), flush=True)
        source = tabular.RowSource(self.data.rows, self.data.labels, self.data.pretrain_rows)
        dataset = tabular.make_pretrain_dataset(
            source, self.config.input.global_batch, seed, process_index, process_count, self._add_masks
        )
        return dataset, len(source)

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_rows': float(self.data.table.bad_rows)}

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        rows = np.zeros((batch_size, self.num_features), np.float32)
        return {'row': rows, **self.sample_masks(batch_size, np.random.default_rng(0))}

    def tokens_per_example(self) -> int:
        return self.reg_tokens + self.num_features

    # --- model ------------------------------------------------------------------------------------------------
    def _context(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Token positions (B, R + C) and key mask of the context: the [REG] tokens, then the context features."""
        size = batch['context_idx'].shape[0]
        reg = jnp.broadcast_to(jnp.arange(self.reg_tokens, dtype=jnp.int32), (size, self.reg_tokens))
        positions = jnp.concatenate([reg, batch['context_idx'] + self.reg_tokens], axis=1)
        mask = jnp.concatenate([jnp.ones_like(reg, bool), batch['context_valid']], axis=1)
        return positions, mask

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        encoder_key, predictor_key = jax.random.split(rng)
        positions, mask = self._context(batch)
        encoder = self.encoder.init(encoder_key, batch['row'], positions, mask)['params']
        context = jnp.zeros((*positions.shape, self.encoder.width), jnp.float32)
        targets = batch['target_idx'] + self.reg_tokens
        predictor = self.predictor.init(predictor_key, context, positions, mask, targets, batch['target_valid'])
        # The target encoder starts as a copy of the context encoder (the reference deep-copies it).
        return {'encoder': encoder, 'predictor': predictor['params']}, {'target_encoder': encoder}

    def regression_targets(self, encoded: jax.Array, target_positions: jax.Array) -> jax.Array:
        """The target encoder's tokens (B, R + D, H) (standardised over the batch with loss.target_norm='batch') at
        the target positions (B, M, T): (B, M, T, H)."""
        if self.config.loss.target_norm == 'batch':
            encoded = standardise_over_batch(encoded)
        return jnp.take_along_axis(encoded[:, None], target_positions[..., None], axis=2)

    def loss(
        self, params: Any, extra: Any, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
        rows = batch['row']
        positions, context_mask = self._context(batch)
        target_positions = batch['target_idx'] + self.reg_tokens
        target_mask = batch['target_valid']
        # Like the reference's target encoder (a deep copy never put in eval mode), it runs with training dropout.
        full, _ = self.encoder.apply(
            {'params': extra['target_encoder']}, rows, train=True, rngs={'dropout': base.stream(rng, 'target_dropout')}
        )
        full = jax.lax.stop_gradient(full)
        targets = self.regression_targets(full, target_positions)
        clamp = self.config.optim.encoder_grad_clamp
        encoder_params = clamp_gradient(params['encoder'], clamp) if clamp > 0 else params['encoder']
        context, _ = self.encoder.apply(
            {'params': encoder_params},
            rows,
            positions,
            context_mask,
            train=True,
            rngs={'dropout': base.stream(rng, 'dropout')},
        )
        predictions = self.predictor.apply(
            {'params': params['predictor']},
            context,
            positions,
            context_mask,
            target_positions,
            target_mask,
            train=True,
            rngs={'dropout': base.stream(rng, 'predictor_dropout')},
        )
        loss = latent_mse(predictions, targets, target_mask)
        metrics = {
            'loss': loss,
            'context_features': jnp.mean(jnp.sum(batch['context_valid'], axis=1).astype(jnp.float32)),
            'target_features': jnp.mean(jnp.sum(target_mask, axis=2).astype(jnp.float32)),
            # A collapse monitor (the reference's intra-feature spread): how much each feature token of the target
            # encoder varies over the rows of the batch, averaged over tokens and channels; 0 = collapsed.
            'target_token_std': jnp.mean(jnp.std(full[:, self.reg_tokens :], axis=0)),
        }
        return loss, (metrics, extra)

    def update_extra(self, params: Any, extra: Any, step: jax.Array) -> Any:
        start, end = self.config.model.ema
        m = ema_momentum(step, self.total_steps, start, end)
        target = jax.tree.map(lambda t, p: m * t + (1 - m) * p, extra['target_encoder'], params['encoder'])
        return {'target_encoder': target}

    # --- evaluation -------------------------------------------------------------------------------------------
    def raw_features(self, rows: jax.Array) -> jax.Array:
        """The input-space baseline: scaled numerical features and one-hot categorical features, (B, Dn + sum(K))."""
        num = self.data.num_numerical
        parts = [rows[:, :num]]
        for j, cardinality in enumerate(self.data.table.cardinalities):
            parts.append(jax.nn.one_hot(rows[:, num + j].astype(jnp.int32), cardinality))
        return jnp.concatenate(parts, axis=1)

    def represent(self, params: Any, extra: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Frozen features of whole rows: 'flatten' (all R + D tokens, the reference's linear_flatten adapter), 'reg'
        (the [REG] tokens), 'mean_pool' (mean feature token), and 'raw' (the input itself, as a baseline)."""
        weights = extra['target_encoder'] if self.config.eval.encoder == 'target' else params['encoder']
        rows = batch['row']
        encoded, _ = self.encoder.apply({'params': weights}, rows)
        size, reg = encoded.shape[0], self.reg_tokens
        features = {
            'flatten': encoded.reshape(size, -1),
            'mean_pool': encoded[:, reg:].mean(axis=1),
            'raw': self.raw_features(rows),
        }
        if reg:
            features['reg'] = encoded[:, :reg].reshape(size, -1)
        return features

    def eval_dataset(
        self, split: str, batch_size: int, max_examples: int, process_index: int, process_count: int
    ) -> Any:
        if split not in self.data.splits:
            raise ConfigError(f"bad split '{split}' for 'eval.split' / 'eval.train_split'; valid: train, val, test")
        source = tabular.RowSource(self.data.rows, self.data.labels, self.data.splits[split])
        if not len(source):
            key = f'input.{split}_fraction' if split != 'train' else 'input.val_fraction'
            raise ConfigError(f"split '{split}' of table {self.data.table.name} has no rows: check '{key}'")
        return tabular.make_eval_dataset(source, batch_size, max_examples, process_index, process_count)

    def evaluate(self, params: Any, extra: Any, mesh: jax.sharding.Mesh) -> dict[str, float]:
        if self.data.table.target is None:  # an unlabelled CSV: nothing to probe
            return {}
        return super().evaluate(params, extra, mesh)
