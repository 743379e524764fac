"""I2P-MAE: the projections and back-projection against a torch transcription of proj2img / I2P, the CLIP maps
against transformers' CLIP, the scales, mask propagation and guided masks, the whole forward and both losses against
a torch transcription of the reference's H_Encoder and decoder with the same weights, the teacher read from a
transformers folder, and the runlocal recipe sharded."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharded_runs
import torch
import torch.nn.functional as F

from jaxssl.config import ConfigError, load_config
from jaxssl.methods import base
from jaxssl.methods import i2p_mae as i2p_method
from jaxssl.models import clip, clip_weights, i2p_mae, point_mae, point_views

CONFIG = 'configs/i2p_mae.py:runlocal'


# --- a torch transcription of proj2img and I2P (models/I2P_MAE.py), torch_scatter's sum as index_add -----------------
def torch_proj2img(pc, size):
    b, n, _ = pc.shape
    pc_range = pc.max(dim=1)[0] - pc.min(dim=1)[0]
    grid_size = pc_range[:, :2].max(dim=-1)[0] / (size - 3)
    pc_min = pc.min(dim=1)[0][:, :2].unsqueeze(dim=1)
    grid_size = grid_size.unsqueeze(dim=1).unsqueeze(dim=2)
    idx_xy = torch.floor((pc[:, :, :2] - pc_min) / grid_size)
    offsets = torch.tensor([[i, j] for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float32)
    idx_xy_dense = (idx_xy.unsqueeze(dim=2) + offsets[None, None]).view(b, n * 25, 2) + 1
    centre = torch.floor((idx_xy_dense.max(dim=1)[0] + idx_xy_dense.min(dim=1)[0]) / 2).int()
    offset_x = size / 2 - centre[:, 0:1] - 1
    offset_y = size / 2 - centre[:, 1:2] - 1
    idx = idx_xy_dense + torch.cat([offset_x, offset_y], dim=1).unsqueeze(dim=1)
    f_dense = pc.unsqueeze(dim=2).expand(-1, -1, 25, -1).contiguous().view(b, n * 25, 3)[..., 2:3].repeat(1, 1, 3)
    idx = idx + (idx < 0).to(torch.int32) - (idx > size - 1).to(torch.int32)
    flat = (idx[:, :, 0] * size + idx[:, :, 1]).long()
    out = torch.zeros(b, size * size, 3)
    for i in range(b):
        out[i].index_add_(0, flat[i], f_dense[i])
    img = torch.sigmoid(out.reshape(b, size, size, 3).permute(0, 3, 1, 2))
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    return (img - mean) / std, pc_min, grid_size, (offset_x, offset_y)


def torch_i2p(pc, f, pc_min, grid_size, offsets, size):
    idx_xy = torch.floor((pc[:, :, :2] - pc_min) / grid_size) + 1
    idx = idx_xy + torch.cat(offsets, dim=1).unsqueeze(dim=1)
    b, c, _, _ = f.shape
    f_dense = F.interpolate(f, size=(size, size), mode='bicubic').reshape(b, c, -1).permute(0, 2, 1)
    flat = (idx[:, :, 0] * size + idx[:, :, 1]).to(torch.int64)
    return torch.gather(f_dense, 1, flat.unsqueeze(-1).repeat(1, 1, c))


def views_torch(pc):
    return [pc, torch.cat((pc[..., 2:3], pc[..., 0:2]), dim=-1), torch.cat((pc[..., 1:3], pc[..., 0:1]), dim=-1)]


def test_projection_and_back_projection_equal_the_reference():
    """The reference's 224-pixel images of the 3 views, and a 14 x 14 map read back at the points, bicubically
    upsampled (torch's kernel) without forming the 224 x 224 map."""
    rng = np.random.default_rng(0)
    cloud = (rng.normal(size=(2, 300, 3)) * [1.0, 0.5, 2.0]).astype(np.float32)
    maps = rng.normal(size=(2, 14, 14, 5)).astype(np.float32)
    for v, view in enumerate(views_torch(torch.from_numpy(cloud))):
        want, *frame = torch_proj2img(view, 224)
        image, got_frame = point_views.project(point_views.view(jnp.asarray(cloud), v), 224)
        np.testing.assert_allclose(np.asarray(image), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)
        probe = view[:, ::7]  # some of the cloud's own points
        wanted = torch_i2p(probe, torch.from_numpy(maps).permute(0, 3, 1, 2), *frame, 224)
        got = point_views.sample_at(point_views.view(jnp.asarray(cloud[:, ::7]), v), got_frame, jnp.asarray(maps))
        np.testing.assert_allclose(np.asarray(got), wanted.numpy(), atol=1e-5)
    # The upsampling matrix is torch's F.interpolate along one axis, edges included.
    x = torch.from_numpy(rng.normal(size=(1, 1, 5, 1)).astype(np.float32))
    want = F.interpolate(x, size=(23, 1), mode='bicubic')[0, 0, :, 0].numpy()
    np.testing.assert_allclose(point_views.bicubic_matrix(23, 5) @ x[0, 0, :, 0].numpy(), want, atol=1e-6)


def saved_clip(directory, width, depth, heads, projection):
    """A random transformers CLIPModel (32-pixel images, 8-pixel patches, a one-block text tower) saved in
    `directory`; returns it."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=48, eos_token_id=49),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                           num_attention_heads=heads, image_size=32, patch_size=8),
        projection_dim=projection,
    )  # fmt: skip
    model = CLIPModel(config).eval()
    model.set_attn_implementation('eager')  # sdpa returns no attention weights
    model.save_pretrained(str(directory))
    return model


def test_clip_maps_equal_transformers_attention_and_projected_patches(tmp_path):
    """Features: post_layernorm and the visual projection on every patch token (clip_attn's map); saliency: the last
    block's class-token attention to the patches, averaged over heads."""
    reference = saved_clip(tmp_path, width=64, depth=3, heads=4, projection=16)
    fields, params = clip_weights.load(str(tmp_path))
    tower = clip.ImageTower(
        fields['image_width'], fields['image_depth'], fields['patch'], fields['image_heads'], fields['activation']
    )
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    keep = {'vision_model': params['vision_model'], 'visual_projection': params['visual_projection']}
    features, saliency = point_views.clip_maps(tower, jax.tree.map(jnp.asarray, keep), jnp.asarray(images))
    with torch.no_grad():
        out = reference.vision_model(
            pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), output_attentions=True,
            output_hidden_states=True,
        )  # fmt: skip
        want_features = reference.visual_projection(reference.vision_model.post_layernorm(out.last_hidden_state[:, 1:]))
        want_saliency = out.attentions[-1].mean(1)[:, 0, 1:]
    assert features.shape == (2, 4, 4, 16) and saliency.shape == (2, 4, 4)
    np.testing.assert_allclose(np.asarray(features).reshape(2, 16, 16), want_features.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(saliency).reshape(2, 16), want_saliency.numpy(), atol=1e-6)


# --- scales and masks -------------------------------------------------------------------------------------------------
def test_scales_group_the_finer_centres():
    cloud = jnp.asarray(np.random.default_rng(1).normal(size=(2, 200, 3)), jnp.float32)
    levels = i2p_mae.hierarchy(cloud, (40, 20, 6), (8, 4, 4))
    assert [lv.neighbourhoods.shape for lv in levels] == [(2, 40, 8, 3), (2, 20, 4, 3), (2, 6, 4, 3)]
    for finer, level in itertools.pairwise(levels):
        want, centres = point_mae.group(finer.centres, *level.neighbourhoods.shape[1:3])
        np.testing.assert_allclose(level.neighbourhoods, want, atol=1e-6)
        np.testing.assert_array_equal(level.centres, centres)
        np.testing.assert_array_equal(
            level.absolute, jax.vmap(lambda c, i: c[i])(finer.centres, level.index)
        )  # the indices address the finer centres


def test_visibility_propagates_to_the_listed_finer_tokens():
    index = np.array([[[0, 1], [2, 3], [3, 4]]])  # 3 coarse tokens listing 2 of 6 finer tokens each
    finer = i2p_mae.Level(None, jnp.zeros((1, 6, 3)), None, None)
    level = i2p_mae.Level(None, jnp.zeros((1, 3, 3)), jnp.asarray(index), None)
    masks = i2p_mae.propagate_visible(jnp.asarray([[True, False, True]]), [finer, level])
    np.testing.assert_array_equal(masks[0], [[True, True, False, True, True, False]])  # 5 is listed by no one
    assert i2p_mae.visible_bounds(13, (512, 256, 64), (16, 8, 8)) == [512, 104, 13]
    index, valid = i2p_mae.visible_first(masks[0], 5)
    np.testing.assert_array_equal(index, [[0, 1, 3, 4, 2]])
    np.testing.assert_array_equal(valid, [[True, True, True, True, False]])


def test_guided_masks_keep_salient_centres_visible():
    """Gumbel top-k = multinomial without replacement: a dominant saliency is always visible; equal ones are
    visible equally often."""
    saliency = jnp.zeros((4000, 8)).at[:, 5].set(20.0)
    visible = np.asarray(i2p_method.guided_visible(jax.random.key(0), saliency, 2))
    assert visible.sum(axis=1).tolist() == [2] * 4000 and visible[:, 5].all()
    frequency = np.delete(visible.mean(axis=0), 5)
    np.testing.assert_allclose(frequency, 1 / 7, atol=0.02)
    # Two of three with probabilities (0.7, 0.2, 0.1): P(0 and 1) = 0.7 x 0.2 / 0.3 + 0.2 x 0.7 / 0.8 = 0.6417
    logits = jnp.log(jnp.broadcast_to(jnp.asarray([0.7, 0.2, 0.1]), (20000, 3)))
    visible = np.asarray(i2p_method.guided_visible(jax.random.key(1), logits, 2))
    np.testing.assert_allclose((visible[:, 0] & visible[:, 1]).mean(), 0.6417, atol=0.01)


# --- the model against a torch transcription of H_Encoder and I2P_MAE.forward ---------------------------------------
class TorchBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5
        if mask is not None:
            attn = attn + (mask * -100000.0).unsqueeze(1)
        x = x + self.proj((attn.softmax(dim=-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TorchTokenEmbed(torch.nn.Module):
    def __init__(self, in_c, out_c, dims):
        super().__init__()
        conv, bn = torch.nn.Conv1d, torch.nn.BatchNorm1d
        a, b, c = dims if in_c == 3 else (in_c, in_c, out_c)
        self.first_conv = torch.nn.Sequential(conv(in_c, a, 1), bn(a), torch.nn.ReLU(), conv(a, b, 1))
        self.second_conv = torch.nn.Sequential(conv(2 * b, c, 1), bn(c), torch.nn.ReLU(), conv(c, out_c, 1))
        self.out_c = out_c

    def forward(self, groups):
        bs, g, n, c = groups.shape
        feature = self.first_conv(groups.reshape(bs * g, n, c).transpose(2, 1))
        feature = torch.cat([feature.max(dim=2, keepdim=True)[0].expand(-1, -1, n), feature], dim=1)
        return self.second_conv(feature).max(dim=2)[0].reshape(bs, g, self.out_c)


def conv_bn(i, o):
    return torch.nn.Sequential(torch.nn.Conv1d(i, o, 1), torch.nn.BatchNorm1d(o))


class TorchI2PMAE(torch.nn.Module):
    """H_Encoder.forward and I2P_MAE.forward after the grouping and the teacher, drop path 0, with a given coarse
    mask (True: masked) and given feature maps; the propagation sends masked coarse tokens' lists nowhere (the
    reference's scatter to index 0 also unmasks the first cloud's token 0)."""

    def __init__(self, dims, depths, heads, embed_dims, k1, feat):
        super().__init__()
        mlp = lambda d: torch.nn.Sequential(torch.nn.Linear(3, d), torch.nn.GELU(), torch.nn.Linear(d, d))
        self.token_embed = torch.nn.ModuleList(
            [TorchTokenEmbed(3, dims[0], embed_dims)] + [TorchTokenEmbed(dims[i - 1], dims[i], None) for i in (1, 2)]
        )
        self.encoder_pos_embeds = torch.nn.ModuleList([mlp(d) for d in dims])
        self.encoder_blocks = torch.nn.ModuleList(
            [torch.nn.ModuleList([TorchBlock(d, heads) for _ in range(n)]) for d, n in zip(dims, depths, strict=True)]
        )
        self.encoder_norms = torch.nn.ModuleList([torch.nn.LayerNorm(d) for d in dims])
        dec = (dims[2], dims[1])
        self.mask_token = torch.nn.Parameter(torch.zeros(1, dec[0]))
        self.h_decoder = torch.nn.ModuleList([TorchBlock(d, heads) for d in dec])
        self.decoder_pos_embeds = torch.nn.ModuleList([mlp(d) for d in dec])
        self.fuse, self.net1, self.net2 = (
            conv_bn(dec[0] + dec[1], dec[1]),
            conv_bn(dec[1], dec[1]),
            conv_bn(dec[1], dec[1]),
        )
        self.decoder_norm = torch.nn.LayerNorm(dec[1])
        self.rec_head_3d = torch.nn.Conv1d(dec[1], 3 * k1, 1)
        self.rec_head_2d = torch.nn.Conv1d(dec[1], feat * k1 * 3, 1)
        self.feat = feat

    def propagate(self, fine, coarse, source, target, source_tokens):
        dists = ((fine[:, :, None] - coarse[:, None]) ** 2).sum(-1)
        dists, idx = dists.sort(dim=-1)
        dists, idx = dists[:, :, :3], idx[:, :, :3]
        weight = 1.0 / (dists + 1e-8)
        weight = weight / weight.sum(dim=2, keepdim=True)
        gathered = torch.stack([source_tokens[i][idx[i]] for i in range(len(idx))])
        x = torch.cat([target, (gathered * weight[..., None]).sum(2)], dim=-1).permute(0, 2, 1)
        x = F.gelu(self.fuse(x))
        x = F.gelu(self.net2(F.gelu(self.net1(x))) + x)
        return x.permute(0, 2, 1)

    def forward(self, neighborhoods, centers, idxs, neighborhood_oris, top_mask, feats, frames, size):
        masks = [top_mask]
        for i in range(len(neighborhoods) - 1, 0, -1):
            b, g, _, _ = neighborhoods[i].shape
            n = b * centers[i - 1].shape[1]
            idx = torch.where(~masks[-1].reshape(-1, 1), idxs[i].reshape(b * g, -1), n).reshape(-1)
            masks.append(torch.ones(n + 1).scatter(0, idx, 0)[:n].bool().reshape(b, -1))
        masks.reverse()
        x_vis_list, mask_vis_list, x_vis = [], [], None
        for i in range(len(centers)):
            if i == 0:
                tokens = self.token_embed[0](neighborhoods[0])
            else:
                b, g1, _ = x_vis.shape
                b, g2, k2, _ = neighborhoods[i].shape
                tokens = self.token_embed[i](x_vis.reshape(b * g1, -1)[idxs[i], :].reshape(b, g2, k2, -1))
            vis = ~masks[i]
            batch, _, c = tokens.shape
            lengths = vis.long().sum(dim=1)
            x_vis = torch.zeros(batch, int(lengths.max()), c)
            centre = torch.zeros(batch, int(lengths.max()), 3)
            mask_vis = torch.ones(batch, int(lengths.max()), int(lengths.max()))
            for j in range(batch):
                x_vis[j][: lengths[j]] = tokens[j][vis[j]]
                centre[j][: lengths[j]] = centers[i][j][vis[j]]
                mask_vis[j][: lengths[j], : lengths[j]] = 0
            pos = self.encoder_pos_embeds[i](centre)
            for block in self.encoder_blocks[i]:
                x_vis = block(x_vis + pos, mask_vis)
            x_vis_list.append(self.encoder_norms[i](x_vis))
            mask_vis_list.append(~(mask_vis[:, :, 0].bool()))
            if i < len(centers) - 1:
                tokens = tokens.clone()
                tokens[vis] = x_vis[~(mask_vis[:, :, 0].bool())]
                x_vis = tokens
        # the decoder
        center, mask = centers[-1], masks[-1]
        x_full = x_vis_list[-1]
        b, _, c = x_full.shape
        center_0 = torch.cat((center[~mask].reshape(b, -1, 3), center[mask].reshape(b, -1, 3)), dim=1)
        pos = self.decoder_pos_embeds[0](center_0)
        x_full = torch.cat([x_full, self.mask_token.expand(b, int(mask[0].sum()), -1)], dim=1)
        x_full = self.h_decoder[0](x_full + pos)
        center, mask = centers[-2], masks[-2]
        x_en = torch.zeros(b, center.shape[1], x_vis_list[-2].shape[-1])
        x_en[~mask] = x_vis_list[-2][mask_vis_list[-2]]
        x_full = self.propagate(center, center_0, None, x_en, x_full)
        x_full = self.decoder_norm(self.h_decoder[1](x_full + self.decoder_pos_embeds[1](center)))
        c = x_full.shape[-1]
        x_rec = x_full[mask].reshape(-1, c)
        rec = self.rec_head_3d(x_rec.unsqueeze(-1)).reshape(len(x_rec), -1, 3)
        gt = neighborhoods[-2][mask].reshape(len(x_rec), -1, 3)
        d = ((rec[:, :, None] - gt[:, None]) ** 2).sum(-1)
        loss_3d = d.min(2)[0].mean() + d.min(1)[0].mean()
        x_vis = x_full[~mask].reshape(-1, c)
        rec_2d = self.rec_head_2d(x_vis.unsqueeze(-1)).reshape(len(x_vis), -1, self.feat * 3)
        bb, nn_, kk, _ = neighborhood_oris[-2].shape
        xyz = neighborhood_oris[-2].reshape(bb, nn_ * kk, 3)
        targets = [
            torch_i2p(view, f, *frame, size).reshape(bb, nn_, kk, -1)[~mask].reshape(len(x_vis), -1, self.feat)
            for view, f, frame in zip(views_torch(xyz), feats, frames, strict=True)
        ]
        loss_2d = F.mse_loss(rec_2d, torch.cat(targets, dim=-1))
        return loss_3d, loss_2d


def load_into_torch(model, params, stats):
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    conv = lambda module, p: (module.weight.copy_(t(p['kernel']).T[..., None]), module.bias.copy_(t(p['bias'])))
    linear = lambda module, p: (module.weight.copy_(t(p['kernel']).T), module.bias.copy_(t(p['bias'])))

    def norm(module, p, s=None):
        module.weight.copy_(t(p['scale']))
        module.bias.copy_(t(p['bias']))
        if s is not None:
            module.running_mean.copy_(t(s['mean']))
            module.running_var.copy_(t(s['var']))

    def block(module, q):
        norm(module.norm1, q['norm1'])
        norm(module.norm2, q['norm2'])
        module.qkv.weight.copy_(t(q['attn']['qkv']['kernel']).T)
        linear(module.proj, q['attn']['proj'])
        linear(module.fc1, q['mlp']['fc1'])
        linear(module.fc2, q['mlp']['fc2'])

    with torch.no_grad():
        for i, embed in enumerate(model.token_embed):
            p, s = params[f'token_embed_{i}'], stats[f'token_embed_{i}']
            for seq, name in ((embed.first_conv, 'first_conv'), (embed.second_conv, 'second_conv')):
                conv(seq[0], p[f'{name}_0'])
                norm(seq[1], p[f'{name}_1'], s[f'{name}_1'])
                conv(seq[3], p[f'{name}_3'])
        for i in range(3):
            linear(model.encoder_pos_embeds[i][0], params[f'encoder_pos_embeds_{i}']['0'])
            linear(model.encoder_pos_embeds[i][2], params[f'encoder_pos_embeds_{i}']['2'])
            for j, module in enumerate(model.encoder_blocks[i]):
                block(module, params[f'encoder_blocks_{i}'][f'blocks_{j}'])
            norm(model.encoder_norms[i], params[f'encoder_norms_{i}'])
        for i in range(2):
            linear(model.decoder_pos_embeds[i][0], params[f'decoder_pos_embeds_{i}']['0'])
            linear(model.decoder_pos_embeds[i][2], params[f'decoder_pos_embeds_{i}']['2'])
            block(model.h_decoder[i], params[f'h_decoder_{i}']['blocks_0'])
        for name in ('fuse', 'net1', 'net2'):
            conv(getattr(model, name)[0], params['token_prop_0'][name]['conv'])
            norm(getattr(model, name)[1], params['token_prop_0'][name]['norm'], stats['token_prop_0'][name]['norm'])
        norm(model.decoder_norm, params['decoder_norm'])
        model.mask_token.copy_(t(params['mask_token'])[None])
        conv(model.rec_head_3d, params['rec_head_3d'])
        conv(model.rec_head_2d, params['rec_head_2d'])


@pytest.fixture(scope='module')
def method():
    overrides = ['model.num_groups=(32, 16, 8)', 'model.group_sizes=(8, 4, 4)', 'input.num_points=128',
                 'teacher.image_size=32', 'model.drop_path_rate=0.0']  # fmt: skip
    return i2p_method.Method(load_config(CONFIG, overrides))


def test_loss_equals_the_reference(method):
    """Method.loss (guided masks from the random CLIP's saliency) against the transcription fed the same scales,
    coarse mask and feature maps: both losses, and the mini-PointNets' and propagation's BatchNorm running means."""
    batch = jax.tree.map(jnp.asarray, method.example_batch(3))
    params, extra = jax.jit(method.init)(jax.random.key(0), batch)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    rng = jax.random.key(2)

    @jax.jit
    def run(params, extra, batch):
        """The loss and, recomputed as the method does, its scales, frames, maps and coarse mask."""
        out = method.loss(params, extra, batch, rng, 0)
        m = method.model
        levels = i2p_mae.hierarchy(batch['points'], m.num_groups, m.group_sizes)
        frames, features, saliency = method.teacher_views(extra['clip'], batch['points'])
        centre_saliency = method.view_samples(levels[-1].centres, frames, saliency[..., None])[..., 0].mean(0)
        top = i2p_method.guided_visible(base.stream(rng, 'mask'), centre_saliency, method.num_visible)
        return out, levels, features, saliency, centre_saliency, top

    (loss, (metrics, updated)), levels, features, saliency, centre_saliency, top = run(params, extra, batch)
    points, m = batch['points'], method.model

    to_torch = lambda x: torch.from_numpy(np.array(x))
    cloud = to_torch(points)
    torch_frames = [torch_proj2img(view, 32)[1:] for view in views_torch(cloud)]
    torch_saliency = (
        sum(
            torch_i2p(view, to_torch(saliency[v])[:, None], *torch_frames[v], 32)[..., 0]
            for v, view in enumerate(views_torch(to_torch(levels[-1].centres)))
        )
        / 3
    )
    np.testing.assert_allclose(np.asarray(centre_saliency), torch_saliency.numpy(), atol=1e-7)

    reference = TorchI2PMAE((32, 64, 64), (1, 1, 1), 4, (32, 64, 128), 4, m.feature_dim).train()
    load_into_torch(reference, params, extra['batch_stats'])
    offsets = [0] + [lv.centres.shape[1] for lv in levels[:-1]]
    idxs = [
        to_torch(lv.index + jnp.arange(3)[:, None, None] * n).reshape(-1) for lv, n in zip(levels, offsets, strict=True)
    ]
    with torch.no_grad():
        loss_3d, loss_2d = reference(
            [to_torch(lv.neighbourhoods) for lv in levels], [to_torch(lv.centres) for lv in levels], idxs,
            [to_torch(lv.absolute) for lv in levels], to_torch(~top),
            [to_torch(features[v]).permute(0, 3, 1, 2) for v in range(3)], torch_frames, 32,
        )  # fmt: skip
    np.testing.assert_allclose(float(metrics['chamfer_l2']), float(loss_3d), rtol=2e-5)
    np.testing.assert_allclose(float(metrics['feature_mse']), float(loss_2d), rtol=2e-5)
    np.testing.assert_allclose(float(loss), float(loss_3d + loss_2d), rtol=2e-5)
    stats = updated['batch_stats']
    np.testing.assert_allclose(
        stats['token_embed_1']['second_conv_1']['mean'], reference.token_embed[1].second_conv[1].running_mean,
        atol=1e-5,
    )  # fmt: skip
    np.testing.assert_allclose(stats['token_prop_0']['net2']['norm']['mean'], reference.net2[1].running_mean, atol=1e-5)


def test_encode_and_parameter_count(method):
    batch = jax.tree.map(jnp.asarray, method.example_batch(4))
    params, extra = jax.jit(method.init)(jax.random.key(0), batch)
    represent = jax.jit(method.represent)
    out = represent(params, extra, batch)
    assert out['max'].shape == (4, 64) and out['pooled'].shape == (4, 128)
    one = represent(params, extra, jax.tree.map(lambda x: x[:1], batch))
    np.testing.assert_allclose(one['max'], out['max'][:1], atol=1e-5)  # no batch statistics at evaluation
    # The reference's sizes: the transcription's modules count the same parameters.
    model = i2p_mae.make_model('base')
    points = jnp.zeros((1, 2048, 3))
    shapes = jax.eval_shape(lambda: i2p_mae.init_variables(model, jax.random.key(0), points, 13)['params'])
    reference = TorchI2PMAE((96, 192, 384), (5, 5, 5), 6, (128, 256, 512), 8, 512)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == sum(p.numel() for p in reference.parameters())
    encoder = {k: v for k, v in shapes.items() if k.startswith(('token_embed', 'encoder'))}
    assert sum(x.size for x in jax.tree.leaves(encoder)) == pytest.approx(12.9e6, rel=0.02)  # the README's 12.9M


def test_teacher_from_a_transformers_folder(tmp_path):
    saved_clip(tmp_path, width=32, depth=2, heads=2, projection=8)  # no tokenizer.json: only the image tower is read
    overrides = ['teacher.kind=clip', f'teacher.path={tmp_path}', 'teacher.image_size=32', 'input.num_points=128',
                 'model.num_groups=(32, 16, 8)', 'model.group_sizes=(8, 4, 4)']  # fmt: skip
    with pytest.raises(ConfigError, match=r'teacher\.image_size'):
        i2p_method.Method(load_config(CONFIG, [*overrides, 'teacher.image_size=64']))
    method = i2p_method.Method(load_config(CONFIG, overrides))
    assert method.model.feature_dim == 8
    batch = jax.tree.map(jnp.asarray, method.example_batch(2))
    params, extra = jax.jit(method.init)(jax.random.key(0), batch)
    _, released = clip_weights.load(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, extra['clip']['vision_model'], released['vision_model'])
    loss, _ = jax.jit(method.loss)(params, extra, batch, jax.random.key(1), 0)
    assert np.isfinite(float(loss))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r'model\.num_groups'):
        load_config(CONFIG, ['model.num_groups=(128, 64)'])
    with pytest.raises(ConfigError, match=r'model\.group_sizes'):
        load_config(CONFIG, ['model.group_sizes=(16, 8, 100)'])
    with pytest.raises(ConfigError, match=r'mask\.ratio'):
        load_config(CONFIG, ['mask.ratio=0.01'])
    with pytest.raises(ConfigError, match=r'teacher\.kind'):
        load_config(CONFIG, ['teacher.kind=dino'])
    with pytest.raises(ConfigError, match=r'teacher\.path'):
        i2p_method.Method(load_config('configs/i2p_mae.py'))  # the paper's teacher needs its weights
    with pytest.raises(ConfigError, match=r'teacher\.image_size'):
        i2p_method.Method(load_config(CONFIG, ['teacher.image_size=66']))


def test_gradients_sharded_over_8_devices_equal_one_devices(method):
    """The loss and its gradient with the batch split over the 8 devices (BatchNorm statistics and the losses' means
    over the global batch) equal one device's: the gradients to 1e-3 of their global norm. (Rounding differs
    between the two programs; a near-tie in a max-pool then routes a kernel column's gradient to another point, and
    the biases a BatchNorm removes have gradients of pure rounding noise.)"""
    batch = jax.tree.map(jnp.asarray, method.example_batch(8))
    params, extra = jax.jit(method.init)(jax.random.key(0), batch)
    grad = jax.jit(jax.value_and_grad(lambda p, b: method.loss(p, extra, b, jax.random.key(1), 0)[0]))
    loss, want = grad(params, batch)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    sharded = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
    sharded_loss, got = grad(params, sharded)
    assert jax.device_count() == 8 and sharded['points'].sharding.num_devices == 8
    np.testing.assert_allclose(float(sharded_loss), float(loss), rtol=1e-5)
    norm = lambda tree: np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(tree)))
    assert norm(jax.tree.map(jnp.subtract, got, want)) < 1e-3 * norm(want)


@pytest.mark.slow
def test_runlocal_trains_sharded_and_probes(tmp_path):
    """Two trainer steps over the 8 devices (the teacher and BatchNorm statistics in the replicated extra state),
    then the probes. That sharding changes no number is the test above's: a two-run comparison through the trainer
    would only add max-pool near-ties (see there) at twice the cost."""
    summary, _, rows = sharded_runs.run(CONFIG, tmp_path, 'mesh.data=8', *sharded_runs.SMALL_EVAL)
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert 0.0 <= summary['final_eval/label/max/knn'] <= 1.0
    assert all(np.isfinite(r['loss']) and r['feature_mse'] > 0 and r['chamfer_l2'] > 0 for r in rows)
