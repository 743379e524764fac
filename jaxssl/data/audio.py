"""Audio input: four log-mel front ends and the raw waveform, audio sources, and Grain pipelines for pretraining and
evaluation.

Front ends (`input.features`), in numpy so that they run per example in the Grain pipeline:
  kaldi_fbank   Kaldi's `compute-fbank-feats` (torchaudio.compliance.kaldi.fbank, which SSAST and BEATs call):
                frames of 25 ms every 10 ms (edges snipped), DC offset removed, pre-emphasis 0.97, a window, a power
                spectrum padded to a power of two, triangular mel filters between 20 Hz and Nyquist on Kaldi's mel
                scale 1127 ln(1 + f / 700), the log floored at float32 epsilon; then SSAST's dataset normalisation
                (x - input.norm_mean) / (2 input.norm_std). Checked against kaldi-native-fbank.
  beats_fbank   BEATs's `preprocess`: Kaldi fbank (as kaldi_fbank, with the waveform scaled by 2^15 to 16-bit
                integer range, no mean removal, Kaldi's default 'povey' window), then (x - input.norm_mean) /
                (2 input.norm_std) on the clip's frames only: the padding frames stay zero, so they are told apart.
  log_mel_cmvn  s3prl's on-the-fly 'mel' features with log and CMVN (TERA's): the waveform scaled to -25 dB RMS,
                torch.stft (25 ms periodic Hann window, 10 ms hop, centred with reflect padding), power, torchaudio's
                HTK mel filters (0 Hz to Nyquist, unnormalised), log(x + 1e-10), then per-utterance mean / std
                normalisation over time. Checked against torch.stft and a torch transcription of torchaudio's filters.
  byola_log_mel BYOL-A's (and UNFUSED's) librosa log-mel: a crop of input.crop_seconds (random in training, the first
                samples in evaluation; shorter clips zero-padded symmetrically first), a 1024-point STFT with a
                periodic Hann window every 160 samples (centred, reflect padding), power, librosa's Slaney mel
                filters (area-normalised) from input.f_min to input.f_max, log(x + float32 epsilon); then the
                dataset normalisation (x - input.norm_mean) / input.norm_std, the converged form of the reference's
                RunningNorm. Checked against transformers.audio_utils (librosa's algorithm).
  waveform      the samples themselves (wav2vec 2.0's input), optionally standardised over the whole file
                (fairseq's `normalize`, for the large / XLSR models), then a random crop of input.max_samples
                (fairseq's crop_to_max_size; the first samples in evaluation) or zero padding up to it.

Sources return one record per index: 'name' (for messages), 'audio' (a path or a float waveform), 'kind' ('file' |
'array') and one int per name in `label_keys`:
  AudioFolderSource     <root>/<class>/<file>.wav, labels index the sorted class names;
  SyntheticWordsSource  'synthetic_words', the built-in set, generated on the fly (see its docstring).
Batches carry 'spectrogram' float32 (B, target_length, num_mel_bins), zero-padded or cut to target_length frames,
or for the waveform 'waveform' float32 (B, max_samples) and 'num_samples' int32 (B,), the samples before the padding.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from typing import Any

import grain
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice
from jaxssl.data import folders, images, pipeline
from jaxssl.data.decode import DecodeError

AUDIO_EXTENSIONS = ('.wav',)
FEATURES = ('kaldi_fbank', 'beats_fbank', 'log_mel_cmvn', 'byola_log_mel', 'waveform')
DATASETS = ('folder', 'synthetic_words')
WINDOWS = ('hanning', 'povey', 'hamming', 'rectangular')


# --- the Kaldi filterbank --------------------------------------------------------------------------------------------
def mel_scale(freq: np.ndarray | float) -> np.ndarray:
    """Kaldi's (HTK's) mel scale."""
    return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


@functools.lru_cache(maxsize=16)
def mel_filters(num_bins: int, fft_size: int, sample_rate: float, low_freq: float, high_freq: float) -> np.ndarray:
    """(fft_size // 2 + 1, num_bins) triangular filters, equally spaced on the mel scale between low_freq and
    high_freq (<= 0: that far below Nyquist), as Kaldi's MelBanks; the Nyquist bin gets no weight."""
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f'mel filters need 0 <= low_freq ({low_freq}) < high_freq ({high}) <= Nyquist ({nyquist})')
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + delta * np.arange(num_bins)
    center, right = left + delta, left + 2 * delta
    mel = mel_scale(sample_rate / fft_size * np.arange(fft_size // 2))[:, None]
    weights = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
    return np.concatenate([weights, np.zeros((1, num_bins))]).astype(np.float32)


def window(kind: str, size: int) -> np.ndarray:
    """Kaldi's analysis windows (symmetric: the denominator is size - 1)."""
    n = np.arange(size)
    if kind == 'rectangular':
        return np.ones(size)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1))
    if kind == 'hanning':
        return hann
    if kind == 'povey':
        return hann**0.85
    if kind == 'hamming':
        return 0.54 - 0.46 * np.cos(2 * np.pi * n / (size - 1))
    raise ValueError(f"unknown window '{kind}'; valid: {', '.join(WINDOWS)}")


def kaldi_fbank(
    waveform: np.ndarray,
    sample_rate: float = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    window_type: str = 'hanning',
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> np.ndarray:
    """Log mel filterbank energies (frames, num_mel_bins) float32 of a 1-D waveform, as Kaldi's compute-fbank-feats
    with dither 0, no energy, snip_edges and power-of-two FFTs (torchaudio.compliance.kaldi.fbank's defaults, with
    SSAST's window_type='hanning'). Fewer samples than one frame give 0 frames."""
    x = np.asarray(waveform, np.float64)
    if x.ndim != 1:
        raise ValueError(f'expected a 1-D waveform, got shape {x.shape}')
    size = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if len(x) < size:
        return np.zeros((0, num_mel_bins), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::shift]
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove_dc_offset
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)  # Kaldi repeats the first sample
    frames = (frames - preemphasis * previous) * window(window_type, size)
    fft_size = 1 << (size - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=fft_size)) ** 2
    energies = power @ mel_filters(num_mel_bins, fft_size, float(sample_rate), float(low_freq), float(high_freq))
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)


def triangles(freqs: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """(len(freqs), len(corners) - 2) unnormalised triangular filters in Hz: filter i rises from corners[i] to
    corners[i + 1] and falls to corners[i + 2] (torchaudio's and librosa's construction)."""
    width = np.diff(corners)
    slopes = corners[None, :] - freqs[:, None]
    down, up = -slopes[:, :-2] / width[:-1], slopes[:, 2:] / width[1:]
    return np.maximum(0.0, np.minimum(down, up))


def centred_power_spectrum(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    """(1 + len // hop, size // 2 + 1) |STFT|^2 with a periodic Hann window of `size` samples every `hop`, centred
    with reflect padding of size // 2 (torch.stft's and librosa.stft's defaults)."""
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(x, size // 2, mode='reflect'), size)[::hop]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / size)  # periodic, as torch.hann_window / scipy's 'hann'
    return np.abs(np.fft.rfft(frames * hann, n=size)) ** 2


@functools.lru_cache(maxsize=16)
def htk_mel_filters(num_bins: int, num_freqs: int, sample_rate: float, low_freq: float = 0.0) -> np.ndarray:
    """(num_freqs, num_bins) triangles over linspace(0, Nyquist, num_freqs), corners equally spaced on the HTK mel
    scale (`mel_scale`; torchaudio writes it 2595 log10(1 + f / 700)) from low_freq to Nyquist, unnormalised:
    torchaudio's melscale_fbanks(norm=None, mel_scale='htk'), which s3prl's MelScale uses. Unlike Kaldi's filters,
    the triangles are in Hz between corners placed in mel."""
    freqs = np.linspace(0, sample_rate / 2, num_freqs)
    corners = np.linspace(mel_scale(low_freq), mel_scale(sample_rate / 2), num_bins + 2)
    corners = 700.0 * (np.exp(corners / 1127.0) - 1.0)
    return triangles(freqs, corners)


def normalize_level(waveform: np.ndarray, target_level_db: float = -25.0) -> np.ndarray:
    """s3prl's bucket_dataset._normalize_wav_decibel: the waveform scaled to an RMS of target_level_db dB."""
    x = np.asarray(waveform, np.float64)
    return x * 10 ** (target_level_db / 20) / (np.sqrt(np.mean(x**2)) + 1e-10)


def log_mel_cmvn(
    waveform: np.ndarray,
    sample_rate: int = 16000,
    num_mel_bins: int = 80,
    window_ms: float = 25.0,
    hop_ms: float = 10.0,
    eps: float = 1e-10,
) -> np.ndarray:
    """TERA's input and target features (frames, num_mel_bins) float32, frames = 1 + len // hop: s3prl's
    OnlinePreprocessor 'mel' with log and cmvn (see the module docstring); the level normalisation comes first
    (`normalize_level`, applied by `spectrogram` before its crop). Needs at least one window of samples."""
    x = np.asarray(waveform, np.float64)
    size, hop = round(window_ms * sample_rate / 1000), round(hop_ms * sample_rate / 1000)
    if len(x) < size:
        raise ValueError(f'{len(x)} samples are fewer than one {size}-sample window')
    power = centred_power_spectrum(x, size, hop)
    mel = np.log(power @ htk_mel_filters(num_mel_bins, size // 2 + 1, sample_rate) + eps)
    return ((mel - mel.mean(axis=0)) / (mel.std(axis=0, ddof=1) + eps)).astype(np.float32)


def ssast_fbank(waveform: np.ndarray, input_config: Any) -> np.ndarray:
    """The reference dataloader's `_wav2fbank`: the waveform's mean removed, then Kaldi fbank (frames, bins)."""
    c = input_config
    x = np.asarray(waveform, np.float64) - np.mean(waveform)
    return kaldi_fbank(x, sample_rate=c.sample_rate, num_mel_bins=c.num_mel_bins, window_type=c.window)


def beats_fbank(waveform: np.ndarray, input_config: Any) -> np.ndarray:
    """BEATs's `preprocess` before its normalisation: Kaldi fbank (frames, bins) of the waveform times 2^15."""
    c = input_config
    x = np.asarray(waveform, np.float64) * 2.0**15
    return kaldi_fbank(x, sample_rate=c.sample_rate, num_mel_bins=c.num_mel_bins, window_type=c.window)


# --- BYOL-A's librosa log-mel ----------------------------------------------------------------------------------------
BYOLA_N_FFT = 1024  # samples: 64 ms at 16 kHz (the reference's MelSpectrogramLibrosa, fixed in samples)
BYOLA_HOP = 160  # samples: 10 ms at 16 kHz


def slaney_mel(freq: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz (3 mels per 200 Hz), logarithmic
    above (27 mels per factor of 6.4), the two pieces meeting at 1 kHz = 15 mels."""
    f = np.asarray(freq, np.float64)
    linear = f * 3.0 / 200.0
    log = 15.0 + np.log(np.maximum(f, 1000.0) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, log, linear)


def slaney_hz(mel: np.ndarray | float) -> np.ndarray:
    """The inverse of `slaney_mel`."""
    m = np.asarray(mel, np.float64)
    linear = m * 200.0 / 3.0
    log = 1000.0 * np.exp((np.maximum(m, 15.0) - 15.0) * np.log(6.4) / 27.0)
    return np.where(m >= 15.0, log, linear)


@functools.lru_cache(maxsize=16)
def slaney_mel_filters(
    num_bins: int, fft_size: int, sample_rate: float, low_freq: float, high_freq: float
) -> np.ndarray:
    """(fft_size // 2 + 1, num_bins) float32: librosa.filters.mel's defaults (htk=False, norm='slaney'), transposed
    for `power @ filters`. Triangles in Hz over the FFT bin frequencies, corners equally spaced on `slaney_mel`
    from low_freq to high_freq, each scaled by 2 / (its width in Hz) so that every filter has the same area (a
    constant-energy filterbank, unlike the unnormalised HTK / Kaldi triangles). float32 as librosa 0.8.1 stores it."""
    freqs = np.linspace(0, sample_rate / 2, fft_size // 2 + 1)
    corners = slaney_hz(np.linspace(slaney_mel(low_freq), slaney_mel(high_freq), num_bins + 2))
    weights = triangles(freqs, corners) * (2.0 / (corners[2:] - corners[:-2]))
    return weights.astype(np.float32)


def byola_power_mel(
    waveform: np.ndarray,
    sample_rate: float = 16000,
    num_mel_bins: int = 64,
    f_min: float = 60.0,
    f_max: float = 7800.0,
) -> np.ndarray:
    """(frames, num_mel_bins) float64 mel power, frames = 1 + len // BYOLA_HOP: the reference's
    MelSpectrogramLibrosa (librosa.stft's defaults: periodic Hann window, centred with reflect padding of n_fft // 2;
    then |X|^2 plus float64 epsilon, which keeps silent bins off zero, before the filters). In float64, where the
    reference's librosa runs in float32 for a float32 waveform."""
    x = np.asarray(waveform, np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f'expected a non-empty 1-D waveform, got shape {x.shape}')
    power = centred_power_spectrum(x, BYOLA_N_FFT, BYOLA_HOP) + np.finfo(np.float64).eps
    return power @ slaney_mel_filters(num_mel_bins, BYOLA_N_FFT, float(sample_rate), float(f_min), float(f_max))


def byola_log_mel(waveform: np.ndarray, input_config: Any) -> np.ndarray:
    """BYOL-A's log-mel (frames, num_mel_bins) float32 of an already cropped waveform: the reference's
    extract_log_mel_spectrogram, log(mel power + torch.finfo().eps), torch's default float32 epsilon."""
    c = input_config
    mel = byola_power_mel(waveform, c.sample_rate, c.num_mel_bins, c.f_min, c.f_max)
    return np.log(mel + np.finfo(np.float32).eps).astype(np.float32)


# --- SpeechT5's log-mel targets --------------------------------------------------------------------------------------
SPEECHT5_N_FFT = 1024  # samples: 64 ms at 16 kHz
SPEECHT5_HOP = 256  # samples: 16 ms, 62.5 frames a second


def speecht5_log_mel(waveform: np.ndarray, sample_rate: float = 16000) -> np.ndarray:
    """SpeechT5's speech-decoder targets (1 + len // 256, 80) float32: log10 of the librosa mel (Slaney scale and
    norm, 80 to 7,600 Hz) of the STFT MAGNITUDE (power 1; 1,024-sample periodic Hann window, centred, reflect
    padding), floored at 1e-10, with no normalisation (the reference's dataset; transformers'
    SpeechT5FeatureExtractor targets)."""
    x = np.asarray(waveform, np.float64)
    if x.ndim != 1 or len(x) <= SPEECHT5_N_FFT // 2:
        raise ValueError(f'expected a 1-D waveform of more than {SPEECHT5_N_FFT // 2} samples, got shape {x.shape}')
    magnitude = np.sqrt(centred_power_spectrum(x, SPEECHT5_N_FFT, SPEECHT5_HOP))
    mel = magnitude @ slaney_mel_filters(80, SPEECHT5_N_FFT, float(sample_rate), 80.0, 7600.0)
    return np.log10(np.maximum(mel, 1e-10)).astype(np.float32)


def crop_or_pad(waveform: np.ndarray, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Exactly `length` samples, as the reference's extract_window: a shorter clip zero-padded symmetrically
    ((length - n) // 2 on the left, the rest on the right), a longer one cut at a start drawn from `rng` (the first
    samples without one, for evaluation: the reference always crops at random)."""
    x = np.asarray(waveform)
    if len(x) < length:
        left = (length - len(x)) // 2
        return np.pad(x, (left, length - len(x) - left))
    start = int(rng.integers(0, len(x) - length + 1)) if rng is not None else 0
    return x[start : start + length]


def crop_samples(input_config: Any) -> int:
    """byola_log_mel's crop in samples: input.crop_seconds at input.sample_rate (0.95 s -> 15,200 at 16 kHz)."""
    return round(input_config.crop_seconds * input_config.sample_rate)


def spectrogram(waveform: np.ndarray, input_config: Any, rng: np.random.Generator | None = None) -> np.ndarray:
    """One example's model input (target_length, num_mel_bins) float32 by `input.features`, zero-padded or cut to
    target_length frames.

    kaldi_fbank (SSAST): `ssast_fbank`, the first target_length frames kept, and (x - norm_mean) / (2 norm_std)
    applied to the padded array (padding included), as the reference's dataloader.
    log_mel_cmvn (TERA): the level normalised over the whole waveform, then a crop of target_length x hop samples at a
    start drawn from `rng` (the first samples without one, for evaluation) before the features, as s3prl's
    `_sample`, so the CMVN statistics are the crop's; padding frames stay zero, which is how the reference tells them
    apart (`frame_lengths`).
    beats_fbank (BEATs): `beats_fbank`, normalised before the padding, so padding frames are zero (`frame_lengths`).
    byola_log_mel (BYOL-A, UNFUSED): `crop_or_pad` to crop_seconds (random start from `rng`, the first samples
    without one), `byola_log_mel`, then (x - norm_mean) / norm_std on the padded array as for kaldi_fbank (the crop
    fills target_length frames at the defaults, so there is no padding to normalise).
    """
    c = input_config
    if c.features == 'kaldi_fbank':
        spectrum = ssast_fbank(waveform, c)
    elif c.features == 'beats_fbank':
        spectrum = (beats_fbank(waveform, c) - np.float32(c.norm_mean)) / np.float32(2 * c.norm_std)
    elif c.features == 'byola_log_mel':
        spectrum = byola_log_mel(crop_or_pad(waveform, crop_samples(c), rng), c)
    else:
        x = normalize_level(waveform)
        crop = c.target_length * round(c.sample_rate / 100)  # 10 ms hops
        if len(x) > crop:
            start = int(rng.integers(0, len(x) - crop + 1)) if rng is not None else 0
            x = x[start : start + crop]
        spectrum = log_mel_cmvn(x, sample_rate=c.sample_rate, num_mel_bins=c.num_mel_bins)
    out = np.zeros((c.target_length, c.num_mel_bins), np.float32)
    frames = min(len(spectrum), c.target_length)
    out[:frames] = spectrum[:frames]
    if c.features == 'kaldi_fbank':
        out = (out - np.float32(c.norm_mean)) / np.float32(2 * c.norm_std)
    elif c.features == 'byola_log_mel':
        out = (out - np.float32(c.norm_mean)) / np.float32(c.norm_std)
    return out


def waveform_example(waveform: np.ndarray, input_config: Any, rng: np.random.Generator | None = None) -> dict:
    """One example of the raw samples: 'waveform' (max_samples,) float32 and 'num_samples' int32 (the samples before
    the zero padding). With `normalize_waveform` the whole file is standardised first (fairseq's
    F.layer_norm(wav, wav.shape), eps 1e-5); longer files are cut at a start drawn from `rng` (the first samples
    without one, for evaluation)."""
    c = input_config
    x = np.asarray(waveform, np.float32)
    if c.normalize_waveform:
        x = ((x - x.mean()) / np.sqrt(x.var() + 1e-5)).astype(np.float32)
    if len(x) > c.max_samples:
        start = int(rng.integers(0, len(x) - c.max_samples + 1)) if rng is not None else 0
        x = x[start : start + c.max_samples]
    out = np.zeros(c.max_samples, np.float32)
    out[: len(x)] = x
    return {'waveform': out, 'num_samples': np.int32(len(x))}


def example(waveform: np.ndarray, input_config: Any, rng: np.random.Generator | None = None) -> dict:
    """One example's model input by `input.features`: 'spectrogram', or 'waveform' and 'num_samples'."""
    if input_config.features == 'waveform':
        return waveform_example(waveform, input_config, rng)
    return {'spectrogram': spectrogram(waveform, input_config, rng)}


def frame_lengths(spectrogram: Any) -> Any:
    """Frames before the zero padding, (...,) from (..., T, F): s3prl's `(spec.sum(dim=-1) != 0).sum(dim=-1)`, for
    numpy or jax arrays."""
    return (spectrogram.sum(axis=-1) != 0).sum(axis=-1)


# --- sources ---------------------------------------------------------------------------------------------------------
class AudioFolderSource:
    """WAV files in class sub-folders of `root` (root/<class>/<file>.wav, nested folders allowed); labels index the
    sorted class names. Files are listed once, sorted, so the index is deterministic."""

    label_keys = ('label',)

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"audio folder '{root}' does not exist (input.data_root / input.split)")
        self.root = root
        self.classes, self.files = folders.class_folder_files(root, AUDIO_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no .wav files in class folders under '{root}'")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.files[index]
        return {'name': path, 'audio': path, 'kind': 'file', 'label': label}

    def __repr__(self) -> str:
        return f'AudioFolderSource({self.root!r}, {len(self)} files, {len(self.classes)} classes)'

    def lengths(self, sample_rate: int) -> np.ndarray:
        """Each file's length in samples at `sample_rate` (rounded up, as the resampler's output): from its WAV
        header with the samples mapped, not read (24-bit files, which scipy cannot map, are read); 0 for a file that
        cannot be opened (it is skipped when read)."""
        from scipy.io import wavfile

        out = np.zeros(len(self.files), np.int64)
        for i, (path, _) in enumerate(self.files):
            for mmap in (True, False):
                try:
                    rate, data = wavfile.read(path, mmap=mmap)
                    out[i] = -(-len(data) * sample_rate // rate) if rate > 0 else 0
                    break
                except ValueError:  # 'mmap=True not compatible with 3-byte container size': read it
                    continue
                except (OSError, EOFError, MemoryError, struct.error):
                    break
        return out


def _tone(f0: np.ndarray, formants: tuple[float, float], sample_rate: int) -> np.ndarray:
    """A voiced sound: harmonics of the pitch track f0 (Hz per sample) weighted by two formant resonances."""
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    out = np.zeros_like(f0)
    for k in range(1, int(0.45 * sample_rate / f0.max()) + 1):
        freq = k * f0.mean()
        gain = sum(w / (1 + ((freq - f) / 90.0) ** 2) for f, w in zip(formants, (1.0, 0.6), strict=True))
        out += gain * np.sin(k * phase) / math.sqrt(k)
    return out


def _hiss(length: int, band: tuple[float, float], rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """A fricative: white noise band-limited to `band` Hz."""
    spectrum = np.fft.rfft(rng.normal(size=length))
    freqs = np.fft.rfftfreq(length, 1 / sample_rate)
    return np.fft.irfft(spectrum * ((freqs >= band[0]) & (freqs <= band[1])), n=length)


# Vowels by their first two formants (Hz), fricatives by their noise band (Hz).
_VOWELS = {'a': (750, 1250), 'e': (480, 1900), 'i': (300, 2300), 'o': (500, 900), 'u': (330, 750)}
_FRICATIVES = {'s': (4000, 7500), 'sh': (2000, 4200), 'f': (900, 6000)}
# Ten words as syllables: a vowel with a pitch contour (-1 falling, 0 flat, +1 rising) or a fricative. Pairs of
# words differ only in their order (0 / 1, 2 / 3, 4 / 5) or their pitch contour (6 / 7), so an average over time of
# the spectrogram cannot tell them apart; 8 and 9 have three syllables.
SYNTHETIC_WORDS = (
    (('a', 0), ('i', 0)),
    (('i', 0), ('a', 0)),
    (('o', 1), ('s', None)),
    (('s', None), ('o', 1)),
    (('e', -1), ('u', 0)),
    (('u', 0), ('e', -1)),
    (('sh', None), ('a', 1)),
    (('sh', None), ('a', -1)),
    (('f', None), ('o', 0), ('i', 1)),
    (('e', 1), ('sh', None), ('u', -1)),
)


def synthesize_word(word: int, rng: np.random.Generator, sample_rate: int = 16000, seconds: float = 1.0) -> np.ndarray:
    """One utterance of SYNTHETIC_WORDS[word] by a random speaker (pitch 90-240 Hz, formants x 0.88-1.15), at a
    random speed (x 0.8-1.25), onset, loudness and background-noise level (SNR 5-25 dB): float32 in [-1, 1]."""
    f0 = rng.uniform(90, 240)
    tract, speed = rng.uniform(0.88, 1.15), rng.uniform(0.8, 1.25)
    pieces = []
    for sound, contour in SYNTHETIC_WORDS[word]:
        vowel = sound in _VOWELS
        length = int(sample_rate * (0.2 if vowel else 0.1) / speed * rng.uniform(0.85, 1.15))
        if vowel:
            track = f0 * (1 + 0.3 * contour * np.linspace(-0.5, 0.5, length))
            piece = _tone(track, tuple(f * tract for f in _VOWELS[sound]), sample_rate)
        else:
            piece = 0.5 * _hiss(length, _FRICATIVES[sound], rng, sample_rate)
        ramp = min(length // 2, int(0.015 * sample_rate))
        envelope = np.ones(length)
        envelope[:ramp] = envelope[-ramp:][::-1] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        pieces += [piece / (np.abs(piece).max() + 1e-9) * envelope, np.zeros(int(0.03 * sample_rate / speed))]
    speech = np.concatenate(pieces)
    total = int(sample_rate * seconds)
    speech = speech[:total]
    out = np.zeros(total)
    start = int(rng.integers(0, total - len(speech) + 1))
    out[start : start + len(speech)] = speech * rng.uniform(0.3, 0.9)
    noise = rng.normal(size=total)
    snr_db = rng.uniform(5, 25)
    noise *= np.sqrt(np.mean(speech**2) / np.mean(noise**2) / 10 ** (snr_db / 10)) * rng.uniform(0.3, 0.9)
    return np.clip(out + noise, -1, 1).astype(np.float32)


class SyntheticWordsSource:
    """The built-in audio set: 10 synthetic 'words' (SYNTHETIC_WORDS), 1 s at 16 kHz, `per_class` utterances each
    (train 200, val 50), generated from (split, index) on the fly, so nothing is stored or downloaded. The label is
    the word; the example's speaker, speed, onset and noise are drawn from its own seed."""

    label_keys = ('label',)

    def __init__(self, split: str, sample_rate: int = 16000):
        if split not in ('train', 'val'):
            raise ValueError(f"synthetic_words has splits 'train' and 'val', not '{split}'")
        self.split, self.sample_rate = split, sample_rate
        self.per_class = 200 if split == 'train' else 50
        self.classes = tuple(str(i) for i in range(len(SYNTHETIC_WORDS)))

    def __len__(self) -> int:
        return self.per_class * len(SYNTHETIC_WORDS)

    def __getitem__(self, index: int) -> dict[str, Any]:
        word = index % len(SYNTHETIC_WORDS)
        rng = np.random.default_rng([self.split == 'val', index])
        audio = synthesize_word(word, rng, self.sample_rate)
        return {'name': f'synthetic_words/{self.split}/{index}', 'audio': audio, 'kind': 'array', 'label': word}

    def __repr__(self) -> str:
        return f'SyntheticWordsSource({self.split!r}, {len(self)} utterances)'

    def lengths(self, sample_rate: int) -> np.ndarray:
        """Every utterance is 1 s."""
        return np.full(len(self), sample_rate, np.int64)


def make_audio_source(config: ml_collections.ConfigDict, split: str | None = None) -> Any:
    """The source `config.input` names, for `split` (default: input.split, the training split)."""
    c = config.input
    split = c.split if split is None else split
    if c.dataset == 'synthetic_words':
        return SyntheticWordsSource(split, c.sample_rate)
    if not c.data_root:
        raise ConfigError("'input.data_root' is empty: set it to <root> with <root>/<split>/<class>/<file>.wav")
    return AudioFolderSource(os.path.join(c.data_root, split))


MIN_SECONDS = 0.025  # one analysis window: shorter files give no frame (Kaldi) or no statistics (CMVN)


def decode_audio(record: dict[str, Any], sample_rate: int, min_samples: int = 0) -> np.ndarray:
    """A record's waveform, float (N,), at `sample_rate`: a WAV file's first channel (torchaudio's fbank reads
    channel 0), integer PCM scaled to [-1, 1), resampled if its rate differs. Raises DecodeError on files that
    cannot be used, including those shorter than MIN_SECONDS or `min_samples`."""
    if record['kind'] == 'array':
        return np.asarray(record['audio'], np.float32)
    from scipy import signal
    from scipy.io import wavfile

    try:
        rate, data = wavfile.read(record['audio'])
    except (OSError, ValueError, EOFError, MemoryError, struct.error) as e:
        raise DecodeError(f'cannot read {record["name"]}: {e}') from e
    data = data[:, 0] if data.ndim == 2 else data
    if data.size == 0:
        raise DecodeError(f'{record["name"]} has no samples')
    if data.dtype == np.uint8:
        data = (data.astype(np.float32) - 128) / 128
    elif np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    data = data.astype(np.float32)
    if rate <= 0:
        raise DecodeError(f'{record["name"]} declares a sample rate of {rate}')
    if rate != sample_rate:
        g = math.gcd(rate, sample_rate)
        data = signal.resample_poly(data, sample_rate // g, rate // g).astype(np.float32)
    if not np.all(np.isfinite(data)):
        raise DecodeError(f'{record["name"]} has non-finite samples')
    if len(data) < MIN_SECONDS * sample_rate:
        raise DecodeError(f'{record["name"]} is shorter than {MIN_SECONDS * 1000:g} ms ({len(data)} samples)')
    if len(data) < min_samples:
        raise DecodeError(f'{record["name"]} has {len(data)} samples, fewer than input.min_samples ({min_samples})')
    return data


# --- reading order ---------------------------------------------------------------------------------------------------
def length_buckets(lengths: np.ndarray, bucket_size: int, rng: np.random.Generator) -> np.ndarray:
    """(num_buckets, bucket_size) indices: fairseq's ordered_indices for a batch sampler (a random permutation
    sorted by length, ties in random order) cut into buckets of consecutive lengths, the buckets shuffled. The
    len % bucket_size left out are drawn at random each epoch (not always the longest)."""
    order = rng.permutation(len(lengths))[: len(lengths) - len(lengths) % bucket_size]
    order = order[np.argsort(lengths[order], kind='stable')]
    buckets = order.reshape(-1, bucket_size)
    return buckets[rng.permutation(len(buckets))]


class LengthBucketOrder(pipeline.EpochBatchOrder):
    """Grain map function: position in this process's stream -> source index, epoch after epoch. A global batch is
    `global_batch / bucket_size` consecutive buckets of `length_buckets(lengths, bucket_size, rng(seed, epoch))`
    (so each device's rows, a contiguous slice, hold utterances of similar length); process p reads its slice."""

    def __init__(
        self,
        lengths: np.ndarray,
        global_batch: int,
        bucket_size: int,
        seed: int,
        process_index: int,
        process_count: int,
    ):
        self.lengths, self.bucket_size, self.seed = lengths, bucket_size, seed
        super().__init__(global_batch, len(lengths) // global_batch, process_index, process_count)

    def batches(self, epoch: int) -> np.ndarray:
        buckets = length_buckets(self.lengths, self.bucket_size, np.random.default_rng([self.seed, epoch]))
        return buckets.reshape(-1)[: self.batches_per_epoch * self.global_batch].reshape(-1, self.global_batch)


def length_bucket_order(
    lengths: np.ndarray,
    global_batch: int,
    bucket_size: int,
    *,
    min_length: int,
    seed: int,
    process_index: int,
    process_count: int,
) -> tuple[grain.MapDataset, int]:
    """(a MapDataset of source indices in reading order for this process (forever), examples per epoch over all
    processes): LengthBucketOrder over the files of at least `min_length` samples only (shorter ones, and unreadable
    ones with length 0, would be replaced at random when read and break their bucket)."""
    usable = np.flatnonzero(lengths >= max(min_length, 1))
    if global_batch % process_count or global_batch % bucket_size or len(usable) < global_batch:
        raise ValueError(
            f'{len(usable)} usable files (of {len(lengths)}), global batch {global_batch}, buckets of {bucket_size} '
            f'and {process_count} processes do not make a whole batch'
        )
    order = LengthBucketOrder(lengths[usable], global_batch, bucket_size, seed, process_index, process_count)
    examples = order.batches_per_epoch * global_batch
    return grain.MapDataset.range(2**62).map(order).map(lambda i: int(usable[i])), examples


# --- datasets --------------------------------------------------------------------------------------------------------
def make_pretrain_dataset(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    sample_transform: images.SampleTransform | None = None,
    source: Any = None,
    batch_transform: pipeline.BatchTransform | None = None,
    order: grain.MapDataset | None = None,
) -> grain.IterDataset:
    """Host-local pretraining batches: 'spectrogram' float32 (B_local, target_length, num_mel_bins) (or 'waveform'
    and 'num_samples', see `example`), 'label', and whatever `sample_transform(sample, rng)` (e.g. masks) and
    `batch_transform(batch, rng)` add. The image pipeline's sharding, shuffling (or `order`, e.g.
    `length_bucket_order`), resume and skip-and-count policy for unreadable files (and files shorter than
    `input.min_samples`), with the audio decoder and front end in place of the image's."""
    c = config.input
    return images.make_image_pretrain_dataset(
        config,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        view=lambda waveform, rng: example(waveform, c, rng),
        sample_transform=sample_transform,
        source=make_audio_source(config) if source is None else source,
        decode=functools.partial(decode_audio, sample_rate=c.sample_rate, min_samples=c.get('min_samples', 0)),
        batch_transform=batch_transform,
        order=order,
    )


class EvalAudioLoader:
    """Grain map function: source index -> one example's model input (`example`, no random crop) as a 1-view stack.
    An unreadable file is not replaced (evaluation must see every example): it yields `valid` 0 and zeros, and is
    counted."""

    def __init__(self, source: Any, config: ml_collections.ConfigDict, num_clips: int = 1, num_crops: int = 1):
        del num_clips, num_crops  # pipeline.make_eval_dataset's loader signature
        self.source, self.input = source, config.input

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        record = self.source[int(index)]
        labels = {k: np.int32(record[k]) for k in self.source.label_keys}
        try:
            inputs, valid = example(decode_audio(record, self.input.sample_rate), self.input), 1
        except DecodeError as e:
            pipeline._log_failure(record['name'], e)
            pipeline._add_skipped(1)
            inputs, valid = zero_example(self.input), 0
        views = {k: np.asarray(v)[None] for k, v in inputs.items()}
        return {**views, 'index': np.int32(index), 'valid': np.int32(valid), **labels}


def zero_example(input_config: Any) -> dict[str, np.ndarray]:
    """The all-zero example that stands in for an unreadable evaluation file: zero samples, or an all-zero
    spectrogram for the log-mel front ends."""
    c = input_config
    if c.features == 'waveform':
        return {'waveform': np.zeros(c.max_samples, np.float32), 'num_samples': np.int32(0)}
    return {'spectrogram': np.zeros((c.target_length, c.num_mel_bins), np.float32)}


def make_eval_dataset(
    config: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int = 0,
    source: Any = None,
) -> tuple[grain.IterDataset, int]:
    """One deterministic pass over a split: 'spectrogram' (B, 1, target_length, num_mel_bins) (or 'waveform' (B, 1,
    max_samples) and 'num_samples' (B, 1)), 'index', 'valid' and the labels; `max_examples` > 0 takes an evenly
    spaced subset. `source` overrides the one `config.input` names for the split."""
    return pipeline.make_eval_dataset(
        config,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        max_clips=max_examples,
        source=make_audio_source(config, split) if source is None else source,
        loader_cls=EvalAudioLoader,
    )


# --- config ----------------------------------------------------------------------------------------------------------
def add_audio_input_config(
    config: ml_collections.ConfigDict, *, runlocal: bool = False, features: str = 'kaldi_fbank'
) -> None:
    """The `input` section of an audio method's config (the built-in synthetic words with `runlocal`). The defaults
    are SSAST's; TERA's config sets its own front end and lengths; `features='byola_log_mel'` sets BYOL-A's 64 mel
    bins and 96 frames (its 0.95 s crop) and the matching normalisation statistics; `features='beats_fbank'` BEATs's
    window, constants and 992 frames (the 62 time patches of a 10 s clip)."""
    c = config.input = ml_collections.ConfigDict()
    c.dataset = 'synthetic_words' if runlocal else 'folder'  # 'folder' or 'synthetic_words'
    c.data_root = ''  # 'folder': <data_root>/<split>/<class>/<file>.wav
    c.split = 'train'
    c.sample_rate = 16000
    # 'kaldi_fbank' (SSAST), 'beats_fbank' (BEATs), 'log_mel_cmvn' (TERA), 'byola_log_mel' (BYOL-A, UNFUSED) or
    # 'waveform' (wav2vec 2.0); see the module docstring.
    c.features = features
    byola, beats = features == 'byola_log_mel', features == 'beats_fbank'
    c.num_mel_bins = 64 if runlocal or byola else 128
    c.window = 'povey' if beats else 'hanning'  # the Kaldi front ends': SSAST's; BEATs keeps Kaldi's default 'povey'
    # frames of 10 ms; shorter clips are zero-padded, longer ones cut (byola_log_mel: 96 = its 0.95 s crop)
    c.target_length = 96 if runlocal or byola else 992 if beats else 1024
    # The dataset's statistics of the log-mel values, measured with jaxssl.data.audio.fbank_stats. kaldi_fbank: the
    # reference's AudioSet + LibriSpeech ones. beats_fbank: the constants BEATs uses on every dataset.
    # byola_log_mel: the reference measures them on its training data (RunningNorm); the default is the built-in
    # words', so measure your own. The built-in words' are set by `runlocal`.
    c.norm_mean = -4.2677393
    c.norm_std = 4.5689974
    if byola:
        c.norm_mean, c.norm_std = SYNTHETIC_WORDS_BYOLA_STATS
    elif beats:
        c.norm_mean, c.norm_std = SYNTHETIC_WORDS_BEATS_STATS if runlocal else BEATS_STATS
    elif runlocal:
        c.norm_mean, c.norm_std = SYNTHETIC_WORDS_STATS
    # 'byola_log_mel' only: the crop (the reference's 0.95 s; shorter clips are zero-padded) and the mel filters' range.
    c.crop_seconds = 0.95
    c.f_min = 60.0
    c.f_max = 7800.0
    c.global_batch = 64 if runlocal else 24
    c.num_sample = 1  # views per example (the image pipeline's field; SSAST uses one)
    # 'waveform' only: samples per example (fairseq's max_sample_size: longer files are randomly cropped, shorter
    # ones zero-padded and their padding masked) and the per-file standardisation of the large / XLSR models.
    c.max_samples = 16000 if runlocal else 250000
    c.normalize_waveform = False
    c.min_samples = 0  # pretraining skips (and counts) shorter files: fairseq's min_sample_size
    c.num_workers = 0 if runlocal else 8
    c.read_threads = 2 if runlocal else 1


# fbank_stats of the built-in words' train split at 64 mel bins (2,000 utterances).
SYNTHETIC_WORDS_STATS = (-1.4518584, 3.3575149)
# The same for byola_log_mel: 64 mel bins, the first 0.95 s of each utterance (2,000 utterances).
SYNTHETIC_WORDS_BYOLA_STATS = (-3.025198, 2.112462)
# beats_fbank's: BEATs's `preprocess` defaults (fbank_mean, fbank_std), and the built-in words' at 64 mel bins.
BEATS_STATS = (15.41663, 6.55582)
SYNTHETIC_WORDS_BEATS_STATS = (19.418411, 3.3530111)


def unnormalized_log_mel(waveform: np.ndarray, input_config: Any) -> np.ndarray:
    """The log-mel frames that `spectrogram` normalises, before the padding, in evaluation (no rng): kaldi_fbank's
    `ssast_fbank` of the whole clip, or byola_log_mel's of its first crop_seconds."""
    c = input_config
    if c.features == 'byola_log_mel':
        return byola_log_mel(crop_or_pad(waveform, crop_samples(c)), c)
    if c.features == 'beats_fbank':
        return beats_fbank(waveform, c)
    return ssast_fbank(waveform, c)


def fbank_stats(config: ml_collections.ConfigDict, max_examples: int = 2000) -> tuple[float, float]:
    """(mean, std) of the log-mel values (`unnormalized_log_mel`, by input.features: kaldi_fbank's, or
    byola_log_mel's) of up to `max_examples` evenly spaced training examples, before padding: the reference's
    per-dataset normalisation constants (for byola_log_mel, what the reference's RunningNorm converges to)."""
    c = config.input
    source = make_audio_source(config)
    picks = np.linspace(0, len(source) - 1, min(max_examples, len(source))).astype(int)
    waveforms = (decode_audio(source[int(i)], c.sample_rate) for i in picks)
    values = np.concatenate([unnormalized_log_mel(x, c).ravel() for x in waveforms])
    return float(values.mean()), float(values.std())


def check_audio_input_config(config: ml_collections.ConfigDict, datasets: tuple[str, ...] = DATASETS) -> None:
    """Raises ConfigError naming the key for an input section that cannot produce data (paths are checked when the
    run starts). A method with sources of its own passes its `datasets`."""
    c = config.input
    check_choice(config, 'input.dataset', datasets)
    check_choice(config, 'input.features', FEATURES)
    check_choice(config, 'input.window', WINDOWS)
    for key in ('sample_rate', 'num_mel_bins', 'target_length', 'global_batch', 'num_sample', 'max_samples'):
        if c.get(key, 1) < 1:  # max_samples: absent from configs saved before the waveform input
            raise ConfigError(f"bad value {c[key]} for 'input.{key}': must be >= 1")
    if c.get('min_samples', 0) < 0:
        raise ConfigError(f"bad value {c.min_samples} for 'input.min_samples': must be >= 0")
    if c.norm_std <= 0:
        raise ConfigError(f"bad value {c.norm_std} for 'input.norm_std': must be > 0")
    if c.features == 'byola_log_mel':
        check_byola_config(c)


def check_byola_config(c: Any) -> None:
    """byola_log_mel's keys: a positive crop and 0 <= f_min < f_max <= Nyquist (librosa warns of empty filters
    beyond it)."""
    for key in ('crop_seconds', 'f_min', 'f_max'):
        if c.get(key) is None:
            raise ConfigError(f"'input.{key}' is missing: byola_log_mel needs it (see add_audio_input_config)")
    if not c.crop_seconds * c.sample_rate >= 1:
        raise ConfigError(f"bad value {c.crop_seconds} for 'input.crop_seconds': must be > 0 (at least one sample)")
    if not c.f_min >= 0:
        raise ConfigError(f"bad value {c.f_min} for 'input.f_min': must be >= 0")
    if not c.f_min < c.f_max <= c.sample_rate / 2:
        raise ConfigError(
            f"bad value {c.f_max} for 'input.f_max': must be above input.f_min ({c.f_min}) and at most Nyquist "
            f'(input.sample_rate / 2 = {c.sample_rate / 2:g})'
        )
    frames = 1 + crop_samples(c) // BYOLA_HOP  # the reference's clip length: no padding, no cut
    if c.target_length != frames:
        raise ConfigError(
            f"'input.target_length' ({c.target_length}) must be the {frames} frames that 'input.crop_seconds' "
            f'({c.crop_seconds} s) gives'
        )


def check_byola_statistics(config: ml_collections.ConfigDict) -> None:
    """Refuses the built-in words' byola_log_mel statistics on another dataset, at run start: the reference
    normalises by its own training data's (RunningNorm), and the wrong ones shift every input."""
    c = config.input
    if c.dataset != 'synthetic_words' and (c.norm_mean, c.norm_std) == SYNTHETIC_WORDS_BYOLA_STATS:
        raise ConfigError(
            "'input.norm_mean' and 'input.norm_std' are the built-in words' statistics: set them to your training "
            "data's log-mel mean and std (jaxssl.data.audio.fbank_stats(config) measures them)"
        )
