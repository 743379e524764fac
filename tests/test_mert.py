"""MERT: the CQT against nnAudio, the MFCC teacher against kaldi-native-fbank, the label alignment and the loss
against transcriptions of the reference, the in-batch noise mixture's properties, and the runlocal recipe sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sharded_runs import assert_sharded_matches_one_device

from jaxssl.config import ConfigError, load_config
from jaxssl.data import audio, mfcc_kmeans
from jaxssl.methods import mert as mert_method
from jaxssl.models import cqt, mert
from jaxssl.models import wav2vec2 as w2v


# --- the musical teacher ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'sample_rate,hop,fmin,bins,per_octave',
    [(24000, 320, 32.7, 336, 48), (24000, 320, 65.4, 72, 12), (16000, 160, 100.0, 30, 6)],
)
def test_cqt_matches_nnaudio(sample_rate, hop, fmin, bins, per_octave):
    """MERT's setting (model_cqt_pred: 336 bins from 32.7 Hz, 48 a octave, hop 320 at 24 kHz), runlocal's, and a
    16 kHz one, on noise and on a 440 Hz tone of a length that is not a multiple of the hop."""
    from nnAudio import features

    rng = np.random.default_rng(0)
    n = sample_rate // 2 - 7
    x = np.stack([rng.normal(size=n), np.sin(2 * np.pi * 440 * np.arange(n) / sample_rate)]).astype(np.float32)
    layer = features.cqt.CQT(
        sr=sample_rate, hop_length=hop, fmin=fmin, fmax=None, n_bins=bins, bins_per_octave=per_octave,
        filter_scale=1, norm=1, window='hann', center=True, pad_mode='constant', trainable=False,
        output_format='Magnitude', verbose=False,
    )  # fmt: skip
    want = layer(torch.from_numpy(x)).numpy().transpose(0, 2, 1)
    got = cqt.cqt_magnitude(
        jnp.asarray(x), sample_rate=sample_rate, hop=hop, fmin=fmin, n_bins=bins, bins_per_octave=per_octave
    )
    assert got.shape == want.shape == (2, n // hop + 1, bins)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
    if bins == 72:  # the tone peaks at the bin of A4: 440 = 65.4 x 2^(33 / 12)
        assert np.argmax(np.asarray(got)[1, 5:-5].mean(axis=0)) == 33


def test_cqt_refuses_bins_above_nyquist():
    with pytest.raises(ValueError, match='Nyquist'):
        cqt.cqt_kernels(8000, 32.7, 336, 48)  # the top bin is 4,127 Hz
    with pytest.raises(ConfigError, match=r'cqt\.bins'):
        load_config('configs/mert.py:runlocal', ['cqt.bins=96'])  # 8 octaves from 65.4 Hz pass 12 kHz


# --- the acoustic teacher --------------------------------------------------------------------------------------------
def test_mfcc_matches_kaldi_native_fbank():
    """torchaudio.compliance.kaldi.mfcc(use_energy=False), HuBERT's features, at MERT's 24 kHz."""
    import kaldi_native_fbank as knf

    waveform = audio.synthesize_word(3, np.random.default_rng(0), 24000)[:23000]
    opts = knf.MfccOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 24000
    opts.mel_opts.use_slaney_mel_scale = False  # Kaldi's HTK mel scale, unnormalised triangles (torchaudio's)
    opts.mel_opts.norm = ''
    opts.use_energy = False
    mfcc = knf.OnlineMfcc(opts)
    mfcc.accept_waveform(24000, waveform.tolist())
    mfcc.input_finished()
    want = np.stack([mfcc.get_frame(i) for i in range(mfcc.num_frames_ready)])
    got = mfcc_kmeans.kaldi_mfcc(waveform, 24000)
    assert got.shape == want.shape == (1 + (23000 - 600) // 240, 13)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
    assert mfcc_kmeans.hubert_mfcc(waveform, 24000).shape == (len(want), 39)


def test_deltas_known_answers():
    """compute_deltas (window 5) of a ramp: slope 1 inside; (1 + 2 x 2) / 10 at the first frame, where the edge
    repeats; and of a constant, 0."""
    ramp = np.arange(8.0)[:, None]
    got = mfcc_kmeans.deltas(ramp)[:, 0]
    np.testing.assert_allclose(got, [0.5, 0.8, 1, 1, 1, 1, 0.8, 0.5])
    np.testing.assert_allclose(mfcc_kmeans.deltas(np.ones((5, 3))), 0.0)


def reference_forward_targets(targets, feat_tsz, label_rate, sample_rate):
    """A transcription of MERTModel.forward_targets (one clip): features trimmed so that labels exist, then label
    index floor(t x feat2tar_ratio)."""
    ratio = label_rate * 320 / sample_rate
    targ_tsz = targets.size(1)
    if ratio * feat_tsz > targ_tsz:
        feat_tsz = int(targ_tsz / ratio)
    target_inds = torch.arange(feat_tsz).float() * ratio
    return targets[:, target_inds.long()]


@pytest.mark.parametrize('rate,samples', [(100, 24000), (100, 120000), (100, 72013), (75, 24000), (50, 16000)])
def test_label_frames_equal_forward_targets(rate, samples):
    frames = int(w2v.frame_counts(samples))
    length = int(rate * samples / 24000) if rate != 100 else 1 + (samples - 600) // 240  # MFCC: snipped edges
    labels = np.random.default_rng(0).integers(0, 50, size=(2, length))
    want = reference_forward_targets(torch.from_numpy(labels), frames, rate, 24000).numpy()
    got = mert_method.label_frames(labels, frames, rate, 24000)
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == -1).all()


def test_teacher_labels_follow_the_crop(tmp_path):
    """The batch transform labels each clip after wav2vec 2.0's crop: the labels of a cropped clip equal the
    nearest centroids of its own MFCCs, and a saved codebook loads in place of fitting."""
    config = load_config('configs/mert.py:runlocal', ['teacher.fit_clips=20', 'teacher.clusters=8'])
    method = mert_method.Method(config)
    assert method.centroids.shape == (8, 39)
    np.save(tmp_path / 'centroids.npy', method.centroids)
    saved = [f'teacher.centroids={tmp_path}/centroids.npy']
    loaded = mert_method.Method(load_config('configs/mert.py:runlocal', saved))
    np.testing.assert_array_equal(loaded.centroids, method.centroids)
    assert loaded.model.codebook_sizes == (12,)  # + fairseq's 4 special symbols
    rng = np.random.default_rng(0)
    source = audio.SyntheticWordsSource('train', 24000)
    waveform = np.zeros((4, 24000), np.float32)
    lengths = np.array([24000, 20000, 22000, 23000], np.int32)
    for i, n in enumerate(lengths):
        waveform[i, :n] = source[i]['audio'][:n]
    batch = mert_method.mfcc_labels(
        {'waveform': waveform, 'num_samples': lengths}, rng, groups=2, mask=config.mask,
        centroids=method.centroids, sample_rate=24000,
    )  # fmt: skip
    assert batch['num_samples'].tolist() == [20000, 20000, 22000, 22000]
    for i in range(4):
        n = batch['num_samples'][i]
        codes = mfcc_kmeans.nearest(mfcc_kmeans.hubert_mfcc(batch['waveform'][i, :n], 24000), method.centroids)
        want = mert_method.label_frames(codes[None], int(w2v.frame_counts(n)), 100, 24000)
        np.testing.assert_array_equal(batch['labels'][i, :, : want.shape[1]], want)
        assert (batch['labels'][i, :, want.shape[1] :] == -1).all()
    with pytest.raises(ConfigError, match=r'teacher\.centroids'):
        np.save(tmp_path / 'bad.npy', np.zeros((4, 13)))
        mert_method.Method(load_config('configs/mert.py:runlocal', [f'teacher.centroids={tmp_path}/bad.npy']))


# --- the in-batch noise mixture --------------------------------------------------------------------------------------
def mixture_config(**fields):
    config = load_config('configs/mert.py:runlocal').mixture
    config.update(fields)
    return config


def coded_batch(b, n, length):
    """Clips whose samples name themselves: 1000 (clip + 1) + sample, zero after `length`."""
    x = 1000.0 * (np.arange(b)[:, None] + 1) + np.arange(n)[None, :]
    x[:, length:] = 0
    return x.astype(np.float32), np.full(b, length, np.int32)


def test_mixture_adds_one_run_of_the_other_clips():
    """One segment per clip: what is added is one run of 200-300 consecutive samples of the pool (the other clips of
    the reference batch, end to end, within their valid length) at a place inside the clip."""
    b, n, length, groups = 8, 1200, 1000, 2
    x, lengths = coded_batch(b, n, length)
    config = mixture_config(prob=1.0, lengths=(200, 300), counts=(1, 1))
    for seed in range(3):
        mixed = mert_method.inbatch_noise(jnp.asarray(x), jnp.asarray(lengths), jax.random.key(seed), groups, config)
        mixed = np.asarray(mixed)
        for i in range(b):
            added = mixed[i] - x[i]
            run = np.flatnonzero(added)
            assert 200 <= len(run) <= 300 and (np.diff(run) == 1).all() and run[-1] < length
            clip, sample = np.divmod(added[run], 1000.0)
            clip = clip.astype(int) - 1
            assert (clip != i).all() and (clip // (b // groups) == i // (b // groups)).all()  # own batch, not itself
            others = [c for c in range(b) if c // (b // groups) == i // (b // groups) and c != i]
            pool_index = np.array([others.index(c) for c in clip]) * length + sample
            assert (np.diff(pool_index) == 1).all() and (sample < length).all()


def test_mixture_probability_counts_and_impossible_segments():
    b, n = 512, 400
    x, lengths = coded_batch(b, n, n)
    half = mixture_config(prob=0.5, lengths=(50, 100), counts=(1, 3))
    mixed = np.asarray(mert_method.inbatch_noise(jnp.asarray(x), jnp.asarray(lengths), jax.random.key(0), 8, half))
    changed = (mixed != x).any(axis=1)
    assert 0.42 < changed.mean() < 0.58
    added = (mixed != x).sum(axis=1)[changed]
    assert added.min() >= 50 and added.max() <= 300 and added.mean() > 110  # 1-3 segments, some overlapping
    for config in (mixture_config(prob=0.0), mixture_config(prob=1.0, lengths=(450, 500))):  # longer than the clips
        out = mert_method.inbatch_noise(jnp.asarray(x), jnp.asarray(lengths), jax.random.key(0), 8, config)
        np.testing.assert_array_equal(np.asarray(out), x)
    single = mert_method.inbatch_noise(jnp.asarray(x[:4]), jnp.asarray(lengths[:4]), jax.random.key(0), 4, half)
    np.testing.assert_array_equal(np.asarray(single), x[:4])  # a batch of one has no other clip


# --- the model and loss ----------------------------------------------------------------------------------------------
def reference_criterion(hidden, params, labels, mask, cqt_targets, features_pen, sizes, temp=0.1):
    """A transcription of MERTModel.forward from the encoder output (compute_pred / compute_nce with every class as
    a candidate and neg_is_pos, untie_final_proj chunks, model_cqt_pred) and fairseq's hubert criterion
    (loss_weights [10, 1]), one reference batch."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
    x = t(hidden)[torch.from_numpy(mask)]
    proj = x @ t(params['final_proj']['kernel']) + t(params['final_proj']['bias'])
    embs = t(params['label_embs']).split(list(sizes), 0)
    loss = 0.0
    for k, chunk in enumerate(proj.chunk(len(sizes), dim=-1)):
        target = torch.from_numpy(labels[:, k][mask]).long()
        pos = torch.index_select(embs[k], 0, target)
        negs = embs[k].unsqueeze(1).expand(-1, chunk.size(0), -1)
        neg_is_pos = (pos == negs).all(-1)
        targets = torch.cat([pos.unsqueeze(0), negs], dim=0)
        logits = torch.cosine_similarity(chunk, targets, dim=-1) / temp
        logits[1:][neg_is_pos] = float('-inf')
        logits = logits.transpose(0, 1)
        loss = loss + torch.nn.functional.cross_entropy(logits, logits.new_zeros(len(logits)).long(), reduction='sum')
    sample_size = int(mask.sum())
    pred = x @ t(params['cqt_proj']['kernel']) + t(params['cqt_proj']['bias'])
    cqt_mse = torch.nn.functional.mse_loss(pred, t(cqt_targets)[torch.from_numpy(mask)])
    loss = loss + 10 * features_pen * sample_size + 1 * cqt_mse * sample_size
    return float(loss / sample_size)


def test_loss_equals_reference_criterion():
    """Two codebooks of different sizes, the CQT head and the feature penalty, on one reference batch: the loss of
    the model's outputs equals the transcription's from the same encoder output and parameters."""
    sizes = (7, 5)
    model = mert.make_model('micro', codebook_sizes=sizes, cqt_bins=6, dropout=0.0, attention_dropout=0.0)
    rng = np.random.default_rng(0)
    waveform = jnp.asarray(rng.normal(size=(3, 4000)), jnp.float32)
    params = mert.init_params(model, jax.random.key(0), waveform)
    frames = int(w2v.frame_counts(4000))
    mask = rng.random((3, frames)) < 0.5
    lengths = jnp.full((3,), 4000)
    outputs = model.apply({'params': params}, waveform, lengths, jnp.asarray(mask))
    labels = np.stack([rng.integers(0, s, size=(3, frames)) for s in sizes], axis=1).astype(np.int32)
    targets = rng.random((3, frames, 6)).astype(np.float32)
    config = load_config('configs/mert.py:runlocal')
    labels_, mask_, targets_ = jnp.asarray(labels), jnp.asarray(mask), jnp.asarray(targets)
    loss, metrics = mert_method.mert_loss(outputs, labels_, mask_, targets_, 1, config)
    hidden, _, _ = model.apply(
        {'params': params}, waveform, lengths, jnp.asarray(mask), True,
        method=lambda module, *a: module.encoder.masked_context(*a),
    )  # fmt: skip
    features_pen = float(np.mean(outputs['features_pen']))  # equal lengths: the batch mean
    want = reference_criterion(np.asarray(hidden), params, labels, mask, targets, features_pen, sizes)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert set(metrics) >= {'accuracy_0', 'accuracy_1', 'prediction', 'cqt', 'features_pen', 'masked_fraction'}


def test_features_penalty_is_weighted_by_each_reference_batch_masked_frames():
    b, t = 4, 6
    outputs = {
        'logits': (jnp.zeros((b, t, 3)),),
        'features_pen': jnp.asarray([1.0, 2.0, 3.0, 4.0]),
    }
    mask = np.zeros((b, t), bool)
    mask[:2, :1] = True  # 2 masked frames in the first reference batch
    mask[2:, :3] = True  # 6 in the second
    config = load_config('configs/mert.py:runlocal')
    _, metrics = mert_method.mert_loss(outputs, jnp.zeros((b, 1, t), jnp.int32), jnp.asarray(mask), None, 2, config)
    np.testing.assert_allclose(float(metrics['features_pen']), 2 / 8 * 1.5 + 6 / 8 * 3.5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics['prediction']), np.log(3), rtol=1e-6)


def test_sizes_and_config_errors():
    assert mert_method.Method(load_config('configs/mert.py:runlocal')).model.final_dim == 16
    shapes = jax.eval_shape(
        lambda: mert.init_params(
            mert.make_model('95M', codebook_sizes=(1024,) * 8, cqt_bins=336), jax.random.key(0), jnp.zeros((1, 16000))
        )
    )
    encoder = sum(x.size for x in jax.tree.leaves(shapes['encoder']))
    assert 94.0e6 < encoder < 94.5e6  # HuBERT / MERT base: 94.4M without the pretraining heads
    assert shapes['final_proj']['kernel'].shape == (768, 512) and shapes['label_embs'].shape == (8192, 64)
    large = load_config('configs/mert.py:variant=330M')
    assert large.model.layerdrop == 0 and large.optim.clip_grad == 1.0 and large.mixture.lengths == (12000, 36000)
    with pytest.raises(ConfigError, match=r'input\.features'):
        load_config('configs/mert.py:runlocal', ['input.features=kaldi_fbank'])
    with pytest.raises(ConfigError, match=r'mixture\.lengths'):
        load_config('configs/mert.py:runlocal', ['mixture.lengths=(300, 200)'])
    with pytest.raises(ConfigError, match=r'teacher\.kind'):
        load_config('configs/mert.py:runlocal', ['teacher.kind=hubert'])
    with pytest.raises(ConfigError, match=r'loss\.reference_batches'):
        load_config('configs/mert.py:runlocal', ['loss.reference_batches=3'])


@pytest.mark.slow
def test_runlocal_sharded_matches_one_device_and_probes(tmp_path):
    summary, rows = assert_sharded_matches_one_device(
        'configs/mert.py:runlocal', tmp_path, 'loss.reference_batches=2', 'teacher.fit_clips=40',
        'input.global_batch=8', 'input.max_samples=12000',
    )  # fmt: skip
    assert 0.0 <= summary['final_eval/label/mean_pool/knn'] <= 1.0
    assert 0 < rows[0]['masked_fraction'] < 1 and rows[0]['cqt'] > 0 and np.isfinite(rows[0]['prediction'])
