"""ViT building blocks: the sinusoid table, patch order, attention biases, scan / remat / dtype options."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.models import vit


def test_sinusoid_table_known_values():
    table = vit.sinusoid_table(3, 6)
    assert table.shape == (3, 6) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], [0, 1, 0, 1, 0, 1])  # sin(0), cos(0) interleaved
    freqs = 1 / 10000.0 ** (np.array([0, 0, 2, 2, 4, 4]) / 6)
    angles = 2 * freqs
    np.testing.assert_allclose(table[2, 0::2], np.sin(angles[0::2]), rtol=1e-6)
    np.testing.assert_allclose(table[2, 1::2], np.cos(angles[1::2]), rtol=1e-6)


def test_sinusoid_table_computed_in_float64():
    # Large positions lose precision if angles are formed in float32 first.
    table = vit.sinusoid_table(1568, 768)
    want = np.sin(np.float64(1567) / np.power(10000.0, 0.0))
    assert table[1567, 0] == np.float32(want)


def test_patch_embed_token_order():
    """Token index = t * (H/p)(W/p) + h * (W/p) + w, like the reference Conv3d + flatten."""
    video = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 6, 4, 3)), jnp.float32)
    module = vit.PatchEmbed(5, (2, 2, 2))
    params = module.init(jax.random.key(0), video)['params']
    tokens = module.apply({'params': params}, video)
    assert tokens.shape == (1, 2 * 3 * 2, 5)
    kernel, bias = params['proj']['kernel'], params['proj']['bias']
    t, h, w = 1, 2, 0
    tube = video[0, 2 * t : 2 * t + 2, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2]
    want = jnp.einsum('thwc,thwcd->d', tube, kernel) + bias
    np.testing.assert_allclose(tokens[0, t * 6 + h * 2 + w], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('patch, shape', [((2, 2, 2), (2, 4, 6, 4, 3)), ((4, 2), (2, 8, 6, 3))])
def test_patch_embed_matmul_equals_conv(patch, shape):
    """The reshape + matmul tubelet embedding has the conv's parameters and gives its result."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    conv, matmul = vit.PatchEmbed(7, patch), vit.PatchEmbed(7, patch, impl='matmul')
    params = conv.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, matmul.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(matmul.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown patch embedding impl 'fft'"):
        vit.PatchEmbed(7, patch, impl='fft').init(jax.random.key(0), x)


@pytest.mark.parametrize('impl', ['conv', 'matmul'])
def test_embedding_selected_tokens_equals_selecting_embedded_tokens(impl):
    """token_idx (the encoder's visible tokens) gives the same rows as embedding everything and then selecting."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 8, 8, 3)), jnp.float32)
    idx = jnp.asarray([[0, 3, 5, 7], [1, 2, 6, 7]])
    embed = vit.PatchEmbed(6, (2, 4, 4), impl=impl)
    params = embed.init(jax.random.key(0), x)
    selected = embed.apply(params, x, idx)
    np.testing.assert_allclose(selected, jnp.take_along_axis(embed.apply(params, x), idx[..., None], 1), atol=1e-6)
    pos = vit.PositionEmbedding('learned')
    pos_params = pos.init(jax.random.key(1), embed.apply(params, x))
    full = pos.apply(pos_params, embed.apply(params, x))
    np.testing.assert_allclose(pos.apply(pos_params, selected, idx, 8), jnp.take_along_axis(full, idx[..., None], 1))
    with pytest.raises(ValueError, match='needs num_tokens'):
        pos.apply(pos_params, selected, idx)


def test_attention_auto_is_xla_off_gpu():
    """'' / None pick cuDNN only on GPUs in half precision; here (CPU) they are the XLA attention."""
    q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(2, 5, 2, 8)), jnp.bfloat16) for i in range(3))
    want = jax.nn.dot_product_attention(q, k, v, implementation='xla')
    for impl in (None, '', 'xla'):
        np.testing.assert_array_equal(vit.dot_product_attention(q, k, v, impl), want)


def test_attention_has_q_and_v_bias_but_no_k_bias():
    x = jnp.ones((1, 3, 8))
    params = vit.Attention(8, 2).init(jax.random.key(0), x)['params']
    assert set(params) == {'qkv', 'q_bias', 'v_bias', 'proj'}
    assert set(params['qkv']) == {'kernel'}


def test_attention_matches_manual_softmax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    module = vit.Attention(8, 2)
    params = module.init(jax.random.key(0), x)['params']
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    out = module.apply({'params': params}, x)
    qkv = x @ params['qkv']['kernel'] + jnp.concatenate([params['q_bias'], jnp.zeros(8), params['v_bias']])
    q, k, v = (qkv[..., i * 8 : (i + 1) * 8].reshape(2, 5, 2, 4).transpose(0, 2, 1, 3) for i in range(3))
    attn = jax.nn.softmax(q * 4**-0.5 @ k.transpose(0, 1, 3, 2), axis=-1)
    ctx = (attn @ v).transpose(0, 2, 1, 3).reshape(2, 5, 8)
    want = ctx @ params['proj']['kernel'] + params['proj']['bias']
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_mlp_uses_exact_gelu():
    x = jnp.linspace(-3, 3, 8).reshape(1, 1, 8)
    module = vit.Mlp(8)
    params = module.init(jax.random.key(0), x)['params']
    h = x @ params['fc1']['kernel'] + params['fc1']['bias']
    want = jax.nn.gelu(h, approximate=False) @ params['fc2']['kernel'] + params['fc2']['bias']
    np.testing.assert_allclose(module.apply({'params': params}, x), want, rtol=1e-6, atol=1e-6)


TINY = dict(width=16, depth=3, heads=2, mlp_hidden=32)


@pytest.fixture(scope='module')
def tiny_stack():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 16)), jnp.float32)
    module = vit.Transformer(**TINY)
    params = module.init(jax.random.key(0), x)['params']
    return module, params, x


def test_scan_and_remat_match_unrolled(tiny_stack):
    module, params, x = tiny_stack
    want, inter = module.apply({'params': params}, x)
    assert set(inter) == {'block_00', 'block_01', 'block_02', 'pre_norm'}
    scanned = dataclasses.replace(module, scan_layers=True, remat=True)
    got, _ = scanned.apply({'params': vit.stack_blocks(params, 3)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    shapes = jax.eval_shape(scanned.init, jax.random.key(0), x)['params']
    assert shapes['blocks']['attn']['qkv']['kernel'].shape == (3, 16, 48)
    round_trip = vit.unstack_blocks(vit.stack_blocks(params, 3))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), round_trip, params))


def test_split_qkv_has_the_fused_parameters_and_numbers(tiny_stack):
    module, params, x = tiny_stack
    split = dataclasses.replace(module, split_qkv=True)
    # The same parameter tree and init (checkpoints and recipes carry over), the same outputs and gradients.
    split_params = split.init(jax.random.key(0), x)['params']
    jax.tree.map(np.testing.assert_array_equal, split_params, params)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)  # non-zero q / v biases
    np.testing.assert_allclose(
        split.apply({'params': params}, x)[0], module.apply({'params': params}, x)[0], rtol=1e-4, atol=1e-5
    )
    probe = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)  # (a normed output's sum of
    grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x)[0] * probe))(params)  # squares is flat)
    # Float32 sums in another order: ~2e-5 on gradients of order 1.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), grad(split), grad(module))


def test_approximate_gelu_is_the_tanh_form_and_close_to_exact():
    x = jnp.linspace(-3, 3, 8).reshape(1, 1, 8)
    exact, tanh = vit.Mlp(8), vit.Mlp(8, approximate_gelu=True)
    params = exact.init(jax.random.key(0), x)['params']
    h = x @ params['fc1']['kernel'] + params['fc1']['bias']
    want = jax.nn.gelu(h, approximate=True) @ params['fc2']['kernel'] + params['fc2']['bias']
    got = tanh.apply({'params': params}, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    difference = np.abs(got - exact.apply({'params': params}, x)).max()
    assert 0 < difference < 1e-2


def test_recompute_gelu_has_the_same_numbers_and_keeps_fewer_activations(tiny_stack):
    module, params, x = tiny_stack
    recomputed = dataclasses.replace(module, recompute_gelu=True)
    probe = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
    grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x)[0] * probe))(params)
    np.testing.assert_array_equal(recomputed.apply({'params': params}, x)[0], module.apply({'params': params}, x)[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), grad(recomputed), grad(module))

    # What the lever is for: the backward keeps fc1's output only, not the erf form's two intermediates. XLA's
    # buffer assignment for a bf16 MLP gradient (4,096 tokens x 256 hidden) shows it without running anything.
    def temp_bytes(recompute):
        mlp = vit.Mlp(256, jnp.bfloat16, recompute_gelu=recompute)
        tokens = jnp.ones((4096, 64), jnp.bfloat16)
        p = mlp.init(jax.random.key(0), tokens)['params']
        loss = lambda p, t: jnp.sum(mlp.apply({'params': p}, t).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(p, tokens).compile().memory_analysis().temp_size_in_bytes

    hidden_array = 4096 * 256 * 2  # one (tokens, hidden) bf16 array
    assert temp_bytes(True) <= temp_bytes(False) - 2 * hidden_array  # measured: 12 vs 16 MiB


@pytest.mark.parametrize('unroll', [0, 2])
def test_unrolled_scan_matches_unrolled_layers_and_keeps_the_stacked_layout(tiny_stack, unroll):
    module, params, x = tiny_stack
    want, _ = module.apply({'params': params}, x)
    unrolled = dataclasses.replace(module, scan_layers=True, scan_unroll=unroll)
    stacked = vit.stack_blocks(params, 3)
    got, _ = unrolled.apply({'params': stacked}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    shapes = jax.eval_shape(unrolled.init, jax.random.key(0), x)['params']
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda a: a.shape, stacked)
    grads = jax.grad(lambda p: unrolled.apply({'params': p}, x)[0].sum())(stacked)
    want_grads = vit.stack_blocks(jax.grad(lambda p: module.apply({'params': p}, x)[0].sum())(params), 3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, want_grads)


def test_bfloat16_compute_keeps_float32_params(tiny_stack):
    module, params, x = tiny_stack
    bf16 = dataclasses.replace(module, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.init(jax.random.key(0), x)))
    out, _ = bf16.apply({'params': params}, x)
    assert out.dtype == jnp.bfloat16
    want, _ = module.apply({'params': params}, x)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=0.1)


def test_drop_path_and_layer_scale():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(400, 4, 16)), jnp.float32)
    block = vit.Block(16, 2, 32, layer_scale_init=0.1)
    params = block.init(jax.random.key(0), x)['params']
    np.testing.assert_allclose(params['gamma_1'], 0.1)
    eval_out, _ = block.apply({'params': params}, x)
    rate0, _ = block.apply({'params': params}, x, 0.0, True, rngs={'drop_path': jax.random.key(1)})
    np.testing.assert_allclose(rate0, eval_out, rtol=1e-6)
    train_out, _ = block.apply({'params': params}, x, 0.5, True, rngs={'drop_path': jax.random.key(1)})
    # Both residual branches dropped (probability 1/4) leaves a sample untouched.
    untouched = np.all(np.asarray(train_out) == np.asarray(x), axis=(1, 2))
    assert 0.15 < untouched.mean() < 0.35


def test_drop_path_is_unbiased():
    x = jnp.ones((20000, 1))
    out = vit.drop_path(x, 0.3, jax.random.key(0))
    np.testing.assert_allclose(np.unique(np.asarray(out)), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs(float(out.mean()) - 1) < 0.03


def test_learned_position_embedding():
    x = jnp.zeros((1, 5, 4))
    fixed = vit.PositionEmbedding('sincos')
    assert fixed.init(jax.random.key(0), x) == {}
    np.testing.assert_allclose(fixed.apply({}, x)[0], vit.sinusoid_table(5, 4))
    learned = vit.PositionEmbedding('learned').init(jax.random.key(0), x)['params']['pos_embed']
    assert learned.shape == (1, 5, 4) and float(jnp.abs(learned).max()) <= 0.02


def test_patch_embed_2d_images():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 12, 3)), jnp.float32)
    module = vit.PatchEmbed(7, (4, 4))
    params = module.init(jax.random.key(0), images)['params']
    tokens = module.apply({'params': params}, images)
    assert tokens.shape == (2, 6, 7) and params['proj']['kernel'].shape == (4, 4, 3, 7)
    want = jnp.einsum('hwc,hwcd->d', images[1, 4:8, 8:12], params['proj']['kernel']) + params['proj']['bias']
    np.testing.assert_allclose(tokens[1, 1 * 3 + 2], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='not divisible'):
        module.apply({'params': params}, images[:, :7])
