"""Mirror-BERT: the span masking and two-view batches (known answers), the loss wiring (pooled views into InfoNCE at
temperature 0.04, by hand), the Flax BERT against transformers' BertModel on the released MiniLM weights, the pooling
and tokenizer, config errors naming the key, the sentence evaluation of the pretrained encoder, and the trainer end to
end: a 2-step runlocal run and the same run sharded over 8 devices."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import text
from jaxssl.evaluate import sentence
from jaxssl.methods import mirror_bert
from jaxssl.models import bert, bert_weights

CONFIG = 'configs/mirror_bert.py'
SENTENCE = 'The quick brown fox jumps over the lazy dog'  # 43 characters


class FixedStart:
    """A stand-in rng whose span start is fixed; it records the bound it was asked for."""

    def __init__(self, start):
        self.start, self.bounds = start, []

    def integers(self, high):
        self.bounds.append(high)
        return self.start


# --- span masking and batches ------------------------------------------------------------------------------------
def test_span_mask_known_answer():
    rng = FixedStart(4)
    # Characters 4..8 ('quick') become ' [MASK] ', joined with spaces as the reference's " ".join([left, MASK, right]).
    assert text.span_mask(SENTENCE, 5, 30, rng) == 'The  [MASK]  brown fox jumps over the lazy dog'
    assert rng.bounds == [len(SENTENCE) - 5]  # start uniform in [0, len - span)
    assert text.span_mask(SENTENCE, 5, 30, FixedStart(0)) == ' [MASK] uick brown fox jumps over the lazy dog'
    last = len(SENTENCE) - 6
    assert text.span_mask(SENTENCE, 5, 30, FixedStart(last)) == 'The quick brown fox jumps over the la [MASK] g'


def test_span_mask_leaves_short_sentences_and_span_zero():
    rng = FixedStart(0)
    assert text.span_mask('A short one, 29 characters!!', 5, 30, rng) == 'A short one, 29 characters!!'
    assert text.span_mask(SENTENCE, 0, 30, rng) == SENTENCE
    assert text.span_mask('abcde', 5, 0, rng) == 'abcde'  # not longer than the span
    assert rng.bounds == []
    real = np.random.default_rng(0)
    starts = {text.span_mask(SENTENCE, 5, 30, real).index(' [MASK] ') for _ in range(400)}
    assert starts == set(range(len(SENTENCE) - 5))  # every start in [0, len - span) occurs, and no other


@pytest.fixture(scope='module')
def tokenizer():
    return bert_weights.Tokenizer('minilm-l6')


def test_tokenizer_pads_and_truncates_keeping_sep(tokenizer):
    ids, mask = tokenizer(['a man plays a guitar [MASK] .', SENTENCE], 8)
    # [CLS] a man plays a guitar [MASK] . [SEP] -> 9 tokens truncated to 8 with [SEP] kept last.
    assert ids[0].tolist() == [101, 1037, 2158, 3248, 1037, 2858, 103, 102]
    assert mask.tolist()[0] == [1] * 8
    short, short_mask = tokenizer(['a man'], 6)
    assert short.tolist() == [[101, 1037, 2158, 102, 0, 0]] and short_mask.tolist() == [[1, 1, 1, 1, 0, 0]]


def test_two_view_batch_pairs_sentence_and_masked_copy(tokenizer):
    sentences = [SENTENCE, 'tiny', 'Another sentence that is long enough to be masked.']
    batch = text.two_view_batch(sentences, np.array([2, 0, 1]), tokenizer, 24, 5, 30, np.random.default_rng(1))
    assert batch['tokens'].shape == (6, 24) and batch['mask'].shape == (6, 24)
    assert batch['index'].tolist() == [2, 0, 1]
    plain, _ = tokenizer([sentences[2], sentences[0], sentences[1]], 24)
    np.testing.assert_array_equal(batch['tokens'][0::2], plain)  # view 1: the sentence itself
    masked = batch['tokens'][1::2]
    assert (masked[:2] == 103).sum(axis=1).tolist() == [1, 1]  # view 2: one [MASK] in each long sentence
    np.testing.assert_array_equal(masked[2], plain[2])  # 'tiny' is too short to mask


def test_pipeline_is_deterministic_and_splits_processes(tokenizer):
    sentences = [f'Sentence number {i} is long enough for the span mask.' for i in range(20)]
    make = lambda index, count: text.make_pretrain_dataset(sentences, tokenizer, 8, 16, 5, 30, 3, index, count)
    whole = next(iter(make(0, 1)))
    again = next(iter(make(0, 1)))
    parts = [next(iter(make(i, 2))) for i in range(2)]
    np.testing.assert_array_equal(whole['tokens'], again['tokens'])
    np.testing.assert_array_equal(whole['tokens'], np.concatenate([p['tokens'] for p in parts]))
    assert whole['tokens'].shape == (16, 16) and len(set(whole['index'].tolist())) == 8


# --- model --------------------------------------------------------------------------------------------------------
def test_pooling_known_answer():
    hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(bert.pool(hidden, mask, 'cls'), [[0, 1], [6, 7]])
    np.testing.assert_allclose(bert.pool(hidden, mask, 'mean'), [[1, 2], [6, 7]])
    np.testing.assert_allclose(bert.pool(hidden, mask, 'mean_with_pad'), [[2, 3], [8, 9]])


@pytest.fixture(scope='module')
def minilm():
    return bert_weights.make_pretrained_encoder('minilm-l6')


def test_bert_matches_transformers_on_minilm_weights(minilm, tokenizer):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    encoder, params = minilm
    ids, mask = tokenizer(['A man is playing a guitar.', f'{SENTENCE}, and then [MASK] again and again.'], 20)
    ours, _ = jax.jit(encoder.apply)({'params': params}, ids, mask)
    reference = transformers.BertModel.from_pretrained(
        bert_weights.checkpoint_dir('minilm-l6'), add_pooling_layer=False
    ).eval()
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).last_hidden_state
    np.testing.assert_allclose(np.asarray(ours), want.numpy(), atol=1e-4, rtol=0)


def test_pretrained_minilm_encodes_similar_sentences_closer(minilm, tokenizer):
    encoder, params = minilm
    ids, mask = tokenizer(['A man is playing a guitar.', 'Someone plays the guitar.', 'The stock market fell.'], 16)
    hidden, _ = encoder.apply({'params': params}, ids, mask)
    sims = sentence.cosine_matrix(*(np.asarray(bert.pool(hidden, mask, 'mean')),) * 2)
    assert sims[0, 1] > sims[0, 2] + 0.3


# --- loss wiring --------------------------------------------------------------------------------------------------
def tiny_config(*overrides):
    items = ['model.pretrained=', 'model.variant=micro', 'input.global_batch=8', 'input.max_len=16']
    items += ['eval.max_len=32', 'eval.max_sentences=16', 'eval.batch_size=16', *overrides]
    return load_config(f'{CONFIG}:runlocal', items)


def test_loss_is_infonce_of_pooled_views_by_hand():
    method = mirror_bert.Method(tiny_config('model.dropout=0.0', 'model.attention_dropout=0.0', 'mesh.data=1'))
    rng = np.random.default_rng(0)
    batch = {'tokens': rng.integers(1000, 2000, (8, 16)).astype(np.int32), 'mask': np.ones((8, 16), np.int32)}
    batch['mask'][:, 10:] = 0
    params, _ = method.init(jax.random.key(0), batch)
    loss, (metrics, _) = method.loss(params, {}, batch, jax.random.key(1), 0)
    # By hand: embeddings = mean over all 16 positions (padding included), rows 2i / 2i + 1 the two views.
    hidden, _ = method.model.apply({'params': params}, batch['tokens'], batch['mask'])
    z = np.asarray(hidden).mean(axis=1)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sims = z @ z.T / 0.04
    losses = []
    for a in range(8):
        positive = a ^ 1  # the other view of the same sentence
        others = [j for j in range(8) if j != a]  # the positive and the 2B - 2 negatives (both views of the rest)
        losses.append(-sims[a, positive] + np.log(np.sum(np.exp(sims[a, others]))))
    np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)
    assert 0 <= float(metrics['contrastive_acc']) <= 1


def test_dropout_makes_the_views_differ():
    method = mirror_bert.Method(tiny_config('mesh.data=1'))
    tokens = np.tile(np.arange(100, 116, dtype=np.int32), (2, 1))
    mask = np.ones_like(tokens)
    params, _ = method.init(jax.random.key(0), {'tokens': tokens, 'mask': mask})
    z = method.embed(params, tokens, mask, 'mean', jax.random.key(1))
    assert float(jnp.abs(z[0] - z[1]).max()) > 1e-3  # identical inputs, different dropout
    z = method.embed(params, tokens, mask, 'mean', None)
    np.testing.assert_allclose(z[0], z[1], atol=1e-6)


@pytest.mark.parametrize(
    'override, key',
    [
        ('model.pooling=max', 'model.pooling'),
        ('model.variant=huge', 'model.variant'),
        ('loss.temperature=0.0', 'loss.temperature'),
        ('input.num_sample=3', 'input.num_sample'),
        ('input.span=-1', 'input.span'),
        ("eval.poolings=('cls','max')", 'eval.poolings'),
        ('input.max_len=2', 'input.max_len'),
    ],
)
def test_config_errors_name_the_key(override, key):
    extra = ['model.pretrained='] if key == 'model.variant' else []
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        load_config(f'{CONFIG}:runlocal', [*extra, override])


def test_missing_corpus_and_checkpoint_name_the_key(tmp_path):
    method = mirror_bert.Method(tiny_config(f'input.corpus={tmp_path}/none.txt'))
    with pytest.raises(ConfigError, match=r"'input\.corpus'"):
        method.dataset(0, 0, 1)
    with pytest.raises(ConfigError, match=r"'model\.pretrained'"):
        mirror_bert.Method(load_config(f'{CONFIG}:runlocal', [f'model.pretrained={tmp_path}']))


# --- evaluation ---------------------------------------------------------------------------------------------------
def test_delete_words_and_lee_set():
    assert sentence.delete_words('a b c d', 0.5, FixedPermutation([3, 0, 2, 1])) == 'b c'  # drops words 3 and 0
    documents, gold = text.load_lee_similarity()
    assert len(documents) == 50 and gold.shape == (1225,) and 0 <= gold.min() and gold.max() <= 1


def test_wiki_corpus_is_prose_sentences():
    """The built-in 'wiki' corpus: the bundled excerpt's 106 articles give ~18.8k sentences of 4+ words with no wiki
    markup left (links, templates, bold / italic quotes, headings, list or table lines)."""
    sentences = text.load_corpus('wiki')
    assert 15_000 < len(sentences) < 25_000 and sentences == text.load_corpus('wiki')  # deterministic
    assert all(len(s.split()) >= 4 for s in sentences)
    markup = ('[[', ']]', '{{', '}}', "''", '==', '<ref')
    assert not [s for s in sentences if any(m in s for m in markup) or s[0] in text.WIKI_MARKUP_STARTS]
    assert any(s.startswith('Autism is a neurodevelopmental disorder') for s in sentences)


class FixedPermutation:
    def __init__(self, order):
        self.order = np.array(order)

    def permutation(self, n):
        return self.order


def test_pretrained_minilm_scores():
    """The fast version of the benchmark on the released MiniLM: measured Lee Spearman 50.4 (mean pooling, 128 tokens)
    and 100% retrieval of 48 half-deleted sentences; a random-init BERT scores ~10 and ~40 (the smoke run below).
    Loose thresholds."""
    overrides = ['eval.max_sentences=48', "eval.poolings=('mean',)"]
    config = load_config(f'{CONFIG}:runlocal', overrides)
    pretrained = mirror_bert.Method(config)
    params, _ = pretrained.init(jax.random.key(0), pretrained.example_batch(1))
    scores = pretrained.evaluate(params, {}, None)
    assert scores['lee_spearman/mean'] > 40 and scores['duplicate_top1/mean'] > 90


def test_benchmark_reports_before_and_after(tmp_path):
    spec = importlib.util.spec_from_file_location('mirror_bert_sts', os.path.join('benchmarks', 'mirror_bert_sts.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    overrides = ['model.pretrained=', 'model.variant=micro', 'input.global_batch=8', 'input.max_len=16']
    overrides += ['train.steps=1', 'eval.max_len=32', 'eval.max_sentences=8', "eval.poolings=('mean',)"]
    overrides += ['train.tensorboard=false', 'checkpoint.async_save=false']
    args = ['--config', f'{CONFIG}:runlocal', '--workdir', str(tmp_path), *(f'--config.{o}' for o in overrides)]
    result = module.main(args)
    assert result['steps'] == 1 and set(result['before']) == set(result['after'])
    assert set(result['before']) == {'lee_spearman/mean', 'duplicate_top1/mean'}
    assert json.loads((tmp_path / 'sts_comparison.json').read_text())['after'] == result['after']


# --- the trainer --------------------------------------------------------------------------------------------------
def smoke_config(**overrides):
    items = ['train.steps=2', 'train.tensorboard=false', 'checkpoint.async_save=false', 'train.log_every=1']
    return tiny_config(*items, *(f'{k}={v}' for k, v in overrides.items()))


@pytest.fixture(scope='module')
def single_device_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('mirror_bert') / 'run')
    summary, state = train.train(smoke_config(**{'mesh.data': 1}), workdir)
    return summary, jax.device_get(state), workdir


def test_runlocal_trains_and_evaluates(single_device_run):
    summary, _, workdir = single_device_run
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    losses = [r['loss'] for r in rows if 'loss' in r]
    # 16 views: the loss starts near log(15), the uniform guess among the 2B - 1 candidates.
    assert len(losses) == 2 and all(np.isfinite(losses)) and 0 < losses[0] < 2 * np.log(15)
    evaluation = {k.removeprefix('final_eval/') for k in summary if k.startswith('final_eval/')}
    assert evaluation == {f'{m}/{p}' for m in ('lee_spearman', 'duplicate_top1') for p in ('cls', 'mean')}


@pytest.mark.slow
def test_sharded_run_matches_one_device(tmp_path, single_device_run):
    want_summary, want_state, _ = single_device_run
    summary, state = train.train(smoke_config(**{'mesh.data': 8, 'eval.at_end': 'false'}), str(tmp_path / 'sharded'))
    assert summary['final_loss'] == pytest.approx(want_summary['final_loss'], rel=1e-4)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    jax.tree.map(close, jax.device_get(state['params']), want_state['params'])
