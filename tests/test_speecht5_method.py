"""SpeechT5 pre-training (the method; the model's parity with transformers is tests/test_speecht5.py): the character
dictionary and BART-noised rows by known answers, the log-mel targets cut to the crop as the reference's collater,
the pipeline's batch, the step's loss as the sum of its terms, the temperature schedule, config errors, and 2
trainer steps on one device equal to the same steps sharded over 8 (with the probes at the end)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.config import ConfigError, load_config
from jaxssl.data import audio, char_denoising, text_noise
from jaxssl.methods import speecht5
from jaxssl.models import wav2vec2 as w2v
from tests.sharded_runs import assert_sharded_matches_one_device

SPEC = 'configs/speecht5.py:runlocal'
SMALL = (
    'model.variant=tiny',
    'teacher.fit_clips=20',
    'teacher.clusters=8',
    'text.max_len=64',
    'input.max_samples=8000',
)
EVERY_BLOCK = 'model.layerdrop=0.0'  # so that every block gets a gradient


@pytest.fixture(scope='module')
def method():
    return speecht5.Method(load_config(SPEC, [*SMALL, EVERY_BLOCK]))


@pytest.fixture(scope='module')
def batch(method):
    return method.example_batch(4)


def test_char_dictionary_follows_fairseq_order():
    d = char_denoising.CharDictionary(['abba', 'cab', 'zz'], min_count=2)
    # specials, then by falling count (a 3, b 3: ties by code point; z 2), c (1) below min_count, <mask> last
    assert d.symbols == ['<s>', '<pad>', '</s>', '<unk>', 'a', 'b', 'z', '<mask>']
    np.testing.assert_array_equal(d.encode('cab'), [0, 3, 4, 5, 2])
    assert d.decode(d.encode('baz')) == 'baz' and d.mask_id == 7


def test_denoising_rows_frame_the_decoder_and_mask_spans():
    d = char_denoising.CharDictionary(['the quick brown fox jumps over the lazy dog'])
    samples = [d.encode('the quick brown fox jumps over the lazy dog'), d.encode('a dog')]
    noise = char_denoising.make_noise(d, 0.3, 3.5, 0.0)
    rows = char_denoising.denoising_rows(samples, noise, np.random.default_rng(0), 48)
    target, prev = rows['text_target'], rows['text_prev']
    n = len(samples[0])
    np.testing.assert_array_equal(target[0, :n], samples[0])
    np.testing.assert_array_equal(prev[0, :n], np.concatenate([[2], samples[0][:-1]]))  # </s> <s> t1 ... tn
    assert (target[0, n:] == 1).all() and rows['text_target_mask'][0].sum() == n
    source = rows['text_source'][0, : rows['text_source_mask'][0].sum()]
    assert source[0] == 0 and source[-1] == 2 and (source == d.mask_id).any()
    # Each span is one <mask> in place of its tokens: ceil(0.3 x (n - 2)) tokens go (fewer when spans overlap or
    # run into the last token), and the kept ones stay in order.
    kept = source[(source != d.mask_id)][1:-1]
    assert n - 2 - int(np.ceil(0.3 * (n - 2))) <= len(kept) < n - 2
    it = iter(samples[0][1:-1])
    assert all(any(k == t for t in it) for k in kept)  # a subsequence of the clean text
    with pytest.raises(ValueError, match='max_len'):
        char_denoising.denoising_rows(samples, noise, np.random.default_rng(0), 8)


def test_random_ratio_swaps_masks_for_symbols_but_never_pad():
    d = char_denoising.CharDictionary(['abcdefghij' * 3])
    sample = d.encode('abcdefghij' * 6)
    every = char_denoising.make_noise(d, 0.3, 3.5, 1.0)
    none = char_denoising.make_noise(d, 0.3, 3.5, 0.0)
    swapped = spans = 0
    for seed in range(20):
        noised = text_noise.text_infilling(sample, every, np.random.default_rng(seed), 80)
        assert not np.isin(noised[1:-1], [0, 1]).any()  # never <s> or <pad> (<mask> itself can be drawn)
        swapped += int((noised == d.mask_id).sum())
        spans += int((text_noise.text_infilling(sample, none, np.random.default_rng(seed), 80) == d.mask_id).sum())
    assert swapped < 0.25 * spans  # about 1 / 13: <mask> among the 13 symbols drawn
    # A tenth of the spans, over many draws.
    tenth = char_denoising.make_noise(d, 0.3, 3.5, 0.1)
    rng = np.random.default_rng(0)
    masks = sum(int((text_noise.text_infilling(sample, tenth, rng, 80) == d.mask_id).sum()) for _ in range(300))
    rng = np.random.default_rng(0)
    spans = sum(int((text_noise.text_infilling(sample, none, rng, 80) == d.mask_id).sum()) for _ in range(300))
    assert 0.8 < masks / spans < 0.97


def test_inserted_masks_are_random_at_the_rounded_up_ratio():
    """Zero-length spans insert tokens (fairseq's add_insertion_noise): ceil(ratio x inserts) of them get random ids,
    so at a ratio of 0.01 nearly every row with an insert has one, where the spans' own 1% would give one in ~10."""
    sample = np.concatenate([[0], np.arange(10, 70), [2]]).astype(np.int32)  # 62 tokens, ids 10..69
    noise = text_noise.Noise(
        mask_id=5, pad_id=1, special_ids=(0, 1, 2), vocab_size=5000, never_drawn=(0, 1, 5), mask_ratio=0.3,
        poisson_lambda=1.0, shuffle=False, replace_ratio=0.0, random_ratio=0.01,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    rows = [text_noise.text_infilling(sample, noise, rng, 200) for _ in range(200)]
    with_random = np.mean([(~np.isin(r, [*sample, 5])).any() for r in rows])  # ids 70+ only come from the draw
    assert with_random > 0.9
    off = text_noise.Noise(**{**noise.__dict__, 'random_ratio': 0.0})
    assert not any((~np.isin(text_noise.text_infilling(sample, off, rng, 200), [*sample, 5])).any() for _ in range(50))


def test_log_mel_targets_are_cut_from_the_whole_utterance():
    rng = np.random.default_rng(0)
    waveform = rng.normal(size=16000).astype(np.float32)
    whole = audio.speecht5_log_mel(waveform)  # 63 frames: 16000 / 63 = 253.97 samples each
    got = speecht5.cropped_log_mel(waveform, 1000, 8000, 16000)
    np.testing.assert_array_equal(got, whole[3:34])  # int(1000 / 253.97) = 3, int(8000 / 253.97) = 31 frames
    end = speecht5.cropped_log_mel(waveform, 15500, 1000, 16000)  # int(61.03) + int(3.94) = 64: cut at the 63rd
    np.testing.assert_array_equal(end, whole[61:63])
    assert speecht5.mel_frames(16000) % 2 == 0 and speecht5.mel_frames(16000) >= 64


def test_batch_crops_labels_and_draws_text(method):
    config = method.config
    source = audio.SyntheticWordsSource('train')
    lengths = np.array([8000, 6000, 7000, 7500], np.int32)
    waveform = np.zeros((4, 8000), np.float32)
    for i, n in enumerate(lengths):
        waveform[i, :n] = source[i]['audio'][:n]
    batch = method.batch_transform(groups=2)({'waveform': waveform, 'num_samples': lengths}, np.random.default_rng(1))
    assert batch['num_samples'].tolist() == [6000, 6000, 7000, 7000]
    frames = int(w2v.frame_counts(6000))
    assert batch['time_mask'][:2].sum(axis=1).tolist() == [batch['time_mask'][0].sum()] * 2  # require_same_masks
    assert (batch['labels'][:2, 0, :frames] >= 0).all() and (batch['labels'][:2, 0, frames:] == -1).all()
    starts = []
    for i in range(4):  # the log-mel of the whole utterance, cut where its waveform was
        size, count = int(batch['num_samples'][i]), int(batch['mel_frames'][i])
        windows = np.lib.stride_tricks.sliding_window_view(waveform[i, : lengths[i]], size)
        start = int(np.flatnonzero((windows == batch['waveform'][i, :size]).all(axis=1))[0])
        starts.append(start)
        want = speecht5.cropped_log_mel(waveform[i, : lengths[i]], start, size, 16000)
        assert count == len(want) and abs(count - size / audio.SPEECHT5_HOP) <= 1
        np.testing.assert_array_equal(batch['mel'][i, :count], want)
        assert (batch['mel'][i, count:] == 0).all()
    assert max(starts) > 0  # some crops start inside their utterance: the targets follow them
    assert speecht5.cropped_log_mel(np.zeros(500, np.float32), 0, 500, 16000).shape == (0, 80)  # one window or less
    rows = config.text.rows_per_utterance
    assert batch['text_source'].shape == (4, rows, config.text.max_len)
    assert (batch['text_target'][..., 0] == 0).all() and (batch['text_prev'][..., 0] == 2).all()
    assert 'crop_start' not in batch


@pytest.fixture(scope='module')
def stepped(method, batch):
    """(params, extra, loss, metrics, extra after the step, gradients) of one step at init."""
    params, extra = method.init(jax.random.key(0), batch)
    step = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
    (loss, (metrics, updated)), grads = step(params, extra, batch, jax.random.key(1), jnp.int32(0))
    return params, extra, loss, metrics, updated, grads


def test_loss_is_the_weighted_sum_of_its_terms(method, batch, stepped):
    params, extra, loss, metrics, updated, _ = stepped
    m = {k: float(v) for k, v in metrics.items()}
    speech = m['prediction'] + 10 * m['features_pen'] + 0.1 * m['speech_diversity'] + m['reconstruction']
    np.testing.assert_allclose(m['speech'], speech, rtol=1e-5)
    np.testing.assert_allclose(m['reconstruction'], m['l1_before'] + m['l1_after'] + m['stop_bce'], rtol=1e-5)
    np.testing.assert_allclose(m['text'], m['text_nll'] + 0.1 * m['text_diversity'], rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.5 * m['speech'] + 0.5 * m['text'], rtol=1e-5)
    assert m['temperature'] == 2.0 and 0 < m['masked_fraction'] < 1
    # Chance level at init: the 8 + 4 label classes, the text symbols.
    np.testing.assert_allclose(m['prediction'], np.log(12), rtol=0.1)
    np.testing.assert_allclose(m['text_nll'], np.log(len(method.dictionary)), rtol=0.1)
    # The post-net's BatchNorm statistics move with the batch.
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), updated, extra)
    assert all(v > 0 for v in jax.tree.leaves(moved))
    # Speech alone: no text terms.
    alone = speecht5.Method(load_config(SPEC, [*SMALL, EVERY_BLOCK, 'loss.text_share=0.0']))
    loss, (metrics, _) = jax.jit(alone.loss)(params, extra, batch, jax.random.key(1), jnp.int32(0))
    assert 'text' not in metrics
    np.testing.assert_allclose(float(loss), m['speech'], rtol=1e-5)


def test_terms_are_normalised_per_reference_batch():
    """Each reference batch (consecutive rows) its own means, as the reference normalises each of its batches."""
    rng = np.random.default_rng(0)
    b, t, f = 4, 6, 8
    valid = np.arange(t)[None, :] < np.array([6, 6, 4, 4])[:, None]
    speech = {
        'logits': rng.normal(size=(b, t, 5)), 'penalty': rng.uniform(size=b),
        'probs': jax.nn.softmax(rng.normal(size=(b, t, 2, 3)) * 3), 'valid': valid,
        'before': rng.normal(size=(b, f, 80)), 'after': rng.normal(size=(b, f, 80)), 'stop': rng.normal(size=(b, f)),
    }  # fmt: skip
    batch = {
        'labels': rng.integers(0, 5, (b, 1, t)), 'time_mask': valid & (rng.uniform(size=(b, t)) < 0.6),
        'mel': rng.normal(size=(b, f + 2, 80)), 'mel_frames': np.array([8, 8, 5, 5]),
    }  # fmt: skip
    both = speecht5.speech_terms(speech, batch, 2, 2)
    for g, rows in enumerate((slice(0, 2), slice(2, 4))):
        half = speecht5.speech_terms(
            {k: v[rows] for k, v in speech.items()}, {k: v[rows] for k, v in batch.items()}, 1, 2
        )
        for key, value in half.items():
            np.testing.assert_allclose(both[key][g], value[0], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(both['features_pen'], [speech['penalty'][:2].mean(), speech['penalty'][2:].mean()])
    whole = speecht5.speech_terms(speech, batch, 1, 2)
    assert abs(float(whole['speech_diversity'][0]) - float(both['speech_diversity'].mean())) > 1e-3


def test_gradients_reach_every_trained_part(stepped):
    grads = stepped[-1]
    norms = {k: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(v))) for k, v in grads.items()}
    for part in ('feature_extractor', 'post_extract_proj', 'mask_emb', 'shared', 'relative_keys', 'encoder_layer_0',
                 'decoder_layer_1', 'speech_prenet_final', 'postnet_convs_0', 'feat_out', 'prob_out', 'final_proj',
                 'label_embs', 'quantizer_weight_proj', 'quantizer_codevectors', 'text_position_scale',
                 'speech_position_scale'):  # fmt: skip
        assert norms[part] > 0, part
    assert norms['speaker_projection'] == 0  # no x-vectors in pre-training here


def test_temperature_decays_to_its_floor(method):
    np.testing.assert_allclose(float(method.temperature(jnp.int32(0))), 2.0)
    np.testing.assert_allclose(float(method.temperature(jnp.int32(100))), 2 * 0.995**100, rtol=1e-5)
    np.testing.assert_allclose(float(method.temperature(jnp.int32(10_000))), 0.5)


def test_represent_pools_unmasked_speech(method, batch):
    params, extra = method.init(jax.random.key(0), batch)
    views = {'waveform': batch['waveform'], 'num_samples': batch['num_samples']}
    out = jax.jit(method.represent)(params, extra, views)
    assert out['mean_pool'].shape == (4, 32) and out['tokens'].shape[:2] == (4, int(w2v.frame_counts(8000)))
    # Only each clip's own samples count: noise past them (and no mask, dropout or code mix) changes nothing.
    shorter = {'waveform': batch['waveform'], 'num_samples': np.array([8000, 6000, 7000, 5000], np.int32)}
    noisy = dict(shorter, waveform=batch['waveform'].copy())
    for i, n in enumerate(shorter['num_samples']):
        noisy['waveform'][i, n:] = np.random.default_rng(i).normal(size=8000 - n)
    a, b = (jax.jit(method.represent)(params, extra, v) for v in (shorter, noisy))
    np.testing.assert_allclose(a['mean_pool'], b['mean_pool'], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a['mean_pool'][1], out['mean_pool'][1])  # and the valid samples do count


def test_pictures_show_targets_and_reconstructions(method, stepped):
    params, _, _, _, updated, _ = stepped
    pictures = method.visualize(params, updated)
    image = pictures['log_mel']
    # 3 rows of 80 mel bins, 4 clips of 1 + 8000 // 256 = 32 frames side by side, 2-pixel gutters.
    assert image.dtype == np.uint8 and image.shape == (3 * 80 + 2 * 2, 4 * (32 + 2), 3)
    rows = [image[i * 82 : i * 82 + 80].astype(float) for i in range(3)]
    assert all(row.std() > 5 for row in rows)  # the words' spectra and the decoder's frames, not blanks


@pytest.mark.parametrize(
    'override, key',
    [
        ('model.variant=huge', "'model.variant'"),
        ('model.dropout=1.5', "'model.dropout'"),
        ('input.sample_rate=24000', "'input.sample_rate'"),
        ('quantizer.share=2.0', "'quantizer.share'"),
        ('loss.text_share=-0.1', "'loss.text_share'"),
        ('text.rows_per_utterance=0', "'text.rows_per_utterance'"),
        ('text.max_len=4', "'text.max_len'"),
        ('text.poisson_lambda=0.0', "'text.poisson_lambda'"),
        ('teacher.clusters=1', "'teacher.clusters'"),
        ('loss.diversity_weight=-1.0', "'loss.diversity_weight'"),
        ('loss.reconstruction_weight=-1.0', "'loss.reconstruction_weight'"),
        ('mask.length=100', "'mask.length'"),
        ('input.dataset=folder', "'input.min_samples'"),  # runlocal's 0 lets through files too short to mask
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(SPEC, [override])


def test_corpus_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("'text.corpus'")):
        speecht5.Method(load_config(SPEC, [*SMALL, f'text.corpus={tmp_path}/missing.txt']))
    (tmp_path / 'long.txt').write_text('x' * 100 + '\n')
    with pytest.raises(ConfigError, match=re.escape("'text.max_len'")):
        speecht5.Method(load_config(SPEC, [*SMALL, f'text.corpus={tmp_path}/long.txt']))


@pytest.mark.slow
def test_runlocal_sharded_matches_one_device_and_probes(tmp_path):
    summary, rows = assert_sharded_matches_one_device(
        SPEC, tmp_path, *SMALL, 'input.global_batch=8', 'loss.reference_batches=2',
        keys=('loss', 'speech', 'text', 'prediction', 'reconstruction'),
    )  # fmt: skip
    assert 0.0 <= summary['final_eval/label/mean_pool/knn'] <= 1.0
    assert np.isfinite(rows[0]['text_nll']) and rows[0]['stop_bce'] > 0
