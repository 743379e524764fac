"""Numerical parity with transformers' PyTorch VideoMAEForPreTraining (VideoMAE v1 mode) through the converter."""

import dataclasses

import jax
import numpy as np
import pytest
import torch  # the `torch` extra: a missing install fails here rather than skipping parity
import transformers

from jaxssl import masks
from jaxssl.convert import videomae as convert
from jaxssl.methods import videomae
from jaxssl.models.videomae import VideoMAEPretrain

FRAMES, SIZE, PATCH, TUBELET = 4, 16, 4, 2
GRID = (FRAMES // TUBELET, SIZE // PATCH, SIZE // PATCH)


@pytest.fixture(scope='module')
def torch_model():
    torch.manual_seed(0)
    config = transformers.VideoMAEConfig(
        image_size=SIZE,
        patch_size=PATCH,
        num_frames=FRAMES,
        tubelet_size=TUBELET,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        layer_norm_eps=1e-6,
        use_mean_pooling=False,  # the pretraining encoder ends with a LayerNorm
        norm_pix_loss=True,
        attn_implementation='eager',
    )
    model = transformers.VideoMAEForPreTraining(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 1e-6  # transformers' decoder norm ignores layer_norm_eps
        # Random (not default zero / one) biases and norm affines, so a mis-mapped one cannot hide.
        for name, p in model.named_parameters():
            if name.endswith('bias') or 'layernorm' in name or 'norm.' in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith('weight') else 0.0))
    state = model.state_dict()
    assert any(k.endswith('query.bias') or k.endswith('q_bias') for k in state)
    q_bias = next(v for k, v in state.items() if k.endswith(('query.bias', 'q_bias')))
    assert float(q_bias.abs().sum()) > 0  # the biases took
    return model


@pytest.fixture(scope='module')
def jax_model():
    return VideoMAEPretrain(
        width=32, depth=2, heads=4, mlp_hidden=128, dec_width=16, dec_depth=2, dec_heads=2,
        dec_mlp_hidden=64, patch=PATCH, tubelet=TUBELET,
    )  # fmt: skip


@pytest.fixture(scope='module')
def batch():
    rng = np.random.default_rng(0)
    enc = np.stack([masks.tube_mask(GRID, 0.75, rng) for _ in range(2)])
    idx = masks.mask_indices(enc, ~enc)  # v1: the decoder reconstructs exactly the encoder-masked tokens
    video = rng.normal(size=(2, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
    return dict(video=video, encoder_mask=enc, **idx)


def torch_outputs(model, batch):
    pixel_values = torch.from_numpy(batch['video']).permute(0, 1, 4, 2, 3)  # (B, T, C, H, W)
    mask = torch.from_numpy(batch['encoder_mask'])
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=mask)
        encoded = model.videomae(pixel_values, bool_masked_pos=mask).last_hidden_state
    return encoded.numpy(), out.logits.numpy(), float(out.loss)


def test_encoder_decoder_and_loss_match_transformers(torch_model, jax_model, batch):
    params = convert.from_torch_state_dict(torch_model.state_dict(), jax_model)
    want_encoded, want_logits, want_loss = torch_outputs(torch_model, batch)
    logits, inter = jax_model.apply({'params': params}, batch['video'], batch['visible_idx'], batch['target_idx'])
    assert np.abs(np.asarray(inter['encoded']) - want_encoded).max() <= 1e-5
    assert np.abs(np.asarray(logits) - want_logits).max() <= 1e-5
    loss, _ = videomae.compute_loss(jax_model, params, batch, train=False)
    assert abs(float(loss) - want_loss) <= 1e-5


def test_scanned_model_converts_to_the_same_outputs(torch_model, jax_model, batch):
    scanned = dataclasses.replace(jax_model, scan_layers=True)
    params = convert.from_torch_state_dict(torch_model.state_dict(), scanned)
    assert params['encoder']['blocks']['attn']['qkv']['kernel'].shape == (2, 32, 96)
    _, want_logits, _ = torch_outputs(torch_model, batch)
    logits, _ = scanned.apply({'params': params}, batch['video'], batch['visible_idx'], batch['target_idx'])
    assert np.abs(np.asarray(logits) - want_logits).max() <= 1e-5


def reference_layout(torch_model):
    return convert.canonical_state_dict(torch_model.state_dict())


def test_reference_layout_and_wrappers(torch_model, jax_model):
    ref = reference_layout(torch_model)
    assert 'encoder.blocks.1.attn.qkv.weight' in ref and ref['encoder.blocks.1.attn.qkv.weight'].shape == (96, 32)
    assert 'encoder.blocks.0.attn.q_bias' in ref and 'decoder.blocks.1.mlp.fc2.weight' in ref
    want = convert.from_torch_state_dict(torch_model.state_dict(), jax_model)
    wrapped = {f'module._orig_mod.{k}': v for k, v in ref.items()}  # DeepSpeed + torch.compile prefixes
    got = convert.from_torch_state_dict(wrapped, jax_model)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), got, want))


def test_round_trip_is_exact(torch_model, jax_model):
    ref = reference_layout(torch_model)
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(ref, jax_model))
    assert back.keys() == ref.keys()
    for key in ref:
        np.testing.assert_array_equal(back[key], ref[key])


def test_bad_state_dicts_list_every_problem(torch_model, jax_model):
    ref = reference_layout(torch_model)
    ref.pop('encoder.blocks.0.attn.q_bias')
    ref.pop('decoder.head.bias')
    ref['encoder.blocks.0.attn.k_bias'] = np.zeros(32, np.float32)
    ref['mask_token'] = np.zeros((1, 1, 17), np.float32)
    with pytest.raises(convert.ConversionError) as err:
        convert.from_torch_state_dict(ref, jax_model)
    message = str(err.value)
    for needle in ('missing 2', 'encoder.blocks.0.attn.q_bias', 'decoder.head.bias', 'unexpected 1',
                   'encoder.blocks.0.attn.k_bias', 'shape mismatch 1', 'mask_token'):  # fmt: skip
        assert needle in message
    partial = convert.from_torch_state_dict(
        {k: v for k, v in reference_layout(torch_model).items() if k != 'mask_token'},
        jax_model,
        allow_missing=True,
    )
    assert 'mask_token' not in partial and 'encoder' in partial
