"""SpeechT5's encoder-decoder against transformers' SpeechT5 with converted weights (a tiny random configuration whose
relative-position table is shorter than the utterance, so the clipping is exercised): the speech encoder with and
without masked frames, the text encoder, speech-to-text logits with padded decoder inputs, and the speech decoder
(pre-net with an x-vector, post-net with BatchNorm statistics). Weights too small at their init to show in the
outputs are enlarged (mutations of those parts failed to fail otherwise). By their formulas or by hand: the sinusoid
tables and relative indices; the cross-modal quantizer (argmax entries, hard forward and straight-through gradient
in training), the batch-shared code mix and the HuBERT head's cosine logits; the speech losses (decoder inputs,
L1 + stop BCE, masked prediction, diversity). The log-mel targets against transformers' feature extractor."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.models import speecht5, speecht5_weights

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

MAX_RELATIVE = 8
SAMPLES = 6480  # 20 frames of 20 ms


def tiny_config():
    return transformers.SpeechT5Config(
        vocab_size=24, hidden_size=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, conv_dim=(32,) * 7,
        encoder_max_relative_position=MAX_RELATIVE, speech_decoder_prenet_units=16, speech_decoder_postnet_units=16,
    )  # fmt: skip


def ours(**kwargs):
    return speecht5.make('tiny', 24, max_relative=MAX_RELATIVE, **kwargs)


def enlarge_relative_keys(reference):
    """N(0, 1) relative keys: at their N(0, 0.02) init they move the encoder's output by ~1e-5, under the tolerance."""
    with torch.no_grad():
        reference.speecht5.encoder.wrapped_encoder.embed_positions.pe_k.weight.normal_()
    return reference


def merged(model, converted, stats=None):
    """Our freshly initialised params with every converted part in place (the rest stays random); with `stats`,
    (params, batch_stats) with those in place too."""
    waveform, tokens = jnp.zeros((1, SAMPLES)), jnp.full((1, 4), 5)
    variables = jax.jit(model.init)(jax.random.key(0), waveform, jnp.asarray([SAMPLES]), tokens, tokens > 1)
    params = dict(variables['params'])
    for key, value in converted.items():
        assert key in params, key
        jax.tree.map(lambda a, b: np.testing.assert_equal(np.shape(a), np.shape(b)), params[key], value)
        params[key] = value
    if stats is None:
        return params
    batch = dict(variables['batch_stats'])
    for key, value in stats.items():
        jax.tree.map(lambda a, b: np.testing.assert_equal(np.shape(a), np.shape(b)), batch[key], value)
        batch[key] = value
    return params, batch


@pytest.fixture(scope='module')
def speech_to_text():
    torch.manual_seed(0)
    reference = enlarge_relative_keys(transformers.SpeechT5ForSpeechToText(tiny_config()).eval())
    model = ours()
    params = merged(model, speecht5_weights.to_flax(reference.state_dict(), 2, 2))
    return reference, model, params


def test_sinusoids_and_relative_indices_follow_their_formulas():
    positions = jnp.asarray([[2, 3, 4, 1]])  # three valid steps, then a pad
    table = np.asarray(speecht5.fairseq_sinusoids(positions, 6))
    w = np.exp(-np.arange(3) * math.log(10000) / 2)
    np.testing.assert_allclose(table[0, 1], np.concatenate([np.sin(3 * w), np.cos(3 * w)]), rtol=1e-5)
    np.testing.assert_array_equal(table[0, 3], 0.0)
    np.testing.assert_array_equal(speecht5.fairseq_positions(jnp.asarray([[True, True, False]])), [[2, 3, 1]])
    idx = np.asarray(speecht5.relative_indices(12, 4))
    assert idx[0, 0] == 4 and idx[5, 0] == 7 and idx[0, 5] == 0 and idx[11, 0] == 7 and idx.min() == 0


def test_speech_encoder_equals_transformers(speech_to_text):
    reference, model, params = speech_to_text
    wave = np.random.default_rng(0).normal(size=(2, SAMPLES)).astype(np.float32)
    frames = 20
    mask = np.zeros((2, frames), bool)
    mask[0, 3:9] = mask[1, 12:18] = True
    for masked in (None, mask):
        with torch.no_grad():
            x, _ = reference.speecht5.encoder.prenet(
                torch.tensor(wave), mask_time_indices=None if masked is None else torch.tensor(masked)
            )
            want = reference.speecht5.encoder.wrapped_encoder(x).last_hidden_state.numpy()

        def encode(module, wave, masked):
            x, valid, _ = module.speech_prenet(wave, jnp.full((2,), SAMPLES), masked, True)
            return module.encode(x, valid)

        got = model.apply({'params': params}, wave, None if masked is None else jnp.asarray(masked), method=encode)
        assert got.shape == (2, frames, 32)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_speech_to_text_logits_equal_transformers(speech_to_text):
    reference, model, params = speech_to_text
    wave = np.random.default_rng(1).normal(size=(2, SAMPLES)).astype(np.float32)
    tokens = np.array([[2, 7, 9, 11, 4], [2, 5, 6, 1, 1]])  # the second row padded
    token_mask = tokens != 1
    with torch.no_grad():
        want = reference(
            input_values=torch.tensor(wave),
            decoder_input_ids=torch.tensor(tokens),
            decoder_attention_mask=torch.tensor(token_mask.astype(np.int64)),
        ).logits.numpy()
    got = model.apply(
        {'params': params}, wave, jnp.full((2,), SAMPLES), tokens, token_mask, method=speecht5.SpeechT5.speech_to_text
    )
    np.testing.assert_allclose(got[token_mask], want[token_mask], atol=2e-5, rtol=1e-4)


def test_text_encoder_equals_transformers():
    torch.manual_seed(1)
    reference = enlarge_relative_keys(transformers.SpeechT5ForTextToSpeech(tiny_config()).eval())
    with torch.no_grad():
        reference.speecht5.encoder.prenet.encode_positions.alpha.fill_(0.7)  # not its init, so the scale is read
    model = ours()
    params = merged(model, speecht5_weights.to_flax(reference.state_dict(), 2, 0))
    tokens = np.array([[4, 8, 15, 16, 23, 2], [4, 9, 10, 2, 1, 1]])
    mask = tokens != 1
    with torch.no_grad():
        want = reference.speecht5.encoder(
            input_values=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))
        ).last_hidden_state.numpy()

    def encode(module, tokens, mask):
        return module.encode(module.text_prenet(tokens, True), mask)

    got = model.apply({'params': params}, tokens, mask, method=encode)
    np.testing.assert_allclose(got[mask], want[mask], atol=2e-5, rtol=1e-4)


def test_speech_decoder_equals_transformers():
    """Speech encoder -> speech decoder (pre-net with an x-vector, decoder, post-net with running BatchNorm
    statistics) against SpeechT5ForSpeechToSpeech without its always-on pre-net dropout (evaluation here). That
    dropout is replaced by the identity: transformers' `_consistent_dropout` keeps a unit with probability p, not
    1 - p (the same at the reference's p = 0.5), so p = 0 would zero the pre-net. The pre-net's weights are enlarged:
    at their N(0, 0.02) init its output is ~1e-4, under the tolerance."""
    torch.manual_seed(2)
    reference = enlarge_relative_keys(transformers.SpeechT5ForSpeechToSpeech(tiny_config()).eval())
    reference.speecht5.decoder.prenet._consistent_dropout = lambda inputs, p: inputs
    with torch.no_grad():
        for layer in (*reference.speecht5.decoder.prenet.layers, reference.speecht5.decoder.prenet.final_layer):
            layer.weight.normal_(0.0, 0.3)
        reference.speecht5.decoder.prenet.encode_positions.alpha.fill_(1.3)
        for layer in reference.speech_decoder_postnet.layers:
            layer.batch_norm.running_mean.normal_()
            layer.batch_norm.running_var.uniform_(0.5, 2.0)
            layer.batch_norm.weight.uniform_(0.5, 1.5)
            layer.batch_norm.bias.normal_()
    state = reference.state_dict()
    model = ours()
    params, stats = merged(model, speecht5_weights.to_flax(state, 2, 2), speecht5_weights.batch_stats(state))
    rng = np.random.default_rng(3)
    wave = rng.normal(size=(2, SAMPLES)).astype(np.float32)
    frames = rng.normal(size=(2, 6, 80)).astype(np.float32)
    speaker = rng.normal(size=(2, 512)).astype(np.float32)
    with torch.no_grad():
        x, _ = reference.speecht5.encoder.prenet(torch.tensor(wave))
        memory = reference.speecht5.encoder.wrapped_encoder(x).last_hidden_state
        hidden = reference.speecht5.decoder(
            input_values=torch.tensor(frames), encoder_hidden_states=memory, speaker_embeddings=torch.tensor(speaker)
        ).last_hidden_state
        want = [t.numpy() for t in reference.speech_decoder_postnet(hidden)]

    def run(module, wave, frames, speaker):
        x, valid, _ = module.speech_prenet(wave, jnp.full((2,), SAMPLES), None, True)
        memory = module.encode(x, valid)
        return module.decode_speech(frames, jnp.ones((2, 6), bool), memory, valid, speaker)

    got = model.apply({'params': params, 'batch_stats': stats}, wave, frames, speaker, method=run)
    assert [g.shape for g in got] == [(2, 12, 80), (2, 12, 80), (2, 12)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4)


@pytest.fixture(scope='module')
def tiny_params():
    model = ours(label_classes=7)
    variables = jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, SAMPLES)), jnp.asarray([SAMPLES]), jnp.full((1, 4), 5), jnp.ones((1, 4), bool)
    )
    return model, variables['params']


def test_quantizer_picks_codebook_entries_with_straight_through_gradients(tiny_params):
    model, params = tiny_params
    states = jax.random.normal(jax.random.key(1), (2, 5, 32))
    vectors, codes, probs = model.apply({'params': params}, states, None, method=speecht5.SpeechT5.quantize)
    table = np.asarray(params['quantizer_codevectors']).reshape(2, 100, 16)
    want = np.concatenate([table[0][np.asarray(codes[..., 0])], table[1][np.asarray(codes[..., 1])]], axis=-1)
    np.testing.assert_array_equal(vectors, want)  # the argmax entries of both codebooks, concatenated
    logits = np.asarray(states) @ np.asarray(params['quantizer_weight_proj']['kernel'])
    logits = logits + np.asarray(params['quantizer_weight_proj']['bias'])
    np.testing.assert_array_equal(codes, logits.reshape(2, 5, 2, 100).argmax(-1))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)

    def training(p, states):
        vectors, _, _ = model.apply(
            {'params': p}, states, 2.0, False, method=speecht5.SpeechT5.quantize, rngs={'gumbel': jax.random.key(2)}
        )
        return vectors

    vectors = training(params, states)
    rows = np.asarray(params['quantizer_codevectors'])[:, None]
    assert all(np.isclose(np.abs(rows - np.asarray(v)[None]).sum(-1), 0).any() for v in np.asarray(vectors)[0, :, :16])
    grad = jax.grad(lambda p: training(p, states).sum())(params)  # through the soft sample to the projection
    assert np.abs(np.asarray(grad['quantizer_weight_proj']['kernel'])).sum() > 0


def test_code_mix_replaces_the_same_steps_of_every_example():
    positions = speecht5.code_positions(jax.random.key(3), 25, 0.1)
    assert int(positions.sum()) == 2  # floor(0.1 x 25)
    assert int(speecht5.code_positions(jax.random.key(3), 9, 0.1).sum()) == 0  # fewer than 10 steps: none
    # A batch padded to 25 steps whose own length is 17: floor(1.7) of its first 17 steps, uniformly.
    drawn = jax.vmap(lambda k: speecht5.code_positions(k, 25, 0.1, jnp.int32(17)))(
        jax.random.split(jax.random.key(0), 400)
    )
    np.testing.assert_array_equal(np.asarray(drawn).sum(axis=1), 1)
    counts = np.asarray(drawn).sum(axis=0)
    assert counts[17:].sum() == 0 and counts[:17].min() > 8  # each of the 17 about 400 / 17 = 23.5 times
    states, vectors = jnp.zeros((3, 25, 4)), jnp.ones((3, 25, 4))
    mixed = np.asarray(speecht5.mix_codes(states, vectors, positions))
    np.testing.assert_array_equal(mixed[:, np.asarray(positions)], 1.0)
    np.testing.assert_array_equal(mixed[:, ~np.asarray(positions)], 0.0)


def test_label_logits_are_cosines_over_the_temperature(tiny_params):
    model, params = tiny_params
    states = jax.random.normal(jax.random.key(4), (2, 3, 32))
    got = model.apply({'params': params}, states, method=speecht5.SpeechT5.label_logits)
    projected = np.asarray(states) @ np.asarray(params['final_proj']['kernel']) + np.asarray(
        params['final_proj']['bias']
    )
    embs = np.asarray(params['label_embs'])
    cos = projected @ embs.T / np.linalg.norm(projected, axis=-1, keepdims=True) / np.linalg.norm(embs, axis=-1)
    assert got.shape == (2, 3, 7)
    np.testing.assert_allclose(got, cos / 0.1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('samples', [16000, 6481])
def test_log_mel_targets_equal_transformers_feature_extractor(samples):
    from jaxssl.data import audio

    wave = (np.random.default_rng(samples).normal(size=samples) * 0.1).astype(np.float32)
    want = transformers.SpeechT5FeatureExtractor()(audio_target=wave, sampling_rate=16000, return_tensors='np')
    got = audio.speecht5_log_mel(wave)
    assert got.shape == (1 + samples // 256, 80) == want['input_values'].shape[1:]
    np.testing.assert_allclose(got, want['input_values'][0], atol=2e-4)


def test_decoder_inputs_thin_and_shift_the_frames():
    from jaxssl.losses import speecht5 as losses

    mel = np.arange(2 * 7 * 1, dtype=np.float32).reshape(2, 7, 1)
    frames, mask = losses.decoder_inputs(jnp.asarray(mel), jnp.asarray([7, 4]), 2)
    np.testing.assert_array_equal(frames[0, :, 0], [0, 1, 3])  # zero, then frames 1, 3 (5 is the last step's target)
    np.testing.assert_array_equal(frames[1, :, 0], [0, 8, 10])
    np.testing.assert_array_equal(mask, [[True, True, True], [True, True, False]])


def test_reconstruction_and_prediction_losses_by_hand():
    from jaxssl.losses import speecht5 as losses

    rng = np.random.default_rng(5)
    before, after, mel = rng.normal(size=(3, 2, 6, 4)).astype(np.float32)
    mel = np.concatenate([mel, rng.normal(size=(2, 1, 4)).astype(np.float32)], axis=1)  # L = 7, T = 6
    stop = rng.normal(size=(2, 6)).astype(np.float32)
    lengths = np.array([7, 5])  # valid outputs: 6 and 4 frames
    total, terms = losses.reconstruction_loss(before, after, stop, mel, lengths, 2)
    l1 = lambda x: (np.abs(x[0] - mel[0, :6]).sum() + np.abs(x[1, :4] - mel[1, :4]).sum()) / (10 * 4)
    labels = np.zeros((2, 6))
    labels[0, 5] = labels[1, 3] = 1
    p = 1 / (1 + np.exp(-stop.astype(np.float64)))
    bce = -(5 * labels * np.log(p) + (1 - labels) * np.log(1 - p))
    want_bce = (bce[0].sum() + bce[1, :4].sum()) / 10
    np.testing.assert_allclose(
        [terms['l1_before'], terms['l1_after'], terms['stop_bce']], [l1(before), l1(after), want_bce], rtol=1e-5
    )
    np.testing.assert_allclose(total, l1(before) + l1(after) + want_bce, rtol=1e-5)

    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = np.array([[1, 4, 0], [2, 2, 3]])
    mask = np.array([[True, False, True], [False, True, False]])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(log_p[0, 0, 1] + log_p[0, 2, 0] + log_p[1, 1, 2]) / 3
    nll, accuracy = losses.masked_prediction_loss(logits, labels, mask)
    np.testing.assert_allclose(nll, want, rtol=1e-5)
    hits = [logits[0, 0].argmax() == 1, logits[0, 2].argmax() == 0, logits[1, 1].argmax() == 2]
    np.testing.assert_allclose(accuracy, np.mean(hits))


def test_diversity_loss_from_uniform_to_collapsed():
    from jaxssl.losses import speecht5 as losses

    uniform = np.full((2, 3, 2, 4), 0.25, np.float32)
    np.testing.assert_allclose(losses.diversity_loss(uniform), 0.0, atol=1e-5)  # perplexity G V: no penalty
    collapsed = np.zeros((2, 3, 2, 4), np.float32)
    collapsed[..., 0] = 1.0
    np.testing.assert_allclose(losses.diversity_loss(collapsed), (8 - 2) / 8, atol=1e-5)  # one code a codebook


def test_init_follows_init_bert_params(tiny_params):
    """fairseq's init_bert_params: every Linear N(0, 0.02), zero bias; the post-net convolutions torch's uniform."""
    _, params = tiny_params
    for name in ('post_extract_proj', 'speech_prenet_layers_0', 'speech_prenet_final', 'feat_out', 'final_proj'):
        kernel = np.asarray(params[name]['kernel'])
        assert abs(kernel.std() - 0.02) < 0.004 and abs(kernel.mean()) < 0.004, name
        np.testing.assert_array_equal(params[name]['bias'], 0.0)
    conv = np.asarray(params['postnet_convs_0']['kernel'])  # (5, 80, 16): bound 1 / sqrt(5 x 80)
    assert np.abs(conv).max() <= 1 / np.sqrt(400) and conv.std() > 0.5 / np.sqrt(3 * 400)


def test_speech_decoder_trains_without_an_x_vector(tiny_params):
    """Training mode: Tacotron dropout, batch-statistics BatchNorm whose running averages move, LayerDrop draws; no
    speaker embedding (the prenet's x-vector branch skipped)."""
    model, _ = tiny_params
    waveform, tokens = jnp.zeros((2, SAMPLES)), jnp.full((2, 4), 5)
    variables = model.init(jax.random.key(0), waveform, jnp.full((2,), SAMPLES), tokens, tokens > 1)
    memory = jax.random.normal(jax.random.key(1), (2, 20, 32))
    frames = jax.random.normal(jax.random.key(2), (2, 6, 80))
    rngs = {name: jax.random.key(i) for i, name in enumerate(('dropout', 'layerdrop'))}
    (before, after, stop), updated = model.apply(
        variables, frames, jnp.ones((2, 6), bool), memory, jnp.ones((2, 20), bool), None, False,
        method=speecht5.SpeechT5.decode_speech, rngs=rngs, mutable=['batch_stats'],
    )  # fmt: skip
    assert before.shape == after.shape == (2, 12, 80) and stop.shape == (2, 12)
    assert np.isfinite(np.asarray(after)).all()
    old, new = variables['batch_stats']['postnet_norms_0']['mean'], updated['batch_stats']['postnet_norms_0']['mean']
    assert not np.allclose(old, new)


def test_padding_leaves_training_outputs_and_statistics_unchanged(tiny_params):
    """Steps past the valid ones change nothing at the valid steps: the post-net's batch statistics (over valid
    frames only) and its convolutions (zeros past the end, as past the reference's unpadded batches), and each
    utterance's feature penalty (its valid frames)."""
    model, _ = tiny_params
    model = model.clone(dropout=0.0, attention_dropout=0.0, prenet_dropout=0.0, postnet_dropout=0.0, layerdrop=0.0)
    waveform, tokens = jnp.zeros((2, SAMPLES)), jnp.full((2, 4), 5)
    variables = model.init(jax.random.key(0), waveform, jnp.full((2,), SAMPLES), tokens, tokens > 1)
    memory = jax.random.normal(jax.random.key(1), (2, 20, 32))
    frames = jax.random.normal(jax.random.key(2), (2, 9, 80))

    def decode(steps):
        mask = jnp.arange(steps)[None, :] < 6
        padded = jnp.where(mask[..., None], frames[:, :steps], 0.0)
        return model.apply(
            variables, padded, mask, memory, jnp.ones((2, 20), bool), None, False,
            method=speecht5.SpeechT5.decode_speech, mutable=['batch_stats'],
        )  # fmt: skip

    (before, after, stop), stats = decode(6)
    (before9, after9, stop9), stats9 = decode(9)
    for got, want in ((before9, before), (after9, after), (stop9, stop)):
        np.testing.assert_allclose(np.asarray(got)[:, :12], want, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats9, stats)

    rng = np.random.default_rng(0)
    speech = rng.normal(size=(2, SAMPLES)).astype(np.float32)
    penalty = lambda w: model.apply(
        variables, jnp.asarray(w), jnp.full((2,), SAMPLES), None, True, method=speecht5.SpeechT5.speech_prenet
    )[2]  # fmt: skip
    longer = np.concatenate([speech, rng.normal(size=(2, 3000)).astype(np.float32)], axis=1)  # noise past the end
    np.testing.assert_allclose(penalty(longer), penalty(speech), rtol=1e-5)
    assert penalty(speech).shape == (2,)
