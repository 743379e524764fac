"""wav2vec 2.0: the span masks against a transcription of fairseq's compute_mask_indices, the negatives and
same-count trimming by their properties, the model, quantizer and loss against transformers' Wav2Vec2ForPreTraining
with converted weights (both encoder layouts), the training-time pieces (Gumbel straight-through, temperature,
feature gradient scale), the waveform input, and a run on the one trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sharded_runs import assert_sharded_matches_one_device

from jaxssl.config import ConfigError, load_config
from jaxssl.data import audio
from jaxssl.methods import wav2vec2
from jaxssl.models import wav2vec2 as w2v
from jaxssl.models import wav2vec2_weights


def reference_row(sz, rng, mask_prob=0.65, mask_length=10, min_masks=2):
    """fairseq data_utils.compute_mask_indices for one row ('static', no_overlap False, num_mask_ver 2,
    idc_select_ver 1), its draws taken from `rng` in the same order."""
    num_mask = int(mask_prob * sz / float(mask_length) + rng.random())
    num_mask = max(min_masks, num_mask)
    lengths = np.full(num_mask, mask_length)
    min_len = min(lengths)
    if sz - min_len <= num_mask:
        min_len = sz - num_mask - 1
    mask_idc = rng.choice(sz - min_len, num_mask, replace=False)
    mask_idc = np.asarray([mask_idc[j] + offset for j in range(len(mask_idc)) for offset in range(lengths[j])])
    return np.unique(mask_idc[mask_idc < sz])


@pytest.mark.parametrize('valid', [49, 30, 13, 12, 11, 780])  # 11, 12: fewer frames than spans need
def test_span_mask_equals_fairseq_rows(valid):
    for seed in range(20):
        got = wav2vec2.span_mask(800, valid, np.random.default_rng(seed), 0.65, 10, 2)
        want = np.zeros(800, bool)
        want[reference_row(valid, np.random.default_rng(seed))] = True
        np.testing.assert_array_equal(got, want)
        assert not got[valid:].any()


def test_span_mask_covers_about_half_of_long_utterances():
    rng = np.random.default_rng(0)
    fraction = np.mean([wav2vec2.span_mask(780, 780, rng, 0.65, 10, 2).mean() for _ in range(200)])
    assert 0.46 < fraction < 0.52  # the fact sheet's ~49% after overlaps


def reference_batch(waveform, lengths, rng, mask_prob=0.65, mask_length=10, min_masks=2):
    """fairseq's RawAudioDataset.collater (pad=False: every source cut at a random start to the shortest) and then
    compute_mask_indices over the batch with require_same_masks, the draws taken from `rng` in the same order."""
    size = min(lengths)
    sources = []
    for source, length in zip(waveform, lengths, strict=True):
        start = int(rng.integers(0, length - size + 1))
        sources.append(source[start : start + size])
    sz = int(w2v.frame_counts(size))
    mask_idcs = [reference_row(sz, rng, mask_prob, mask_length, min_masks) for _ in lengths]
    target_len = min(len(m) for m in mask_idcs)
    mask = np.zeros((len(lengths), int(w2v.frame_counts(waveform.shape[1]))), bool)
    for i, mask_idc in enumerate(mask_idcs):
        if len(mask_idc) > target_len:
            mask_idc = rng.choice(mask_idc, target_len, replace=False)
        mask[i, mask_idc] = True
    return np.stack(sources), mask


def test_crop_and_mask_equals_fairseq_collater_and_masks():
    config = load_config('configs/wav2vec2.py:runlocal').mask
    data = np.random.default_rng(0)
    for seed in range(10):
        lengths = data.integers(4000, 16001, size=8).astype(np.int32)
        waveform = data.normal(size=(8, 16000)).astype(np.float32) * (np.arange(16000) < lengths[:, None])
        batch = {'waveform': waveform, 'num_samples': lengths, 'label': np.arange(8)}
        got = wav2vec2.crop_and_mask(batch, np.random.default_rng(seed), groups=2, mask=config)
        want_rng = np.random.default_rng(seed)
        for rows in (slice(0, 4), slice(4, 8)):
            sources, mask = reference_batch(waveform[rows], lengths[rows], want_rng)
            size = sources.shape[1]
            np.testing.assert_array_equal(got['num_samples'][rows], size)
            np.testing.assert_array_equal(got['waveform'][rows, :size], sources)
            assert not got['waveform'][rows, size:].any()
            np.testing.assert_array_equal(got['time_mask'][rows], mask)
            assert len(set(got['time_mask'][rows].sum(axis=1))) == 1  # require_same_masks
        np.testing.assert_array_equal(got['label'], np.arange(8))


def test_negatives_are_other_masked_frames_of_the_same_utterance():
    rng = np.random.default_rng(0)
    mask = np.stack([wav2vec2.span_mask(60, 60, rng, 0.65, 10, 2) for _ in range(4)])
    negatives = np.asarray(wav2vec2.sample_negatives(jnp.asarray(mask), 100, jax.random.key(1)))
    for b in range(4):
        masked = np.flatnonzero(mask[b])
        for t in masked:
            assert mask[b, negatives[b, t]].all() and (negatives[b, t] != t).all()
        drawn = np.bincount(negatives[b, masked].ravel(), minlength=60)[masked]
        expected = len(masked) * 100 / (len(masked) - 1)
        assert np.all(np.abs(drawn - expected) < 5 * np.sqrt(expected))  # uniform over the other masked frames


def test_gumbel_temperature_schedule():
    q = load_config('configs/wav2vec2.py').quantizer
    temperature = lambda step, start=0: float(wav2vec2.gumbel_temperature(q, jnp.asarray(step), start))
    assert temperature(0) == pytest.approx(2.0)
    assert temperature(100_000) == pytest.approx(2.0 * 0.999995**100_000, rel=1e-5)
    assert temperature(300_000) == pytest.approx(0.5)  # the base floor, reached after about 277k updates
    assert temperature(0, 10**9) == pytest.approx(0.5)  # continued pretraining starts at the floor


# --- parity with transformers --------------------------------------------------------------------------------------
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(24,) * 7,
    conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2), num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4, num_codevector_groups=2, num_codevectors_per_group=12, codevector_dim=16,
    proj_codevector_dim=12, num_negatives=7, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    feat_proj_dropout=0.0, feat_quantizer_dropout=0.0, layerdrop=0.0,
)  # fmt: skip
LAYOUTS = {
    'base': dict(feat_extract_norm='group', conv_bias=False, do_stable_layer_norm=False),
    'large': dict(feat_extract_norm='layer', conv_bias=True, do_stable_layer_norm=True),
}


@pytest.fixture(scope='module', params=sorted(LAYOUTS))
def converted(request, tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    torch.manual_seed(0)
    reference = Wav2Vec2ForPreTraining(Wav2Vec2Config(**TINY, **LAYOUTS[request.param])).eval()
    with torch.no_grad():  # away from the init so that every parameter matters
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = str(tmp_path_factory.mktemp(request.param))
    reference.save_pretrained(directory)
    fields, params = wav2vec2_weights.load(directory)
    model = w2v.Wav2Vec2(**fields, dropout=0.0, attention_dropout=0.0)
    return reference, model, jax.tree.map(jnp.asarray, params)


def test_converted_weights_fill_the_model(converted):
    _, model, params = converted
    waveform, mask = jnp.zeros((1, 3200)), jnp.zeros((1, int(w2v.frame_counts(3200))), bool)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), waveform, jnp.asarray([3200]), mask)['params'])
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    jax.tree.map(lambda s, p: np.testing.assert_equal(s.shape, p.shape), shapes, params)


def test_context_vectors_match_transformers_with_padding(converted):
    """A batch with a zero-padded utterance: each utterance's context vectors equal transformers' on that utterance
    alone. (transformers' group-norm encoder takes its statistics over the padding too, so a padded row is compared
    with the cut utterance, the reference's pretraining input; with the layer-norm encoder its padded batch agrees as
    well.)"""
    reference, model, params = converted
    samples, lengths = 4000, np.array([4000, 2600])
    waveform = np.random.default_rng(0).normal(size=(2, samples)).astype(np.float32)
    waveform[1, lengths[1] :] = 0
    attention = (np.arange(samples)[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        padded = reference.wav2vec2(torch.from_numpy(waveform), attention_mask=torch.from_numpy(attention))
        cut = reference.wav2vec2(torch.from_numpy(waveform[1:, : lengths[1]]))
    frames = int(w2v.frame_counts(lengths[1]))
    hidden, _ = model.apply({'params': params}, jnp.asarray(waveform), jnp.asarray(lengths), method=model.encode)
    got = np.asarray(hidden)
    np.testing.assert_allclose(got[0], padded.last_hidden_state[0].numpy(), atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(got[1, :frames], cut.last_hidden_state[0].numpy(), atol=2e-4, rtol=2e-4)
    if model.extractor_mode == 'layer':
        want = padded.last_hidden_state[1, :frames].numpy()
        np.testing.assert_allclose(got[1, :frames], want, atol=2e-4, rtol=2e-4)


def test_pretraining_outputs_and_loss_match_transformers(converted):
    reference, model, params = converted
    batch, samples = 3, 6400
    rng = np.random.default_rng(1)
    waveform = rng.normal(size=(batch, samples)).astype(np.float32)
    frames = int(w2v.frame_counts(samples))
    mask = np.stack([wav2vec2.span_mask(frames, frames, rng, 0.4, 4, 2) for _ in range(batch)])
    negatives = np.asarray(wav2vec2.sample_negatives(jnp.asarray(mask), TINY['num_negatives'], jax.random.key(0)))
    flat = negatives + np.arange(batch)[:, None, None] * frames  # transformers indexes the flattened (B T) frames
    with torch.no_grad():
        want = reference(
            torch.from_numpy(waveform),
            mask_time_indices=torch.from_numpy(mask),
            sampled_negative_indices=torch.from_numpy(flat),
        )
    lengths = jnp.full((batch,), samples)
    out = model.apply({'params': params}, jnp.asarray(waveform), lengths, jnp.asarray(mask))
    np.testing.assert_allclose(out['predictions'], want.projected_states.numpy(), atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(out['targets'], want.projected_quantized_states.numpy(), atol=2e-4, rtol=2e-4)
    config = load_config('configs/wav2vec2.py:runlocal').loss
    _, metrics = wav2vec2.wav2vec2_loss(out, jnp.asarray(mask), jnp.asarray(negatives), 1, config)
    count = mask.sum()
    np.testing.assert_allclose(float(metrics['contrastive']) * count, want.contrastive_loss.item(), rtol=1e-4)
    # In evaluation transformers' perplexity is that of the argmax codes: the code perplexity here.
    np.testing.assert_allclose(float(metrics['code_perplexity']), want.codevector_perplexity.item(), rtol=1e-5)


# --- training-time pieces ------------------------------------------------------------------------------------------
def tiny_model(**overrides):
    fields = dict(TINY_FIELDS, dropout=0.0, attention_dropout=0.0)
    return w2v.Wav2Vec2(**{**fields, **overrides})


TINY_FIELDS = dict(
    conv_channels=16, extractor_mode='group', conv_bias=False, width=16, depth=1, heads=2, mlp=32, norm_first=False,
    final_dim=8, codevector_dim=8, codebooks=2, codebook_entries=6, pos_conv_kernel=8, pos_conv_groups=2,
)  # fmt: skip


def test_training_quantizer_is_straight_through_gumbel():
    model = tiny_model()
    waveform = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3200)), jnp.float32)
    frames = int(w2v.frame_counts(3200))
    params = w2v.init_params(model, jax.random.key(0), waveform)
    _, latents = model.apply({'params': params}, waveform, jnp.asarray([3200, 3200]), method=model.latents)

    def quantize(p):
        return model.apply(
            {'params': p}, latents, jnp.float32(0.7), False, method=model.quantize, rngs={'gumbel': jax.random.key(3)}
        )

    vectors, codes, probs = quantize(params)
    logits = latents @ params['quantizer_weight_proj']['kernel'] + params['quantizer_weight_proj']['bias']
    logits = logits.reshape(2, frames, 2, 6)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits, -1), atol=1e-6)
    table = params['quantizer_codevectors'].reshape(2, 6, 4)
    want = np.concatenate([table[g][np.asarray(codes[..., g])] for g in range(2)], axis=-1)
    np.testing.assert_allclose(vectors, want, atol=1e-6)  # forward: exactly the chosen entries
    grads = jax.grad(lambda p: jnp.sum(quantize(p)[0] ** 2))(params)
    assert float(jnp.abs(grads['quantizer_weight_proj']['kernel']).max()) > 0  # gradients reach the logits
    assert not np.array_equal(np.asarray(codes), np.asarray(jnp.argmax(logits, -1)))  # noise changes some codes


def test_feature_grad_mult_scales_only_the_feature_encoder_gradient():
    waveform = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3200)), jnp.float32)
    frames = int(w2v.frame_counts(3200))
    lengths = jnp.asarray([3200, 3200])
    mask = jnp.asarray(np.random.default_rng(1).random((2, frames)) < 0.5)
    params = w2v.init_params(tiny_model(), jax.random.key(0), waveform)

    def grads(mult):
        model = tiny_model(feature_grad_mult=mult)
        loss = lambda p: jnp.sum(model.apply({'params': p}, waveform, lengths, mask)['predictions'] ** 2)
        return jax.jit(jax.grad(loss))(params)

    full, scaled = grads(1.0), grads(0.1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(0.1 * a, b, rtol=1e-3, atol=1e-6),
                 full['feature_extractor'], scaled['feature_extractor'])  # fmt: skip
    np.testing.assert_allclose(full['final_proj']['kernel'], scaled['final_proj']['kernel'], rtol=1e-4, atol=1e-4)


# --- input and config ----------------------------------------------------------------------------------------------
def test_waveform_example_crops_pads_and_normalises():
    config = load_config('configs/wav2vec2.py:runlocal').input
    long = np.arange(20000, dtype=np.float32)
    out = audio.waveform_example(long, config, np.random.default_rng(0))
    start = int(out['waveform'][0])
    np.testing.assert_array_equal(out['waveform'], long[start : start + 16000])
    assert out['num_samples'] == 16000
    evaluation = audio.waveform_example(long, config)
    assert evaluation['waveform'][0] == 0  # the first samples without an rng
    short = audio.waveform_example(np.ones(9000, np.float32), config)
    assert short['num_samples'] == 9000 and not short['waveform'][9000:].any()
    config.normalize_waveform = True
    x = np.random.default_rng(0).normal(3.0, 2.0, 5000).astype(np.float32)
    normalised = audio.waveform_example(x, config)['waveform'][:5000]
    torch_layer_norm = torch.nn.functional.layer_norm(torch.from_numpy(x), x.shape).numpy()
    np.testing.assert_allclose(normalised, torch_layer_norm, atol=1e-5)


@pytest.mark.parametrize('mode', ['group', 'layer'])
def test_padding_samples_do_not_change_the_utterance(mode):
    """A zero-padded utterance's frames and feature penalty equal the cut utterance's, whatever the padding holds:
    the GroupNorm of the base encoder takes its statistics over the valid samples."""
    model = tiny_model(extractor_mode=mode, conv_bias=mode == 'layer', norm_first=mode == 'layer')
    x = np.random.default_rng(0).normal(size=(1, 6400)).astype(np.float32)
    params = w2v.init_params(model, jax.random.key(0), jnp.asarray(x))
    frames = int(w2v.frame_counts(4000))

    def run(waveform, length):
        mask = np.zeros((1, int(w2v.frame_counts(waveform.shape[1]))), bool)
        mask[0, 3:7] = True
        out = model.apply({'params': params}, jnp.asarray(waveform), jnp.asarray([length]), jnp.asarray(mask))
        hidden, _ = model.apply({'params': params}, jnp.asarray(waveform), jnp.asarray([length]), method=model.encode)
        return np.asarray(hidden)[:, :frames], np.asarray(out['predictions'])[:, :frames], float(out['features_pen'][0])

    zeros, fives = x.copy(), x.copy()
    zeros[:, 4000:], fives[:, 4000:] = 0.0, 5.0
    cut = run(x[:, :4000], 4000)
    for waveform in (zeros, fives):
        for got, want in zip(run(waveform, 4000), cut, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError):  # the length matters: the padding read as signal changes the frames
        np.testing.assert_allclose(run(fives, 6400)[0], cut[0], atol=1e-3)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r'input\.features'):
        load_config('configs/wav2vec2.py:runlocal', ['input.features=kaldi_fbank'])
    with pytest.raises(ConfigError, match=r'input\.max_samples'):
        load_config('configs/wav2vec2.py:runlocal', ['input.max_samples=1000'])
    with pytest.raises(ConfigError, match=r'loss\.reference_batches'):
        load_config('configs/wav2vec2.py:runlocal', ['loss.reference_batches=3'])
    with pytest.raises(ConfigError, match=r'loss\.reference_batches'):  # must divide each micro-batch
        load_config('configs/wav2vec2.py:runlocal', ['loss.reference_batches=8', 'train.grad_accum=4'])
    with pytest.raises(ConfigError, match=r'input\.min_samples'):  # a folder needs the reference's floor or so
        load_config('configs/wav2vec2.py:runlocal', ['input.dataset=folder', 'input.min_samples=1000'])
    with pytest.raises(ConfigError, match=r'model\.pretrained'):
        wav2vec2.Method(load_config('configs/wav2vec2.py:runlocal', ['model.pretrained=/no/such/folder']))
    large = load_config('configs/wav2vec2.py:variant=large')
    assert large.input.normalize_waveform and large.loss.feature_penalty_weight == 0
    assert wav2vec2.Method(large).model.norm_first


@pytest.mark.slow
def test_runlocal_sharded_matches_one_device_and_probes(tmp_path):
    summary, rows = assert_sharded_matches_one_device(
        'configs/wav2vec2.py:runlocal', tmp_path, 'loss.reference_batches=1'
    )
    assert 0.0 <= summary['final_eval/label/mean_pool/knn'] <= 1.0
    assert rows[0]['temperature'] == pytest.approx(2.0) and 0 < rows[0]['masked_fraction'] < 1


def test_perplexity_known_answers():
    uniform = jnp.full((5, 2, 4), 0.25)
    assert float(wav2vec2.perplexity(uniform, jnp.ones(5))) == pytest.approx(8.0, rel=1e-5)  # G V: all entries used
    one_code = jax.nn.one_hot(jnp.zeros((5, 2), int), 4)
    assert float(wav2vec2.perplexity(one_code, jnp.ones(5))) == pytest.approx(2.0, rel=1e-5)  # G: one per codebook
    two_codes = jax.nn.one_hot(jnp.asarray([[0, 0], [1, 1], [2, 2]]), 4)
    weights = jnp.asarray([1.0, 1.0, 0.0])  # the unmasked third frame does not count
    assert float(wav2vec2.perplexity(two_codes, weights)) == pytest.approx(4.0, rel=1e-5)


def test_continued_pretraining_starts_from_the_released_weights(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    torch.manual_seed(0)
    Wav2Vec2ForPreTraining(Wav2Vec2Config(**TINY, **LAYOUTS['large'])).save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match=r'input\.normalize_waveform'):  # XLSR-style models read standardised audio
        wav2vec2.Method(load_config('configs/wav2vec2.py:runlocal,continue', [f'model.pretrained={tmp_path}']))
    overrides = [f'model.pretrained={tmp_path}', 'input.normalize_waveform=true']
    config = load_config('configs/wav2vec2.py:runlocal,continue', overrides)
    method = wav2vec2.Method(config)
    assert method.model.width == TINY['hidden_size'] and method.model.norm_first  # sizes from config.json
    batch = method.example_batch(2)
    params, _ = method.init(jax.random.key(0), batch)
    _, released = wav2vec2_weights.load(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, released)
    loss, (metrics, _) = method.loss(params, {}, batch, jax.random.key(1), jnp.asarray(0))
    assert np.isfinite(float(loss)) and float(metrics['temperature']) == pytest.approx(config.quantizer.temperature[1])


def test_length_buckets_keep_each_reference_batch_similar(tmp_path):
    from scipy.io import wavfile

    rng = np.random.default_rng(0)
    lengths = rng.integers(4000, 16000, size=32)
    for i, n in enumerate(lengths):
        (tmp_path / 'train' / str(i % 2)).mkdir(parents=True, exist_ok=True)
        wavfile.write(tmp_path / 'train' / str(i % 2) / f'{i}.wav', 16000, rng.uniform(-0.5, 0.5, n).astype(np.float32))
    overrides = [
        'input.dataset=folder', f'input.data_root={tmp_path}', 'input.bucket_by_length=true', 'input.global_batch=16',
        'loss.reference_batches=4', 'input.min_samples=4000',
    ]  # fmt: skip
    method = wav2vec2.Method(load_config('configs/wav2vec2.py:runlocal', overrides))
    dataset, _ = method.dataset(seed=0, process_index=0, process_count=1)
    batch = next(iter(dataset))
    kept = batch['num_samples'].reshape(4, 4)
    assert (kept == kept[:, :1]).all()  # each reference batch cut to its shortest
    # Sorted buckets: the four shortest files form one reference batch, so little is cut from any.
    assert set(kept[:, 0]) <= set(np.sort(lengths)[::4])


def test_per_gpu_terms_are_weighted_by_masked_frames():
    """fairseq adds coef x term x sample_size on each GPU and divides the summed gradients by the total sample size:
    with two reference batches, each one's diversity and feature penalty count by its share of masked frames."""
    rng = np.random.default_rng(0)
    b, t, g, v = 4, 6, 2, 3
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(b, t, g, v)), jnp.float32) * 3, -1)
    outputs = {
        'predictions': jnp.asarray(rng.normal(size=(b, t, 5)), jnp.float32),
        'targets': jnp.asarray(rng.normal(size=(b, t, 5)), jnp.float32),
        'codes': jnp.asarray(rng.integers(0, v, size=(b, t, g)), jnp.int32),
        'probs': probs,
        'features_pen': jnp.asarray([1.0, 2.0, 3.0, 4.0]),
    }
    mask = np.zeros((b, t), bool)
    mask[:2, :1] = True  # 2 masked frames in the first reference batch
    mask[2:, :3] = True  # 6 in the second
    negatives = wav2vec2.sample_negatives(jnp.asarray(mask), 2, jax.random.key(0))
    config = load_config('configs/wav2vec2.py').loss
    _, metrics = wav2vec2.wav2vec2_loss(outputs, jnp.asarray(mask), negatives, 2, config)

    def diversity(rows):
        mean = np.asarray(probs)[rows][mask[rows]].mean(axis=0)  # (G, V) over the group's masked frames
        return (g * v - np.exp(-(mean * np.log(mean + 1e-7)).sum(-1)).sum()) / (g * v)

    want = 2 / 8 * diversity(slice(0, 2)) + 6 / 8 * diversity(slice(2, 4))
    np.testing.assert_allclose(float(metrics['diversity']), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics['features_pen']), 2 / 8 * 1.5 + 6 / 8 * 3.5, rtol=1e-6)
