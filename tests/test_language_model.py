"""Language-model pretraining (BERT's masked LM, GPT-1's causal LM): both models equal transformers' with converted
weights, causal attention leaks nothing from the future, BERT's masking draws the right counts, places and
replacements, both losses and both sentence log-likelihoods equal numpy by hand, packed rows, the 'last' pooling, the
held-out means and minimal-pair ties by known answers, the corpus vocabulary, config errors, and a 2-step runlocal run
of each objective sharded over 8 devices equal to one device with its evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import text
from jaxssl.evaluate import sentence
from jaxssl.methods import language_model as lm_method
from jaxssl.models import bert, bert_weights, language_model

CONFIG = 'configs/language_model.py:runlocal'
VOCAB, LENGTH = 50, 9
TOKENS = np.random.default_rng(0).integers(5, VOCAB, (2, LENGTH)).astype(np.int32)
MASK = np.array([[1] * LENGTH, [1] * 6 + [0] * 3], np.int32)


def randomise(model):
    """Weights of a trained model's scale: transformers initialises biases at 0 and kernels at N(0, 0.02), where
    the MLP's pre-activations are ~0.1 and the exact and tanh GELUs agree to 1e-6; here they are O(1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.normal_(0, 0.5)
            elif p.ndim == 2:
                p.normal_(0, 0.3)
    return model.eval()


def small_encoder(**kwargs):
    return bert.BertEncoder(vocab_size=VOCAB, width=32, depth=2, heads=4, max_positions=16, **kwargs)


def test_bert_masked_lm_matches_transformers():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16,
    )  # fmt: skip
    reference = randomise(transformers.BertForMaskedLM(config))
    with torch.no_grad():
        want = reference(torch.tensor(TOKENS).long(), attention_mask=torch.tensor(MASK)).logits.numpy()
    params = bert_weights.masked_lm_to_flax({k: v.numpy() for k, v in reference.state_dict().items()}, 2)
    model = language_model.LanguageModel(small_encoder(mlp=64), 'bert')
    got, _ = model.apply({'params': params}, TOKENS, MASK)
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5)
    positions = np.array([[1, 3], [0, 5]])  # decoding only the drawn positions gives the same rows
    picked, _ = model.apply({'params': params}, TOKENS, MASK, positions)
    np.testing.assert_allclose(picked, np.take_along_axis(want, positions[..., None], axis=1), atol=2e-5)


def gpt_model_and_reference():
    torch.manual_seed(1)
    config = transformers.OpenAIGPTConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    reference = randomise(transformers.OpenAIGPTLMHeadModel(config))
    params = bert_weights.openai_gpt_to_flax({k: v.numpy() for k, v in reference.state_dict().items()}, 2)
    encoder = small_encoder(
        mlp=128, causal=True, embedding_norm=False, type_vocab_size=0, eps=1e-5, approximate_gelu=True
    )
    return language_model.LanguageModel(encoder, 'gpt'), params, reference


def test_gpt_causal_lm_matches_transformers_and_sees_no_future():
    model, params, reference = gpt_model_and_reference()
    with torch.no_grad():
        want = reference(torch.tensor(TOKENS).long(), attention_mask=torch.tensor(MASK)).logits.numpy()
    got, _ = model.apply({'params': params}, TOKENS, MASK)
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5)
    changed = TOKENS.copy()
    changed[:, 5] = changed[:, 5] % (VOCAB - 1) + 1
    after, _ = model.apply({'params': params}, changed, MASK)
    np.testing.assert_array_equal(np.asarray(after)[:, :5], np.asarray(got)[:, :5])  # positions before 5: unchanged
    assert np.abs(np.asarray(after)[:, 5] - np.asarray(got)[:, 5]).min() > 0
    assert language_model.make('micro', VOCAB, 'gpt', True).encoder.approximate_gelu  # GPT-1's tanh GELU
    # The same stack without the causal mask lets position 0 see position 5.
    bidirectional = language_model.LanguageModel(model.encoder.clone(causal=False), 'gpt')
    seen = [bidirectional.apply({'params': params}, t, MASK)[0][:, 0] for t in (TOKENS, changed)]
    assert np.abs(np.asarray(seen[0]) - np.asarray(seen[1])).max() > 1e-4


def test_mlm_draw_counts_places_and_replacements():
    special = (0, 2, 3)  # pad, cls, sep
    rng = np.random.default_rng(0)
    rows, length, vocab = 20000, 24, 1000
    lengths = rng.integers(3, length + 1, rows)
    tokens = rng.integers(5, vocab, (rows, length)).astype(np.int32)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    tokens[:, 0] = 2
    tokens[np.arange(rows), lengths - 1] = 3
    tokens[mask == 0] = 0
    draw = jax.device_get(lm_method.draw_mlm_targets(jax.random.key(0), tokens, mask, special, 4, vocab, 0.15, 4))
    # round(0.15 x tokens, [CLS] / [SEP] counted), at least 1, at most max_predictions (4) and the candidates.
    want_count = np.minimum(np.minimum(np.maximum(np.round(lengths * 0.15), 1), 4), lengths - 2)
    np.testing.assert_array_equal(draw['weights'].sum(1), want_count)
    chosen = draw['weights'] > 0
    pos = draw['positions']
    assert (pos[chosen] > 0).all() and (pos[chosen] < (lengths - 1)[:, None].repeat(4, 1)[chosen]).all()
    for row in range(50):  # distinct positions in each row
        assert len(set(pos[row][chosen[row]].tolist())) == chosen[row].sum()
    np.testing.assert_array_equal(draw['labels'], np.take_along_axis(tokens, pos, axis=1))
    new = np.take_along_axis(draw['tokens'], pos, axis=1)[chosen]
    original = draw['labels'][chosen]
    as_mask, kept = (new == 4).mean(), (new == original).mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 / vocab)) < 0.015, (as_mask, kept)
    untouched = np.ones_like(tokens, bool)
    np.put_along_axis(untouched, np.where(chosen, pos, 0), False, axis=1)
    untouched[:, 0] = True  # column 0 ([CLS]) stands for the padding slots above and is never drawn
    np.testing.assert_array_equal(draw['tokens'][untouched], tokens[untouched])
    # Uniform over the real non-special tokens: in the full rows each of the 22 is drawn with p 4 / 22.
    full = lengths == length
    hits = np.zeros(length)
    np.add.at(hits, pos[full][chosen[full]], 1)
    expected = full.sum() * 4 / 22  # about 150: Poisson noise about 8%
    assert hits[0] == hits[-1] == 0 and np.abs(hits[1:-1] / expected - 1).max() < 0.3, hits


def test_losses_by_hand():
    config = load_config(CONFIG, ['input.vocab_min_count=0'])
    method = lm_method.Method(config)
    batch = method.example_batch(2)
    params, _ = method.init(jax.random.key(0), jax.tree.map(jnp.asarray, batch))
    tokens, mask = method.tokenizer(['The fire crews were called.', 'Rain fell.'], config.input.max_len)
    logsoftmax = lambda x: (
        x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    )
    # Causal LM: position t predicts token t + 1 over the real tokens.
    clm = lm_method.Method(
        load_config(CONFIG.replace('runlocal', 'runlocal,objective=clm'), ['input.vocab_min_count=0'])
    )
    clm_params, _ = clm.init(jax.random.key(0), jax.tree.map(jnp.asarray, batch))
    logits, _ = clm.lm.apply({'params': clm_params}, tokens, mask)
    logp = logsoftmax(np.asarray(logits, np.float64))
    nll = [-logp[b, t, tokens[b, t + 1]] for b in range(2) for t in range(mask[b].sum() - 1)]
    terms = clm.lm_terms(clm_params, tokens, mask, jax.random.key(1), train=False)
    np.testing.assert_allclose(terms['loss'], np.mean(nll), rtol=1e-5)
    assert terms['tokens'] == len(nll) == mask.sum() - 2
    # Masked LM: the mean cross-entropy at the drawn positions, on the corrupted input.
    k = config.masking
    rng = jax.random.key(3)
    mask_rng, _ = jax.random.split(rng)
    draw = lm_method.draw_mlm_targets(
        mask_rng, tokens, mask, method.tokenizer.special_ids, method.tokenizer.mask_id, method.tokenizer.vocab_size,
        k.ratio, k.max_predictions,
    )  # fmt: skip
    logits, _ = method.lm.apply({'params': params}, draw['tokens'], mask)
    logp = logsoftmax(np.asarray(logits, np.float64))
    w = np.asarray(draw['weights'])
    picked = np.take_along_axis(np.take_along_axis(logp, np.asarray(draw['positions'])[..., None], 1),
                                np.asarray(draw['labels'])[..., None], 2)[..., 0]  # fmt: skip
    terms = method.lm_terms(params, tokens, mask, rng, train=False)
    np.testing.assert_allclose(terms['loss'], -(picked * w).sum() / w.sum(), rtol=1e-5)
    assert terms['tokens'] == w.sum() == round(mask[0].sum() * 0.15) + max(round(mask[1].sum() * 0.15), 1)


def test_sentence_log_likelihoods_by_hand():
    """The causal LM's sum of next-token log-probabilities; the masked LM's pseudo-log-likelihood, one [MASK]ed
    copy per real non-special token; and the swapped copies of the minimal pairs keep their words."""
    texts = ['Rain fell on the town.', 'Fire crews were called.']
    for objective in ('clm', 'mlm'):
        spec = CONFIG.replace('runlocal', f'runlocal,objective={objective}')
        method = lm_method.Method(load_config(spec, ['eval.max_len=16']))
        params, _ = method.init(jax.random.key(2), jax.tree.map(jnp.asarray, method.example_batch(1)))
        tokens, mask = method.tokenizer(texts, 16)
        want = []
        for row, row_mask in zip(tokens, mask, strict=True):
            n = int(row_mask.sum())
            if objective == 'clm':
                logits, _ = method.lm.apply({'params': params}, row[None], row_mask[None])
                logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64))
                want.append(sum(logp[t, row[t + 1]] for t in range(n - 1)))
                continue
            total = 0.0
            for t in range(1, n - 1):  # every token but [CLS] and [SEP]
                masked = row.copy()
                masked[t] = method.tokenizer.mask_id
                logits, _ = method.lm.apply({'params': params}, masked[None], row_mask[None])
                total += float(jax.nn.log_softmax(np.asarray(logits[0, t], np.float64))[row[t]])
            want.append(total)
        np.testing.assert_allclose(method.sentence_log_likelihoods(params, texts), want, rtol=1e-5)
        # In passes sorted by length and cut to their longest (here 2 passes of 16, one of them at 16 tokens).
        mixed = ['Fire.'] * 15 + texts + ['Crews worked through the night to contain the fires near the town.']
        np.testing.assert_allclose(method.sentence_log_likelihoods(params, mixed)[15:17], want, rtol=1e-5)
    rng = np.random.default_rng(0)
    swapped = [sentence.swap_two_words(t, rng) for t in texts * 5]
    assert all(sorted(a.split()) == sorted(b.split()) and a != b for a, b in zip(texts * 5, swapped, strict=True))


def test_packed_rows_known_answer():
    """Three sentences of 2, 1 and 3 words as one stream (each with its [SEP]) cut into rows of [CLS] + 3 tokens."""
    vocab = {'a': 10, 'b': 11, 'c': 12, 'd': 13, 'e': 14, 'f': 15}
    cls, sep = 2, 3

    def tokenize(texts, max_len):
        ids, mask = np.zeros((len(texts), max_len), np.int32), np.zeros((len(texts), max_len), np.int32)
        for i, t in enumerate(texts):
            row = [cls, *(vocab[w] for w in t.split()), sep]
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        return ids, mask

    tokens, mask = text.pack_sentences(tokenize, ['a b', 'c', 'd e f'], 4, cls, chunk=2)
    np.testing.assert_array_equal(tokens, [[2, 10, 11, 3], [2, 12, 3, 13], [2, 14, 15, 3]])
    np.testing.assert_array_equal(mask, np.ones((3, 4)))
    tokens, mask = text.pack_sentences(tokenize, ['a b', 'c'], 4, cls)
    np.testing.assert_array_equal(tokens, [[2, 10, 11, 3], [2, 12, 3, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 1, 0]])


def test_unpacked_rows_hold_one_sentence_each():
    tokenizer = bert_weights.Tokenizer('minilm-l6')
    sentences = [f'Sentence {i} of the corpus.' for i in range(8)]
    batch = next(iter(text.make_sentence_dataset(sentences, tokenizer, 4, 16, seed=0)))
    want, want_mask = tokenizer([sentences[i] for i in batch['index']], 16)
    np.testing.assert_array_equal(batch['tokens'], want)
    np.testing.assert_array_equal(batch['mask'], want_mask)
    assert batch['tokens'].shape == (4, 16) and len(set(batch['index'].tolist())) == 4


def test_last_pooling_and_held_out_means_over_tokens():
    hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    np.testing.assert_allclose(bert.pool(hidden, jnp.array([[1, 1, 0], [1, 1, 1]]), 'last'), [[2, 3], [10, 11]])
    # held_out: one mean over every predicted token of every pass, whatever the passes' sizes.
    method = lm_method.Method(
        load_config(CONFIG.replace('runlocal', 'runlocal,objective=clm'), ['eval.max_sentences=3'])
    )
    params, _ = method.init(jax.random.key(0), jax.tree.map(jnp.asarray, method.example_batch(1)))
    method.held_out_sentences = ['Rain fell on the town today.'] * 3 + ['Fire.'] * 15  # passes of 16 + 2
    got = method.held_out(params)
    tokens, mask = method.tokenizer(method.held_out_sentences, method.config.eval.max_len)
    want = method.lm_terms(params, tokens, mask, jax.random.key(0), train=False)
    np.testing.assert_allclose(got['held_out/loss'], want['loss'], rtol=1e-5)
    np.testing.assert_allclose(got['held_out/accuracy'], want['accuracy'], rtol=1e-5)
    # Minimal pairs (the first 3 held-out sentences, then their swapped copies): won, tied, lost.
    method.sentence_log_likelihoods = lambda p, texts: np.array([3.0, 1.0, 2.0, 2.0, 1.0, 3.0])
    assert method.minimal_pairs(params) == pytest.approx((1 + 0.5 + 0) / 3)


def test_corpus_vocabulary_keeps_frequent_ids_and_specials():
    tokenizer = bert_weights.Tokenizer('minilm-l6')
    sentences = ['the cat sat', 'the cat ran', 'a dog']
    vocab = text.CorpusVocabulary(tokenizer, sentences, min_count=2)
    # the, cat, [CLS], [SEP] are used twice or more; [PAD], [UNK], [MASK] are always kept.
    assert vocab.vocab_size == 7
    ids, mask = vocab(['the cat flew', 'a'], 8)
    words = ids[0][mask[0].astype(bool)].tolist()
    cls, sep = vocab.special_ids[1:]
    assert words[0] == cls and words[-1] == sep and words[3] == vocab.unk_id and len(set(words)) == 5
    assert ids[1][1] == vocab.unk_id and ids.max() < vocab.vocab_size
    again = text.CorpusVocabulary(tokenizer, sentences, min_count=2)
    np.testing.assert_array_equal(again.kept, vocab.kept)
    assert vocab.mask_id != vocab.unk_id and vocab.pad_id == 0


@pytest.mark.parametrize(
    'override, key',
    [
        ('model.objective=gpt', 'model.objective'),
        ('model.head=t5', 'model.head'),
        ('masking.mask_prob=0.95', 'masking.mask_prob'),
        ('masking.max_predictions=0', 'masking.max_predictions'),
        ('masking.max_predictions=49', 'masking.max_predictions'),
        ('input.vocab_min_count=-1', 'input.vocab_min_count'),
        ("eval.poolings=('max',)", 'eval.poolings'),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        load_config(CONFIG, [override])


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['mlm', 'clm'])
def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path, objective):
    spec = CONFIG.replace('runlocal', f'runlocal,objective={objective}')
    common = ['train.steps=2', 'train.tensorboard=false', 'train.log_every=1', 'input.global_batch=16']
    small_eval = ['eval.max_sentences=16', 'eval.max_len=32', "eval.poolings=('mean','last')"]
    _, want = train.train(load_config(spec, [*common, 'mesh.data=1', 'eval.at_end=false']), str(tmp_path / 'one'))
    summary, state = train.train(load_config(spec, [*common, 'mesh.data=8', *small_eval]), str(tmp_path / 'eight'))
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    assert summary['final_loss'] == pytest.approx(float(np.log(4536)), rel=0.1)  # near a uniform guess over 4.5k ids
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, jax.device_get(state['params']), jax.device_get(want['params']))
    evaluation = {k.removeprefix('final_eval/') for k in summary if k.startswith('final_eval/')}
    want_keys = {f'{m}/{p}' for m in ('lee_spearman', 'duplicate_top1') for p in ('mean', 'last')}
    held_out = {f'held_out/{m}' for m in ('loss', 'perplexity', 'accuracy', 'word_order_pairs')}
    assert evaluation == want_keys | held_out and 0 <= summary['final_eval/held_out/word_order_pairs'] <= 1
    assert 0 <= summary['final_eval/held_out/accuracy'] < 1 and summary['final_eval/held_out/perplexity'] > 100
