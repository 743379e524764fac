"""`init_from` + `init_from_select`: the encoder of a pretraining params directory or workdir, the head left fresh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxssl import checkpoint, params_io, train
from jaxssl.config import ConfigError
from jaxssl.convert.videomae import resample_pos_embed
from jaxssl.models import videomae as videomae_model

ENCODER = ('patch_embed/.*', 'pos_embed/.*', 'encoder/.*')
VIDEO = jnp.zeros((1, 4, 16, 16, 3))


def flat(tree):
    return traverse_util.flatten_dict(tree, sep='/')


def random_params(shapes, seed=0):
    """Random numpy params of the given shapes (no compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def classifier_shapes(**overrides):
    model = videomae_model.make_classifier('micro/8', 5, **overrides)
    return jax.eval_shape(lambda: model.init(jax.random.key(1), VIDEO)['params'])


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A micro pretraining model's params, saved as a params directory and as a training workdir's checkpoint."""
    model = videomae_model.make_pretrain_model('micro/8')
    idx = jnp.zeros((1, 4), jnp.int32)
    params = random_params(jax.eval_shape(lambda: model.init(jax.random.key(0), VIDEO, idx, idx)['params']))
    root = tmp_path_factory.mktemp('init_from')
    params_io.save_params(root / 'params', params, {'kind': 'pretrain', 'variant': 'micro/8'})
    ckpt = checkpoint.Checkpointer(str(root / 'workdir'), keep=2, async_save=False)
    opt_like = jax.tree.map(np.zeros_like, params)
    for step in (1, 2):  # the latest step (2) must be the one taken
        scaled = jax.tree.map(lambda x, s=step: x * np.float32(s), params)
        state = {'step': np.int32(step), 'params': scaled, 'opt': opt_like}
        ckpt.save(step, state, force=True)
    ckpt.close()
    return params, root


def test_encoder_taken_head_and_norm_left_out(pretrained):
    params, root = pretrained
    loaded, metadata, notes = params_io.load_selected(root / 'params', classifier_shapes(), ENCODER)
    stored = flat(params)
    assert metadata['kind'] == 'pretrain' and notes == []
    assert not any(name.startswith(('head', 'fc_norm')) for name in loaded)
    encoder = [n for n in stored if n.startswith(('patch_embed', 'encoder/block'))]
    assert sorted(loaded) == sorted(encoder)  # encoder/norm, decoder, mask_token: not in the target, ignored
    for name in encoder:
        np.testing.assert_array_equal(loaded[name], stored[name])


def test_scanned_target_from_a_workdir_takes_the_latest_checkpoint(pretrained):
    params, root = pretrained
    loaded, metadata, _ = params_io.load_selected(root / 'workdir', classifier_shapes(scan_layers=True), ENCODER)
    assert 'step 2' in metadata['source']
    stored = flat(params)
    want = np.stack([stored[f'encoder/block_{i:02d}/mlp/fc1/kernel'] for i in range(2)]) * 2
    np.testing.assert_array_equal(loaded['encoder/blocks/mlp/fc1/kernel'], want)


def test_errors_list_what_does_not_fit(pretrained):
    _, root = pretrained
    wide = jax.eval_shape(
        lambda: videomae_model.VideoMAEClassifier(
            width=32, depth=2, heads=2, mlp_hidden=64, num_classes=5, patch=8
        ).init(jax.random.key(0), VIDEO)['params']
    )
    with pytest.raises(
        ValueError, match=r'shape mismatch \d+: encoder/block_00/attn/proj/bias: stored \(64,\), wanted \(32,\)'
    ):
        params_io.load_selected(root / 'params', wide, ENCODER)
    with pytest.raises(ValueError, match='missing 2: head/bias, head/kernel'):
        params_io.load_selected(root / 'params', classifier_shapes(), (*ENCODER, 'head/.*'))
    with pytest.raises(ValueError, match=r'missing 4: .*not in the target \d+: decoder'):
        params_io.load_selected(root / 'params', classifier_shapes())  # the default '.*' asks for an exact fit


class _Writer:
    def __init__(self):
        self.lines = []

    def print(self, text):
        self.lines.append(text)


def test_trainer_merges_selected_params_and_reports(pretrained):
    params, root = pretrained
    fresh = jax.tree.map(jnp.asarray, random_params(classifier_shapes(), seed=7))
    state = {'params': fresh, 'step': jnp.zeros((), jnp.int32)}
    shardings = jax.tree.map(lambda x: x.sharding, state)
    writer = _Writer()
    out = train._load_initial_params(str(root / 'workdir'), state, shardings, writer, ENCODER)
    got, stored = flat(jax.device_get(out['params'])), flat(params)
    np.testing.assert_array_equal(
        got['encoder/block_01/attn/qkv/kernel'], 2 * stored['encoder/block_01/attn/qkv/kernel']
    )
    np.testing.assert_array_equal(got['head/kernel'], np.asarray(flat(fresh)['head/kernel']))  # fresh head
    assert 'fresh: fc_norm/bias, fc_norm/scale, head/bias, head/kernel' in writer.lines[0]
    with pytest.raises(ConfigError) as err:
        train._load_initial_params(str(root / 'nowhere'), state, shardings, writer, ENCODER)
    assert "'init_from'" in str(err.value) and '\n' not in str(err.value)


def test_learned_position_table_is_resampled(tmp_path):
    source = videomae_model.make_classifier('micro/8', 5, pos_embedding='learned')
    params = random_params(
        jax.eval_shape(lambda: source.init(jax.random.key(0), jnp.zeros((1, 8, 32, 32, 3)))['params'])
    )
    meta = {'kind': 'classifier', 'variant': 'micro/8', 'frames': 8, 'image_size': 32, 'patch': 8, 'tubelet': 2}
    params_io.save_params(tmp_path / 'p', params, meta)
    target = videomae_model.make_classifier('micro/8', 5, pos_embedding='learned')
    shapes = jax.eval_shape(lambda: target.init(jax.random.key(0), jnp.zeros((1, 8, 48, 48, 3)))['params'])
    loaded, _, notes = params_io.load_selected(tmp_path / 'p', shapes, ENCODER)
    want = resample_pos_embed(params['pos_embed']['pos_embed'], (4, 4, 4), (4, 6, 6))
    np.testing.assert_allclose(loaded['pos_embed/pos_embed'], want, rtol=1e-6)
    assert loaded['pos_embed/pos_embed'].shape == (1, 144, 64) and 'resampled' in notes[0]
