"""Audio input: the Kaldi filterbank against kaldi-native-fbank, WAV decoding, the built-in synthetic words, and the
Grain pipelines' skip-and-count policy for unreadable files."""

import itertools
import struct

import ml_collections
import numpy as np
import pytest
from scipy.io import wavfile

from jaxssl.data import audio, skipped_files
from jaxssl.data.decode import DecodeError


def input_config(**fields):
    c = ml_collections.ConfigDict()
    audio.add_audio_input_config(c, runlocal=True)
    c.input.update(fields)
    return c


def knf_fbank(waveform, num_bins, window_type):
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = window_type
    opts.mel_opts.num_bins = num_bins
    # torchaudio's (and Kaldi's) HTK mel scale and unnormalised triangles, not kaldi-native-fbank's Slaney defaults.
    opts.mel_opts.use_slaney_mel_scale = False
    opts.mel_opts.norm = ''
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, waveform.tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


@pytest.mark.parametrize('window_type', audio.WINDOWS)
@pytest.mark.parametrize('num_bins', [23, 64, 80])
def test_kaldi_fbank_matches_kaldi_native_fbank(num_bins, window_type):
    rng = np.random.default_rng(num_bins)
    waveform = audio.synthesize_word(int(rng.integers(10)), rng)[: 16000 - int(rng.integers(300))]
    want = knf_fbank(waveform, num_bins, window_type)
    got = audio.kaldi_fbank(waveform, 16000, num_bins, window_type=window_type)
    assert got.shape == want.shape == (1 + (len(waveform) - 400) // 160, num_bins)
    # Log energies; kaldi-native-fbank runs float32 FFTs, which lose digits on the quietest bins (log ~ -15).
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=5e-4)


def test_mel_filters_at_128_bins():
    """128 bins at 16 kHz over a 512-point FFT (SSAST's setting): kaldi-native-fbank refuses it because one low filter
    holds no FFT bin; torchaudio, which the reference calls, keeps that filter, whose log energy is then log(eps)."""
    filters = audio.mel_filters(128, 512, 16000.0, 20.0, 0.0)
    assert filters.shape == (257, 128) and not filters[-1].any()  # the Nyquist bin has no weight
    assert np.flatnonzero(filters.sum(axis=0) == 0).tolist() == [3]
    fbank = audio.kaldi_fbank(np.random.default_rng(0).normal(size=4000), num_mel_bins=128)
    np.testing.assert_allclose(fbank[:, 3], np.log(np.finfo(np.float32).eps))
    assert audio.kaldi_fbank(np.zeros(399)).shape == (0, 128)  # shorter than one frame


def torchaudio_melscale_fbanks(n_freqs, f_min, f_max, n_mels, sample_rate):
    """torchaudio.functional.melscale_fbanks(norm=None, mel_scale='htk'), transcribed in torch (torchaudio does not
    install beside this torch)."""
    import torch

    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    m_min, m_max = (2595.0 * np.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    m_pts = torch.linspace(m_min, m_max, n_mels + 2, dtype=torch.float64)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down_slopes = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up_slopes = slopes[:, 2:] / f_diff[1:]
    return torch.max(torch.zeros(1, dtype=torch.float64), torch.min(down_slopes, up_slopes))


def s3prl_log_mel_cmvn(waveform, n_mels=80):
    """s3prl: bucket_dataset._normalize_wav_decibel(-25), then OnlinePreprocessor (win 25 ms, hop 10 ms, n_freq 201)
    'mel' with log=True, cmvn=True, eps 1e-10, written with torch.stft as the reference."""
    import torch

    wav = torch.tensor(waveform, dtype=torch.float64)
    wav = wav * (10 ** (-25 / 20)) / (wav.pow(2).mean().pow(0.5) + 1e-10)
    window = torch.hann_window(400, dtype=torch.float64)
    complx = torch.stft(wav, n_fft=400, hop_length=160, win_length=400, window=window, center=True,
                        pad_mode='reflect', normalized=False, onesided=True, return_complex=True)  # fmt: skip
    linear = complx.abs().pow(2)  # (201, frames)
    mel = torch.matmul(linear.transpose(0, 1), torchaudio_melscale_fbanks(201, 0.0, 8000.0, n_mels, 16000))
    feat = torch.log(mel.transpose(0, 1) + 1e-10)
    feat = (feat - feat.mean(dim=-1, keepdim=True)) / (feat.std(dim=-1, keepdim=True) + 1e-10)
    return feat.transpose(0, 1).numpy()


@pytest.mark.parametrize('num_bins', [40, 80])
def test_log_mel_cmvn_matches_s3prl(num_bins):
    rng = np.random.default_rng(num_bins)
    waveform = audio.synthesize_word(int(rng.integers(10)), rng)[: 16000 - int(rng.integers(500))]
    want = s3prl_log_mel_cmvn(waveform, num_bins)
    got = audio.log_mel_cmvn(audio.normalize_level(waveform), num_mel_bins=num_bins)
    assert got.shape == want.shape == (1 + len(waveform) // 160, num_bins)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(got.mean(axis=0), 0, atol=1e-5)


def test_spectrogram_pads_cuts_and_normalises():
    c = input_config(target_length=50, norm_mean=-2.0, norm_std=3.0).input
    waveform = np.random.default_rng(0).normal(size=16000).astype(np.float32) + 0.3  # a DC offset
    out = audio.spectrogram(waveform, c)
    fbank = audio.kaldi_fbank(waveform - waveform.mean(), 16000, c.num_mel_bins)
    np.testing.assert_allclose(out, (fbank[:50] + 2.0) / 6.0, rtol=1e-6, atol=1e-6)
    padded = audio.spectrogram(waveform[:3000], c)  # 17 frames, then zeros, normalised like the rest
    np.testing.assert_allclose(padded[17:], 2.0 / 6.0)
    c.features, c.target_length = 'log_mel_cmvn', 120  # TERA's: 101 frames, then zero padding
    tera = audio.spectrogram(waveform, c)
    want = audio.log_mel_cmvn(audio.normalize_level(waveform), num_mel_bins=c.num_mel_bins)
    np.testing.assert_array_equal(tera[:101], want)
    assert not tera[101:].any() and audio.frame_lengths(tera) == 101


def test_tera_crops_long_utterances_before_the_features():
    """s3prl's `_sample`: level-normalise the whole waveform, crop target_length x 160 samples at a random start,
    then compute the features (so the CMVN statistics are the crop's); evaluation takes the first crop."""
    c = input_config(features='log_mel_cmvn', num_mel_bins=40, target_length=50).input
    waveform = np.random.default_rng(0).normal(size=48000) * np.linspace(0.1, 1, 48000)
    level = audio.normalize_level(waveform)
    first = audio.spectrogram(waveform, c)
    np.testing.assert_allclose(first, audio.log_mel_cmvn(level[:8000], num_mel_bins=40)[:50], atol=1e-6)
    starts = set()
    for seed in range(5):
        crop = audio.spectrogram(waveform, c, np.random.default_rng(seed))
        start = int(np.random.default_rng(seed).integers(0, 48000 - 8000 + 1))
        np.testing.assert_allclose(
            crop, audio.log_mel_cmvn(level[start : start + 8000], num_mel_bins=40)[:50], atol=1e-6
        )
        starts.add(start)
    assert len(starts) == 5


def test_decode_wav_formats(tmp_path):
    rng = np.random.default_rng(0)
    signal = (0.5 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)
    stereo = np.stack([signal, rng.uniform(-1, 1, 8000).astype(np.float32)], axis=1)
    wavfile.write(tmp_path / 'int16.wav', 16000, (stereo * 32767).astype(np.int16))
    wavfile.write(tmp_path / 'float.wav', 16000, signal)
    wavfile.write(tmp_path / 'rate8k.wav', 8000, signal)
    read = lambda name: audio.decode_audio({'name': name, 'audio': str(tmp_path / name), 'kind': 'file'}, 16000)
    np.testing.assert_allclose(read('int16.wav'), signal, atol=1e-4)  # the first channel, scaled by 1 / 32768
    np.testing.assert_array_equal(read('float.wav'), signal)
    assert read('rate8k.wav').shape == (16000,)  # resampled to 16 kHz
    (tmp_path / 'broken.wav').write_bytes(b'RIFF....WAVEfmt garbage')
    wavfile.write(tmp_path / 'rate0.wav', 0, signal)
    wavfile.write(tmp_path / 'short.wav', 16000, signal[:300])
    for name in ('broken.wav', 'rate0.wav', 'short.wav'):
        with pytest.raises(DecodeError):
            read(name)


def test_synthetic_words_are_deterministic_and_balanced():
    train, val = audio.SyntheticWordsSource('train'), audio.SyntheticWordsSource('val')
    assert (len(train), len(val)) == (2000, 500)
    a, b = train[13], audio.SyntheticWordsSource('train')[13]
    np.testing.assert_array_equal(a['audio'], b['audio'])
    assert a['label'] == 3 and a['audio'].shape == (16000,) and np.abs(a['audio']).max() <= 1
    assert not np.array_equal(val[13]['audio'], a['audio'])  # the splits draw different utterances
    assert np.bincount([train[i]['label'] for i in range(100)]).tolist() == [10] * 10
    with pytest.raises(ValueError, match='splits'):
        audio.SyntheticWordsSource('test')


def test_built_in_statistics_are_the_measured_ones():
    """SYNTHETIC_WORDS_STATS are fbank_stats of the train split (here over 200 of its utterances)."""
    mean, std = audio.fbank_stats(input_config(), max_examples=200)
    np.testing.assert_allclose((mean, std), audio.SYNTHETIC_WORDS_STATS, atol=0.1)


@pytest.fixture()
def wav_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (('train', 6), ('val', 3)):
        for label in ('no', 'yes'):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                wavfile.write(folder / f'{i}.wav', 16000, rng.uniform(-0.5, 0.5, 12000).astype(np.float32))
    (tmp_path / 'train' / 'yes' / '2.wav').write_bytes(b'not a wav file')
    wavfile.write(tmp_path / 'train' / 'no' / '3.wav', 16000, np.zeros(150, np.float32))  # shorter than a window
    (tmp_path / 'val' / 'no' / '1.wav').write_bytes(b'')
    return tmp_path


def test_folder_pipelines_skip_count_and_flag_broken_files(wav_root):
    config = input_config(dataset='folder', data_root=str(wav_root), global_batch=4)
    source = audio.make_audio_source(config)
    assert len(source) == 12 and source.classes == ['no', 'yes']
    before = skipped_files()
    it = iter(audio.make_pretrain_dataset(config, seed=0))
    batches = [next(it) for _ in range(6)]  # two epochs: the two broken files are drawn twice each
    assert batches[0]['spectrogram'].shape == (4, 96, 64) and batches[0]['spectrogram'].dtype == np.float32
    assert np.isfinite(np.stack([b['spectrogram'] for b in batches])).all()
    assert skipped_files() - before == 4
    dataset, count = audio.make_eval_dataset(config, split='val', batch_size=4)
    rows = list(dataset)
    valid = np.concatenate([r['valid'] for r in rows])
    assert count == 6 and rows[0]['spectrogram'].shape == (4, 1, 96, 64)
    assert valid.tolist() == [1, 0, 1, 1, 1, 1, 0, 0]  # val/no/1.wav is empty; then the padding
    assert skipped_files() - before == 5


def test_waveform_pipelines_carry_lengths_and_flag_broken_files(wav_root):
    config = input_config(dataset='folder', data_root=str(wav_root), global_batch=4, features='waveform')
    batch = next(iter(audio.make_pretrain_dataset(config, seed=0)))
    assert batch['waveform'].shape == (4, 16000) and batch['num_samples'].tolist() == [12000] * 4
    assert not batch['waveform'][:, 12000:].any()
    rows = list(audio.make_eval_dataset(config, split='val', batch_size=4)[0])
    assert rows[0]['waveform'].shape == (4, 1, 16000)
    lengths = np.concatenate([r['num_samples'][:, 0] for r in rows])[:6]
    assert lengths.tolist() == [12000, 0, 12000, 12000, 12000, 12000]  # val/no/1.wav is empty
    record = audio.make_audio_source(config)[0]
    assert len(audio.decode_audio(record, 16000, min_samples=12000)) == 12000
    with pytest.raises(DecodeError, match=r'input\.min_samples'):  # fairseq's min_sample_size
        audio.decode_audio(record, 16000, min_samples=12001)


def test_config_errors_name_the_key():
    from jaxssl.config import ConfigError

    bad = ((dict(dataset='mp3s'), 'input.dataset'), (dict(window='kaiser'), 'input.window'),
           (dict(norm_std=0.0), 'input.norm_std'), (dict(target_length=0), 'input.target_length'))  # fmt: skip
    for fields, key in bad:
        with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
            audio.check_audio_input_config(input_config(**fields))
    with pytest.raises(ConfigError, match=r'input\.data_root'):  # checked when the data is opened
        audio.make_audio_source(input_config(dataset='folder'))


def test_folder_lengths_come_from_the_headers(wav_root):
    source = audio.make_audio_source(input_config(dataset='folder', data_root=str(wav_root)))
    lengths = source.lengths(16000)
    names = [path.split('train/')[1] for path, _ in source.files]
    want = {'no/3.wav': 150, 'yes/2.wav': 0}  # a 150-sample file; a broken one
    assert lengths.tolist() == [want.get(n, 12000) for n in names]
    assert source.lengths(8000)[0] == 6000  # at another rate, as the decoder resamples


def test_folder_lengths_of_24_bit_files(tmp_path):
    """scipy cannot memory-map 24-bit PCM: such files are read for their length, not taken as empty."""
    (tmp_path / 'a').mkdir()
    samples = 5000
    fmt = struct.pack('<HHIIHH', 1, 1, 16000, 16000 * 3, 3, 24)
    data = np.random.default_rng(0).integers(0, 256, samples * 3, dtype=np.uint8).tobytes()
    chunks = b'fmt ' + struct.pack('<I', len(fmt)) + fmt + b'data' + struct.pack('<I', len(data)) + data
    (tmp_path / 'a' / 'x.wav').write_bytes(b'RIFF' + struct.pack('<I', 4 + len(chunks)) + b'WAVE' + chunks)
    source = audio.AudioFolderSource(str(tmp_path))
    assert source.lengths(16000).tolist() == [samples]
    assert len(audio.decode_audio(source[0], 16000)) == samples


def test_length_buckets_hold_consecutive_lengths():
    lengths = np.random.default_rng(0).integers(100, 10000, size=103)
    buckets = audio.length_buckets(lengths, 8, np.random.default_rng(1))
    assert buckets.shape == (12, 8) and len(np.unique(buckets)) == 96
    ranges = sorted((lengths[b].min(), lengths[b].max()) for b in buckets)
    assert all(high <= next_low for (_, high), (next_low, _) in itertools.pairwise(ranges))
    again = audio.length_buckets(lengths, 8, np.random.default_rng(2))
    assert not np.array_equal(buckets, again)  # a new order every epoch
    seen = np.concatenate([audio.length_buckets(lengths, 8, np.random.default_rng(e)).ravel() for e in range(30)])
    assert len(np.unique(seen)) == 103  # the 7 left out differ between epochs: the longest are read too


def test_length_bucket_order_gives_each_process_its_slice_of_whole_buckets():
    lengths = np.random.default_rng(0).integers(100, 10000, size=64)
    orders = [
        audio.length_bucket_order(lengths, 16, 4, min_length=0, seed=3, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert orders[0][1] == 64  # examples per epoch
    reads = [np.asarray(list(order[:40])) for order, _ in orders]
    for p, read in enumerate(reads):
        batches = read.reshape(5, 8)  # 8 rows per host per global batch; 4 global batches per epoch
        epoch = audio.LengthBucketOrder(lengths, 16, 4, 3, p, 2).epoch(0)
        np.testing.assert_array_equal(batches[:4], epoch[:, p * 8 : (p + 1) * 8])
    first_epoch = np.concatenate([r[:32] for r in reads])
    assert len(np.unique(first_epoch)) == 64  # every file once per epoch


def test_length_bucket_order_leaves_out_files_too_short_to_use():
    lengths = np.arange(1, 41) * 1000
    lengths[[3, 17]] = 0  # unreadable
    order, examples = audio.length_bucket_order(
        lengths, 8, 4, min_length=10_000, seed=0, process_index=0, process_count=1
    )
    read = np.asarray(list(order[:examples]))
    assert examples == 24 and (lengths[read] >= 10_000).all() and len(np.unique(read)) == 24  # 29 usable, 3 batches
