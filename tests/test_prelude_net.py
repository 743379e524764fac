"""PreludeNet: the lit-scene renderer's known answers, PredNet against a transcription of the Keras layer's step,
the decoders' causality and gradient gate, the losses and evaluation measures, the folder source, config errors,
and the method on the one trainer (one device and sharded)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharded_runs import run

from jaxssl import optim
from jaxssl.config import ConfigError, load_config
from jaxssl.data import lit_scenes
from jaxssl.data.decode import DecodeError
from jaxssl.methods import prelude_net
from jaxssl.models import prednet

CONFIG = 'configs/prelude_net.py:runlocal'
TINY = ('input.frames=3', 'input.image_size=16', 'input.global_batch=8', 'eval.scenes=4', 'eval.batch_size=2')


def lone_sphere_scene(distance: float, radius: float, pitch: float = 0.0) -> lit_scenes.Scene:
    """One sphere straight ahead of a static camera at the sphere's centre height, so the optical axis hits it."""
    return lit_scenes.Scene(
        camera_height=radius, camera_pitch=pitch, camera_x=0.0, camera_speed=0.0,
        centres=np.array([[0.0, distance]]), velocities=np.zeros((1, 2)), radii=np.array([radius]),
        albedos=np.array([[0.5, 0.5, 0.5]]), ground=np.array([[0.4, 0.4, 0.4], [0.6, 0.6, 0.6]]), tile=1.0,
    )  # fmt: skip


# --- renderer --------------------------------------------------------------------------------------------------------
def test_camera_rays_are_unit_and_centred_on_the_forward_axis():
    dirs, forward = lit_scenes.camera_rays(33, pitch=20.0)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(dirs.reshape(33, 33, 3)[16, 16], forward, atol=1e-12)
    # The middle of the top row looks up by half the field of view (relative to the axis); left of centre is -x.
    top = dirs.reshape(33, 33, 3)[0, 16]
    half = math.degrees(math.atan(16 / 33 / (0.5 / math.tan(math.radians(lit_scenes.FOV_DEGREES / 2)))))
    assert math.degrees(math.acos(top @ forward)) == pytest.approx(half, abs=1e-9)
    assert top[1] > forward[1] and dirs.reshape(33, 33, 3)[16, 0, 0] < 0


def test_depth_known_answers_sphere_ahead_and_ground():
    scene = lone_sphere_scene(distance=6.0, radius=1.0)
    out = lit_scenes.render(scene, lit_scenes.Lighting(), frames=1, size=33)
    assert out['depth'][0, 16, 16] == pytest.approx(5.0, abs=1e-9)  # the optical axis meets the sphere at D - r
    # Below the sphere the ground: z-depth = height x (d . forward) / -d_y for the pixel's ray.
    dirs, forward = lit_scenes.camera_rays(33, 0.0)
    row = 32 * 33 + 16
    want = scene.camera_height * (dirs[row] @ forward) / -dirs[row, 1]
    assert out['depth'][0, 32, 16] == pytest.approx(want, rel=1e-6) and out['valid'][0, 32, 16]
    # Above the horizon: sky, invalid, coloured with the illumination-scaled sky colour.
    assert not out['valid'][0, 0, 0] and out['depth'][0, 0, 0] == lit_scenes.FAR
    np.testing.assert_allclose(out['frames'][0, 0, 0], lit_scenes.SKY, rtol=1e-6)


def test_lighting_changes_colours_never_depth():
    scene = lit_scenes.sample_scene(lit_scenes.scene_seed('val', 3))
    renders = [lit_scenes.render(scene, light, 4, 24) for light in lit_scenes.EVAL_LIGHTINGS]
    for other in renders[1:]:
        np.testing.assert_array_equal(other['depth'], renders[0]['depth'])
        np.testing.assert_array_equal(other['valid'], renders[0]['valid'])
        assert (np.abs(other['frames'] - renders[0]['frames']) > 0.05).any(axis=-1).mean() > 0.01  # 1% of pixels
    # Illumination scales every colour below the clip: the dimmed lighting is half the reference.
    reference, dim = renders[0]['frames'], renders[1]['frames']
    np.testing.assert_allclose(dim, 0.5 * reference, atol=1e-6)


def test_shadowed_ground_keeps_only_the_ambient_light():
    scene = lone_sphere_scene(distance=6.0, radius=1.0, pitch=15.0)
    sun = dict(illumination=1.0, elevation=40.0, azimuth=0.0)  # ahead of the camera: the shadow falls toward it
    shadowed = lit_scenes.render(scene, lit_scenes.Lighting(**sun, shadows=1.0), 1, 48)
    plain = lit_scenes.render(scene, lit_scenes.Lighting(**sun, shadows=0.0), 1, 48)
    differ = np.any(shadowed['frames'] != plain['frames'], axis=-1)[0]
    assert differ.sum() > 20  # a shadow is visible
    ratio = shadowed['frames'][0][differ] / plain['frames'][0][differ]
    lit = lit_scenes.AMBIENT + (1 - lit_scenes.AMBIENT) * math.sin(math.radians(40.0))
    np.testing.assert_allclose(ratio, lit_scenes.AMBIENT / lit, rtol=1e-5)  # the ground loses exactly the sun


def test_scenes_are_fixed_by_their_seed():
    a = lit_scenes.LitSceneSource('train')[5]['scene']
    b = lit_scenes.LitSceneSource('train')[5]['scene']
    c = lit_scenes.LitSceneSource('train')[6]['scene']
    np.testing.assert_array_equal(a.centres, b.centres)
    assert not np.array_equal(a.centres, c.centres)
    assert len(lit_scenes.LitSceneSource('val')) == lit_scenes.SPLIT_SIZES['val']
    with pytest.raises(ValueError, match='unknown split'):
        lit_scenes.LitSceneSource('test')


# --- PredNet ---------------------------------------------------------------------------------------------------------
def keras_prednet(params, frames, layers):
    """A numpy transcription of coxlab/prednet's PredNet.step over a clip (channels last): (frame predictions,
    per-layer mean errors (B, T, L), the final R)."""

    def conv(x, p):
        kernel, bias = np.asarray(p['kernel'], np.float64), np.asarray(p['bias'], np.float64)
        k = kernel.shape[0] // 2
        xp = np.pad(x, ((0, 0), (k, k), (k, k), (0, 0)))
        h, w = x.shape[1:3]
        out = np.zeros((x.shape[0], h, w, kernel.shape[-1])) + bias
        for dy in range(kernel.shape[0]):
            for dx in range(kernel.shape[1]):
                out += np.einsum('bhwc,cd->bhwd', xp[:, dy : dy + h, dx : dx + w], kernel[dy, dx])
        return out

    relu = lambda x: np.maximum(x, 0.0)
    hard_sigmoid = lambda x: np.clip(0.2 * x + 0.5, 0.0, 1.0)
    up = lambda x: x.repeat(2, axis=1).repeat(2, axis=2)
    pool = lambda x: x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, x.shape[3]).max(axis=(2, 4))
    b, steps, h, w, _ = frames.shape
    enc = params['encoder']
    rs = [enc[f'gates_{level}']['kernel'].shape[-1] // 4 for level in range(layers)]
    stacks = [enc[f'ahat_{level}']['kernel'].shape[-1] for level in range(layers)]
    r = [np.zeros((b, h >> level, w >> level, rs[level])) for level in range(layers)]
    c = [np.zeros_like(x) for x in r]
    e = [np.zeros((b, h >> level, w >> level, 2 * stacks[level])) for level in range(layers)]
    predictions, errors = [], []
    for t in range(steps):
        r_up, new_r, new_c = None, [None] * layers, [None] * layers
        for level in reversed(range(layers)):
            inputs = np.concatenate([r[level], e[level]] + ([] if r_up is None else [r_up]), axis=-1)
            kernel, bias = enc[f'gates_{level}']['kernel'], enc[f'gates_{level}']['bias']
            gate = lambda g: conv(inputs, {'kernel': kernel[..., g * rs[level] : (g + 1) * rs[level]],  # noqa: B023
                                           'bias': bias[g * rs[level] : (g + 1) * rs[level]]})  # noqa: B023  # fmt: skip
            i, f, o = hard_sigmoid(gate(0)), hard_sigmoid(gate(1)), hard_sigmoid(gate(3))
            new_c[level] = f * c[level] + i * np.tanh(gate(2))
            new_r[level] = o * np.tanh(new_c[level])
            if level > 0:
                r_up = up(new_r[level])
        r, c, e = new_r, new_c, []
        a = np.asarray(frames[:, t], np.float64)
        for level in range(layers):
            ahat = relu(conv(r[level], enc[f'ahat_{level}']))
            if level == 0:
                ahat = np.minimum(ahat, 1.0)
                predictions.append(ahat)
            e.append(np.concatenate([relu(ahat - a), relu(a - ahat)], axis=-1))
            if level < layers - 1:
                a = pool(relu(conv(e[level], enc[f'a_{level}'])))
        errors.append(np.stack([x.reshape(b, -1).mean(axis=1) for x in e], axis=-1))
    return np.stack(predictions, 1), np.stack(errors, 1), r


@pytest.fixture(scope='module')
def tiny_model():
    model = prednet.PreludeNet((3, 4, 6), (3, 5, 6), (4, 4, 6))
    frames = jax.random.uniform(jax.random.key(1), (2, 4, 8, 8, 3))
    params = model.init(jax.random.key(0), frames)['params']
    # Larger weights than the Glorot init, so every gate and the clip at pixel_max matter.
    params = jax.tree.map(lambda x: 3.0 * x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape), params)
    return model, params, frames


def test_prednet_matches_a_transcription_of_the_keras_step(tiny_model):
    model, params, frames = tiny_model
    out = model.apply({'params': params}, frames, return_states=True)
    predictions, errors, r = keras_prednet(jax.device_get(params), np.asarray(frames), layers=3)
    np.testing.assert_allclose(out['prediction'], predictions, atol=1e-5)
    np.testing.assert_allclose(out['errors'], errors, atol=1e-5)
    for got, want in zip(out['r'], r, strict=True):
        np.testing.assert_allclose(got[:, -1], want, atol=1e-5)
    assert 0 < (np.asarray(out['prediction']) == 1.0).mean() < 1  # the cap at pixel_max was exercised


def test_hard_sigmoid_and_the_fused_gate_init():
    np.testing.assert_allclose(prednet.hard_sigmoid(jnp.array([-3.0, -1.0, 0.0, 1.0, 3.0])), [0, 0.3, 0.5, 0.7, 1])
    kernel = prednet.gate_init(4)(jax.random.key(0), (3, 3, 40, 4 * 64))
    bound = math.sqrt(6 / (9 * 40 + 9 * 64))  # Glorot-uniform of one gate's conv (fan_out 9 x 64, not 9 x 256)
    for block in jnp.split(kernel, 4, axis=-1):
        assert float(jnp.abs(block).max()) <= bound and float(jnp.abs(block).max()) > 0.95 * bound
    assert not np.allclose(kernel[..., :64], kernel[..., 64:128])


def test_predict_reads_only_the_past_and_infer_sees_the_present(tiny_model):
    model, params, frames = tiny_model
    changed = frames.at[:, 2].set(1.0 - frames[:, 2])
    a, b = model.apply({'params': params}, frames), model.apply({'params': params}, changed)
    np.testing.assert_array_equal(a['predict'][:, :3], b['predict'][:, :3])  # step 2's predict: frames 0, 1 only
    np.testing.assert_array_equal(a['prediction'][:, 2], b['prediction'][:, 2])
    assert np.abs(a['infer'][:, 2] - b['infer'][:, 2]).max() > 1e-4
    assert np.abs(a['predict'][:, 3] - b['predict'][:, 3]).max() > 1e-4


@pytest.mark.parametrize('scale', [0.0, 0.5, 1.0])
def test_depth_gradient_reaches_the_encoder_scaled(tiny_model, scale):
    _, params, frames = tiny_model
    model = prednet.PreludeNet((3, 4, 6), (3, 5, 6), (4, 4, 6), depth_grad_scale=scale)
    depth_loss = lambda p: model.apply({'params': p}, frames)['infer'].sum()
    full = prednet.PreludeNet((3, 4, 6), (3, 5, 6), (4, 4, 6), depth_grad_scale=1.0)
    grads = jax.grad(depth_loss)(params)
    want = jax.grad(lambda p: full.apply({'params': p}, frames)['infer'].sum())(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, scale * w, rtol=1e-4, atol=1e-6), grads['encoder'],
                 want['encoder'])  # fmt: skip
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), grads['infer'], want['infer'])


# --- losses and measures ---------------------------------------------------------------------------------------------
def test_prednet_loss_weights_steps_and_layers_as_kitti_train():
    errors = jnp.stack([jnp.full((2, 3), v) for v in (100.0, 1.0, 2.0, 3.0)], axis=1)  # (B, T=4, L=3), step 0 huge
    errors = errors * jnp.array([1.0, 10.0, 100.0])
    # Step 0 weighs 0; the others 1 / 3; layers (1, 0.1, 0): (1 + 1) x (1 + 2 + 3) / 3 = 4.
    assert float(prelude_net.prednet_loss(errors, (1.0, 0.1, 0.0))) == pytest.approx(4.0)
    np.testing.assert_allclose(prelude_net.time_weights(4), [0, 1 / 3, 1 / 3, 1 / 3])


def test_invariance_measure_known_answers():
    ref = jnp.array([[0.0, 0.0], [3.0, 4.0]])
    within, between = prelude_net.invariance(ref, ref)
    assert float(within) == 0 and float(between) == 50  # each scene against the other: 25 twice
    within, between = prelude_net.invariance(ref + jnp.array([[1.0, 0.0], [0.0, 0.0]]), ref)
    assert 1 - float(within) / float(between) == pytest.approx(0.98)


def test_step_schedule_drops_at_the_boundaries():
    schedule = optim.step_schedule(1e-3, 100, 0, (0.5, 0.75), 0.1)
    got = [float(schedule(s)) for s in (0, 49, 50, 74, 75, 99)]
    np.testing.assert_allclose(got, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-6)
    warm = optim.step_schedule(1e-3, 100, 10, (0.5,), 0.1)
    assert float(warm(5)) == pytest.approx(5e-4) and float(warm(10)) == pytest.approx(1e-3)
    for bad in ('(0.7,0.2)', '(0.5,0.5)'):
        with pytest.raises(ConfigError, match=r'optim\.step_boundaries'):
            load_config(CONFIG, [f'optim.step_boundaries={bad}'])
    with pytest.raises(ConfigError, match='runs past the first drop'):
        optim.learning_rate_schedule(load_config(CONFIG, ['optim.warmup_steps=200']), 300, 100)
    # The full recipe: 150 epochs of 125 steps, the drop after epoch 75.
    full = optim.learning_rate_schedule(load_config('configs/prelude_net.py', []), 18_750, 125)
    assert float(full(9374)) == pytest.approx(1e-3) and float(full(9375)) == pytest.approx(1e-4)


# --- data, config, method --------------------------------------------------------------------------------------------
def write_clip(path, lightings=2, frames=5, size=20, depth_fill=3.0):
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (lightings, frames, size, size, 3), dtype=np.uint8)
    depth = np.full((frames, size, size), depth_fill, np.float32)
    depth[:, :4] = np.inf  # sky rows
    np.savez(path, frames=clip, depth=depth)


def test_folder_clips_are_cropped_and_bad_files_skipped(tmp_path):
    from jaxssl import data

    for split in ('train', 'val'):
        (tmp_path / split).mkdir()
        write_clip(tmp_path / split / 'a.npz')
        write_clip(tmp_path / split / 'b.npz', lightings=1)
    (tmp_path / 'train' / 'broken.npz').write_bytes((tmp_path / 'train' / 'a.npz').read_bytes()[:300])  # truncated
    config = load_config(CONFIG, [*TINY, 'input.dataset=folder', f'input.data_root={tmp_path}', 'input.depth_scale=6'])
    clips = prelude_net.Clips(config, 'train')
    item = clips.decode(clips.source[0])
    view = clips.train_view(item, np.random.default_rng(0))
    assert view['frames'].shape == (3, 16, 16, 3) and view['frames'].max() <= 1
    np.testing.assert_allclose(view['depth'][view['valid'] > 0], 0.5)  # 3 / depth_scale 6
    assert view['valid'][:, :2].sum() == 0 and view['valid'][:, 2:].all()  # the crop starts at the file's row 2
    with pytest.raises(DecodeError, match=r'cannot read .*broken'):
        clips.decode(clips.source[2])
    method = prelude_net.Method(config)
    before = data.skipped_files()
    batch = next(iter(method.dataset(0, 0, 1)[0]))
    assert batch['frames'].shape == (8, 3, 16, 16, 3) and np.isfinite(batch['frames']).all()
    assert data.skipped_files() > before  # the truncated file was drawn, replaced and counted
    with pytest.raises(ConfigError, match='different numbers of lightings'):
        method.evaluate(None, {}, None)


def test_evaluation_known_answers_on_a_folder_with_identical_lightings(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / 'train').mkdir()
    (tmp_path / 'val').mkdir()
    depth = np.broadcast_to(2.0 + np.arange(4.0)[:, None, None], (4, 16, 16)).copy()  # 2, 3, 4, 5 over the steps
    depth[:, :2] = 0.0  # two invalid rows
    clips = []
    for name in ('c0', 'c1', 'c2'):
        once = rng.uniform(size=(1, 4, 16, 16, 3)).astype(np.float32)
        clips.append(once[0])
        np.savez(tmp_path / 'val' / f'{name}.npz', frames=np.concatenate([once, once]), depth=depth)  # K = 2, equal
    np.savez(tmp_path / 'train' / 'c0.npz', frames=clips[0], depth=depth)
    (tmp_path / 'val' / 'broken.npz').write_bytes(b'PK not really')
    overrides = [*TINY, 'input.frames=4', 'input.dataset=folder', f'input.data_root={tmp_path}', 'input.depth_scale=10']
    method = prelude_net.Method(load_config(CONFIG, [*overrides, 'eval.scenes=4']))
    params, _ = method.init(jax.random.key(0), method.example_batch(2))
    got = method.evaluate(params, {}, None)
    assert got['eval_skipped_files'] == 1
    for level in range(3):
        assert got[f'invariance/r{level}'] == 1.0  # the same frames under both "lightings"
    assert got['depth_shift_rmse/infer'] == 0 and got['depth_rmse/infer/spread'] == 0
    assert got['depth_rmse/copy_last'] == pytest.approx(1.0)  # depth grows by 1 a step
    assert got['depth_rmse/pixel_mean'] == pytest.approx(math.sqrt(1.25))  # 2..5 about their mean 3.5
    frames = np.stack(clips)
    assert got['copy_last_mse'] == pytest.approx(np.mean((frames[:, 1:] - frames[:, :-1]) ** 2), rel=1e-6)
    out = method.model.apply({'params': params}, frames)
    valid = depth > 0
    want = np.sqrt(np.mean((np.asarray(out['infer']) * 10 - depth)[:, valid] ** 2))
    assert got['depth_rmse/infer/lighting0'] == pytest.approx(want, rel=1e-5)
    want = np.sqrt(np.mean((np.asarray(out['predict'][:, 1:]) * 10 - depth[1:])[:, valid[1:]] ** 2))
    assert got['depth_rmse/predict/lighting1'] == pytest.approx(want, rel=1e-5)
    assert got['next_frame_mse'] == pytest.approx(np.mean((np.asarray(out['prediction'])[:, 1:] - frames[:, 1:]) ** 2))
    # represent: each layer's R at the last step, pooled over space, for clips with a views axis too.
    features = method.represent(params, {}, {'frames': jnp.asarray(frames[:, None])})
    out = method.model.apply({'params': params}, frames, return_states=True)
    for level, width in enumerate((3, 16, 32)):  # runlocal's R sizes
        np.testing.assert_allclose(features[f'r{level}'], out['r'][level][:, -1].mean(axis=(1, 2)), rtol=1e-6)
        assert features[f'r{level}'].shape == (3, width)


@pytest.mark.parametrize(
    'override, key',
    [
        ('model.stack_sizes=(1,4)', 'model.stack_sizes'),
        ('model.decoder_widths=(4,4)', 'model.decoder_widths'),
        ('loss.layer_weights=(1.0,)', 'loss.layer_weights'),
        ('input.image_size=18', 'input.image_size'),
        ('input.frames=1', 'input.frames'),
        ('model.depth_grad_scale=2.0', 'model.depth_grad_scale'),
        ('input.lighting=sunny', 'input.lighting'),
        ('input.dataset=folder', 'input.data_root'),
        ('eval.batch_size=1', 'eval.batch_size'),
        ('model.dtype=bf16', 'model.dtype'),
        ('input.split=test', 'input.split'),
        ('eval.split=test', 'eval.split'),
        ('loss.layer_weights=(0.0,0.0,0.0)', 'loss.layer_weights'),
    ],
)
def test_bad_config_fails_fast_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        prelude_net.check_config(load_config(CONFIG, [override]))


def test_trains_sharded_like_one_device_and_evaluates(tmp_path):
    overrides = (*TINY, 'train.steps=2', 'checkpoint.every=2', 'eval.pictures=1')
    _, want, want_rows = run(CONFIG, tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false', *overrides)
    summary, state, rows = run(CONFIG, tmp_path / 'sharded', 'mesh.data=8', *overrides)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    # Adam's first steps move a weight by ~lr whatever its gradient's size: near-zero gradients summed in another
    # order can differ by 1e-5 after two steps of lr 2e-3.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), state['params'],
                 want['params'])  # fmt: skip
    evaluation = [r for r in map(__import__('json').loads, open(tmp_path / 'sharded' / 'metrics.jsonl'))
                  if 'eval/next_frame_mse' in r][-1]  # fmt: skip
    for k in range(len(lit_scenes.EVAL_LIGHTINGS)):
        assert evaluation[f'eval/depth_rmse/infer/lighting{k}'] > 0
    assert -10 < evaluation['eval/invariance/r2'] <= 1 and evaluation['eval/copy_last_mse'] > 0
    assert 0 < evaluation['eval/depth_rmse/pixel_mean'] < lit_scenes.FAR
    assert (tmp_path / 'sharded' / 'pictures').exists()
