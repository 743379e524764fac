"""Numerical parity with transformers' PyTorch ViTMAEForPreTraining through jaxssl.convert.mae: encoder output,
decoder logits and loss for the same noise (so the same masks), the unmasked encoder, and the converter's layouts."""

import dataclasses

import jax
import numpy as np
import pytest
import torch  # the `torch` extra: a missing install fails here rather than skipping parity
import transformers

from jaxssl import masks
from jaxssl.convert import mae as convert
from jaxssl.convert.videomae import ConversionError
from jaxssl.methods import mae
from jaxssl.models import mae as model_lib

SIZE, PATCH, RATIO = 16, 4, 0.75
TOKENS = (SIZE // PATCH) ** 2


@pytest.fixture(scope='module')
def torch_model():
    torch.manual_seed(0)
    config = transformers.ViTMAEConfig(
        image_size=SIZE,
        patch_size=PATCH,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        layer_norm_eps=1e-6,  # the reference's (transformers defaults to 1e-12)
        mask_ratio=RATIO,
        norm_pix_loss=True,
        attn_implementation='eager',
    )
    model = transformers.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        # transformers' own sin-cos initialisation (this version leaves the fixed tables at zero after post_init).
        model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
        model.vit.embeddings.initialize_weights()
        model.decoder.initialize_weights(TOKENS)
        # Random weights, biases (the key bias too) and norm affines, so a mis-mapped one cannot hide.
        for name, p in model.named_parameters():
            if 'pos_embed' in name or 'position_embeddings' in name:
                continue
            scale = 0.1 if name.endswith('bias') or 'norm' in name else 0.2
            p.copy_(torch.randn_like(p) * scale + (1.0 if 'norm' in name and name.endswith('weight') else 0.0))
    tables = [model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed]
    assert all(float(t.detach().abs().sum()) > 0 for t in tables)
    assert float(model.vit.layers[0].attention.k_proj.bias.detach().abs().sum()) > 0
    return model


@pytest.fixture(scope='module')
def jax_model():
    return model_lib.MAEPretrain(
        width=32, depth=2, heads=4, mlp_hidden=128, dec_width=16, dec_depth=2, dec_heads=2, dec_mlp_hidden=64,
        patch=PATCH,
    )  # fmt: skip


@pytest.fixture(scope='module')
def batch():
    rng = np.random.default_rng(0)
    noise = rng.random((2, TOKENS)).astype(np.float32)
    image = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    return dict(image=image, noise=noise, **masks.shuffle_masking_from_noise(noise, RATIO))


def torch_outputs(model, batch):
    pixel_values = torch.from_numpy(batch['image']).permute(0, 3, 1, 2)  # NHWC -> NCHW
    noise = torch.from_numpy(batch['noise'])
    with torch.no_grad():
        out = model(pixel_values, noise=noise)
        encoded = model.vit(pixel_values, noise=noise).last_hidden_state
    return encoded.numpy(), out.logits.numpy(), float(out.loss), out.mask.numpy(), out.ids_restore.numpy()


@pytest.fixture(scope='module')
def params(torch_model, jax_model):
    return convert.from_torch_state_dict(torch_model.state_dict(), jax_model)


def test_masks_match_transformers(torch_model, batch):
    *_, want_mask, want_restore = torch_outputs(torch_model, batch)
    np.testing.assert_array_equal(batch['ids_restore'], want_restore)
    np.testing.assert_array_equal(masks.removed_mask(batch['ids_restore'], batch['ids_keep'].shape[1]), want_mask)


def test_encoder_decoder_and_loss_match_transformers(torch_model, jax_model, params, batch):
    want_encoded, want_logits, want_loss, _, _ = torch_outputs(torch_model, batch)
    logits, inter = jax.jit(jax_model.apply)(
        {'params': params}, batch['image'], batch['ids_keep'], batch['ids_restore']
    )
    assert np.abs(np.asarray(inter['encoded']) - want_encoded).max() <= 1e-5
    assert np.abs(np.asarray(logits) - want_logits).max() <= 1e-5
    loss = jax.jit(lambda p, b: mae.compute_loss(jax_model, p, b, train=False)[0])(params, batch)
    assert abs(float(loss) - want_loss) <= 1e-5


def test_unmasked_encoder_matches_transformers(torch_model, jax_model, params, batch):
    """`encode` without ids_keep (the probes' features) = transformers with mask ratio 0 and noise = arange
    (otherwise it returns the tokens permuted by argsort(noise))."""
    pixel_values = torch.from_numpy(batch['image']).permute(0, 3, 1, 2)
    torch_model.config.mask_ratio = 0.0
    try:
        with torch.no_grad():
            noise = torch.arange(TOKENS, dtype=torch.float32).expand(2, -1)
            want = torch_model.vit(pixel_values, noise=noise).last_hidden_state.numpy()
    finally:
        torch_model.config.mask_ratio = RATIO
    got, _ = jax_model.apply({'params': params}, batch['image'], method=jax_model.encode)
    assert got.shape == (2, 1 + TOKENS, 32)
    assert np.abs(np.asarray(got) - want).max() <= 1e-5


def test_position_tables_equal_transformers(torch_model):
    encoder = torch_model.vit.embeddings.position_embeddings[0].detach().numpy()
    decoder = torch_model.decoder.decoder_pos_embed[0].detach().numpy()
    side = SIZE // PATCH
    for table, width in ((encoder, 32), (decoder, 16)):
        np.testing.assert_array_equal(table[0], 0.0)  # the cls row
        np.testing.assert_allclose(table[1:], model_lib.sincos_2d_table(side, side, width), atol=1e-6)


def test_scanned_model_converts_to_the_same_outputs(torch_model, jax_model, batch):
    scanned = dataclasses.replace(jax_model, scan_layers=True)
    params = convert.from_torch_state_dict(torch_model.state_dict(), scanned)
    assert params['encoder']['blocks']['attn']['qkv']['kernel'].shape == (2, 32, 96)
    _, want_logits, _, _, _ = torch_outputs(torch_model, batch)
    logits, _ = scanned.apply({'params': params}, batch['image'], batch['ids_keep'], batch['ids_restore'])
    assert np.abs(np.asarray(logits) - want_logits).max() <= 1e-5


def test_reference_layout_round_trip_and_zero_key_bias(torch_model, jax_model, params, batch):
    ref = convert.canonical_state_dict(torch_model.state_dict())
    assert ref['blocks.1.attn.qkv.weight'].shape == (96, 32) and ref['decoder_blocks.0.attn.qkv.bias'].shape == (48,)
    assert 'pos_embed' in ref and 'decoder_pred.weight' in ref
    back = convert.to_torch_state_dict(params, image_size=SIZE)
    assert back.keys() == ref.keys()
    for key in ref:
        if key.endswith('attn.qkv.bias'):  # the key third is written as zeros
            q, k, v = np.split(ref[key], 3)
            np.testing.assert_array_equal(back[key], np.concatenate([q, np.zeros_like(k), v]))
        else:
            np.testing.assert_allclose(back[key], ref[key], atol=1e-6, err_msg=key)
    # The reference layout (with wrappers) reads back to the same params; loaded into transformers with the key
    # bias zeroed, the outputs are unchanged: the key bias never mattered.
    wrapped = {f'module._orig_mod.{k}': v for k, v in ref.items()}
    again = convert.from_torch_state_dict(wrapped, jax_model)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), again, params))
    state = torch_model.state_dict()
    zeroed = {k: (torch.zeros_like(v) if k.endswith('k_proj.bias') else v.clone()) for k, v in state.items()}
    other = transformers.ViTMAEForPreTraining(torch_model.config).eval()
    other.load_state_dict(zeroed)
    _, want_logits, _, _, _ = torch_outputs(torch_model, batch)
    _, zeroed_logits, _, _, _ = torch_outputs(other, batch)
    assert np.abs(zeroed_logits - want_logits).max() <= 1e-5


def test_transformers_4_names_and_encoder_only_checkpoints(torch_model, jax_model, params):
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    old = {}
    for key, value in state.items():  # transformers 4's names for the same weights
        key = key.replace('vit.layers.', 'vit.encoder.layer.')
        for new, was in (('q_proj', 'attention.query'), ('k_proj', 'attention.key'), ('v_proj', 'attention.value'),
                         ('o_proj', 'output.dense')):  # fmt: skip
            key = key.replace(f'attention.{new}.', f'attention.{was}.')
        key = key.replace('.mlp.fc1.', '.intermediate.dense.').replace('.mlp.fc2.', '.output.dense.')
        old[key] = value
    assert 'vit.encoder.layer.0.attention.attention.query.weight' in old
    got = convert.from_torch_state_dict(old, jax_model)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), got, params))
    # mae_pretrain_vit_*.pth style: the encoder alone, read with allow_missing.
    ref = convert.canonical_state_dict(state)
    encoder_only = {k: v for k, v in ref.items() if not k.startswith(('decoder', 'mask_token'))}
    with pytest.raises(ConversionError, match='missing'):
        convert.from_torch_state_dict(encoder_only, jax_model)
    partial = convert.from_torch_state_dict(encoder_only, jax_model, allow_missing=True)
    assert sorted(partial) == ['cls_token', 'encoder', 'patch_embed']


def test_bad_state_dicts_list_every_problem(torch_model, jax_model):
    ref = convert.canonical_state_dict(torch_model.state_dict())
    ref.pop('blocks.0.norm1.bias')
    ref['blocks.0.attn.extra'] = np.zeros(3, np.float32)
    ref['mask_token'] = np.zeros((1, 1, 17), np.float32)
    ref['pos_embed'] = ref['pos_embed'][..., ::-1].copy()  # a different layout of the table
    with pytest.raises(ConversionError) as err:
        convert.from_torch_state_dict(ref, jax_model)
    message = str(err.value)
    for needle in ('missing 1', 'encoder/block_00/norm1/bias', 'unexpected 1', 'blocks.0.attn.extra',
                   'shape mismatch 1', 'mask_token', 'pos_embed: differs from the 2-D sin-cos table'):  # fmt: skip
        assert needle in message
