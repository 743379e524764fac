"""E2S2: BART equals transformers' BartForConditionalGeneration with converted weights; the corruption (text
infilling, local shuffles, random replacements) by known answers with scripted draws and by properties over random
draws; the detection terms by hand; the weighted losses; packed rows; config errors; and a 2-step runlocal run
sharded over 8 devices equal to one device with its evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_language_model import randomise  # weights of a trained model's scale

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import text_noise
from jaxssl.methods import e2s2
from jaxssl.models import bart, bert_weights

CONFIG = 'configs/e2s2.py:runlocal'
PAD, CLS, SEP, MASK = 0, 1, 2, 3
NOISE = text_noise.Noise(mask_id=MASK, pad_id=PAD, special_ids=(PAD, CLS, SEP), vocab_size=60, never_drawn=(PAD, CLS))


def test_bart_matches_transformers():
    """A 2 + 2-layer BART: the decoder's logits (cross-attention over a padded source) and the encoder's states."""
    vocab, length, target = 50, 9, 7
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    reference = randomise(transformers.BartForConditionalGeneration(config))
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, vocab, (2, length)).astype(np.int32)
    mask = np.array([[1] * length, [1] * 6 + [0] * 3], np.int32)
    decoder_tokens = rng.integers(5, vocab, (2, target)).astype(np.int32)
    with torch.no_grad():
        want = reference(
            input_ids=torch.tensor(tokens).long(),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(decoder_tokens).long(),
        )
    params = bert_weights.bart_to_flax({k: v.numpy() for k, v in reference.state_dict().items()}, 2, 2)
    model = bart.Bart(vocab, 32, 2, 2, 4, 64, max_positions=16, init_std=None)
    params['detection'] = model.init(jax.random.key(0), tokens, mask, decoder_tokens)['params']['detection']
    logits, memory, detection = model.apply({'params': params}, tokens, mask, decoder_tokens)
    np.testing.assert_allclose(logits, want.logits.numpy(), atol=2e-5)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(memory)[real], want.encoder_last_hidden_state.numpy()[real], atol=2e-5)
    assert detection.shape == (2, length, 3)


class ScriptedRng:
    """A numpy Generator's choice / permutation / integers answering from scripts (in call order)."""

    def __init__(self, choices=(), permutations=(), integers=()):
        self.choices, self.permutations, self.integers_ = list(choices), list(permutations), list(integers)

    def choice(self, a, size, p=None):
        return np.asarray(self.choices.pop(0))[:size]

    def permutation(self, n):
        return np.asarray(self.permutations.pop(0))

    def integers(self, high):
        return self.integers_.pop(0)


def test_span_lengths_known_answer():
    probabilities = text_noise.span_length_probabilities(3.0)
    k = np.arange(len(probabilities))
    poisson = np.exp(-3.0) * 3.0**k / np.array([math.factorial(i) for i in k])
    np.testing.assert_allclose(probabilities, poisson / poisson.sum(), rtol=1e-12)
    assert poisson[-1] < 1e-7 <= poisson[-2]  # fairseq stops at the first value under 1e-7, keeping it
    # Budget 5: draws 2, 0, 4 reach it at the third span, cut to 3; a second round when the first falls short.
    assert text_noise.span_lengths(5, probabilities, ScriptedRng([[2, 0, 4, 1, 1]])).tolist() == [2, 0, 3]
    assert text_noise.span_lengths(3, probabilities, ScriptedRng([[1, 0, 0], [0, 5, 1]])).tolist() == [1, 0, 0, 0, 2]


def test_text_infilling_known_answer():
    """Row of 12: budget ceil(0.15 x 10) = 2 -> spans [0, 2]: the 2-span at position 4 becomes one [MASK] and deletes
    the next token; the 0-span inserts a [MASK] at place 1 + 6 of the 11 left."""
    row = np.array([CLS, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, SEP])
    rng = ScriptedRng(choices=[[0, 2]], permutations=[[4, 9, 1], [6, 2]])
    got = text_noise.text_infilling(row, NOISE, rng, max_len=12)
    assert got.tolist() == [CLS, 10, 11, 12, MASK, 15, 16, MASK, 17, 18, 19, SEP]
    # A span running into the end stops before the last token; one running over another's [MASK] swallows it.
    rng = ScriptedRng(choices=[[3, 3]], permutations=[[9, 8]])
    row = np.array([CLS, *range(10, 40), SEP])  # 32 tokens: budget ceil(0.15 x 30) = 5 -> spans [3, 2]
    got = text_noise.text_infilling(row, NOISE, rng, max_len=32)
    # Spans over positions 9..11 and 8..9 (tokens 17..20) merge into one [MASK].
    assert got.tolist() == [CLS, *range(10, 17), MASK, *range(21, 40), SEP]
    # A span of 5 from position 29 stops before the last token: positions 29 and 30 -> one [MASK].
    rng = ScriptedRng(choices=[[5]], permutations=[[29]])
    got = text_noise.text_infilling(row, NOISE, rng, max_len=32)
    assert got.tolist() == [CLS, *range(10, 38), MASK, SEP]


def test_text_infilling_properties():
    """Over random draws: first and last kept, the surviving tokens in order, at most the budget covered (exactly
    it unless spans merge), spans of mean length near lambda, and never longer than max_len."""
    rng = np.random.default_rng(0)
    row = np.array([CLS, *range(10, 58), SEP])  # 50 tokens: budget 8
    covered, spans = [], []
    for _ in range(300):
        out = text_noise.text_infilling(row, NOISE, rng, max_len=len(row))
        assert out[0] == CLS and out[-1] == SEP and len(out) <= len(row)
        kept = out[out != MASK]
        assert np.all(np.isin(kept, row)) and np.all(np.diff(kept[1:-1]) > 0)
        covered.append(len(row) - len(kept))
        spans.append((out == MASK).sum())
    assert max(covered) <= 8 and np.mean(np.array(covered) == 8) > 0.6  # 0.73 measured: the rest merged
    assert 2.0 < np.sum(covered) / np.sum(spans) < 3.0  # Poisson(3) spans, the last cut at the budget: 2.45


def test_local_shuffle_known_answer_and_properties():
    # 40 tokens, 38 candidates: blocks of 18, 18, 2; budget min(26, round(2.0)) = 2 windows.
    row = np.array([CLS, *range(10, 48), SEP])
    rng = ScriptedRng(integers=[0, 5, 1], permutations=[[2, 0, 1]])
    out, labels = text_noise.local_shuffle(row, NOISE, rng)
    # Centre 10 (position 1) has [CLS] beside it: skipped; centre 33 (position 24): window 32 33 34 -> 34 32 33;
    # centre 47 (position 38): window 46 47 [SEP]: skipped.
    want = row.copy()
    want[23:26] = [34, 32, 33]
    assert out.tolist() == want.tolist()
    assert labels.tolist() == [int(i in (23, 24, 25)) for i in range(len(row))]
    # Properties: same tokens, specials and [MASK]s unmoved, labels exactly where a token changed, <= budget windows.
    rng = np.random.default_rng(1)
    row = np.array([CLS, *range(10, 30), MASK, *range(30, 70), SEP, *range(70, 90), SEP])
    for _ in range(100):
        out, labels = text_noise.local_shuffle(row, NOISE, rng)
        assert sorted(out) == sorted(row) and labels.tolist() == (out != row).astype(int).tolist()
        fixed = np.isin(row, [CLS, SEP, MASK])
        assert np.array_equal(out[fixed], row[fixed])
        assert labels.sum() <= 3 * round(len(row) * 0.05)


def test_random_replacement_known_answer_and_properties():
    row = np.array([CLS, 10, 11, 12, 13, 14, 15, SEP])  # ceil(0.15 x 8) = 2 positions among 1..6
    labels = np.array([0, 0, 1, 1, 0, 0, 0, 0], np.int32)
    rng = ScriptedRng(permutations=[[2, 4, 0, 1, 3, 5]], choices=[[55]])
    out, got = text_noise.random_replacement(row, labels, NOISE, rng)
    # Position 3 is already shuffled (label 1): only position 5 is replaced.
    assert out.tolist() == [CLS, 10, 11, 12, 13, 55, 15, SEP] and got.tolist() == [0, 0, 1, 1, 0, 2, 0, 0]
    rng = np.random.default_rng(2)
    row = np.array([CLS, *range(10, 50), SEP])
    for _ in range(50):
        out, got = text_noise.random_replacement(row, np.zeros(len(row), np.int32), NOISE, rng)
        assert got.sum() == 2 * math.ceil(len(row) * 0.15) and out[0] == CLS and out[-1] == SEP
        assert not np.isin(out[got == 2], [PAD, CLS]).any() and np.array_equal(out[got == 0], row[got == 0])


def test_corrupt_batch_shapes_and_pairs():
    tokens = np.full((2, 30), PAD, np.int32)
    tokens[0] = [CLS, *range(10, 38), SEP]
    tokens[1, :12] = [CLS, *range(10, 20), SEP]
    mask = (tokens != PAD).astype(np.int32)
    got = text_noise.corrupt_batch(tokens, mask, NOISE, seed=7)
    # Each row's corruption depends on its place in the global batch, not on which process holds which rows.
    second = text_noise.corrupt_batch(tokens[1:], mask[1:], NOISE, seed=7, first_row=1)
    assert all(np.array_equal(got[k][1:], second[k]) for k in got)
    for i in range(2):
        n = got['noisy_mask'][i].sum()
        assert (
            got['masked'][i, n - 1] == SEP and np.all(got['noisy'][i, n:] == PAD) and np.all(got['labels'][i, n:] == 0)
        )
        # The mask-only row is the noisy one before shuffling and replacement: they differ only where labelled.
        differs = got['noisy'][i, :n] != got['masked'][i, :n]
        assert np.all(got['labels'][i, :n][differs] > 0)


def test_shift_right_and_detection_terms_by_hand():
    assert e2s2.shift_right(jnp.array([[1, 5, 6, 2, 0]]), 2).tolist() == [[2, 1, 5, 6, 2]]
    logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]]])
    labels = jnp.array([[0, 1, 1, 0]])
    mask = jnp.array([[1, 1, 1, 0]])
    got = jax.device_get(e2s2.detection_terms(logits, labels, mask, jnp.asarray(4.0)))
    logp = jax.nn.log_softmax(logits[0, :3], axis=-1)
    want = -(logp[0, 0] + logp[1, 1] + logp[2, 1]) / 4  # summed over the real inputs, per target token
    assert got['loss'] == pytest.approx(float(want), rel=1e-6)
    assert got['accuracy'] == pytest.approx(2 / 3) and got['shuffled_recall'] == pytest.approx(1 / 2)
    assert got['replaced_recall'] == 0 and got['tokens'] == 3 and got['shuffled'] == 2


@pytest.fixture(scope='module')
def method_and_batch():
    method = e2s2.Method(load_config(CONFIG, ['model.dropout=0.0', 'model.attention_dropout=0.0']))
    tokens, mask = method.packed_rows
    batch = method.corrupt(tokens[:8], mask[:8], seed=0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return method, batch, method.init(jax.random.key(0), batch)[0]


def test_packed_rows(method_and_batch):
    method, _, _ = method_and_batch
    tokens, mask = method.packed_rows
    ends = mask.sum(axis=1) - 1
    assert np.all(tokens[:, 0] == method.cls_id) and np.all(tokens[np.arange(len(tokens)), ends] == method.sep_id)
    assert np.all(mask[:-1].sum(axis=1) == 48) and tokens.shape[1] == 48
    assert np.all((tokens == method.sep_id).sum(axis=1) == 1)  # sentences joined without separators, as fairseq's


def test_weighted_losses(method_and_batch):
    method, batch, params = method_and_batch
    pair = jax.device_get(method.e2s2_terms(params, batch, jax.random.key(1), train=False, pair=True))
    want = 0.5 * pair['nll']['loss'] + 0.5 * pair['masked_nll']['loss']
    want += 0.05 * pair['contrastive']['loss'] + 0.05 * pair['detection']['loss']
    assert pair['loss'] == pytest.approx(want, rel=1e-6)
    assert pair['nll']['tokens'] == np.asarray(batch['mask']).sum()
    assert pair['nll']['loss'] == pytest.approx(np.log(method.tokenizer.vocab_size), rel=0.1)  # untrained
    assert 0 < pair['contrastive']['loss'] <= np.log(2 * 8 - 1) + 2  # temperature 1: logits within [-1, 1]
    # The reconstruction terms by hand: each input encoded, the clean row decoded behind [SEP].
    for source, name in (('noisy', 'nll'), ('masked', 'masked_nll')):
        memory = method.bart.apply({'params': params}, batch[source], batch['noisy_mask'], method='encode')
        decoder_tokens = jnp.concatenate([jnp.full((8, 1), method.sep_id), batch['tokens'][:, :-1]], axis=1)
        logits = method.bart.apply({'params': params}, decoder_tokens, memory, batch['noisy_mask'], method='decode')
        logp = np.asarray(jax.nn.log_softmax(logits))
        picked = np.take_along_axis(logp, np.asarray(batch['tokens'])[..., None], axis=-1)[..., 0]
        real = np.asarray(batch['mask'], bool)
        assert pair[name]['loss'] == pytest.approx(-picked[real].mean(), rel=1e-5)
    assert pair['nll']['loss'] != pair['masked_nll']['loss']
    single = jax.device_get(method.e2s2_terms(params, batch, jax.random.key(1), train=False, pair=False))
    assert single['loss'] == pytest.approx(single['nll']['loss'] + 0.05 * single['detection']['loss'], rel=1e-6)


def test_config_errors():
    large = load_config('configs/e2s2.py')
    assert large.model.variant == 'large' and large.optim.b2 == 0.98 and large.input.max_len == 1024
    assert bart.VARIANTS['large'] == (1024, 12, 12, 16, 4096)
    bad = [
        ('noise.mask_ratio=1.5', 'noise.mask_ratio'),
        ('noise.poisson_lambda=0.0', 'noise.poisson_lambda'),
        ('noise.poisson_lambda=17.0', 'noise.poisson_lambda'),  # its table would hold length 0 alone
        ("noise.shuffle='yes'", 'noise.shuffle'),
        ('loss.temperature=0.0', 'loss.temperature'),
        ('loss.detection_weight=-1.0', 'loss.detection_weight'),
        ("model.variant='huge'", 'model.variant'),
        ('input.max_len=2', 'input.max_len'),
    ]
    for override, key in bad:
        with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
            load_config(CONFIG, [override])


@pytest.mark.slow
def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path):
    common = ['train.steps=2', 'train.tensorboard=false', 'train.log_every=1', 'input.global_batch=16']
    small_eval = ['eval.max_sentences=16', 'eval.max_len=32', "eval.poolings=('mean',)"]
    _, want = train.train(load_config(CONFIG, [*common, 'mesh.data=1', 'eval.at_end=false']), str(tmp_path / 'one'))
    summary, state = train.train(load_config(CONFIG, [*common, 'mesh.data=8', *small_eval]), str(tmp_path / 'eight'))
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, jax.device_get(state['params']), jax.device_get(want['params']))
    evaluation = {k.removeprefix('final_eval/') for k in summary if k.startswith('final_eval/')}
    held_out = {
        f'held_out/{m}'
        for m in (
            'loss', 'perplexity', 'accuracy', 'detection_accuracy', 'shuffled_recall', 'replaced_recall',
            'word_order_pairs',
        )
    }  # fmt: skip
    assert evaluation == {'lee_spearman/mean', 'duplicate_top1/mean'} | held_out
    assert 0 <= summary['final_eval/held_out/word_order_pairs'] <= 1
    assert 0 < summary['final_eval/held_out/detection_accuracy'] <= 1


def test_continues_a_released_bart(tmp_path):
    """E2S2's set-up: a transformers BART folder (config.json, model.safetensors) with its byte-level BPE
    tokenizer.json (<s> ... </s>, <mask>). The method loads both: the released weights (a fresh detection head
    beside them) give transformers' encoder states on tokenised text, and a corrupted batch's loss is finite."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    method = e2s2.Method(load_config(CONFIG))
    specials = ['<s>', '<pad>', '</s>', '<unk>', '<mask>']
    tok = Tokenizer(models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(method.sentences[:500], trainer)
    tok.post_processor = processors.RobertaProcessing(('</s>', 2), ('<s>', 0))
    tok.save(str(tmp_path / 'tokenizer.json'))
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=tok.get_vocab_size(), d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
    )  # fmt: skip
    transformers.BartForConditionalGeneration(config).save_pretrained(str(tmp_path), safe_serialization=True)
    released = transformers.BartModel.from_pretrained(str(tmp_path)).eval()

    overrides = [f'model.pretrained={tmp_path}', f'input.tokenizer={tmp_path}', 'input.vocab_min_count=0']
    method = e2s2.Method(load_config(CONFIG, overrides))
    t = method.tokenizer
    assert (t.special_ids, t.mask_id, t.mask_token) == ((1, 0, 2), 4, '<mask>')
    tokens, mask = t(method.sentences[:8], 24)
    assert np.all(tokens[:, 0] == 0) and np.all(tokens[np.arange(8), mask.sum(axis=1) - 1] == 2)
    batch = {k: jnp.asarray(v) for k, v in method.corrupt(tokens, mask, seed=0).items()}
    params, _ = method.init(jax.random.key(0), batch)
    states = method.bart.apply({'params': params}, tokens, mask, method='encode')
    with torch.no_grad():
        want = released.encoder(input_ids=torch.tensor(tokens).long(), attention_mask=torch.tensor(mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(states)[real], want.last_hidden_state.numpy()[real], atol=2e-5)
    assert set(params) == {*bert_weights.load_bart(str(tmp_path))[1], 'detection'}
    terms = jax.device_get(method.e2s2_terms(params, batch, jax.random.key(1), train=False, pair=True))
    assert np.isfinite(terms['loss']) and terms['nll']['tokens'] == mask.sum()
    with pytest.raises(ConfigError, match='vocab_min_count'):
        e2s2.Method(load_config(CONFIG, overrides[:2]))
