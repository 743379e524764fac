"""The byola_log_mel front end (BYOL-A's / UNFUSED's librosa log-mel): filters and mel power against
transformers.audio_utils (librosa's algorithm in numpy), the crop and padding, the normalisation and the config
checks."""

import ml_collections
import numpy as np
import pytest

from jaxssl.config import ConfigError
from jaxssl.data import audio


def input_config(**fields):
    c = ml_collections.ConfigDict()
    audio.add_audio_input_config(c, runlocal=True, features='byola_log_mel')
    c.input.update(fields)
    return c


def reference_filters(num_bins=64, f_min=60.0, f_max=7800.0):
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=513,
        num_mel_filters=num_bins,
        min_frequency=f_min,
        max_frequency=f_max,
        sampling_rate=16000,
        norm='slaney',
        mel_scale='slaney',
    )


@pytest.mark.parametrize(('num_bins', 'f_min', 'f_max'), [(64, 60.0, 7800.0), (40, 0.0, 8000.0), (96, 125.0, 3000.0)])
def test_slaney_filters_match_transformers(num_bins, f_min, f_max):
    ours = audio.slaney_mel_filters(num_bins, 1024, 16000.0, f_min, f_max)
    theirs = reference_filters(num_bins, f_min, f_max)
    assert ours.shape == theirs.shape == (513, num_bins)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())


def test_slaney_mel_scale():
    """Linear below 1 kHz (15 mels there), 27 mels per factor 6.4 above, and `slaney_hz` inverts it."""
    np.testing.assert_allclose(audio.slaney_mel([0.0, 200.0, 1000.0, 6400.0]), [0.0, 3.0, 15.0, 42.0], atol=1e-12)
    freqs = np.array([0.0, 60.0, 999.0, 1000.0, 1001.0, 7800.0])
    np.testing.assert_allclose(audio.slaney_hz(audio.slaney_mel(freqs)), freqs, rtol=1e-12, atol=1e-9)


def test_power_mel_matches_transformers():
    from transformers.audio_utils import spectrogram, window_function

    rng = np.random.default_rng(0)
    waveform = audio.synthesize_word(3, rng)[:15200]
    ours = audio.byola_power_mel(waveform, 16000, 64, 60.0, 7800.0)
    theirs = spectrogram(
        waveform.astype(np.float64),
        window_function(1024, 'hann', periodic=True),
        frame_length=1024,
        hop_length=160,
        power=2.0,
        center=True,
        pad_mode='reflect',
        mel_filters=reference_filters(),
        mel_floor=0.0,
        dtype=np.float64,
    ).T
    assert ours.shape == theirs.shape == (96, 64)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * theirs.max())
    # And bin by bin where the mel power is not tiny (the float64 epsilon added before the filters is below this).
    big = theirs > 1e-6 * theirs.max()
    np.testing.assert_allclose(ours[big], theirs[big], rtol=1e-5)


def test_log_mel_of_silence_is_the_log_of_the_epsilons():
    """All-zero input: log(filters' row sums x float64 eps + float32 eps), about log(1.19e-7), never -inf."""
    out = audio.byola_log_mel(np.zeros(15200, np.float32), input_config().input)
    assert out.shape == (96, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.log(np.finfo(np.float32).eps), rtol=1e-6)


def test_short_clip_is_padded_symmetrically():
    clip = np.arange(1, 8001, dtype=np.float32)  # 0.5 s
    out = audio.crop_or_pad(clip, 15200, np.random.default_rng(0))
    assert len(out) == 15200
    np.testing.assert_array_equal(out[:3600], 0)
    np.testing.assert_array_equal(out[3600:11600], clip)
    np.testing.assert_array_equal(out[11600:], 0)
    odd = audio.crop_or_pad(np.ones(7), 10)  # 3 left over: 1 on the left, 2 on the right
    np.testing.assert_array_equal(odd, [0, 1, 1, 1, 1, 1, 1, 1, 0, 0])


def test_long_clip_crop_is_a_window_chosen_by_rng():
    clip = np.arange(32000, dtype=np.float32)  # 2 s
    starts = set()
    for seed in range(8):
        out = audio.crop_or_pad(clip, 15200, np.random.default_rng(seed))
        assert len(out) == 15200
        np.testing.assert_array_equal(np.diff(out), 1)  # contiguous
        assert 0 <= out[0] <= 32000 - 15200
        starts.add(int(out[0]))
        again = audio.crop_or_pad(clip, 15200, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, again)  # the start is the rng's
    assert len(starts) > 1
    np.testing.assert_array_equal(audio.crop_or_pad(clip, 15200), clip[:15200])  # evaluation: the first samples


def test_spectrogram_crops_and_normalises():
    c = input_config().input
    assert (c.target_length, c.num_mel_bins, audio.crop_samples(c)) == (96, 64, 15200)
    assert (c.norm_mean, c.norm_std) == audio.SYNTHETIC_WORDS_BYOLA_STATS
    waveform = np.concatenate([audio.synthesize_word(w, np.random.default_rng(w)) for w in (0, 1)])  # 2 s
    rng = np.random.default_rng(5)
    start = int(np.random.default_rng(5).integers(0, 32000 - 15200 + 1))
    out = audio.spectrogram(waveform, c, rng)
    assert out.shape == (96, 64) and out.dtype == np.float32
    expected = (audio.byola_log_mel(waveform[start : start + 15200], c) - c.norm_mean) / c.norm_std
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    evaluation = audio.example(waveform, c)['spectrogram']
    expected = (audio.byola_log_mel(waveform[:15200], c) - c.norm_mean) / c.norm_std
    np.testing.assert_allclose(evaluation, expected, rtol=1e-6, atol=1e-6)
    assert audio.zero_example(c)['spectrogram'].shape == (96, 64)


def test_stats_are_the_synthetic_words():
    """SYNTHETIC_WORDS_BYOLA_STATS are fbank_stats of the train split (here over 200 of its utterances)."""
    mean, std = audio.fbank_stats(input_config(), max_examples=200)
    np.testing.assert_allclose((mean, std), audio.SYNTHETIC_WORDS_BYOLA_STATS, atol=0.1)


def test_other_front_ends_keep_their_defaults():
    c = ml_collections.ConfigDict()
    audio.add_audio_input_config(c)
    assert (c.input.num_mel_bins, c.input.target_length, c.input.norm_mean) == (128, 1024, -4.2677393)
    audio.check_audio_input_config(c)


@pytest.mark.parametrize(
    ('fields', 'key'),
    [
        ({'crop_seconds': 0.0}, 'input.crop_seconds'),
        ({'crop_seconds': -1.0}, 'input.crop_seconds'),
        ({'f_max': 9000.0}, 'input.f_max'),
        ({'f_min': 8000.0}, 'input.f_max'),
        ({'f_min': -5.0}, 'input.f_min'),
        ({'crop_seconds': 0.5}, 'input.target_length'),  # 51 frames of audio, 45 of padding: refused
    ],
)
def test_config_check_names_the_key(fields, key):
    config = input_config(**fields)
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        audio.check_audio_input_config(config)


def test_config_check_accepts_the_defaults():
    audio.check_audio_input_config(input_config())
    c = ml_collections.ConfigDict()
    audio.add_audio_input_config(c, features='byola_log_mel')
    audio.check_audio_input_config(c)
    # The byola keys are not checked for the other front ends (an 8 kHz SSAST config keeps the 7.8 kHz default).
    c = ml_collections.ConfigDict()
    audio.add_audio_input_config(c, runlocal=True)
    c.input.sample_rate = 8000
    audio.check_audio_input_config(c)
