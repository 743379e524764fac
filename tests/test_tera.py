"""TERA: the alteration policy against a transcription of s3prl's task.py, the masked L1 against torch, the model
against transformers' BERT blocks with s3prl's input layer and head, and a run on the one trainer."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from sharded_runs import assert_sharded_matches_one_device

from jaxssl.config import ConfigError, load_config
from jaxssl.data import audio
from jaxssl.methods import tera
from jaxssl.models import tera as tera_model
from jaxssl.models import vit

ALTERATION = ml_collections.ConfigDict(
    dict(time_proportion=0.15, span_min=7, span_max=7, max_freq_proportion=0.2, noise_probability=0.15, noise_std=0.2)
)


def reference_alteration(spec, rng, config):
    """task.py generate_masked_acoustic_model_data's per-utterance body for one utterance (overlap allowed), with
    python's random / torch.randperm draws taken from `rng` in the same order."""
    spec_masked = spec.copy()
    mask_label = np.zeros(spec.shape, np.uint8)
    spec_len = int((spec.sum(axis=-1) != 0).sum())

    def _starts_to_intervals(starts, consecutive):
        return (np.tile(starts, (consecutive, 1)).T + np.arange(consecutive)).reshape(-1)

    mask_consecutive = int(rng.integers(config['mask_consecutive_min'], config['mask_consecutive_max'] + 1))
    valid_start_max = max(spec_len - mask_consecutive - 1, 0)
    proportion = round(spec_len * config['mask_proportion'] / mask_consecutive)
    chosen_starts = rng.permutation(valid_start_max + 1)[:proportion]
    chosen_intervals = _starts_to_intervals(chosen_starts, mask_consecutive)
    dice = rng.random()
    if dice < 0.8:
        spec_masked[chosen_intervals, :] = 0
    elif dice >= 0.8 and dice < 0.9:
        random_starts = rng.permutation(valid_start_max + 1)[:proportion]
        random_intervals = _starts_to_intervals(random_starts, mask_consecutive)
        spec_masked[chosen_intervals, :] = spec_masked[random_intervals, :]
    mask_label[chosen_intervals, :] = 1
    max_width = int(spec_masked.shape[1] * config['mask_frequency'])
    rand_bandwidth = int(rng.integers(0, max_width + 1))
    chosen_starts = rng.permutation(spec_masked.shape[1] - rand_bandwidth)[:1]
    chosen_intervals = _starts_to_intervals(chosen_starts, rand_bandwidth)
    spec_masked[:, chosen_intervals] = 0
    mask_label[:spec_len, chosen_intervals] = 1
    return spec_masked, mask_label.astype(bool)


def test_alteration_equals_the_reference_policy():
    reference_config = dict(mask_consecutive_min=7, mask_consecutive_max=7, mask_proportion=0.15, mask_frequency=0.2)
    dice_outcomes = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        length = int(rng.integers(20, 60))
        spec = np.zeros((64, 80), np.float32)
        spec[:length] = rng.normal(size=(length, 80))
        want_spec, want_mask = reference_alteration(spec, np.random.default_rng([seed, 1]), reference_config)
        got = tera.alter(spec, np.random.default_rng([seed, 1]), ALTERATION)
        np.testing.assert_array_equal(got['altered'], want_spec)
        mask = tera.target_mask(jnp.asarray(spec)[None], got['time_mask'][None], got['freq_mask'][None])[0]
        np.testing.assert_array_equal(mask, want_mask)
        # Which of zero / replace / keep the die chose: altered frames zero, equal to the input, or other frames.
        frames = got['time_mask']
        bins = ~got['freq_mask']
        if not got['altered'][frames][:, bins].any():
            dice_outcomes.add('zero')
        elif np.array_equal(got['altered'][frames][:, bins], spec[frames][:, bins]):
            dice_outcomes.add('keep')
        else:
            dice_outcomes.add('replace')
    assert dice_outcomes == {'zero', 'replace', 'keep'}


def test_masked_l1_is_torch_l1_over_masked_select():
    rng = np.random.default_rng(0)
    prediction, target = rng.normal(size=(2, 3, 10, 8)).astype(np.float32)
    mask = rng.random((3, 10, 8)) < 0.3
    want = torch.nn.L1Loss()(torch.tensor(prediction).masked_select(torch.tensor(mask)),
                             torch.tensor(target).masked_select(torch.tensor(mask)))  # fmt: skip
    np.testing.assert_allclose(tera.masked_l1(prediction, target, mask), float(want), rtol=1e-6)


def test_model_matches_bert_blocks_with_s3prl_input_and_head():
    """s3prl's TransformerModel + SpecHead is BERT's post-norm encoder between a spectrogram input layer and a
    prediction head: built here from transformers' BertEncoder and torch layers, with our weights copied in."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEncoder

    model = tera_model.make_model('micro', out_dim=16, dropout=0.0, attention_dropout=0.0)
    frames = np.random.default_rng(0).normal(size=(2, 12, 16)).astype(np.float32)
    frames[1, 9:] = 0  # the second utterance has 9 frames
    valid = audio.frame_lengths(frames)[:, None] > np.arange(12)
    params = tera_model.init_params(model, jax.random.key(0), jnp.asarray(frames), jnp.asarray(valid))
    kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(params) if 'kernel' in jax.tree_util.keystr(path)]
    assert len(kernels) == 15 and all(abs(np.std(k) - 0.02) < 0.004 for k in kernels)  # s3prl: N(0, 0.02) for all
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)  # biases too
    prediction, hidden = model.apply({'params': params}, frames, valid)

    t = lambda x: torch.tensor(np.asarray(x))
    dense = lambda p: (t(p['kernel']).T, t(p['bias']))
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                        layer_norm_eps=1e-12, hidden_act='gelu', attn_implementation='eager')  # fmt: skip
    encoder = BertEncoder(config).eval()
    state = {}
    for i in range(2):
        p, layer = params[f'layers_{i}'], f'layer.{i}'
        names = {'attention.self.query': p['attention']['query'], 'attention.self.key': p['attention']['key'],
                 'attention.self.value': p['attention']['value'], 'attention.output.dense': p['attention']['output'],
                 'intermediate.dense': p['intermediate'], 'output.dense': p['output']}  # fmt: skip
        for name, value in names.items():
            state[f'{layer}.{name}.weight'], state[f'{layer}.{name}.bias'] = dense(value)
        for name, value in (
            ('attention.output.LayerNorm', p['attention_norm']),
            ('output.LayerNorm', p['output_norm']),
        ):
            state[f'{layer}.{name}.weight'], state[f'{layer}.{name}.bias'] = t(value['scale']), t(value['bias'])
    encoder.load_state_dict(state)

    def linear(p):
        weight, bias = dense(p)
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.weight.data, layer.bias.data = weight, bias
        return layer

    def layer_norm(p):
        norm = torch.nn.LayerNorm(p['scale'].shape[0], eps=1e-12)
        norm.weight.data, norm.bias.data = t(p['scale']), t(p['bias'])
        return norm

    with torch.no_grad():
        x = linear(params['spec_transform'])(t(frames)) + t(vit.sinusoid_table(12, 64))
        x = layer_norm(params['input_norm'])(x)
        extended = (1.0 - t(valid).float()[:, None, None, :]) * -10000.0  # s3prl's attention mask
        x = encoder(x, attention_mask=extended)[0]
        y = torch.nn.functional.gelu(linear(params['head_dense'])(x))
        y = linear(params['head_out'])(layer_norm(params['head_norm'])(y))
    np.testing.assert_allclose(np.asarray(hidden)[valid], x.numpy()[valid], atol=2e-5)
    np.testing.assert_allclose(np.asarray(prediction)[valid], y.numpy()[valid], atol=2e-5)


def test_padding_frames_do_not_change_the_utterance():
    method = tera.Method(load_config('configs/tera.py:runlocal'))
    frames = np.random.default_rng(0).normal(size=(1, 100, 80)).astype(np.float32)
    frames[:, 60:] = 0
    params, _ = method.init(jax.random.key(0), {'spectrogram': jnp.asarray(frames)})
    padded = method.represent(params, {}, {'spectrogram': jnp.asarray(frames)})
    unpadded = method.represent(params, {}, {'spectrogram': jnp.asarray(frames[:, :60])})
    np.testing.assert_allclose(padded['mean_pool'], unpadded['mean_pool'], atol=1e-5)
    np.testing.assert_allclose(padded['tokens'][:, :60], unpadded['tokens'], atol=1e-5)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r'input\.features'):
        load_config('configs/tera.py:runlocal', ['input.features=kaldi_fbank'])
    with pytest.raises(ConfigError, match=r'alteration\.span_min'):
        load_config('configs/tera.py:runlocal', ['alteration.span_min=0'])
    with pytest.raises(ConfigError, match=r'model\.variant'):
        load_config('configs/tera.py:runlocal', ['model.variant=large'])
    config = load_config('configs/tera.py:variant=slim')
    assert tera.Method(config).model.depth == 12 and config.input.target_length == 1500


def test_runlocal_sharded_matches_one_device_and_probes(tmp_path):
    summary, _ = assert_sharded_matches_one_device('configs/tera.py:runlocal', tmp_path)
    assert 0.0 <= summary['final_eval/label/mean_pool/knn'] <= 1.0
