"""Global / local contrastive pretraining (Chaitanya et al. 2020): the losses against loop transcriptions of the
reference's (krishnabits001/domain_specific_cl models.py), its regions, masks, UNet, data and augmentations, the
Dice measures, config errors, and the two stages on the trainer (sharded = one device) with the fine-tuning
evaluation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxssl import params_io
from jaxssl.config import ConfigError, load_config
from jaxssl.data import phantoms, slices
from jaxssl.data.decode import DecodeError
from jaxssl.methods import _segmentation as segmentation
from jaxssl.methods import global_local as gl
from jaxssl.models import unet
from tests.sharded_runs import run

SPEC = 'configs/global_local.py:runlocal'


def reference_term(s, anchor, positive, negatives):
    """One term of the reference's loss, written out: -log(e^s_ap / (e^s_ap + sum_n e^s_an))."""
    return -np.log(
        np.exp(s[anchor, positive]) / (np.exp(s[anchor, positive]) + sum(np.exp(s[anchor, n]) for n in negatives))
    )


def cosine_logits(z, temperature=0.1):
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    return z @ z.T / temperature


def test_gd_minus_loss_equals_the_reference_loop():
    """G^{D-} (models.py global_loss_exp_no 1) on the reference's 3 volumes x 4 partitions: its batch is [raw(12) |
    aug1(12) | aug2(12)] with raw index 4 vol + partition; ours is volume-major. Same loss on the same images."""
    rng = np.random.default_rng(0)
    ours = rng.normal(size=(3, 3, 4, 16))  # (volume, view, partition, dim)
    reference = ours.transpose(1, 0, 2, 3).reshape(36, 16)  # view-major
    s = cosine_logits(reference)
    total = 0.0
    for p in range(12):
        negatives = [n for n in range(36) if n % 4 != p % 4]
        for a, b in itertools.permutations((p, 12 + p, 24 + p), 2):
            total += reference_term(s, a, b, negatives)
    positives, negatives = gl.global_pairs(3, 'gd_minus', 4)
    assert positives.sum() == 72
    got = gl.pair_contrastive_loss(jnp.asarray(ours.reshape(36, 16)), positives, negatives, 0.1)
    np.testing.assert_allclose(got, total / 36, rtol=1e-5)


def test_gd_loss_equals_the_reference_loop():
    """G^D (exp 2) with the reference's 12 partition slices x 4 = 48 images, all real: its loop over anchors p with
    p % 8 < 4 pairs p with p + 4, p + 8 and p + 12 (mod 48) in the layout [vol raw | vol aug | next vol raw | next
    vol aug | ...], ours for 6 volumes x (raw, aug) x 4 partitions; the sum of its 192 terms / 48."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(48, 16))
    s = cosine_logits(z)
    total, terms = 0.0, []
    for p in range(48):
        if p % 8 >= 4:
            continue
        i1, i2, i3, i4 = p, (p + 4) % 48, (p + 8) % 48, (p + 12) % 48
        negatives = [n for n in range(48) if n % 4 != p % 4]
        for a, b in ((i1, i2), (i1, i3), (i3, i4), (i2, i4)):
            total += reference_term(s, a, b, negatives) + reference_term(s, b, a, negatives)
            terms += [(a, b), (b, a)]
    positives, negatives = gl.global_pairs(6, 'gd', 4)
    assert positives.sum() == len(terms) == 192 and len(set(terms)) == 144  # the raw-aug pairs come twice
    np.testing.assert_array_equal(negatives, np.arange(48)[:, None] % 4 != np.arange(48)[None] % 4)
    got = gl.pair_contrastive_loss(jnp.asarray(z), positives, negatives, 0.1)
    np.testing.assert_allclose(got, total / 48, rtol=1e-5)


def test_gr_is_nt_xent():
    """G^R: the two views of a slice are the only positives and every other image is a negative: the loss is
    SimCLR's NT-Xent (mean over the 2N anchors)."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 2, 3, 8))  # (volume, view, partition, dim): 6 slices, 12 images
    flat = z.reshape(12, 8)
    s = cosine_logits(flat)
    positives, negatives = gl.global_pairs(2, 'gr', 3)
    want = []
    for a in range(12):
        b = next(j for j in range(12) if positives[a, j])
        want.append(-s[a, b] + np.log(np.sum(np.exp(np.delete(s[a], a)))))
    np.testing.assert_allclose(gl.pair_contrastive_loss(jnp.asarray(flat), positives, negatives, 0.1), np.mean(want),
                               rtol=1e-5)  # fmt: skip


def test_regions_are_the_references_on_its_48_px_map():
    corners = gl.region_corners(48)
    assert corners.shape == (17, 2)
    anchors = [(0, 0), (0, 22), (0, 44), (22, 0), (22, 22), (22, 44), (44, 0), (44, 22), (44, 44), (11, 11), (11, 33),
               (33, 11), (33, 33)]  # fmt: skip
    assert [tuple(c) for c in corners[:13]] == anchors
    # models.py's 13 hand-written lists of negative regions (3 x 3 regions, im = 44), in its order.
    reference = [
        [(0, 22), (11, 11), (11, 22), (22, 0), (22, 11)], [(0, 0), (0, 44), (11, 11), (11, 33), (22, 22)],
        [(0, 22), (11, 22), (11, 33), (22, 33), (22, 44)], [(0, 0), (11, 11), (22, 22), (44, 0), (33, 11)],
        [(11, 11), (11, 33), (33, 11), (33, 33), (22, 0)], [(0, 44), (22, 22), (44, 44), (11, 33), (33, 33)],
        [(22, 0), (22, 11), (44, 22), (33, 11), (33, 22)], [(22, 22), (44, 0), (44, 44), (33, 11), (33, 33)],
        [(22, 33), (22, 44), (44, 22), (33, 33), (33, 22)], [(0, 0), (0, 22), (22, 0), (22, 22), (11, 33)],
        [(0, 22), (0, 44), (11, 11), (22, 22), (22, 44)], [(22, 0), (22, 22), (44, 0), (44, 22), (33, 33)],
        [(22, 22), (22, 44), (44, 22), (44, 44), (33, 11)],
    ]  # fmt: skip
    got = [[tuple(corners[gl.REGIONS.index(q)]) for q in row] for row in gl.NEGATIVES]
    assert got == reference


def test_local_loss_equals_the_reference_loop():
    """L^R (local_loss_exp_no 0): for each slice's two views (a, a'), both directions and each anchor region r:
    -log(e^s(a_r, a'_r) / (e^s(a_r, a'_r) + sum over r's 5 negative regions m of e^s(a_r, a_m) + e^s(a_r, a'_m))),
    averaged over the anchors and the 13 regions."""
    rng = np.random.default_rng(2)
    regions = rng.normal(size=(3, 2, 17, 8))
    terms = []
    for b, v, r in itertools.product(range(3), range(2), range(13)):
        z = regions[b] / np.linalg.norm(regions[b], axis=-1, keepdims=True) / np.sqrt(0.1)
        pos = z[v, r] @ z[1 - v, r]
        negs = [z[v, r] @ z[w, gl.REGIONS.index(q)] for q in gl.NEGATIVES[r] for w in (0, 1)]
        terms.append(-np.log(np.exp(pos) / (np.exp(pos) + np.sum(np.exp(negs)))))
    np.testing.assert_allclose(gl.local_contrastive_loss(jnp.asarray(regions), 0.1), np.mean(terms), rtol=1e-5)


def test_unet_shapes_and_shared_decoder_names():
    """The reference's UNet on 192 px: a 6 x 6 x 128 bottleneck, g1 on its 4,608 values, the third decoder
    block's map 48 x 48 x 64; the 3-block decoder's params are the full decoder's first blocks, by name."""
    channels = (16, 32, 64, 128, 128, 128)
    images = jax.ShapeDtypeStruct((2, 192, 192, 1), jnp.float32)
    encoder = unet.UNetEncoder(channels)
    variables = jax.eval_shape(encoder.init, jax.random.key(0), images)
    bottleneck, skips = jax.eval_shape(encoder.apply, variables, images)
    assert bottleneck.shape == (2, 6, 6, 128) and [s.shape[1] for s in skips] == [192, 96, 48, 24, 12]
    head = jax.eval_shape(unet.GlobalHead().init, jax.random.key(0), bottleneck)
    assert head['params']['hidden']['kernel'].shape == (4608, 1024) and 'bias' not in head['params']['hidden']
    partial, full = unet.UNetDecoder(channels, 3), unet.UNetDecoder(channels)
    partial_vars = jax.eval_shape(partial.init, jax.random.key(0), bottleneck, skips)
    assert jax.eval_shape(partial.apply, partial_vars, bottleneck, skips).shape == (2, 48, 48, 64)
    full_vars = jax.eval_shape(full.init, jax.random.key(0), bottleneck, skips)
    assert jax.eval_shape(full.apply, full_vars, bottleneck, skips).shape == (2, 192, 192, 16)
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    for name, value in partial_vars['params'].items():
        assert shapes(full_vars['params'][name]) == shapes(value)
    assert 'block4_b' not in full_vars['params']  # the last block has a single conv
    assert gl.local_map_size(load_config('configs/global_local.py')) == 48


def test_dice_measures_known_answers():
    targets = np.zeros((1, 2, 2, 2), np.float32)
    targets[0, :, :, 0] = 1  # all background
    logits = jnp.asarray(np.log(np.stack([np.full((1, 2, 2), 0.75), np.full((1, 2, 2), 0.25)], -1)))
    # Background: 2 x 3 / (3 + 4) = 6/7; class 1: 0 / (1 + 0) = 0.
    np.testing.assert_allclose(segmentation.dice_loss(logits, jnp.asarray(targets)), 1 - (6 / 7 + 0) / 2, rtol=1e-5)
    prediction, label = np.array([[0, 1, 1, 2]]), np.array([[0, 1, 2, 2]])
    np.testing.assert_allclose(segmentation.foreground_dice(prediction, label, 4), [2 / 3, 2 / 3, 1.0])  # 3: absent


def test_partitions_crop_and_intensity():
    rng = np.random.default_rng(0)
    draws = np.array([slices.partition_slices(10, 4, rng) for _ in range(200)])
    for k in range(4):  # floor(10 / 4) = 2 slices each; the last two slices are never drawn
        assert set(draws[:, k]) == {2 * k, 2 * k + 1}
    with pytest.raises(DecodeError):
        slices.partition_slices(3, 4, rng)
    image = np.tile(np.arange(192, dtype=np.float64), (192, 1))  # value = column
    crop = slices.random_crop(image, rng)
    assert crop.shape == (192, 192)
    left, right = crop[0, 0], crop[0, -1]  # a 100 px window starting in [10, 70)
    assert 10 - 1 <= left < 70 and 99 - 1 <= right - left <= 100
    jitter = lambda x: slices.intensity(x, rng, brightness=0.3, contrast=(0.7, 1.3), clip=(0.0, 1.5))
    flat = np.array([jitter(np.full((4, 4), 0.5)) for _ in range(200)])  # brightness only: the contrast keeps it
    assert 0.2 <= flat.min() and flat.max() <= 0.8 and flat.std() > 0.1
    ramp = np.linspace(0.4, 0.6, 16).reshape(4, 4)  # never clipped: contrast about the shifted mean
    outs = [jitter(ramp) for _ in range(200)]
    ratios = np.array([out.std() / ramp.std() for out in outs])
    assert 0.7 - 1e-6 <= ratios.min() < 0.75 and 1.25 < ratios.max() <= 1.3 + 1e-6
    shifts = np.array([out.mean() - ramp.mean() for out in outs])
    assert -0.3 <= shifts.min() < -0.25 and 0.25 < shifts.max() <= 0.3
    assert jitter(np.full((2, 2), 3.0)).max() == 1.5  # clipped


def test_finetune_augmentation_keeps_labels_a_distribution():
    rng = np.random.default_rng(0)
    record = phantoms.PhantomSource('val', 48)[0]
    image, label = record['image'][0], record['label'][0]
    for _ in range(20):
        warped, soft = slices.finetune_augment(image, label, 4, rng)
        assert warped.shape == (48, 48) and soft.shape == (48, 48, 4)
        np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-5)
        assert soft[..., 3].sum() > 0.5 * (label == 3).sum()  # the LV stays in view


def test_phantoms_are_deterministic_and_labelled():
    a, b = phantoms.PhantomSource('train', 48)[3], phantoms.PhantomSource('train', 48)[3]
    np.testing.assert_array_equal(a['image'], b['image'])
    assert 8 <= len(a['image']) <= 14 and a['label'].shape == a['image'].shape
    assert set(np.unique(a['label'])) == {0, 1, 2, 3}  # the base shows every class
    assert set(np.unique(a['label'][-1])) == {0, 2, 3}  # the apex has no RV
    p1, p99 = np.percentile(a['image'], [1, 99])
    np.testing.assert_allclose([p1, p99], [0, 1], atol=1e-5)


def test_examples_follow_the_variant():
    config = load_config(SPEC)
    method = gl.Method(config)
    rng = np.random.default_rng(0)
    volume = slices.decode_volume(phantoms.PhantomSource('train', 48)[0], 48)
    example = method.view(volume, rng)['image']
    assert example.shape == (2, 4, 48, 48, 1)
    depth = len(volume[0])
    raw = example[0, :, :, :, 0]
    matches = [[np.array_equal(raw[k], volume[0][z]) for z in range(depth)] for k in range(4)]
    for k, row in enumerate(matches):  # the raw view is an unaugmented slice of partition k
        m = depth // 4
        assert any(row[k * m : (k + 1) * m])
    batch = next(iter(method.dataset(0, 0, 1)[0]))
    assert batch['image'].shape == (8, 2, 4, 48, 48, 1)
    gr = gl.Method(load_config(SPEC, ['loss.variant=gr']))  # one uniformly drawn slice per example
    assert gr.view(volume, rng)['image'].shape == (2, 1, 48, 48, 1)
    minus = gl.Method(load_config(SPEC, ['loss.variant=gd_minus']))
    example = minus.view(volume, rng)['image']
    assert example.shape == (3, 4, 48, 48, 1) and not np.array_equal(example[1], example[2])


def test_batch_sizes_follow_the_variant_and_the_lr_stays_the_references():
    """The reference's batches (G^D 6 volumes, G^{D-} 3, G^R 12 slices, local 10 slices), and Adam at 1e-3 whatever
    the batch (the trainer's lr is base_lr x global_batch / 256)."""
    from jaxssl import optim

    for arg, batch in (('', 6), (':variant=gd_minus', 3), (':variant=gr', 12), (':stage=local', 10)):
        config = load_config('configs/global_local.py' + arg, ['pretrained=x'] if 'local' in arg else [])
        assert config.input.global_batch == batch
        np.testing.assert_allclose(optim.peak_learning_rate(config), 1e-3)
    config = load_config(SPEC, ['input.global_batch=3', 'mesh.data=1'])
    np.testing.assert_allclose(optim.peak_learning_rate(config), 1e-3)


def test_folder_volumes_skip_bad_files(tmp_path):
    root = tmp_path / 'train'
    root.mkdir()
    image = np.random.default_rng(0).uniform(size=(9, 40, 56)).astype(np.float32)
    np.savez(root / 'a.npz', image=image, label=np.zeros((9, 40, 56), np.int32))
    (root / 'b.npz').write_bytes(b'not a zip file')
    np.savez(root / 'c.npz', image=np.zeros((40, 56)))  # 2-D
    source = slices.VolumeFolderSource(str(root))
    got, label = slices.decode_volume(source[0], 48)
    assert got.shape == (9, 48, 48) and label.shape == (9, 48, 48)
    np.testing.assert_array_equal(got[:, 4:44, :], slices.crop_or_pad(phantoms.normalize_volume(image), 48)[:, 4:44])
    assert np.all(got[:, :4] == 0)  # zero padded rows, cropped columns
    for record in (source[1], source[2]):
        with pytest.raises(DecodeError):
            slices.decode_volume(record, 48)


def test_config_errors_name_the_key():
    for overrides, key in (
        (['loss.variant=xx'], r'loss\.variant'),
        (['model.channels=(8,16,32,32,32,32)'], r'input\.image_size'),
        (['loss.decoder_blocks=9'], r'loss\.decoder_blocks'),
        (['loss.decoder_blocks=1'], r'loss\.decoder_blocks'),  # a 6 px map
        (['loss.partitions=1'], r'loss\.partitions'),
        (['input.global_batch=1', 'mesh.data=1'], r'input\.global_batch'),
        (['eval.labelled_volumes=0'], r'eval\.labelled_volumes'),
        (['input.dataset=folder'], r'input\.data_root'),
    ):
        with pytest.raises(ConfigError, match=key):
            method = gl.Method(load_config(SPEC, overrides))
            method.dataset(0, 0, 1)
    with pytest.raises(ConfigError, match='pretrained'):
        load_config(SPEC + ',stage=local')


SMALL_FINETUNE = ('eval.finetune_steps=3', 'eval.test_volumes=2', 'eval.labelled_volumes=1')


def assert_gradients_sharded_equal_one_devices(method, batch, extra):
    """d loss / d params on `batch` split over the 8 devices equals one device's, to float32 rounding of the
    first convolutions' gradients (sums over every pixel of the batch, 3e-5 of the largest gradient): a sharding
    mistake (per-device BatchNorm statistics, negatives or pairs within a device) changes them by far more. The
    convolutions' biases feed BatchNorm, which removes them: their gradients are zero up to rounding, checked so."""
    params, _ = method.init(jax.random.key(0), batch)
    grad = jax.jit(jax.grad(lambda p, b: method.loss(p, extra, b, jax.random.key(1), 0)[0]))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    sharded = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
    one, eight = (traverse_util.flatten_dict(jax.device_get(grad(params, b)), sep='/') for b in (batch, sharded))
    scale = max(np.abs(g).max() for g in one.values())
    for name, want in one.items():
        if name.endswith('conv/bias'):
            assert np.abs(want).max() < 1e-4 * scale and np.abs(eight[name]).max() < 1e-4 * scale, name
        else:
            np.testing.assert_allclose(eight[name], want, rtol=1e-3, atol=1e-4 * scale, err_msg=name)


@pytest.mark.slow
def test_both_stages_shard_their_gradients_train_and_finetune(tmp_path):
    """Each stage's gradients on a real batch over 8 devices = one device's; the global stage trains on 8 devices
    and its evaluation fine-tunes from the pretrained weights and from a random init, reporting Dice per class; the
    local stage trains from it with its encoder frozen."""
    summary, _, rows = run(SPEC, tmp_path / 'global', 'mesh.data=8', *SMALL_FINETUNE)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert 0 <= summary['final_eval/pretrained/dice'] <= 1
    assert {'random_init/dice/rv', 'pretrained/dice/lv'} <= {k.removeprefix('final_eval/') for k in summary}
    method = gl.Method(load_config(SPEC))
    batch = jax.tree.map(jnp.asarray, next(iter(method.dataset(0, 0, 1)[0])))
    assert_gradients_sharded_equal_one_devices(method, {'image': batch['image']}, {})

    pretrained = str(tmp_path / 'global')
    # (Its evaluation is the global stage's with more pretrained weights: not repeated here.)
    local_summary, state, rows = run(SPEC + ',stage=local', tmp_path / 'local', f'pretrained={pretrained}',
                                     'mesh.data=8', 'eval.at_end=false')  # fmt: skip
    assert local_summary['nonfinite_steps'] == 0 and set(state['params']) == {'decoder', 'local_head'}
    assert rows[0]['loss'] < np.log(11) + 0.5  # near chance (1 positive against 10 negatives) at the start
    # The frozen encoder is the global run's last one, unchanged by the local stage.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {'encoder': state['extra']['encoder']})
    stored, _, _ = params_io.load_selected(pretrained, shapes, ('encoder/.*',))
    for name, value in stored.items():
        np.testing.assert_array_equal(value, traverse_util.flatten_dict(state['extra'], sep='/')[name])
    local = gl.Method(load_config(SPEC + ',stage=local', [f'pretrained={pretrained}']))
    starts = local.pretrained_variables(state['params'], state['extra'])  # what its fine-tuning starts from
    assert starts['encoder'] is state['extra']['encoder'] and set(starts['decoder']) == {
        'block0_up',
        'block0_a',
        'block0_b',
        'block1_up',
        'block1_a',
        'block1_b',
        'block2_up',
        'block2_a',
        'block2_b',
    }
    volume = slices.decode_volume(phantoms.PhantomSource('train', 48)[0], 48)
    views = local.view(volume, np.random.default_rng(0))['image']
    assert views.shape == (2, 1, 48, 48, 1) and not np.array_equal(views[0], views[1])
    np.testing.assert_allclose(views[0].std(), views[1].std(), rtol=0.5)  # intensity only: the same geometry
    local_batch = jax.tree.map(jnp.asarray, next(iter(local.dataset(0, 0, 1)[0])))
    assert_gradients_sharded_equal_one_devices(local, {'image': local_batch['image']}, state['extra'])
    with pytest.raises(ConfigError, match='pretrained'):  # a local run is not a global stage
        gl.Method(load_config(SPEC + ',stage=local', [f'pretrained={tmp_path / "local"}']))


def test_finetuning_starts_from_the_pretrained_weights_and_recalibrates():
    """One fine-tuning step from given encoder / decoder weights moves each by at most the lr (Adam); the head is
    fresh; the recomputed BatchNorm averages are the labelled slices' statistics, so the network's outputs in
    evaluation mode on those slices equal its outputs with batch statistics."""
    config = load_config(SPEC, ['eval.finetune_steps=1', 'model.channels=(4,8)', 'loss.decoder_blocks=1',
                                'input.image_size=32'])  # fmt: skip
    method = gl.Method(config)
    volumes = [slices.decode_volume(phantoms.PhantomSource('val', 32)[0], 32)]
    fresh = method.segmenter.init(jax.random.key(5), jnp.zeros((1, 32, 32, 1)))
    pretrained = {
        'encoder': jax.tree.map(lambda x: x + 1.0, fresh['encoder']['params']),
        'decoder': {'block0_up': jax.tree.map(lambda x: x - 1.0, fresh['decoder']['params']['block0_up'])},
    }
    tuned = method.finetune(pretrained, volumes, seed=0)
    flat = lambda tree: traverse_util.flatten_dict(tree, sep='/')
    for name, tree in (('encoder', pretrained['encoder']), ('decoder', pretrained['decoder'])):
        for key, value in flat(tree).items():
            assert np.abs(flat(tuned[name]['params'])[key] - value).max() <= 1.01e-3, (name, key)
    assert 'block0_a' in tuned['decoder']['params'] and 'logits' in tuned['head']['params']
    images = jnp.asarray(volumes[0][0][..., None])
    evaluation, _ = method.segmenter.apply(tuned, images, train=False)
    training, _ = method.segmenter.apply(tuned, images, train=True)
    np.testing.assert_allclose(evaluation, training, rtol=1e-4, atol=1e-4)
