"""Point-MAE: FPS, grouping and Chamfer against numpy transcriptions, the whole masked forward and loss against a
torch transcription of the reference with the same weights, the built-in shapes and point files, and the runlocal
recipe sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sharded_runs import assert_sharded_matches_one_device

from jaxssl.config import ConfigError, load_config
from jaxssl.data import points as point_data
from jaxssl.data.decode import DecodeError
from jaxssl.methods import point_mae as point_mae_method
from jaxssl.models import point_mae


def reference_fps(points, num):
    """A transcription of pointnet2_ops' furthest_point_sampling_kernel for one cloud."""
    n = len(points)
    temp = np.full(n, 1e10, np.float32)
    chosen, old = [0], 0
    for _ in range(1, num):
        best, besti = -1.0, 0
        for k in range(n):
            x = points[k]
            if float(np.sum(x * x)) <= 1e-3:
                continue
            d = float(np.sum((x - points[old]) ** 2))
            temp[k] = min(d, temp[k])
            if temp[k] > best:
                best, besti = temp[k], k
        old = besti
        chosen.append(besti)
    return np.array(chosen)


def test_farthest_point_sample_equals_pointnet2():
    rng = np.random.default_rng(0)
    clouds = rng.normal(size=(3, 200, 3)).astype(np.float32)
    clouds[1, 5] = 0.01  # a point at the origin: the kernel never picks it
    clouds[1, 0] = 0.0  # the first point is picked whatever it is
    got = np.asarray(point_mae.farthest_point_sample(jnp.asarray(clouds), 17))
    for cloud, indices in zip(clouds, got, strict=True):
        np.testing.assert_array_equal(indices, reference_fps(cloud, 17))
    assert 5 not in got[1]


def test_groups_are_the_nearest_points_around_each_centre():
    rng = np.random.default_rng(1)
    cloud = rng.normal(size=(2, 100, 3)).astype(np.float32)
    neighbourhoods, centres = point_mae.group(jnp.asarray(cloud), 8, 6)
    neighbourhoods, centres = np.asarray(neighbourhoods), np.asarray(centres)
    indices = np.asarray(point_mae.farthest_point_sample(jnp.asarray(cloud), 8))
    for b in range(2):
        np.testing.assert_array_equal(centres[b], cloud[b, indices[b]])
        for g in range(8):
            distances = ((cloud[b] - centres[b, g]) ** 2).sum(axis=1)
            want = cloud[b, np.argsort(distances, kind='stable')[:6]] - centres[b, g]
            np.testing.assert_allclose(neighbourhoods[b, g], want, atol=1e-6)
    assert (neighbourhoods[:, :, 0] == 0).all()  # each centre is its own nearest point


def test_chamfer_l2_known_answer():
    p = np.array([[[0.0, 0, 0], [1, 0, 0]]], np.float32)
    q = np.array([[[0.0, 0, 0], [0, 2, 0]]], np.float32)
    # p -> q: 0 and 1 (nearest (0,0,0)), mean 0.5; q -> p: 0 and 4, mean 2
    np.testing.assert_allclose(float(point_mae.chamfer_l2(jnp.asarray(p), jnp.asarray(q))), 2.5)


def test_random_masks_partition_the_patches():
    visible, masked = point_mae_method.random_masks(jax.random.key(0), 5, 64, 0.6)
    assert visible.shape == (5, 26) and masked.shape == (5, 38)  # int(0.6 x 64) = 38 masked
    both = np.sort(np.concatenate([visible, masked], axis=1), axis=1)
    np.testing.assert_array_equal(both, np.broadcast_to(np.arange(64), (5, 64)))
    assert (np.diff(np.asarray(masked), axis=1) > 0).all()


def test_block_masks_take_the_patches_nearest_a_random_one():
    rng = np.random.default_rng(2)
    centres = jnp.asarray(rng.normal(size=(4, 20, 3)), jnp.float32)
    visible, masked = point_mae_method.block_masks(jax.random.key(0), centres, 0.6)
    assert visible.shape == (4, 8) and masked.shape == (4, 12)
    for c, v, m in zip(np.asarray(centres), np.asarray(visible), np.asarray(masked), strict=True):
        seeds = [i for i in m if np.linalg.norm(c[m] - c[i], axis=1).max() <= np.linalg.norm(c[v] - c[i], axis=1).min()]
        assert seeds  # some masked patch has every masked centre nearer than every visible one: the seed
    config = load_config('configs/point_mae.py:runlocal', ['mask.type=block'])
    method = point_mae_method.Method(config)
    batch = jax.tree.map(jnp.asarray, method.example_batch(2))
    params, extra = method.init(jax.random.key(0), batch)
    loss, _ = jax.jit(method.loss)(params, extra, batch, jax.random.key(1), 0)
    assert np.isfinite(float(loss))


# --- the model against a torch transcription of models/Point_MAE.py ---------------------------------------------------
class TorchBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TorchPointMAE(torch.nn.Module):
    """Point_MAE.forward after the grouping, drop path 0, with a given mask; returns the Chamfer-L2 loss."""

    def __init__(self, width, depth, heads, decoder_depth, group_size, dims=(128, 256, 512)):
        super().__init__()
        conv, (a, b, c) = torch.nn.Conv1d, dims
        self.first_conv = torch.nn.Sequential(conv(3, a, 1), torch.nn.BatchNorm1d(a), torch.nn.ReLU(), conv(a, b, 1))
        self.second_conv = torch.nn.Sequential(conv(2 * b, c, 1), torch.nn.BatchNorm1d(c), torch.nn.ReLU(),
                                               conv(c, width, 1))  # fmt: skip
        mlp = lambda: torch.nn.Sequential(torch.nn.Linear(3, 128), torch.nn.GELU(), torch.nn.Linear(128, width))
        self.pos_embed, self.decoder_pos_embed = mlp(), mlp()
        self.blocks = torch.nn.ModuleList([TorchBlock(width, heads) for _ in range(depth)])
        self.decoder = torch.nn.ModuleList([TorchBlock(width, heads) for _ in range(decoder_depth)])
        self.norm, self.decoder_norm = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.increase_dim = conv(width, 3 * group_size, 1)
        self.width = width

    def forward(self, neighborhood, center, mask):
        bs, g, n, _ = neighborhood.shape
        feature = self.first_conv(neighborhood.reshape(bs * g, n, 3).transpose(2, 1))
        feature = torch.cat([torch.max(feature, dim=2, keepdim=True)[0].expand(-1, -1, n), feature], dim=1)
        tokens = torch.max(self.second_conv(feature), dim=2)[0].reshape(bs, g, self.width)
        x_vis = tokens[~mask].reshape(bs, -1, self.width)
        pos = self.pos_embed(center[~mask].reshape(bs, -1, 3))
        for block in self.blocks:
            x_vis = block(x_vis + pos)
        x_vis = self.norm(x_vis)
        pos_vis = self.decoder_pos_embed(center[~mask]).reshape(bs, -1, self.width)
        pos_mask = self.decoder_pos_embed(center[mask]).reshape(bs, -1, self.width)
        m = pos_mask.shape[1]
        x = torch.cat([x_vis, self.mask_token.expand(bs, m, -1)], dim=1)
        pos = torch.cat([pos_vis, pos_mask], dim=1)
        for block in self.decoder:
            x = block(x + pos)
        x = self.decoder_norm(x[:, -m:])
        rebuilt = self.increase_dim(x.transpose(1, 2)).transpose(1, 2).reshape(bs * m, -1, 3)
        target = neighborhood[mask].reshape(bs * m, -1, 3)
        d = ((rebuilt[:, :, None] - target[:, None]) ** 2).sum(-1)
        return d.min(2)[0].mean() + d.min(1)[0].mean()


def load_into_torch(model, params, stats):
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    conv = lambda module, dense: (
        module.weight.copy_(t(dense['kernel']).T[..., None]),
        module.bias.copy_(t(dense['bias'])),
    )
    linear = lambda module, dense: (module.weight.copy_(t(dense['kernel']).T), module.bias.copy_(t(dense['bias'])))

    def norm(module, p, s=None):
        module.weight.copy_(t(p['scale']))
        module.bias.copy_(t(p['bias']))
        if s is not None:
            module.running_mean.copy_(t(s['mean']))
            module.running_var.copy_(t(s['var']))

    def blocks(modules, p):
        for i, block in enumerate(modules):
            q = p[f'blocks_{i}']
            norm(block.norm1, q['norm1'])
            norm(block.norm2, q['norm2'])
            block.qkv.weight.copy_(t(q['attn']['qkv']['kernel']).T)
            linear(block.proj, q['attn']['proj'])
            linear(block.fc1, q['mlp']['fc1'])
            linear(block.fc2, q['mlp']['fc2'])

    with torch.no_grad():
        e = params['encoder']
        conv(model.first_conv[0], e['first_conv_0'])
        norm(model.first_conv[1], e['first_conv_1'], stats['encoder']['first_conv_1'])
        conv(model.first_conv[3], e['first_conv_3'])
        conv(model.second_conv[0], e['second_conv_0'])
        norm(model.second_conv[1], e['second_conv_1'], stats['encoder']['second_conv_1'])
        conv(model.second_conv[3], e['second_conv_3'])
        for name in ('pos_embed', 'decoder_pos_embed'):
            linear(getattr(model, name)[0], params[name]['0'])
            linear(getattr(model, name)[2], params[name]['2'])
        blocks(model.blocks, params['blocks'])
        blocks(model.decoder, params['decoder'])
        norm(model.norm, params['norm'])
        norm(model.decoder_norm, params['decoder_norm'])
        model.mask_token.copy_(t(params['mask_token'])[None, None])
        conv(model.increase_dim, params['increase_dim'])


def test_masked_forward_and_loss_equal_the_reference():
    """The grouped clouds through a torch transcription of Point_MAE (mini-PointNet with training-mode BatchNorm,
    the encoder on the visible patches with positions added before every block, the decoder, the head, Chamfer-L2)
    with the same weights and mask give the same loss and BatchNorm running means."""
    model = point_mae.make_model('micro', num_groups=8, group_size=6, drop_path_rate=0.0)
    rng = np.random.default_rng(0)
    cloud = jnp.asarray(rng.normal(size=(3, 64, 3)), jnp.float32)
    visible, masked = point_mae_method.random_masks(jax.random.key(3), 3, 8, 0.6)
    variables = point_mae.init_variables(model, jax.random.key(0), cloud, visible, masked)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), variables['params'])
    (loss, _), updated = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, cloud, visible, masked, train=True,
        mutable=['batch_stats'],
    )  # fmt: skip
    reference = TorchPointMAE(64, 2, 4, 1, 6, dims=(32, 64, 128)).train()
    load_into_torch(reference, params, variables['batch_stats'])
    neighbourhoods, centres = point_mae.group(cloud, 8, 6)
    mask = np.zeros((3, 8), bool)
    np.put_along_axis(mask, np.asarray(masked), True, axis=1)
    with torch.no_grad():
        want = reference(torch.from_numpy(np.array(neighbourhoods)), torch.from_numpy(np.array(centres)),
                         torch.from_numpy(mask))  # fmt: skip
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-5)
    np.testing.assert_allclose(
        updated['batch_stats']['encoder']['second_conv_1']['mean'], reference.second_conv[1].running_mean, atol=1e-5
    )


def test_encode_uses_every_patch_and_running_statistics():
    config = load_config('configs/point_mae.py:runlocal')
    method = point_mae_method.Method(config)
    batch = method.example_batch(4)
    params, extra = method.init(jax.random.key(0), jax.tree.map(jnp.asarray, batch))
    represent = jax.jit(method.represent)
    out = represent(params, extra, jax.tree.map(jnp.asarray, batch))
    assert out['pooled'].shape == (4, 128) and out['mean_pool'].shape == (4, 64)
    one = represent(params, extra, jax.tree.map(lambda x: jnp.asarray(x[:1]), batch))
    np.testing.assert_allclose(one['pooled'], out['pooled'][:1], atol=1e-5)  # no batch statistics at evaluation


# --- data -------------------------------------------------------------------------------------------------------------
def test_synthetic_shapes_and_example():
    source = point_data.SyntheticShapesSource('train')
    assert len(source) == 1600 and len(point_data.SyntheticShapesSource('val')) == 400
    first = source[3]
    np.testing.assert_array_equal(first['points'], source[3]['points'])  # generated from the index
    assert first['label'] == 3 and first['points'].shape == (2048, 3)
    config = load_config('configs/point_mae.py:runlocal').input
    test = point_data.example(first['points'], config)['points']
    assert test.shape == (512, 3)
    np.testing.assert_allclose(test.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(np.sqrt((test**2).sum(axis=1)).max(), 1.0, rtol=1e-6)
    train = point_data.example(first['points'], config, np.random.default_rng(0))['points']
    assert train.shape == (512, 3) and np.abs(train).max() <= 1.5 + 0.2
    sphere = point_data.synthesize_shape(0, np.random.default_rng(0))
    radii = np.sqrt((sphere**2).sum(axis=1))
    assert 0.7 < radii.min() and radii.max() < 1.3  # on a stretched unit sphere


def test_point_files_read_skip_and_refuse(tmp_path):
    for name in ('a', 'b'):
        (tmp_path / 'train' / name).mkdir(parents=True)
    np.save(tmp_path / 'train' / 'a' / 'one.npy', np.ones((600, 6), np.float32))
    rows = '\n'.join(','.join(str(v) for v in row) for row in np.arange(3000.0).reshape(500, 6))
    (tmp_path / 'train' / 'b' / 'two.txt').write_text(rows + '\n')
    (tmp_path / 'train' / 'b' / 'bad.txt').write_text('not numbers\n')
    source = point_data.PointFolderSource(str(tmp_path / 'train'))
    assert len(source) == 3 and source.classes == ['a', 'b']
    points = point_data.decode_points(source[2], 100)  # two.txt (sorted after bad.txt)
    np.testing.assert_array_equal(points[1], [6, 7, 8])
    with pytest.raises(DecodeError):
        point_data.decode_points(source[1])  # bad.txt
    with pytest.raises(DecodeError, match='fewer than'):
        point_data.decode_points(source[0], 1024)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r'model\.group_size'):
        load_config('configs/point_mae.py:runlocal', ['model.group_size=1000'])
    with pytest.raises(ConfigError, match=r'mask\.ratio'):
        load_config('configs/point_mae.py:runlocal', ['mask.ratio=0.01'])
    with pytest.raises(ConfigError, match=r'input\.dataset'):
        load_config('configs/point_mae.py:runlocal', ['input.dataset=shapenet'])
    base = point_mae_method.Method(load_config('configs/point_mae.py'))
    shapes = jax.eval_shape(lambda: base.init(jax.random.key(0), base.example_batch(2))[0])
    reference = TorchPointMAE(384, 12, 6, 4, 32)  # the reference's modules at pretrain.yaml's sizes
    assert sum(x.size for x in jax.tree.leaves(shapes)) == sum(p.numel() for p in reference.parameters())
    encoder = [shapes[k] for k in ('encoder', 'pos_embed', 'blocks', 'norm')]
    assert sum(x.size for x in jax.tree.leaves(encoder)) == 21_825_024  # + the 0.3M classifier: the paper's 22.1M


@pytest.mark.slow
def test_runlocal_sharded_matches_one_device_and_probes(tmp_path):
    """Equal losses on one device and on 8, and parameters to 5e-5 (1% of two steps' movement at lr 2e-3): the
    mini-PointNet's max-pools route a gradient to one point, and rounding can pick a different one between the two
    runs; some gradients are pure rounding noise (the biases a BatchNorm removes: the Linear right before each, and
    first_conv's last Linear, whose bias reaches the second BatchNorm as a constant), which Adam's first steps turn
    into lr-sized steps, so Adam's eps is 1e-3 here to keep those steps as small as their gradients."""
    summary, rows = assert_sharded_matches_one_device(
        'configs/point_mae.py:runlocal', tmp_path, 'optim.eps=1e-3', atol=5e-5
    )
    assert 0.0 <= summary['final_eval/label/pooled/knn'] <= 1.0 and rows[0]['chamfer_l2'] > 0
