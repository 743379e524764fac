"""Fine-tuning checkpoints: VideoMAEClassifier sizes, logits parity with transformers' VideoMAEForVideoClassification
through the converter, the reference layout with its prefixes, encoders, variants and position tables."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the `torch` extra: a missing install fails here rather than skipping parity
import transformers

from jaxssl.convert import videomae as convert
from jaxssl.models import videomae as model_lib

FRAMES, SIZE, PATCH, TUBELET, WIDTH, CLASSES = 4, 16, 4, 2, 32, 5


def tiny_classifier(**overrides):
    fields = dict(width=WIDTH, depth=2, heads=4, mlp_hidden=128, num_classes=CLASSES, patch=PATCH, tubelet=TUBELET)
    return model_lib.VideoMAEClassifier(**{**fields, **overrides})


def random_params(model, *inputs, seed=0):
    """Random values (biases and norms included) in the model's parameter shapes, without running its init."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)['params']
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


def make_torch_classifier(use_mean_pooling):
    torch.manual_seed(1 if use_mean_pooling else 2)
    config = transformers.VideoMAEConfig(
        image_size=SIZE, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET, hidden_size=WIDTH,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=CLASSES,
        use_mean_pooling=use_mean_pooling, layer_norm_eps=1e-6, attn_implementation='eager',
    )  # fmt: skip
    model = transformers.VideoMAEForVideoClassification(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 1e-6  # fc_norm ignores layer_norm_eps
        # Random (not default zero / one) biases and norm affines, so a mis-mapped one cannot hide.
        for name, p in model.named_parameters():
            if name.endswith('bias') or 'norm' in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith('weight') else 0.0))
    state = model.state_dict()
    assert float(state['videomae.encoder.layer.0.attention.attention.query.bias'].abs().sum()) > 0  # biases took
    return model


@pytest.fixture(scope='module')
def torch_classifier():
    return make_torch_classifier(use_mean_pooling=True)


@pytest.fixture(scope='module')
def video():
    return np.random.default_rng(0).normal(size=(2, FRAMES, SIZE, SIZE, 3)).astype(np.float32)


def torch_logits(model, video):
    with torch.no_grad():
        return model(torch.from_numpy(video).permute(0, 1, 4, 2, 3)).logits.numpy()  # (B, T, C, H, W)


def test_classifier_parameter_counts_match_reference():
    # The reference's fine-tuning models with a 400-class head (shared/reference/videomae_v2.md).
    want = {'S': 22.0, 'B': 86.5, 'L': 304.3, 'H': 632.1, 'g': 1012.2}
    for variant, millions in want.items():
        model = model_lib.make_classifier(variant, 400, scan_layers=True)  # one traced block: fast
        video = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), video)['params']
        count = model_lib.count_params(params)
        assert round(count / 1e6, 1) == millions, variant
        if variant == 'B':
            assert count == 86_534_800
        assert 'norm' not in params['encoder'] and set(params) == {'patch_embed', 'encoder', 'fc_norm', 'head'}


@pytest.mark.parametrize('use_mean_pooling', [True, False])
def test_logits_match_transformers(use_mean_pooling, torch_classifier, video):
    torch_model = torch_classifier if use_mean_pooling else make_torch_classifier(use_mean_pooling=False)
    model = tiny_classifier(use_mean_pooling=use_mean_pooling)
    params = convert.from_torch_state_dict(torch_model.state_dict(), model)
    logits, inter = model.apply({'params': params}, video)
    assert logits.dtype == jnp.float32 and inter['pooled'].shape == (2, WIDTH)
    assert inter['encoded'].shape == (2, (FRAMES // TUBELET) * (SIZE // PATCH) ** 2, WIDTH)
    assert np.abs(np.asarray(logits) - torch_logits(torch_model, video)).max() <= 1e-5


def test_scanned_classifier_converts_to_the_same_logits(torch_classifier, video):
    model = tiny_classifier(scan_layers=True)
    params = convert.from_torch_state_dict(torch_classifier.state_dict(), model)
    assert params['encoder']['blocks']['attn']['qkv']['kernel'].shape == (2, WIDTH, 3 * WIDTH)
    logits, _ = model.apply({'params': params}, video)
    assert np.abs(np.asarray(logits) - torch_logits(torch_classifier, video)).max() <= 1e-5


def reference_finetune_layout(torch_model):
    return convert.canonical_finetune_state_dict(torch_model.state_dict())


def test_reference_layout_and_prefixes(torch_classifier):
    ref = reference_finetune_layout(torch_classifier)
    assert ref['blocks.1.attn.qkv.weight'].shape == (3 * WIDTH, WIDTH) and 'blocks.0.attn.q_bias' in ref
    assert {'fc_norm.weight', 'head.weight', 'head.bias', 'patch_embed.proj.weight'} <= set(ref)
    model = tiny_classifier()
    want = convert.from_torch_state_dict(torch_classifier.state_dict(), model)
    for prefix in ('_orig_mod.', 'module._orig_mod.', 'backbone.', 'module.encoder.', 'model.'):
        got = convert.from_torch_state_dict({prefix + k: v for k, v in ref.items()}, model)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), got, want)), prefix


def test_bad_classifier_state_dicts_list_every_problem(torch_classifier):
    ref = reference_finetune_layout(torch_classifier)
    ref.pop('fc_norm.bias')
    ref['blocks.0.attn.k_bias'] = np.zeros(WIDTH, np.float32)
    ref['head.weight'] = np.zeros((CLASSES + 1, WIDTH), np.float32)
    with pytest.raises(convert.ConversionError) as err:
        convert.from_torch_state_dict(ref, tiny_classifier())
    message = str(err.value)
    for needle in ('missing 1: fc_norm.bias', 'unexpected 1: blocks.0.attn.k_bias', 'shape mismatch 1', 'head.weight'):
        assert needle in message


def test_pretrained_encoder_into_a_classifier():
    pretrain = model_lib.VideoMAEPretrain(
        width=WIDTH, depth=2, heads=4, mlp_hidden=128, dec_width=16, dec_depth=1, dec_heads=2, dec_mlp_hidden=64,
        patch=PATCH, tubelet=TUBELET,
    )  # fmt: skip
    idx = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    pretrain_params = random_params(pretrain, jax.ShapeDtypeStruct((1, FRAMES, SIZE, SIZE, 3), jnp.float32), idx, idx)
    state = {f'_orig_mod.{k}': v for k, v in convert.to_torch_state_dict(pretrain_params).items()}
    conversion = convert.convert_state_dict(state, tiny_classifier(), 'encoder')
    assert conversion.kind == 'encoder' and set(conversion.params) == {'patch_embed', 'encoder'}
    assert {'decoder.norm.weight', 'encoder_to_decoder.weight', 'mask_token'} <= set(conversion.skipped)
    for part in ('patch_embed', 'encoder'):  # the encoder's own final norm comes along (a probe may want it)
        same = jax.tree.map(lambda a, b: bool((a == b).all()), conversion.params[part], pretrain_params[part])
        assert jax.tree.all(same)
    with pytest.raises(convert.ConversionError, match=r'missing 4: fc_norm\.bias, fc_norm\.weight, head\.bias'):
        convert.convert_state_dict(state, tiny_classifier(), 'classifier')  # strict: no head, a decoder
    # HF-hosted copies: `model.` on every key, fc_norm, no head.
    ref = {f'model.{k}': v for k, v in convert.to_torch_state_dict(pretrain_params).items() if k.startswith('encoder.')}
    ref['model.fc_norm.weight'] = np.ones(WIDTH, np.float32)
    ref['model.fc_norm.bias'] = np.zeros(WIDTH, np.float32)
    spec = convert.inspect_state_dict(ref)
    assert spec['kind'] == 'encoder' and spec['use_mean_pooling'] and (spec['width'], spec['depth']) == (WIDTH, 2)
    assert 'fc_norm' in convert.convert_state_dict(ref, tiny_classifier(), 'auto').params


def test_variant_is_inferred_and_checked():
    model = model_lib.make_classifier('micro', 3)
    params = random_params(model, jax.ShapeDtypeStruct((1, 2, 32, 32, 3), jnp.float32))
    state = {f'module.{k}': v for k, v in convert.to_torch_state_dict(params).items()}
    conversion = convert.convert_checkpoint(state)
    assert (conversion.kind, conversion.variant, conversion.model.num_classes) == ('classifier', 'micro', 3)
    with pytest.raises(convert.ConversionError, match=r"variant 'B' does not fit .* width 64 \(not 768\).*'micro'"):
        convert.convert_checkpoint(state, variant='B')
    with pytest.raises(convert.ConversionError, match=r'patch 16 \(not 8\)'):
        convert.convert_checkpoint(state, variant='micro/8')
    state['pos_embed'] = model_lib.vit.sinusoid_table(4, 64)[None]  # a stored copy of the fixed table is dropped
    conversion = convert.convert_checkpoint(state, variant='micro')
    assert conversion.skipped == ['pos_embed (a copy of the fixed sinusoid, which is regenerated)']
    with pytest.raises(convert.ConversionError, match="learned position table: use a model with pos_embedding='le"):
        convert.convert_state_dict({**state, 'pos_embed': state['pos_embed'] + 0.5}, model)


def torch_resample(table, source, target):
    """What the reference does: bicubic per temporal slice (and linear over time, as for its sinusoid)."""
    x = torch.from_numpy(table).reshape(*source, -1)
    if source[0] != target[0]:
        x = torch.nn.functional.interpolate(
            x.permute(1, 2, 3, 0).reshape(-1, x.shape[-1], source[0]), target[0], mode='linear'
        )
        x = x.reshape(source[1], source[2], -1, target[0]).permute(3, 0, 1, 2)
    x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), target[1:], mode='bicubic', align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1]).numpy()


@pytest.mark.parametrize(('source', 'target'), [((2, 4, 4), (2, 6, 6)), ((2, 6, 6), (2, 3, 3)), ((4, 4, 4), (2, 5, 5))])
def test_learned_position_table_resampling_matches_torch(source, target):
    table = np.random.default_rng(0).normal(size=(1, int(np.prod(source)), 8)).astype(np.float32)
    got = convert.resample_pos_embed(table, source, target)
    np.testing.assert_allclose(got, torch_resample(table, source, target), atol=2e-6)


def test_learned_position_table_is_fitted_to_the_clip(torch_classifier):
    ref = reference_finetune_layout(torch_classifier)
    ref['pos_embed'] = np.random.default_rng(1).normal(size=(1, 2 * 4 * 4, WIDTH)).astype(np.float32)
    model = tiny_classifier(pos_embedding='learned')
    conversion = convert.convert_state_dict(ref, model, frames=FRAMES, image_size=24)
    assert conversion.params['pos_embed']['pos_embed'].shape == (1, 2 * 6 * 6, WIDTH)
    assert conversion.notes == ['pos_embed resampled from a (2, 4, 4) to a (2, 6, 6) token grid']
    logits, _ = model.apply({'params': conversion.params}, np.zeros((1, FRAMES, 24, 24, 3), np.float32))
    assert logits.shape == (1, CLASSES)
    same_size = convert.convert_state_dict(ref, model)  # no clip given: the stored table is kept
    np.testing.assert_array_equal(same_size.params['pos_embed']['pos_embed'], ref['pos_embed'])


def test_round_trips_are_exact(torch_classifier):
    ref = reference_finetune_layout(torch_classifier)
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(ref, tiny_classifier(scan_layers=True)))
    assert back.keys() == ref.keys()
    for key in ref:
        np.testing.assert_array_equal(back[key], ref[key])
    model = dataclasses.replace(tiny_classifier(), use_mean_pooling=False)
    ref = reference_finetune_layout(make_torch_classifier(use_mean_pooling=False))
    assert 'norm.weight' in ref and 'fc_norm.weight' not in ref
    back = convert.to_torch_state_dict(convert.from_torch_state_dict(ref, model), layout='finetune')
    assert back.keys() == ref.keys() and all((back[k] == ref[k]).all() for k in ref)
