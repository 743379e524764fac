"""Layer-wise lr decay through the trainer's lr rules (scanned and unscanned), and the fine-tuning no-decay set."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxssl import optim
from jaxssl.config import ConfigError, load_config
from jaxssl.models import videomae as videomae_model

FINETUNE = 'configs/videomae_v2_finetune.py'
# depth 3, decay 0.5: scale_i = 0.5 ** (3 + 1 - i); patch/pos = layer 0, block k = layer k + 1, the rest = layer 4.
TABLE = {
    'patch_embed/proj/kernel': 1 / 16,
    'pos_embed/pos_embed': 1 / 16,
    'encoder/block_00/attn/qkv/kernel': 1 / 8,
    'encoder/block_01/mlp/fc1/bias': 1 / 4,
    'encoder/block_02/norm1/scale': 1 / 2,
    'fc_norm/scale': 1.0,
    'head/kernel': 1.0,
}


def classifier_shapes(scan: bool):
    model = videomae_model.VideoMAEClassifier(
        width=16, depth=3, heads=2, mlp_hidden=32, num_classes=5, patch=8, pos_embedding='learned', scan_layers=scan
    )
    video = jax.ShapeDtypeStruct((1, 4, 16, 16, 3), jnp.float32)
    return jax.eval_shape(lambda v: model.init(jax.random.key(0), v)['params'], video)


def flat(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep='/')


def test_layer_decay_table_unscanned():
    multipliers = flat(optim.lr_multipliers(classifier_shapes(False), optim.layer_decay_rules(3, 0.5)))
    for name, want in TABLE.items():
        assert multipliers[name] == pytest.approx(want), name
    assert all(isinstance(v, float) for v in multipliers.values())


def test_layer_decay_table_scanned_broadcasts_per_layer():
    shapes = classifier_shapes(True)
    multipliers = flat(optim.lr_multipliers(shapes, optim.layer_decay_rules(3, 0.5)))
    qkv = multipliers['encoder/blocks/attn/qkv/kernel']
    assert qkv.shape == (3, 1, 1)
    np.testing.assert_allclose(qkv.ravel(), [1 / 8, 1 / 4, 1 / 2])
    assert multipliers['encoder/blocks/norm1/scale'].shape == (3, 1)
    assert multipliers['patch_embed/proj/kernel'] == pytest.approx(1 / 16) and multipliers['head/kernel'] == 1.0
    # The multipliers scale each layer's update: one SGD-like step of the chained optimiser.
    config = ml_collections.ConfigDict(
        dict(optim=dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_grad=0.0, no_decay=(),
                        lr_rules=optim.layer_decay_rules(3, 0.5)))
    )  # fmt: skip
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    optimizer = optim.make_optimizer(config, shapes, lambda step: 1.0)
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params), params)
    step = np.asarray(flat(updates)['encoder/blocks/mlp/fc1/kernel'])[:, 0, 0]
    np.testing.assert_allclose(-step, [1 / 8, 1 / 4, 1 / 2], rtol=1e-3)  # Adam's first step is -lr * sign


def test_sequence_rule_needs_a_scanned_stack_of_that_depth():
    with pytest.raises(ValueError, match='one entry per layer'):
        optim.lr_multipliers(classifier_shapes(True), [('encoder/blocks/.*', (1.0, 0.5))])
    with pytest.raises(ValueError, match='scanned stack'):
        optim.lr_multipliers(classifier_shapes(False), [('head/.*', (1.0, 0.5))])
    assert optim.layer_decay_rules(12, 1.0) == ()


def test_finetune_config_rules_and_no_decay():
    config = load_config(FINETUNE)  # B: 12 blocks, layer decay 0.75
    rules = [tuple(rule) for rule in config.optim.lr_rules]
    shapes = jax.eval_shape(
        lambda: videomae_model.make_classifier('B', 400, scan_layers=True).init(
            jax.random.key(0), jnp.zeros((1, 16, 224, 224, 3))
        )['params']
    )
    multipliers = flat(optim.lr_multipliers(shapes, rules))
    np.testing.assert_allclose(multipliers['encoder/blocks/attn/proj/kernel'].ravel(), 0.75 ** (12 - np.arange(12)))
    assert multipliers['patch_embed/proj/kernel'] == pytest.approx(0.75**13)
    mask = flat(optim.decay_mask(shapes, [(p, True) for p in config.optim.no_decay]))
    assert mask['encoder/blocks/attn/qkv/kernel'] and mask['head/kernel']
    assert not mask['head/bias'] and not mask['encoder/blocks/attn/q_bias'] and not mask['fc_norm/scale']
    assert load_config(f'{FINETUNE}:layer_decay=0.5').optim.lr_rules[0][1] == pytest.approx(0.5**13)
    assert load_config(f'{FINETUNE}:variant=L,recipe=ssv2').optim.lr_rules[0][1] == pytest.approx(0.75**25)


def test_variant_override_with_stale_rules_is_an_error():
    with pytest.raises(ConfigError, match='variant='):
        load_config(FINETUNE, ['model.variant=L'])


def test_reference_recipes():
    b = load_config(FINETUNE)
    assert (b.optim.base_lr, b.input.global_batch, b.optim.epochs, b.model.drop_path_rate) == (7e-4, 512, 90, 0.1)
    assert (b.optim.b2, b.optim.min_lr, b.optim.weight_decay, b.optim.warmup_epochs) == (0.999, 1e-6, 0.05, 5)
    assert (b.eval.num_clips, b.eval.num_crops, b.input.num_sample, b.augment.flip) == (5, 3, 2, True)
    ssv2 = load_config(f'{FINETUNE}:recipe=ssv2')
    assert (ssv2.optim.base_lr, ssv2.model.num_classes, ssv2.eval.num_clips) == (2e-3, 174, 2)
    assert ssv2.augment.flip is False and ssv2.input.temporal_sampling == 'segments'
    g = load_config(f'{FINETUNE}:variant=g,recipe=k710')
    assert (g.optim.weight_decay, g.model.drop_path_rate, g.optim.clip_grad, g.model.num_classes) == (
        0.1,
        0.3,
        5.0,
        710,
    )
