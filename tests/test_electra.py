"""ELECTRA: the generator and discriminator equal transformers' ElectraForMaskedLM / ElectraForPreTraining with
converted weights (shared embeddings, both projections), the replacements and their labels and the detection terms by
known answers, the discriminator's loss reaching the shared embeddings but not the generator, the generator sizes of
the released models, config errors, and a 2-step runlocal run sharded over 8 devices equal to one device with its
evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_language_model import randomise  # weights of a trained model's scale

from jaxssl import train
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import electra as electra_method
from jaxssl.models import bert, bert_weights, electra

CONFIG = 'configs/electra.py:runlocal'
VOCAB, LENGTH = 50, 9
TOKENS = np.random.default_rng(0).integers(5, VOCAB, (2, LENGTH)).astype(np.int32)
MASK = np.array([[1] * LENGTH, [1] * 6 + [0] * 3], np.int32)


def test_generator_and_discriminator_match_transformers():
    """Embeddings 16 wide, a 32-wide discriminator and an 8-wide generator: both project their embeddings."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, embedding_size=16, num_hidden_layers=2, max_position_embeddings=16)
    d_config = transformers.ElectraConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, **common)
    g_config = transformers.ElectraConfig(hidden_size=8, num_attention_heads=2, intermediate_size=32, **common)
    discriminator = randomise(transformers.ElectraForPreTraining(d_config))
    generator = randomise(transformers.ElectraForMaskedLM(g_config))
    generator.electra.embeddings.load_state_dict(discriminator.electra.embeddings.state_dict())  # one shared copy
    assert generator.generator_lm_head.weight is generator.electra.embeddings.word_embeddings.weight  # tied
    with torch.no_grad():
        ids, mask = torch.tensor(TOKENS).long(), torch.tensor(MASK)
        want_gen = generator(ids, attention_mask=mask).logits.numpy()
        want_disc = discriminator(ids, attention_mask=mask).logits.numpy()
    state = lambda m: {k: v.numpy() for k, v in m.state_dict().items()}
    params = bert_weights.electra_to_flax(state(discriminator), state(generator), 2, 2)

    encoder = lambda **kw: bert.BertEncoder(vocab_size=VOCAB, max_positions=16, embedding_size=16, **kw)
    model = electra.Electra(
        encoder(width=16, depth=0, heads=1, mlp=0),
        encoder(width=8, depth=2, heads=2, mlp=32),
        encoder(width=32, depth=2, heads=4, mlp=64),
    )
    positions = np.tile(np.arange(LENGTH), (2, 1))
    got_gen = model.apply({'params': params}, TOKENS, MASK, positions, method='generate')
    got_disc, _ = model.apply({'params': params}, TOKENS, MASK, method='discriminate')
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(got_gen)[real], want_gen[real], atol=5e-5)
    np.testing.assert_allclose(np.asarray(got_disc)[real], want_disc[real], atol=5e-5)
    # The standalone discriminator encoder (what pretraining leaves) gives the same hidden states.
    _, hidden = model.apply({'params': params}, TOKENS, MASK, method='discriminate')
    alone, _ = encoder(width=32, depth=2, heads=4, mlp=64).apply(
        {'params': electra.discriminator_params(params)}, TOKENS, MASK
    )
    np.testing.assert_allclose(alone, hidden, atol=1e-6)


def test_replacements_and_labels_known_answer():
    tokens = jnp.array([[1, 10, 11, 12, 13, 2, 0], [1, 20, 21, 2, 0, 0, 0]])
    mask = (tokens > 0).astype(jnp.int32)
    positions = jnp.array([[1, 3, 0], [2, 1, 4]])
    weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    samples = jnp.array([[30, 12, 31], [40, 41, 42]])  # 12 at position 3 is its own token; weight-0 slots unused
    fake, labels = electra_method.replace_tokens(tokens, positions, weights, samples, mask)
    np.testing.assert_array_equal(fake, [[1, 30, 11, 12, 13, 2, 0], [1, 20, 40, 2, 0, 0, 0]])
    np.testing.assert_array_equal(labels, [[0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0]])


def test_detection_terms_by_hand():
    logits = jnp.array([[2.0, -1.0, 0.5, -3.0], [-0.5, 1.5, 0.0, 4.0]])
    labels = jnp.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    got = jax.device_get(electra_method.detection_terms(logits, labels, mask))
    real = np.asarray(mask, bool)
    x, y = np.asarray(logits)[real], np.asarray(labels)[real]
    nll = -(y * np.log(1 / (1 + np.exp(-x))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-x))))
    assert got['loss'] == pytest.approx(nll.mean(), rel=1e-6)
    # Real tokens' predictions (logit > 0): [1, 0, 1, 0, 0, 1, 0]; labels [1, 0, 0, 0, 1, 1, 0].
    assert got['accuracy'] == pytest.approx(5 / 7) and got['tokens'] == 7
    assert got['precision'] == pytest.approx(2 / 3) and got['predicted'] == 3
    assert got['recall'] == pytest.approx(2 / 3) and got['replaced'] == 3


@pytest.fixture(scope='module')
def method_and_batch():
    method = electra_method.Method(load_config(CONFIG, ['model.dropout=0.0', 'model.attention_dropout=0.0']))
    tokens, mask = method.packed_rows
    batch = {'tokens': jnp.asarray(tokens[:4]), 'mask': jnp.asarray(mask[:4])}
    return method, batch, method.init(jax.random.key(0), batch)[0]


def test_losses_reach_only_their_models(method_and_batch):
    """The discriminator's loss trains the shared embeddings and the discriminator, never the generator's layers
    (the samples carry no gradient); the generator's loss leaves the discriminator alone."""
    method, batch, params = method_and_batch

    def term(p, weights):
        out = method.electra_terms(p, batch['tokens'], batch['mask'], jax.random.key(3), train=False)
        return weights[0] * out['generator']['loss'] + weights[1] * out['discriminator']['loss']

    grad = jax.jit(jax.grad(term))  # one compilation for both weightings
    gen_only, disc_only = grad(params, jnp.array([1.0, 0.0])), grad(params, jnp.array([0.0, 1.0]))
    norm = lambda tree: float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))
    for name in ('generator', 'generator_dense', 'generator_norm', 'output_bias'):
        assert norm(disc_only[name]) == 0.0, name
    assert norm(disc_only['embeddings']) > 0 and norm(disc_only['discriminator']) > 0
    for name in ('discriminator', 'discriminator_dense', 'discriminator_prediction'):
        assert norm(gen_only[name]) == 0.0, name
    assert norm(gen_only['embeddings']) > 0 and norm(gen_only['generator']) > 0


def test_terms_and_weighted_loss(method_and_batch):
    """The drawn positions are the reference's count, all [MASK]ed or kept (no random ids), the replacements are
    samples at exactly those positions, and the loss is 1 x generator + 50 x discriminator."""
    method, batch, params = method_and_batch
    out = jax.device_get(method.electra_terms(params, batch['tokens'], batch['mask'], jax.random.key(5), False))
    real = np.asarray(batch['mask']).sum()
    assert out['generator']['tokens'] == 4 * 7  # round(0.15 x 48) per full row
    assert out['discriminator']['tokens'] == real
    assert out['discriminator']['replaced'] <= out['generator']['tokens']
    want = out['generator']['loss'] + 50 * out['discriminator']['loss']
    assert out['loss'] == pytest.approx(want, rel=1e-6)
    assert out['generator']['loss'] == pytest.approx(np.log(method.tokenizer.vocab_size), rel=0.1)  # untrained


def test_rows_shorter_than_max_predictions(method_and_batch):
    """An evaluation at fewer tokens than max_predictions (large: 130 predictions, eval.max_len 128) draws at most a
    row's tokens."""
    method, batch, params = method_and_batch
    tokens, mask = batch['tokens'][:, :6], batch['mask'][:, :6]
    assert method.config.masking.max_predictions == 7
    out = jax.device_get(method.electra_terms(params, tokens, mask, jax.random.key(1), False))
    assert out['generator']['tokens'] == 4 * 1 and np.isfinite(out['loss'])  # round(0.15 x 6) = 1 a row


def test_generator_sizes_and_config_errors():
    assert electra.generator_shape('small', 0.25) == dict(width=64, depth=12, heads=1, mlp=256)
    assert electra.generator_shape('base', 1 / 3) == dict(width=256, depth=12, heads=4, mlp=1024)
    assert electra.generator_shape('large', 0.25) == dict(width=256, depth=24, heads=4, mlp=1024)
    small = load_config('configs/electra.py')
    assert small.masking.max_predictions == 19 and small.model.variant == 'small'  # int(0.155 x 128)
    large = load_config('configs/electra.py:variant=large')
    assert large.masking.max_predictions == 130 and large.masking.ratio == 0.25
    bad = [
        ('model.generator_size=0.0', 'model.generator_size'),
        ('model.generator_size=0.55', 'model.generator_size'),  # 35 wide: not a whole width over 2 heads
        ('model.temperature=0.0', 'model.temperature'),
        ("model.temperature='hot'", 'model.temperature'),
        ('loss.disc_weight=-1.0', 'loss.disc_weight'),
        ('masking.max_predictions=60', 'masking.max_predictions'),
        ("model.variant='huge'", 'model.variant'),
    ]
    for override, key in bad:
        with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
            load_config(CONFIG, [override])


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
            'generator_loss', 'generator_accuracy', 'sampled_accuracy', 'discriminator_loss',
            'discriminator_accuracy', 'discriminator_precision', 'discriminator_recall', 'word_order_pairs',
        )
    }  # fmt: skip
    assert evaluation == {'lee_spearman/mean', 'duplicate_top1/mean'} | held_out
    assert 0 <= summary['final_eval/held_out/word_order_pairs'] <= 1
    assert 0 < summary['final_eval/held_out/discriminator_accuracy'] <= 1
