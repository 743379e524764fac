"""The ResNet backbone against a torch transcription of torchvision's forward, with the same weights."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.models import resnet

torch = pytest.importorskip('torch')
F = torch.nn.functional


def to_torch(tree):
    return {k: torch.tensor(np.asarray(v)) for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


def torch_forward(x, p, s, variant, small_stem, train):
    """torchvision.models.ResNet.forward (fc = Identity) in functional torch, NCHW; `s` holds the running stats
    and is updated in place when training (torch's momentum 0.1 and unbiased running variance)."""
    stages, bottleneck = resnet.VARIANTS[variant]

    def conv(x, name, stride=1, pad=0):
        return F.conv2d(x, p[f'{name}/kernel'].permute(3, 2, 0, 1), stride=stride, padding=pad)

    def bn(x, name):
        return F.batch_norm(
            x, s[f'{name}/mean'], s[f'{name}/var'], p[f'{name}/scale'], p[f'{name}/bias'], train, 0.1, 1e-5
        )

    x = F.relu(bn(conv(x, 'conv1', *((1, 1) if small_stem else (2, 3))), 'bn1'))
    if not small_stem:
        x = F.max_pool2d(x, 3, 2, 1)
    for stage, blocks in enumerate(stages):
        for block in range(blocks):
            b, stride = f'layer{stage + 1}_{block}', 2 if stage > 0 and block == 0 else 1
            if bottleneck:
                y = F.relu(bn(conv(x, f'{b}/conv1'), f'{b}/bn1'))
                y = F.relu(bn(conv(y, f'{b}/conv2', stride, 1), f'{b}/bn2'))
                y = bn(conv(y, f'{b}/conv3'), f'{b}/bn3')
            else:
                y = F.relu(bn(conv(x, f'{b}/conv1', stride, 1), f'{b}/bn1'))
                y = bn(conv(y, f'{b}/conv2', 1, 1), f'{b}/bn2')
            if f'{b}/downsample_conv/kernel' in p:
                x = bn(conv(x, f'{b}/downsample_conv', stride), f'{b}/downsample_bn')
            x = F.relu(x + y)
    return x.mean(dim=(2, 3))


@pytest.mark.parametrize(
    'variant, small_stem, size', [('resnet18', True, 16), ('resnet50', False, 36), ('resnet34', False, 33)]
)
def test_matches_torchvision_transcription_in_train_and_eval(variant, small_stem, size):
    model = resnet.make_resnet(variant, width=8, small_stem=small_stem)
    images = jax.random.normal(jax.random.key(1), (4, size, size, 3))
    variables = model.init(jax.random.key(0), images)
    # Non-trivial BatchNorm affine parameters, so a swapped scale / shift or a missing one shows.
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape) if p.ndim == 1 else p,
        variables['params'],
    )
    out, updated = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images, True,
                               mutable=['batch_stats'])  # fmt: skip
    assert out.shape == (4, resnet.feature_dim(variant, 8)) and out.dtype == jnp.float32

    p, s = to_torch(params), to_torch(variables['batch_stats'])
    x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2)
    np.testing.assert_allclose(out, torch_forward(x, p, s, variant, small_stem, True).numpy(), rtol=1e-4, atol=1e-4)
    # Running means follow torch; torch's running variance uses the unbiased batch variance (flax's the biased one),
    # so the two differ by n / (n - 1), n the values per channel: checked where n is smallest, the last stage.
    new = to_torch(updated['batch_stats'])
    for name in new:
        if name.endswith('/mean'):
            np.testing.assert_allclose(new[name], s[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    last = next(k for k in reversed(list(new)) if k.endswith('bn2/var'))
    n = 4 * int(np.ceil(size / (1 if small_stem else 4) / 8)) ** 2
    batch_var = (new[last].numpy() - 0.9) / 0.1
    np.testing.assert_allclose(batch_var * n / (n - 1), (s[last].numpy() - 0.9) / 0.1, rtol=1e-3, atol=1e-4)

    # Evaluation normalises with the running averages.
    shift = lambda v: v + 0.2 * jax.random.uniform(jax.random.key(v.size), v.shape)
    stats = jax.tree.map(shift, variables['batch_stats'])
    evaluated = model.apply({'params': params, 'batch_stats': stats}, images, False)
    np.testing.assert_allclose(
        evaluated, torch_forward(x, p, to_torch(stats), variant, small_stem, False).numpy(), rtol=1e-4, atol=1e-4
    )


def test_init_follows_torchvision():
    model = resnet.make_resnet('resnet50', width=16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    kernel = variables['params']['layer2_0']['conv2']['kernel']  # (3, 3, 32, 32): kaiming normal, fan out
    assert abs(float(jnp.std(kernel)) - np.sqrt(2 / (3 * 3 * 32))) < 0.01
    assert float(jnp.max(jnp.abs(kernel))) > 2.5 * np.sqrt(2 / (3 * 3 * 32))  # normal, not truncated at 2 std
    bn = variables['params']['layer2_0']['bn3']
    assert bool(jnp.all(bn['scale'] == 1)) and bool(jnp.all(bn['bias'] == 0))
    assert 'bias' not in variables['params']['conv1']
    stats = variables['batch_stats']['bn1']
    assert bool(jnp.all(stats['mean'] == 0)) and bool(jnp.all(stats['var'] == 1))


def test_zero_init_residual_starts_every_block_as_the_identity():
    for variant in ('resnet18', 'resnet50'):
        model = resnet.make_resnet(variant, width=8, zero_init_residual=True)
        params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
        last = 'bn3' if resnet.VARIANTS[variant][1] else 'bn2'
        for name, block in params.items():
            if name.startswith('layer'):
                assert bool(jnp.all(block[last]['scale'] == 0)) and bool(jnp.all(block['bn1']['scale'] == 1))


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match='resnet18, resnet34, resnet50'):
        resnet.make_resnet('resnet20')
    assert resnet.is_resnet('resnet50') and not resnet.is_resnet('micro/4')
