"""NeRF-MAE: the 3-D Swin + UNETR network against a torch transcription of the reference's forward, the masks, the
loss, the data (density conversions, padding, corrupt files), the one-cycle schedule, the evaluation's probe and
config errors, and a sharded run on the one trainer."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from sharded_runs import run

from jaxssl import data, optim
from jaxssl.config import ConfigError, load_config
from jaxssl.data import radiance_grids
from jaxssl.data.decode import DecodeError
from jaxssl.methods import nerf_mae
from jaxssl.models import swin3d

CONFIG = 'configs/nerf_mae.py:runlocal'
# Three stages over 12 tokens a side: stage 1's 6 tokens pad to 8 and shift (padding and the shift mask together),
# stage 2's 3 pad to one window (no shift).
TINY = dict(patch=4, width=12, depths=(2, 2, 2), heads=(1, 2, 2), window=4, drop_path=0.0)
TINY_RESOLUTION = 48


# --- a torch transcription of the reference (swin_mae3d.py, unetr_block.py, torch_utils.py) -----------------------
def reference_sincos(dim, size):
    """get_3d_sincos_pos_embed: np.meshgrid in 'xy' order, three 1-D MAE tables, reshaped to (size,)*3 + (dim,)."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    axis = np.arange(size, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, axis), axis=0).reshape(3, 1, size, size, size)
    emb = np.concatenate([one_d(dim // 3, grid[k]) for k in range(3)], axis=1)
    return emb.reshape(size, size, size, dim)


def reference_window_attention(x, p, heads, window, shift):
    b, h, w, d, c = x.shape
    pads = [(window - s % window) % window for s in (h, w, d)]
    x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    _, ph, pw, pd, _ = x.shape
    shifts = [0 if window >= s else shift for s in (ph, pw, pd)]
    if sum(shifts):
        x = torch.roll(x, shifts=[-s for s in shifts], dims=(1, 2, 3))
    nw = (ph // window) * (pw // window) * (pd // window)
    x = x.view(b, ph // window, window, pw // window, window, pd // window, window, c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * nw, window**3, c)
    qkv = F.linear(x, p('attn/qkv/kernel').T, p('attn/qkv/bias'))
    qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
    attn = q.matmul(k.transpose(-2, -1))
    coords = torch.flatten(torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing='ij')), 1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    index = rel[..., 0] * (2 * window - 1) ** 2 + rel[..., 1] * (2 * window - 1) + rel[..., 2]
    bias = p('attn/relative_position_bias_table')[index.flatten()].view(window**3, window**3, -1)
    attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
    if sum(shifts):
        ids = x.new_zeros((ph, pw, pd))
        cuts = [((0, -window), (-window, -s), (-s, None)) for s in shifts]
        for count, (sh, sw, sd) in enumerate(itertools.product(*cuts)):
            ids[sh[0] : sh[1], sw[0] : sw[1], sd[0] : sd[1]] = count
        ids = ids.view(ph // window, window, pw // window, window, pd // window, window)
        ids = ids.permute(0, 2, 4, 1, 3, 5).reshape(nw, window**3)
        mask = ids.unsqueeze(1) - ids.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(-1, nw, heads, window**3, window**3) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, window**3, window**3)
    x = F.softmax(attn, dim=-1).matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = F.linear(x, p('attn/proj/kernel').T, p('attn/proj/bias'))
    x = x.view(b, ph // window, pw // window, pd // window, window, window, window, c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, ph, pw, pd, c)
    if sum(shifts):
        x = torch.roll(x, shifts=shifts, dims=(1, 2, 3))
    return x[:, :h, :w, :d, :]


def reference_forward(params, grid, token_mask, cfg):
    """SwinTransformer_MAE3D_New.forward_encoder_ecoder (channels first in, as the reference) with our weights."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
    tensor = lambda name: torch.tensor(np.asarray(flat[name]), dtype=torch.float64)

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], tensor(f'{name}/scale'), tensor(f'{name}/bias'), eps=1e-5)

    def conv(x, name, padding=0, stride=1):  # ours (k, k, k, in, out) -> torch (out, in, k, k, k)
        return F.conv3d(x, tensor(f'{name}/kernel').permute(4, 3, 0, 1, 2), tensor(f'{name}/bias'), stride, padding)

    def res_block(x, name):
        out = F.leaky_relu(F.instance_norm(conv(x, f'{name}/conv1', 1), eps=1e-5), 0.01)
        out = F.instance_norm(conv(out, f'{name}/conv2', 1), eps=1e-5)
        if f'{name}/conv3/kernel' in flat:
            x = F.instance_norm(conv(x, f'{name}/conv3'), eps=1e-5)
        return F.leaky_relu(out + x, 0.01)

    def up_block(x, name, factor, skip=None):  # ours (k, k, k, in, out) -> torch (in, out, k, k, k)
        weight = tensor(f'{name}/transp_conv/kernel').permute(3, 4, 0, 1, 2)
        x = F.conv_transpose3d(x, weight, tensor(f'{name}/transp_conv/bias'), stride=factor)
        if skip is not None:
            x = torch.cat((x, skip), dim=1)
        return res_block(x, f'{name}/conv_block')

    p = cfg['patch']
    x = torch.tensor(np.asarray(grid), dtype=torch.float64).permute(0, 4, 1, 2, 3)
    x = conv(x, 'patch_embed', stride=p).permute(0, 2, 3, 4, 1)
    x = layer_norm(x, 'patch_norm')
    x = x + torch.tensor(reference_sincos(cfg['width'], x.shape[1]), dtype=torch.float64)[None]
    if token_mask is not None:
        index = torch.tensor(np.broadcast_to(np.asarray(token_mask), x.shape[:4]).copy())
        x = x.clone()
        x[index, :] = tensor('mask_token')
    features = []
    for s, (depth, heads) in enumerate(zip(cfg['depths'], cfg['heads'], strict=True)):
        if s > 0:  # PatchMerging
            name = f'merge{s}'
            x = F.pad(x, (0, 0, 0, x.shape[3] % 2, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
            parts = [
                x[:, i::2, j::2, k::2]
                for (i, j, k) in [
                    (0, 0, 0),
                    (1, 0, 0),
                    (0, 1, 0),
                    (1, 1, 0),
                    (0, 0, 1),
                    (1, 0, 1),
                    (0, 1, 1),
                    (1, 1, 1),
                ]
            ]
            x = layer_norm(torch.cat(parts, -1), f'{name}/norm') @ tensor(f'{name}/reduction/kernel')
        for i in range(depth):
            name = f'stage{s}_block{i}'
            block = lambda n, name=name: tensor(f'{name}/{n}')
            shift = 0 if i % 2 == 0 else cfg['window'] // 2
            x = x + reference_window_attention(layer_norm(x, f'{name}/norm1'), block, heads, cfg['window'], shift)
            h = F.linear(layer_norm(x, f'{name}/norm2'), block('fc1/kernel').T, block('fc1/bias'))
            x = x + F.linear(F.gelu(h), block('fc2/kernel').T, block('fc2/bias'))
        features.append(x.permute(0, 4, 1, 2, 3))
    y = features[-1]
    for s in range(len(features) - 1, 0, -1):
        y = up_block(y, f'decoder{s}', 2, features[s - 1])
    y = up_block(y, 'decoder0', p)
    out = conv(y, 'out')
    return out.permute(0, 2, 3, 4, 1).numpy(), [f.permute(0, 2, 3, 4, 1).numpy() for f in features]


@pytest.fixture(scope='module')
def tiny():
    model = swin3d.NeRFMAE(**TINY)
    rng = np.random.default_rng(0)
    grid = rng.uniform(size=(2, TINY_RESOLUTION, TINY_RESOLUTION, TINY_RESOLUTION, 4)).astype(np.float32)
    tokens = TINY_RESOLUTION // TINY['patch']
    mask = nerf_mae.cube_mask(jax.random.PRNGKey(3), tokens, 2, 0.5)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(grid), mask)['params']
    # Enlarged so that every path (the bias tables, the shift mask, the merges) moves the output.
    params = jax.tree.map(lambda a: a * 2.0 if a.ndim <= 2 else a, params)
    apply = jax.jit(lambda params, grid, mask: model.apply({'params': params}, grid, mask))
    return model, params, grid, mask, apply


def test_network_matches_a_torch_transcription_of_the_reference(tiny):
    _, params, grid, mask, apply = tiny
    out = apply(params, grid, mask)
    want, want_stages = reference_forward(params, grid, mask, TINY)
    assert out['prediction'].shape == grid.shape
    for got, ref in zip(out['stages'], want_stages, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out['prediction'], want, rtol=1e-4, atol=1e-4)
    # Without a mask (the evaluation's features) too.
    np.testing.assert_allclose(apply(params, grid, None)['prediction'], reference_forward(params, grid, None, TINY)[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_masked_tokens_lose_their_content_and_position(tiny):
    model, params, grid, mask, _ = tiny
    # Two grids that differ only inside masked tokens give the same first stage everywhere: a masked token is the
    # mask token whatever the voxels under it.
    voxels = np.asarray(nerf_mae.voxel_mask(mask, TINY['patch']))[0]
    other = np.where(voxels[None, ..., None], np.random.default_rng(1).uniform(size=grid.shape), grid)
    stages = lambda g: model.apply({'params': params}, jnp.asarray(g, jnp.float32), mask)['stages'][0]
    np.testing.assert_allclose(stages(other), stages(grid), atol=1e-5)


def test_stochastic_depth_only_in_training(tiny):
    _, params, grid, mask, apply = tiny
    plain = swin3d.NeRFMAE(**TINY)  # drop_path 0: an rng changes nothing
    dropping = swin3d.NeRFMAE(**{**TINY, 'drop_path': 0.5})
    run = lambda model, rng: model.apply({'params': params}, jnp.asarray(grid), mask, rng)['prediction']
    deterministic = apply(params, grid, mask)['prediction']
    np.testing.assert_allclose(run(plain, jax.random.PRNGKey(1)), deterministic, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dropping.apply({'params': params}, jnp.asarray(grid), mask)['prediction'],
                               deterministic, rtol=1e-4, atol=1e-5)  # fmt: skip
    a, b = run(dropping, jax.random.PRNGKey(1)), run(dropping, jax.random.PRNGKey(2))
    assert np.all(np.isfinite(a)) and not np.allclose(a, b) and not np.allclose(a, deterministic)


def test_sincos_table_is_the_references_axis_order():
    np.testing.assert_allclose(swin3d.sincos_3d(24, 5), reference_sincos(24, 5), atol=1e-6)
    with pytest.raises(ValueError, match='divisible by 6'):
        swin3d.sincos_3d(16, 4)


def test_cube_mask_is_shared_whole_cubes_and_leaves_the_rest_visible():
    mask = np.asarray(nerf_mae.cube_mask(jax.random.PRNGKey(0), 10, 4, 0.5))
    assert mask.shape == (1, 10, 10, 10) and mask.dtype == bool
    assert not mask[:, 8:].any() and not mask[:, :, 8:].any() and not mask[..., 8:].any()
    cubes = mask[0, :8, :8, :8].reshape(2, 4, 2, 4, 2, 4).transpose(0, 2, 4, 1, 3, 5).reshape(8, -1)
    assert np.all(cubes.min(1) == cubes.max(1))  # each 4^3 cube all masked or all visible
    draws = np.stack([np.asarray(nerf_mae.cube_mask(jax.random.PRNGKey(k), 8, 2, 0.75)) for k in range(200)])
    assert abs(draws.mean() - 0.75) < 0.02


def test_loss_known_answer():
    rng = np.random.default_rng(0)
    grid = rng.uniform(size=(2, 8, 8, 8, 4)).astype(np.float32)
    grid[..., 3] = np.where(rng.uniform(size=(2, 8, 8, 8)) < 0.5, 0.0, grid[..., 3])
    pred = rng.normal(size=grid.shape).astype(np.float32)
    valid = np.zeros((2, 8, 8, 8), np.float32)
    valid[:, :6, :7, :5] = 1
    masked = rng.uniform(size=(1, 8, 8, 8)) < 0.6
    loss_rgb, loss_alpha = nerf_mae.nerf_mae_loss(jnp.asarray(pred), jnp.asarray(grid), jnp.asarray(valid),
                                                  jnp.asarray(masked))  # fmt: skip
    rgb_sum = alpha_sum = occupied = region = 0.0
    for b, i, j, k in itertools.product(range(2), range(8), range(8), range(8)):
        if grid[b, i, j, k, 3] > 0.01:
            rgb_sum += sum((pred[b, i, j, k, c] - grid[b, i, j, k, c]) ** 2 for c in range(3))
            occupied += 1
        if valid[b, i, j, k] and masked[0, i, j, k]:
            alpha_sum += (1 / (1 + np.exp(-pred[b, i, j, k, 3])) - grid[b, i, j, k, 3]) ** 2
            region += 1
    assert float(loss_rgb) == pytest.approx(rgb_sum / occupied, rel=1e-5)
    assert float(loss_alpha) == pytest.approx(alpha_sum / region, rel=1e-5)


def test_density_to_alpha_and_padding():
    sigma = np.array([-10.0, 0.0, np.log(100.0), 10.0])
    np.testing.assert_allclose(radiance_grids.density_to_alpha(sigma, 'log'),
                               [1 - np.exp(-np.exp(-10) / 100), 1 - np.exp(-0.01), 1 - np.exp(-1), 1.0])  # fmt: skip
    np.testing.assert_allclose(radiance_grids.density_to_alpha(np.array([-5.0, 100.0]), 'relu'),
                               [0.0, 1 - np.exp(-1)])  # fmt: skip
    padded = radiance_grids.pad_grid(np.ones((3, 4, 2, 4)), 5)
    assert padded['grid'].shape == (5, 5, 5, 4) and padded['valid'].sum() == 24
    assert padded['valid'][:3, :4, :2].all() and padded['grid'][3:].sum() == 0


def test_rooms_are_seeded_labelled_and_within_the_grid():
    a = radiance_grids.load_grid(radiance_grids.RoomSource('val')[3], 32, 'log')
    b = radiance_grids.load_grid(radiance_grids.RoomSource('val')[3], 32, 'log')
    np.testing.assert_array_equal(a['grid'], b['grid'])
    alpha, labels = a['grid'][..., 3], a['labels']
    assert set(np.unique(labels)) >= {0, 1} and labels.max() < len(radiance_grids.CLASSES)
    assert np.all(alpha[labels > 0] > 0.5)  # solids are dense
    assert np.mean(alpha[labels == 0] > 0.01) < 0.01  # free space is empty but for a few floaters
    assert np.all(alpha[a['valid'] == 0] == 0)


def write_grid(path, shape=(20, 24, 16), labels=True, dtype=np.float32):
    rgbsigma = np.random.default_rng(0).uniform(size=(*shape, 4)).astype(np.float32)
    rgbsigma[..., 3] = np.log(rgbsigma[..., 3] * 500)
    arrays = {'rgbsigma': rgbsigma.astype(dtype)}
    if labels:
        arrays['labels'] = np.ones(shape, np.int32)
    np.savez(path, **arrays)


def test_folder_grids_convert_pad_and_skip_bad_files(tmp_path):
    root = tmp_path / 'train'
    root.mkdir()
    write_grid(root / 'a.npz')
    write_grid(root / 'b.npz', labels=False)
    write_grid(root / 'big.npz', shape=(40, 8, 8))
    (root / 'corrupt.npz').write_bytes(b'PK\x03\x04 not a zip')
    np.savez(root / 'wrong.npz', rgbsigma=np.zeros((4, 4, 3)))
    np.savez(root / 'x_nan.npz', rgbsigma=np.full((4, 4, 4, 4), np.nan, np.float32))
    np.savez(root / 'y_labels.npz', rgbsigma=np.zeros((4, 4, 4, 4), np.float32), labels=np.zeros((4, 4, 3), int))
    np.savez(root / 'z_uint8.npz', rgbsigma=np.full((4, 4, 4, 4), 51, np.uint8))
    source = radiance_grids.FolderSource(str(tmp_path), 'train')
    good = radiance_grids.load_grid(source[0], 32, 'log')
    raw = np.load(root / 'a.npz')['rgbsigma']
    np.testing.assert_allclose(good['grid'][:20, :24, :16, 3], 1 - np.exp(-np.exp(raw[..., 3]) / 100), atol=1e-6)
    assert good['labels'][:20, :24, :16].min() == 1 and good['labels'][20:].max() == -1  # padding: no label
    assert radiance_grids.load_grid(source[1], 32, 'log')['labels'].max() == -1  # no labels in the file
    for index in (2, 3, 4, 5, 6):  # big, corrupt, wrong, NaN, mismatched labels: skipped by the pipeline
        with pytest.raises(DecodeError):
            radiance_grids.load_grid(source[index], 32, 'log')
    # uint8: all four channels / 255, the fourth already alpha; 'relu' densities as ScanNet's loader.
    np.testing.assert_allclose(radiance_grids.load_grid(source[7], 8, 'log')['grid'][:4, :4, :4], 0.2, rtol=1e-6)
    relu = radiance_grids.load_grid(source[0], 32, 'relu')['grid'][:20, :24, :16, 3]
    np.testing.assert_allclose(relu, 1 - np.exp(-np.maximum(raw[..., 3], 0) / 100), atol=1e-6)
    # The training pipeline skips and counts them.
    (tmp_path / 'val').mkdir()
    write_grid(tmp_path / 'val' / 'v.npz')
    config = load_config(CONFIG, ['input.dataset=folder', f'input.data_root={tmp_path}', 'input.global_batch=2'])
    before = data.skipped_files()
    batches = iter(nerf_mae.Method(config).dataset(0, 0, 1)[0])
    for _ in range(3):  # 3 readable files, batches of 2: every file of the first pass is read
        batch = next(batches)
        assert batch['grid'].shape == (2, 32, 32, 32, 4) and batch['valid'].shape == (2, 32, 32, 32)
    assert data.skipped_files() - before >= 5


def test_augmentation_turns_and_flips_as_the_reference():
    grid = np.arange(3 * 4 * 2 * 4, dtype=np.float32).reshape(3, 4, 2, 4)
    item = {'grid': grid, 'labels': grid[..., 0].astype(np.int32)}
    always = lambda rotate, flip: radiance_grids.augment(item, np.random.default_rng(0), rotate, flip)
    # torch.transpose(x, 1, 2) then flip(dim 1) on (C, W, L, H): a quarter turn about the up axis.
    np.testing.assert_array_equal(always(1.0, 0.0)['grid'], np.rot90(grid, 1, axes=(0, 1)))
    np.testing.assert_array_equal(always(0.0, 1.0)['grid'], grid[::-1, ::-1])
    np.testing.assert_array_equal(always(1.0, 1.0)['labels'], np.rot90(grid, 1, axes=(0, 1))[::-1, ::-1, :, 0])
    np.testing.assert_array_equal(always(0.0, 0.0)['grid'], grid)
    rng = np.random.default_rng(1)
    seen = {radiance_grids.augment(item, rng, 0.5, 0.5)['grid'].tobytes() for _ in range(200)}
    assert len(seen) == 8  # 2 turns x 2 x 2 flips, all drawn


@pytest.mark.parametrize('total, pct', [(40, 0.3), (2, 0.3), (7, 0.5)])
def test_one_cycle_schedule_equals_torch(total, pct):
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-4, total_steps=total, pct_start=pct)
    want = []
    for _ in range(total):
        want.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    got = [float(optim.one_cycle_schedule(1e-4, total, pct, 25.0, 1e4)(step)) for step in range(total)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    config = load_config(CONFIG, [])
    lr = optim.learning_rate_schedule(config, 40, 40)
    assert float(lr(0)) == pytest.approx(1e-3 / 25, rel=1e-5) and float(lr(11)) == pytest.approx(1e-3, rel=1e-5)


def test_adamw_under_one_cycle_equals_torch():
    """The recipe's optimiser: torch AdamW (decay on every parameter) under OneCycleLR, which also cycles beta1
    between 0.95 and 0.85, on a small non-quadratic problem."""
    total, target = 12, np.array([0.3, 0.1, -0.2])
    w0 = np.array([1.0, -2.0, 0.5])
    weight = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.AdamW([weight], lr=0.1, weight_decay=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
    for _ in range(total):
        opt.zero_grad()
        ((weight - torch.tensor(target)) ** 3).abs().sum().backward()
        opt.step()
        scheduler.step()
    config = load_config(CONFIG, [f'optim.base_lr={0.1 * 256 / 8}', 'optim.clip_grad=0.0'])
    tx = optim.make_optimizer(config, {'w': jnp.zeros(3)}, optim.learning_rate_schedule(config, total, total), total)
    params = {'w': jnp.asarray(w0, jnp.float32)}
    state = tx.init(params)
    for _ in range(total):
        grads = jax.grad(lambda p: jnp.sum(jnp.abs((p['w'] - target) ** 3)))(params)
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(params['w'], weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    # Without the beta1 cycle the result differs: the test sees it.
    fixed = load_config(CONFIG, [f'optim.base_lr={0.1 * 256 / 8}', 'optim.clip_grad=0.0', 'optim.one_cycle_beta1=()'])
    assert optim.beta1_schedule(fixed, total) is None
    b1 = optim.beta1_schedule(config, 100)
    assert float(b1(0)) == pytest.approx(0.95) and float(b1(29)) == pytest.approx(0.85)
    assert float(b1(99)) == pytest.approx(0.95)


def test_token_labels_and_the_voxel_probe():
    labels = np.zeros((1, 8, 8, 8), np.int32)
    labels[0, :4, :4, :4] = 2
    labels[0, 4:, :, :2] = 1
    labels[0, 0, 0, 0] = 3  # a minority voxel does not change its token's majority
    valid = np.ones((1, 8, 8, 8), np.float32)
    valid[0, :, :, 6:] = 0
    tokens = nerf_mae.token_labels(labels, valid, 2, 5)
    assert tokens[0, 0, 0, 0] == 2 and tokens[0, 3, 3, 0] == 1 and tokens[0, 3, 3, 2] == 0
    assert np.all(tokens[0, :, :, 3] == -1)  # outside the scene
    feats = [jnp.asarray(np.eye(5)[np.maximum(tokens, 0)] + 0.01)]
    assert nerf_mae.multilevel_features(feats).shape == (1, 4, 4, 4, 5)


def test_composite_known_answers():
    grid = np.zeros((4, 3, 4, 4), np.float32)
    grid[1, 0, 2] = [1.0, 0.0, 0.0, 0.5]  # half-opaque red in front of
    grid[1, 2, 2] = [0.0, 0.0, 1.0, 1.0]  # opaque blue
    grid[2, 1, 0] = [0.0, 1.0, 0.0, 1.0]  # opaque green on the lowest layer
    image = nerf_mae.composite(grid)  # along the second axis; the third is drawn upward
    assert image.shape == (4, 4, 3)
    np.testing.assert_allclose(image[1, 1], [0.5, 0.0, 0.5])  # row 1 from the top = third-axis index 2
    np.testing.assert_allclose(image[3, 2], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(image[0, 0], [1.0, 1.0, 1.0])  # nothing: white


def test_evaluation_known_answers_with_a_stand_in_network(tmp_path):
    """A stand-in forward that predicts RGB + 0.1 and the exact alpha, and whose token features are the one-hot
    majority label: PSNR 20 on every occupied voxel, alpha MSE 0, the probe perfect, baselines recomputed."""
    rng = np.random.default_rng(0)
    for split, count in (('train', 3), ('val', 2)):
        (tmp_path / split).mkdir()
        for k in range(count):
            rgbsigma = rng.uniform(0.0, 0.8, size=(28, 32, 24, 4)).astype(np.float32)
            rgbsigma[..., 3] = np.where(rng.uniform(size=(28, 32, 24)) < 0.5, 0.0, 0.9)
            labels = np.where(rgbsigma[..., 3] > 0, 1 + (rgbsigma[..., 0] > 0.4), 0)
            np.savez(tmp_path / split / f'{k}.npz', rgbsigma=rgbsigma, labels=labels)
    (tmp_path / 'val' / 'broken.npz').write_bytes(b'not a zip')
    (tmp_path / 'train' / 'broken.npz').write_bytes(b'not a zip')  # in the probe's fitting split: counted once
    overrides = ['input.dataset=folder', f'input.data_root={tmp_path}', 'input.density=alpha', 'eval.batch_size=2']
    method = nerf_mae.Method(load_config(CONFIG, overrides))

    def predict(params, grid, token_mask):
        grid = np.asarray(grid)
        alpha = np.clip(grid[..., 3:], 1e-6, 1 - 1e-6)
        return np.concatenate([grid[..., :3] + 0.1, np.log(alpha / (1 - alpha))], axis=-1)

    def features(params, grid):
        grid = np.asarray(grid)
        voxel = np.where(grid[..., 3] > 0, 1 + (grid[..., 0] > 0.4), 0)
        tokens = nerf_mae.token_labels(voxel, np.ones_like(voxel), 4, 5)
        return np.eye(5)[np.maximum(tokens, 0)]

    method.__dict__['_predict'], method.__dict__['_features'] = predict, features
    got = method.evaluate({}, {}, None)
    assert got['eval_skipped_files'] == 2
    assert got['psnr/all'] == pytest.approx(20.0, abs=1e-3) and got['psnr/masked'] == pytest.approx(20.0, abs=1e-3)
    assert got['alpha_mse/masked'] == pytest.approx(0.0, abs=1e-8)
    assert got['voxel_probe/miou'] == 1.0 and got['voxel_probe/accuracy'] == 1.0
    assert 0 < got['voxel_probe/input/miou'] <= 1  # the raw-voxel baseline runs on the same tokens
    grids = [
        radiance_grids.load_grid({'name': f, 'path': str(f)}, 32, 'alpha')
        for f in sorted((tmp_path / 'val').glob('[0-9].npz'))
    ]
    rgb = np.concatenate([g['grid'][..., :3][g['grid'][..., 3] > 0.01] for g in grids])
    assert got['psnr/all/mean_colour'] == pytest.approx(-10 * np.log10(rgb.var()), rel=1e-4)


@pytest.mark.parametrize(
    'override, key',
    [
        ('model.width=16', 'model.width'),
        ('model.heads=(5,2,4,8)', 'model.heads'),
        ('model.depths=(2,2)', 'model.depths'),
        ('input.resolution=30', 'input.resolution'),
        ('input.resolution=24', 'input.resolution'),
        ('mask.unit=9', 'mask.unit'),
        ('mask.ratio=1.0', 'mask.ratio'),
        ('input.density=linear', 'input.density'),
        ('input.dataset=folder', 'input.data_root'),
        ('eval.split=test', 'eval.split'),
        ('eval.probe_scenes=0', 'eval.probe_scenes'),
        ('optim.warmup_steps=5', 'optim.warmup_steps'),
        ('optim.one_cycle_pct=1.5', 'optim.one_cycle_pct'),
        ('optim.one_cycle_beta1=(0.95,0.85)', 'optim.one_cycle_beta1'),
        ('model.patch=0', 'model.patch'),
        ('model.width=0', 'model.width'),
        ('input.rotate_prob=1.5', 'input.rotate_prob'),
        ('eval.probe_classes=0', 'eval.probe_classes'),
    ],
)
def test_bad_config_fails_fast_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        config = load_config(CONFIG, [override])
        nerf_mae.check_config(config)
        optim.learning_rate_schedule(config, 300, 300)


def test_trains_sharded_like_one_device_and_evaluates(tmp_path):
    overrides = ('train.steps=2', 'checkpoint.every=2', 'eval.pictures=1', 'eval.scenes=4', 'eval.probe_scenes=4',
                 'eval.batch_size=2', 'input.global_batch=8')  # fmt: skip
    _, want, want_rows = run(CONFIG, tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false', *overrides)
    summary, state, rows = run(CONFIG, tmp_path / 'sharded', 'mesh.data=8', *overrides)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    for key in ('loss', 'loss_rgb', 'loss_alpha', 'grad_norm'):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want_rows], rtol=1e-5)
    # Parameters after two Adam steps of ~8e-4 each (a 2-step one-cycle run starts near its peak): Adam moves a
    # weight by ~lr whatever its gradient's size, so tiny gradients summed in another order can differ by a
    # fraction of a step. The decoder's conv biases feed InstanceNorm, which removes them: their true gradient is 0
    # and Adam turns its rounding noise into whole steps of either sign, so they are left out.
    got, ref = (traverse_util.flatten_dict(p['params'], sep='/') for p in (state, want))
    for name in ref:
        if not ('conv_block' in name and name.endswith('bias')):
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=2e-4, err_msg=name)
    evaluation = [r for r in map(json.loads, open(tmp_path / 'sharded' / 'metrics.jsonl')) if 'eval/psnr/all' in r][-1]
    assert 0 < evaluation['eval/voxel_probe/miou'] <= 1 and 0 < evaluation['eval/voxel_probe/accuracy'] <= 1
    assert evaluation['eval/psnr/all/mean_colour'] > 0 and evaluation['eval/alpha_mse/masked/mean_alpha'] > 0
    assert (tmp_path / 'sharded' / 'pictures').exists()
