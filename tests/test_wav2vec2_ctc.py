"""wav2vec 2.0 CTC fine-tuning: the CTC loss against torch's, greedy decoding and error rates by hand, fairseq's
tri-stage schedule and frozen encoder, the fine-tuning masks, manifests and spellings, the model with a letter head
against transformers' Wav2Vec2ForCTC, starting from a pretraining run, and a 2-step runlocal run on 1 and 8 devices."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from sharded_runs import run

from jaxssl import optim, params_io, rules, train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import transcripts
from jaxssl.methods import wav2vec2, wav2vec2_ctc
from jaxssl.models import wav2vec2 as w2v
from jaxssl.models import wav2vec2_weights

CONFIG = 'configs/wav2vec2_ctc.py:runlocal'


def test_ctc_loss_equals_torch_and_flags_impossible_alignments():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 12, 6)).astype(np.float32)
    frames = np.array([12, 9, 3])
    targets = np.array([[2, 3, 3, 5], [4, 1, 2, 0], [2, 2, 0, 0]])  # row 2: 2 letters + 1 repeat need 3 frames
    lengths = np.array([4, 3, 2])
    got, possible = wav2vec2_ctc.ctc_loss(jnp.asarray(logits), jnp.asarray(frames), jnp.asarray(targets),
                                          jnp.asarray(lengths))  # fmt: skip
    log_probs = torch.log_softmax(torch.from_numpy(logits), -1).transpose(0, 1)
    want = torch.nn.functional.ctc_loss(
        log_probs, torch.from_numpy(targets), torch.from_numpy(frames), torch.from_numpy(lengths), blank=0,
        reduction='none', zero_infinity=False,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4)
    assert possible.tolist() == [True, True, True]
    _, possible = wav2vec2_ctc.ctc_loss(jnp.asarray(logits), jnp.asarray([12, 9, 2]), jnp.asarray(targets),
                                        jnp.asarray(lengths))  # fmt: skip
    assert possible.tolist() == [True, True, False]  # torch's loss is inf there: zero_infinity zeroes it


def test_greedy_decoding_and_error_rates_known_answers():
    blank = transcripts.BLANK
    assert transcripts.greedy_decode(np.array([blank, 5, 5, blank, 5, 6, 6, 7, 0, 0]), 8) == [5, 5, 6, 7]
    assert transcripts.edit_distance('kitten', 'sitting') == 3 and transcripts.edit_distance([], [1, 2]) == 2
    assert transcripts.words('H I | T H E R E |'.split()) == ['HI', 'THERE']
    dictionary = transcripts.LetterDictionary(['|', 'A', 'B'])  # ids 4, 5, 6
    assert dictionary.encode('A B | C').tolist() == [5, 6, 4, transcripts.UNK]
    tokens = np.array([[5, 0, 6, 4, 0], [5, 5, 4, 6, 4]])  # 'A B |' and 'A | B |'
    references = ['A B |', 'A B |']
    rates = wav2vec2_ctc.error_rates(tokens, np.array([1, 1]), np.array([0, 1]), references, dictionary)
    assert rates['uer'] == pytest.approx(100 * 1 / 6)  # one inserted word end in 6 reference letters
    assert rates['wer'] == pytest.approx(100 * 2 / 2)  # 'A B' against 'AB': a substitution and an insertion
    rates = wav2vec2_ctc.error_rates(tokens, np.array([1, 0]), np.array([0, 1]), references, dictionary)
    assert rates == {'uer': 0.0, 'wer': 0.0}  # the invalid row does not count
    # </s> and <pad> leave the hypothesis; a letter outside the dictionary is <unk> in the reference, as fairseq's.
    tokens = np.array([[5, 2, 3, 1, 4, 0]])
    rates = wav2vec2_ctc.error_rates(tokens, np.array([1]), np.array([0]), ['A C |'], dictionary)
    assert rates == {'uer': 0.0, 'wer': 0.0}


def fairseq_tri_stage(update, peak, max_update, ratios=(0.1, 0.4, 0.5), init_scale=0.01, final_scale=0.05):
    """fairseq's TriStageLRSchedule.step_update, transcribed."""
    warmup, hold, decay = (int(max_update * r) for r in ratios)
    if update < warmup:
        return init_scale * peak + (peak - init_scale * peak) / warmup * update
    if update < warmup + hold:
        return peak
    if update <= warmup + hold + decay:
        return peak * math.exp(math.log(final_scale) / decay * (update - warmup - hold))
    return final_scale * peak


def test_tri_stage_schedule_and_frozen_encoder():
    config = load_config('configs/wav2vec2_ctc.py:hours=10')
    total = config.train.steps
    schedule = optim.learning_rate_schedule(config, total, 1)
    peak = optim.peak_learning_rate(config)
    assert peak == pytest.approx(5e-5)  # the yaml's lr at the reference batch
    for step in (0, 1, 1999, 2000, 9999, 10000, 15000, 20000, 20001):
        assert float(schedule(step)) == pytest.approx(fairseq_tri_stage(step, peak, total), rel=1e-5)
    with pytest.raises(ConfigError, match=r'optim\.phase_ratio'):
        load_config('configs/wav2vec2_ctc.py', ['optim.phase_ratio=(0.5, 0.4, 0.5)'])


def test_encoder_gets_no_gradient_before_freeze_finetune_updates():
    method = wav2vec2_ctc.Method(load_config(CONFIG, ['model.freeze_finetune_updates=5']))
    batch = method.example_batch(2)
    batch['targets'][:, :3] = [5, 6, 7]
    batch['target_length'][:] = 3
    params, _ = method.init(jax.random.key(0), batch)
    grad = jax.jit(lambda step: jax.grad(lambda p: method.loss(p, {}, batch, jax.random.key(1), step)[0])(params))
    for step, encoder_moves in ((0, False), (4, False), (5, True)):
        grads = grad(jnp.asarray(step))
        assert float(jnp.abs(grads['lm_head']['kernel']).max()) > 0
        moved = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads['layers_0']))
        assert (moved > 0) == encoder_moves, step
        assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads['feature_extractor'])) == 0.0  # never
    assert load_config('configs/wav2vec2_ctc.py:hours=10').model.freeze_finetune_updates == 10_000
    assert load_config('configs/wav2vec2_ctc.py').model.freeze_finetune_updates == 0  # 100 h trains it all


def test_masks_stay_inside_each_utterance_with_equal_counts():
    config = load_config(CONFIG, ['mask.length=4', 'mask.min_spans=1', 'channel_mask.length=3'])
    lengths = np.array([16000, 9000, 16000, 6400])
    batch = {'waveform': np.zeros((4, 16000), np.float32), 'num_samples': lengths}
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = wav2vec2_ctc.ctc_masks(batch, rng, groups=2, time=config.mask, channel=config.channel_mask, width=64)
        time_mask, channel_mask = out['time_mask'], out['channel_mask']
        frames = w2v.frame_counts(lengths)
        assert not any(time_mask[i, frames[i] :].any() for i in range(4))  # never on padding frames
        for rows in ((0, 1), (2, 3)):  # require_same_masks per reference batch
            assert len({int(time_mask[i].sum()) for i in rows}) == 1
            assert len({int(channel_mask[i].sum()) for i in rows}) == 1
        assert time_mask[:2].sum(axis=1).min() >= 1
    off = ml_collections.ConfigDict({'prob': 0.0, 'length': 3})
    out = wav2vec2_ctc.ctc_masks(batch, rng, groups=1, time=config.mask, channel=off, width=64)
    assert not out['channel_mask'].any()


def test_manifest_dictionary_and_spellings(tmp_path):
    (tmp_path / 'dict.ltr.txt').write_text('| 120\nE 80\nH 10\nL 9\nO 8\n')
    (tmp_path / 'train.tsv').write_text('/audio\na.wav\t16000\nlong.wav\t900000\nb.wav\t32000\n')
    (tmp_path / 'train.ltr').write_text('H E L L O |\nL O N G |\nO H |\n')
    source = transcripts.ManifestSource(str(tmp_path), 'train', max_samples=560_000)
    assert len(source) == 2 and source.skipped == 1  # the utterance over max_samples is left out and counted
    assert source[1] == {'name': '/audio/b.wav', 'audio': '/audio/b.wav', 'kind': 'file', 'transcript': 1}
    assert source.transcripts == ['H E L L O |', 'O H |']
    dictionary = transcripts.LetterDictionary.from_file(str(tmp_path / 'dict.ltr.txt'))
    assert dictionary.symbols[:5] == ['<s>', '<pad>', '</s>', '<unk>', '|']  # fairseq's Dictionary order
    assert dictionary.encode('H E L L O |').tolist() == [6, 5, 7, 7, 8, 4]
    (tmp_path / 'bad.tsv').write_text('/audio\na.wav\t16000\n')
    (tmp_path / 'bad.ltr').write_text('A |\nB |\n')
    with pytest.raises(ValueError, match='2 transcripts for the 1 utterances'):
        transcripts.ManifestSource(str(tmp_path), 'bad', max_samples=560_000)
    # Bucketed reading order from the manifest's sample counts: each reference batch holds neighbouring lengths.
    (tmp_path / 'many.tsv').write_text(
        '/audio\n' + ''.join(f'u{i}.wav\t{16000 + 997 * ((7 * i) % 16)}\n' for i in range(16))
    )
    (tmp_path / 'many.ltr').write_text('A |\n' * 16)
    config = load_config('configs/wav2vec2_ctc.py', [f'input.manifest_dir={tmp_path}', 'input.split=many',
                                                    'input.global_batch=8', 'loss.reference_batches=2'])  # fmt: skip
    method = wav2vec2_ctc.Method(config)
    lengths = method.train_source().lengths(16000)
    order, per_epoch = method.reading_order(method.train_source(), 0, 0, 1)
    with pytest.raises(ConfigError, match=r'loss\.max_target_length'):  # before any step, not in a worker
        wav2vec2_ctc.Method(load_config('configs/wav2vec2_ctc.py', [f'input.manifest_dir={tmp_path}',
                                        'input.split=train', 'loss.max_target_length=4'])).train_source()  # fmt: skip
    assert per_epoch == 16
    first = [int(order[i]) for i in range(8)]
    ranks = np.argsort(np.argsort(lengths))
    for group in (first[:4], first[4:]):
        assert sorted(ranks[group]) == list(range(min(ranks[group]), min(ranks[group]) + 4))
    assert transcripts.SYNTHETIC_SPELLINGS[2] == 'o + s |' and transcripts.SYNTHETIC_SPELLINGS[9] == 'e + s h u - |'
    assert len(set(transcripts.SYNTHETIC_SPELLINGS)) == 10  # every word spelled apart


def test_letter_head_matches_transformers_ctc(tmp_path):
    from test_wav2vec2 import LAYOUTS, TINY
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(0)
    reference = Wav2Vec2ForCTC(Wav2Vec2Config(**TINY, **LAYOUTS['base'], vocab_size=9)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(str(tmp_path))
    with pytest.raises(KeyError, match='quantizer'):  # continued pretraining refuses a CTC checkpoint
        wav2vec2_weights.load(str(tmp_path))
    fields, params = wav2vec2_weights.load(str(tmp_path), quantizer=False)
    model = w2v.Wav2Vec2(**fields, dropout=0.0, attention_dropout=0.0, pretraining=False, vocab_size=9)
    waveform = np.random.default_rng(0).normal(size=(2, 4000)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(waveform)).logits.numpy()
    got = model.apply({'params': params}, jnp.asarray(waveform), jnp.asarray([4000, 4000]), method=model.ctc_logits)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)
    time_mask = np.zeros((2, int(w2v.frame_counts(4000))), bool)
    time_mask[0, 2:5], time_mask[1, 7:9] = True, True  # masked frames take the mask embedding, as transformers'
    with torch.no_grad():
        want = reference(torch.from_numpy(waveform), mask_time_indices=torch.from_numpy(time_mask)).logits.numpy()
    got = model.apply({'params': params}, jnp.asarray(waveform), jnp.asarray([4000, 4000]), jnp.asarray(time_mask),
                      method=model.ctc_logits)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)
    shapes = jax.eval_shape(lambda: w2v.init_params(model, jax.random.key(0), jnp.zeros((1, 4000))))
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, params)  # no quantizer, a head
    # As the start of a fine-tuning: the encoder as released, a new head for the built-in words' 11 + 4 symbols.
    with pytest.raises(ConfigError, match=r'input\.normalize_waveform'):
        wav2vec2_ctc.Method(load_config(CONFIG, [f'model.pretrained={tmp_path}', 'input.normalize_waveform=true']))
    method = wav2vec2_ctc.Method(load_config(CONFIG, [f'model.pretrained={tmp_path}']))
    start, _ = method.init(jax.random.key(0), method.example_batch(2))
    assert start['lm_head']['kernel'].shape == (TINY['hidden_size'], 15)
    jax.tree.map(np.testing.assert_array_equal, start['layers_1'], params['layers_1'])


def test_runlocal_sharded_matches_one_device_and_decodes(tmp_path):
    """(sharded_runs' helper adds probe keys this method has not: its two runs by hand.)"""
    _, want_state, want_rows = run(CONFIG, tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false',
                                   'loss.reference_batches=1')  # fmt: skip
    summary, state, rows = run(CONFIG, tmp_path / 'sharded', 'mesh.data=8', 'loss.reference_batches=1',
                               'eval.max_test_clips=32')  # fmt: skip
    assert jax.device_count() == 8 and summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in want_rows], rtol=1e-5)
    # The attention key biases are left out: their gradient is zero in exact arithmetic (a per-query constant under
    # the softmax), and Adam with eps 1e-8 turns the rounding noise, which differs with the sharding, into full steps.
    for name, (a, b) in _flat_pairs(state['params'], want_state['params']).items():
        if not name.endswith('key/bias'):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    assert summary['final_eval/uer'] >= 0.0 and summary['final_eval/wer'] >= 0.0  # insertions can pass 100
    assert rows[0]['loss'] > 0 and rows[0]['impossible'] == 0.0


def _flat_pairs(a, b):
    flat = lambda tree: {rules.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    other = flat(b)
    return {name: (value, other[name]) for name, value in flat(a).items()}


def test_starts_from_pretrained_params_without_their_quantizer(tmp_path):
    """The pretraining method's params, written as a params directory: what a workdir's checkpoint holds, without
    compiling a pretraining step to make one (loading from a workdir is tests/test_finetune_init.py's)."""
    pretrain = wav2vec2.Method(load_config('configs/wav2vec2.py:runlocal'))
    start, _ = pretrain.init(jax.random.key(7), jax.tree.map(jnp.asarray, pretrain.example_batch(2)))
    start = jax.device_get(start)
    assert 'quantizer_codevectors' in start
    params_io.save_params(tmp_path / 'pretrain', start, {'kind': 'pretrain', 'source': 'wav2vec2 runlocal init'})
    config = load_config(CONFIG, [f'init_from={tmp_path / "pretrain"}', 'train.steps=1', 'train.tensorboard=false',
                                  'eval.at_end=false', 'model.freeze_finetune_updates=5'])  # fmt: skip
    _, state = train.train(config, str(tmp_path / 'finetune'))
    end = jax.device_get(state['params'])
    assert 'lm_head' in end and 'quantizer_codevectors' not in end
    for name in end:  # one step with the encoder frozen: the encoder is still the pretrained one
        if name != 'lm_head':
            jax.tree.map(np.testing.assert_array_equal, end[name], start[name])
    with open(tmp_path / 'finetune' / 'metrics.jsonl') as f:
        assert any('loss' in json.loads(line) for line in f)
    assert os.path.isdir(tmp_path / 'finetune' / 'checkpoints')
    with pytest.raises(ConfigError, match=r'input\.manifest_dir'):
        wav2vec2_ctc.Method(load_config('configs/wav2vec2_ctc.py'))


@pytest.mark.parametrize('layout', ['base', 'large'])
def test_padded_batch_and_channel_masks_match_transformers_ctc(tmp_path, layout, monkeypatch):
    """A batch with a shorter, zero-padded utterance, masked frames and zeroed channels (transformers draws channel
    masks in training mode; its draw is replaced by ours): each utterance's logits equal transformers' on that
    utterance alone, unpadded. For the large layout (LayerNorm per frame) that is also transformers' padded batch with
    an attention mask; the base layout's GroupNorm takes its statistics over the utterance's own frames here, where
    fairseq and transformers include the batch's zero padding (docs/methods.md, wav2vec 2.0 CTC section)."""
    from test_wav2vec2 import LAYOUTS, TINY
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    from transformers.models.wav2vec2 import modeling_wav2vec2

    torch.manual_seed(0)
    config = Wav2Vec2Config(**TINY, **LAYOUTS[layout], vocab_size=9, final_dropout=0.0, mask_time_prob=0.05,
                            mask_feature_prob=0.5, mask_feature_length=2)  # fmt: skip
    reference = Wav2Vec2ForCTC(config)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(str(tmp_path))
    fields, params = wav2vec2_weights.load(str(tmp_path), quantizer=False)
    model = w2v.Wav2Vec2(**fields, dropout=0.0, attention_dropout=0.0, pretraining=False, vocab_size=9)
    lengths = np.array([4000, 2900])
    waveform = np.random.default_rng(1).normal(size=(2, 4000)).astype(np.float32)
    waveform[1, lengths[1] :] = 0.0
    frames = [int(w2v.frame_counts(n)) for n in lengths]
    time_mask = np.zeros((2, frames[0]), bool)
    time_mask[0, 1:4], time_mask[1, 5:7] = True, True
    channel_mask = np.zeros((2, TINY['hidden_size']), bool)
    channel_mask[0, [3, 4, 20]], channel_mask[1, [0, 1, 31]] = True, True
    got = model.apply({'params': params}, jnp.asarray(waveform), jnp.asarray(lengths), jnp.asarray(time_mask),
                      jnp.asarray(channel_mask), method=model.ctc_logits)  # fmt: skip
    reference.train()  # transformers applies channel masks only in training mode; every dropout here is 0

    def transformers_logits(rows, samples, attention_mask=None):
        monkeypatch.setattr(modeling_wav2vec2, '_compute_mask_indices', lambda *args, **kwargs: channel_mask[rows])
        with torch.no_grad():
            out = reference(
                torch.from_numpy(waveform[rows, :samples]),
                attention_mask=attention_mask,
                mask_time_indices=torch.from_numpy(time_mask[rows, : int(w2v.frame_counts(samples))]),
            )
        return out.logits.numpy()  # fmt: skip

    for row, (n, t) in enumerate(zip(lengths, frames, strict=True)):
        alone = transformers_logits([row], n)[0]
        np.testing.assert_allclose(np.asarray(got)[row, :t], alone, atol=2e-4, rtol=2e-4)
    if layout == 'large':
        attention = torch.from_numpy(np.arange(4000)[None] < lengths[:, None]).long()
        padded = transformers_logits([0, 1], 4000, attention)
        for row, t in enumerate(frames):
            np.testing.assert_allclose(np.asarray(got)[row, :t], padded[row, :t], atol=2e-4, rtol=2e-4)
