"""NeRF-MAE's network and loss against the reference's own code: builds zubair-irshad/NeRF-MAE's
SwinTransformer_MAE3D_New from a checkout (`--reference`, e.g. a clone at 721b5ee), loads jaxssl's weights into it,
and prints the largest difference of the predictions, both loss terms, the position tables and the parameter counts.

    python benchmarks/nerf_mae_reference_check.py --reference=/path/to/NeRF-MAE

Needs torch and einops. The reference imports three helpers from torchvision (StochasticDepth, MLP, Permute); this
script provides stand-ins (the model runs in eval mode, where stochastic depth is the identity) so torchvision need
not be installed, and sets np.float (removed in NumPy 1.24, used by the reference's torch_utils.py). Masks come from
the reference's own window_masking_3d (Python's random, seeded) and are handed to jaxssl's model.
"""

import argparse
import random
import sys
import types

import numpy as np
import torch


def install_torchvision_stand_ins() -> None:
    """Modules torchvision.ops.stochastic_depth / torchvision.ops.misc with the three names the reference uses."""

    class StochasticDepth(torch.nn.Module):
        def __init__(self, p, mode):
            super().__init__()
            self.p = p

        def forward(self, x):
            if self.training and self.p > 0:
                raise RuntimeError('the stand-in only supports eval mode')
            return x

    class MLP(torch.nn.Sequential):  # torchvision's layout: Linear, act, Dropout, ..., Linear, Dropout
        def __init__(self, in_channels, hidden_channels, activation_layer=None, inplace=None, dropout=0.0):
            layers, width = [], in_channels
            for hidden in hidden_channels[:-1]:
                layers += [torch.nn.Linear(width, hidden), activation_layer(), torch.nn.Dropout(dropout)]
                width = hidden
            super().__init__(*layers, torch.nn.Linear(width, hidden_channels[-1]), torch.nn.Dropout(dropout))

    class Permute(torch.nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.dims = dims

        def forward(self, x):
            return torch.permute(x, self.dims)

    modules = {
        name: types.ModuleType(name)
        for name in ('torchvision', 'torchvision.ops', 'torchvision.ops.stochastic_depth', 'torchvision.ops.misc')
    }
    modules['torchvision.ops.stochastic_depth'].StochasticDepth = StochasticDepth
    modules['torchvision.ops.misc'].MLP = MLP
    modules['torchvision.ops.misc'].Permute = Permute
    sys.modules.update(modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--reference', required=True, help='a NeRF-MAE checkout (holds nerf_mae/model/mae/)')
    parser.add_argument('--resolution', type=int, default=96, help='voxels a side, a multiple of 32')
    args = parser.parse_args()
    np.float = float  # noqa: NPY001 (the reference's torch_utils.py uses it)
    install_torchvision_stand_ins()
    sys.path.insert(0, args.reference)
    check(args.resolution)


def check(resolution: int) -> None:
    """Runs both at a small size: patch 4, width 12, four stages (the reference's decoder needs four), two
    scenes of different extents (padding), float64 for the reference. At 96^3 (24 tokens) stage 2's 6 tokens are
    padded to 8 and shifted, the case of stage 3 at 160^3. Raises AssertionError on a mismatch."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from nerf_mae.model.mae.swin_mae3d import SwinTransformer_MAE3D_New  # from --reference

    from jaxssl.data import radiance_grids
    from jaxssl.methods import nerf_mae
    from jaxssl.models.swin3d import NeRFMAE, sincos_3d

    torch.set_default_dtype(torch.float64)
    R, P, C, DEPTHS, HEADS = resolution, 4, 12, (2, 2, 2, 2), (1, 2, 2, 4)
    ref = SwinTransformer_MAE3D_New(
        patch_size=[P] * 3,
        embed_dim=C,
        depths=list(DEPTHS),
        num_heads=list(HEADS),
        window_size=[4] * 3,
        stochastic_depth_prob=0.1,
        resolution=R,
        masking_prob=0.75,
    ).eval()
    ours = NeRFMAE(patch=P, width=C, depths=DEPTHS, heads=HEADS, window=4)
    n = R // P
    params = ours.init(jax.random.PRNGKey(0), jnp.zeros((1, R, R, R, 4)), jnp.zeros((1, n, n, n), bool))['params']
    params = jax.tree.map(lambda a: np.asarray(a) * (3.0 if a.ndim <= 2 else 1.0), params)
    flat = traverse_util.flatten_dict(params, sep='/')
    t = lambda name, *perm: (
        torch.tensor(np.asarray(flat[name])).permute(*perm) if perm else torch.tensor(np.asarray(flat[name]))
    )
    sd = {
        'patch_partition.0.weight': t('patch_embed/kernel', 4, 3, 0, 1, 2),
        'patch_partition.0.bias': t('patch_embed/bias'),
        'patch_partition.2.weight': t('patch_norm/scale'),
        'patch_partition.2.bias': t('patch_norm/bias'),
        'mask_token': t('mask_token'),
        'out.conv.weight': t('out/kernel', 4, 3, 0, 1, 2),
        'out.conv.bias': t('out/bias'),
    }
    for s in range(4):
        off = 0
        if s > 0:
            sd[f'stages.{s}.0.reduction.weight'] = t(f'merge{s}/reduction/kernel', 1, 0)
            sd[f'stages.{s}.0.norm.weight'] = t(f'merge{s}/norm/scale')
            sd[f'stages.{s}.0.norm.bias'] = t(f'merge{s}/norm/bias')
            off = 1
        for i in range(DEPTHS[s]):
            a, b = f'stages.{s}.{i + off}', f'stage{s}_block{i}'
            for tn, on in (('norm1', 'norm1'), ('norm2', 'norm2')):
                sd[f'{a}.{tn}.weight'] = t(f'{b}/{on}/scale')
                sd[f'{a}.{tn}.bias'] = t(f'{b}/{on}/bias')
            for tn, on in (('attn.qkv', 'attn/qkv'), ('attn.proj', 'attn/proj'), ('mlp.0', 'fc1'), ('mlp.3', 'fc2')):
                sd[f'{a}.{tn}.weight'] = t(f'{b}/{on}/kernel', 1, 0)
                sd[f'{a}.{tn}.bias'] = t(f'{b}/{on}/bias')
            sd[f'{a}.attn.relative_position_bias_table'] = t(f'{b}/attn/relative_position_bias_table')
    for k in range(4):  # reference decoder{k+1} = ours decoder{k}
        a, b = f'decoder{k + 1}', f'decoder{k}'
        sd[f'{a}.transp_conv.weight'] = t(f'{b}/transp_conv/kernel', 3, 4, 0, 1, 2)
        sd[f'{a}.transp_conv.bias'] = t(f'{b}/transp_conv/bias')
        for c in ('conv1', 'conv2', 'conv3'):
            if f'{b}/conv_block/{c}/kernel' in flat:
                sd[f'{a}.conv_block.{c}.weight'] = t(f'{b}/conv_block/{c}/kernel', 4, 3, 0, 1, 2)
                sd[f'{a}.conv_block.{c}.bias'] = t(f'{b}/conv_block/{c}/bias')
    missing, unexpected = ref.load_state_dict({k: v.double() for k, v in sd.items()}, strict=False)
    assert not unexpected and all('relative_position_index' in k or k == 'pos_embed' for k in missing), missing
    rng = np.random.default_rng(0)
    scenes = [rng.uniform(size=(4, R - 14, R, R - 23)), rng.uniform(size=(4, R, R - 27, R - 4))]
    for sc in scenes:
        sc[3] = np.where(rng.uniform(size=sc[3].shape) < 0.6, 0.0, sc[3])
    with torch.no_grad():
        random.seed(0)
        _, rgb_ref, alpha_ref = ref([torch.tensor(sc) for sc in scenes])
        random.seed(0)
        padded, _ = ref.transform([torch.tensor(sc) for sc in scenes])
        x = torch.cat(padded, 0)
        out_ref, mask_patches = ref.forward_encoder_ecoder(x)
    token_mask = mask_patches[..., 0].bool().numpy()
    assert np.all(token_mask == token_mask[:1])
    grids = [radiance_grids.pad_grid(np.moveaxis(sc, 0, -1), R) for sc in scenes]
    grid = np.stack([g['grid'] for g in grids]).astype(np.float32)
    valid = np.stack([g['valid'] for g in grids])
    jax.config.update('jax_default_matmul_precision', 'highest')
    out = ours.apply({'params': params}, jnp.asarray(grid), jnp.asarray(token_mask[:1]))
    pred = np.asarray(out['prediction'])
    want = out_ref.permute(0, 2, 3, 4, 1).numpy()
    print(f'{R}^3: prediction max abs diff {np.abs(pred - want).max():.2e}, outputs up to {np.abs(want).max():.2f}')
    assert np.abs(pred - want).max() < 1e-4 * max(np.abs(want).max(), 1.0)
    lr, la = nerf_mae.nerf_mae_loss(
        out['prediction'], jnp.asarray(grid), jnp.asarray(valid), nerf_mae.voxel_mask(jnp.asarray(token_mask[:1]), P)
    )
    print(f'L_rgb {float(lr):.7f} (reference {float(rgb_ref):.7f}), L_alpha {float(la):.7f} ({float(alpha_ref):.7f})')
    np.testing.assert_allclose([float(lr), float(la)], [float(rgb_ref), float(alpha_ref)], rtol=1e-5)
    table = np.abs(ref.pos_embed.numpy()[0] - sincos_3d(C, n)).max()
    counts = sum(p.numel() for p in ref.parameters() if p.requires_grad), sum(v.size for v in jax.tree.leaves(params))
    print(f'position tables differ by {table:.1e}; trainable parameters {counts[0]:,} (reference) / {counts[1]:,}')
    assert table < 1e-6 and counts[0] == counts[1]
    print('OK: equal to the reference')


if __name__ == '__main__':
    main()
