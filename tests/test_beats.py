"""BEATs: the backbone against a torch transcription of the reference's BEATs.py / backbone.py (converted weights by
the reference's names, padding included), the relative position buckets, DeepNorm's init, the layer-wise gradient
decay, the random-projection tokenizer, masks, the front end, the visible-only encoding, and a run on the one
trainer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sharded_runs import assert_sharded_matches_one_device
from test_audio import knf_fbank

from jaxssl.config import ConfigError, load_config
from jaxssl.data import audio
from jaxssl.methods import beats
from jaxssl.models import beats as beats_model
from jaxssl.models import beats_weights


# --- a torch transcription of the reference's backbone, written from its equations ----------------------------------
def torch_buckets(relative, num_buckets, max_distance):
    half = num_buckets // 2
    out = (relative > 0).long() * half
    distance = relative.abs()
    max_exact = half // 2
    large = (
        max_exact
        + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)).long()
    )
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return out + torch.where(distance < max_exact, distance, large)


class TorchAttention(torch.nn.Module):
    def __init__(self, width, heads, first, buckets, max_distance):
        super().__init__()
        self.heads, self.buckets, self.max_distance = heads, buckets, max_distance
        for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
            setattr(self, name, torch.nn.Linear(width, width))
        self.grep_linear = torch.nn.Linear(width // heads, 8)
        self.grep_a = torch.nn.Parameter(torch.rand(1, heads, 1, 1) + 0.5)
        if first:
            self.relative_attention_bias = torch.nn.Embedding(buckets, heads)

    def forward(self, x, padding, bias):
        b, n, d = x.shape
        h, hd = self.heads, d // self.heads
        scaling, alpha = hd**-0.5, 32
        split = lambda t: t.view(b, n, h, hd).transpose(1, 2)  # (b, h, n, hd)
        q = split(self.q_proj(x) * scaling / alpha)
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        logits = q @ k.transpose(-1, -2)
        logits = (logits - logits.max(dim=-1, keepdim=True)[0]) * alpha  # the reference's rescaled logits
        logits = logits.masked_fill(padding[:, None, None, :], float('-inf'))
        if bias is None:
            position = torch.arange(n)
            bias = self.relative_attention_bias(torch_buckets(position[None] - position[:, None], self.buckets,
                                                              self.max_distance)).permute(2, 0, 1)  # fmt: skip
        gates = torch.sigmoid(self.grep_linear(q * alpha / scaling).view(b, h, n, 2, 4).sum(-1))
        gate_a, gate_b = gates.chunk(2, dim=-1)
        logits = logits + (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias[None]
        out = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out), bias


class TorchLayer(torch.nn.Module):
    def __init__(self, width, heads, mlp, depth, first, buckets, max_distance):
        super().__init__()
        self.self_attn = TorchAttention(width, heads, first, buckets, max_distance)
        self.self_attn_layer_norm = torch.nn.LayerNorm(width)
        self.fc1, self.fc2 = torch.nn.Linear(width, mlp), torch.nn.Linear(mlp, width)
        self.final_layer_norm = torch.nn.LayerNorm(width)
        self.alpha = (2 * depth) ** 0.25

    def forward(self, x, padding, bias):
        y, bias = self.self_attn(x, padding, bias)
        x = self.self_attn_layer_norm(x * self.alpha + y)
        y = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        return self.final_layer_norm(x * self.alpha + y), bias


class TorchBEATs(torch.nn.Module):
    def __init__(self, embed, width, depth, heads, mlp, kernel, groups, buckets=320, max_distance=800):
        super().__init__()
        self.patch_embedding = torch.nn.Conv2d(1, embed, 16, 16, bias=False)
        self.layer_norm = torch.nn.LayerNorm(embed)
        self.post_extract_proj = torch.nn.Linear(embed, width)
        self.encoder = torch.nn.Module()
        conv = torch.nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=groups)
        self.encoder.pos_conv = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(conv, dim=2))
        self.encoder.layer_norm = torch.nn.LayerNorm(width)
        self.encoder.layers = torch.nn.ModuleList(
            TorchLayer(width, heads, mlp, depth, i == 0, buckets, max_distance) for i in range(depth)
        )
        self.kernel = kernel
        with torch.no_grad():  # non-trivial norms and biases, so the test sees every parameter
            for name, p in self.named_parameters():
                if name.endswith('bias') or 'layer_norm' in name:
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, fbank, padding):
        x = self.patch_embedding(fbank[:, None])
        x = self.post_extract_proj(self.layer_norm(x.flatten(2).transpose(1, 2)))
        x = x.masked_fill(padding[..., None], 0.0)
        conv = self.encoder.pos_conv(x.transpose(1, 2))
        if self.kernel % 2 == 0:
            conv = conv[:, :, :-1]  # SamePad
        x = self.encoder.layer_norm(x + torch.nn.functional.gelu(conv).transpose(1, 2))
        bias = None
        for layer in self.encoder.layers:
            x, bias = layer(x, padding, bias)
        return x


def test_relative_position_buckets_known_answers():
    # Offsets below 80 exact, then 80 log-spaced buckets up to 800, half the 320 buckets for each sign:
    # 80 + int(80 log10(400 / 80)) = 135.
    forwards = beats_model.relative_position_buckets(1, 2001, 320, 800)[0]  # key - query = 0 ... 2000
    assert forwards[[0, 1, 79, 80, 400, 800, 2000]].tolist() == [0, 161, 239, 240, 295, 319, 319]
    backwards = beats_model.relative_position_buckets(2001, 1, 320, 800)[:, 0]  # key - query = 0 ... -2000
    assert backwards[[0, 1, 79, 80, 400, 800]].tolist() == [0, 1, 79, 80, 135, 159]
    position = torch.arange(1200)
    want = torch_buckets(position[None] - position[:, None], 320, 800).numpy()
    np.testing.assert_array_equal(beats_model.relative_position_buckets(1200, 1200, 320, 800), want)


@pytest.fixture(scope='module')
def torch_and_flax():
    torch.manual_seed(0)
    sizes = dict(embed=32, width=64, depth=2, heads=4, mlp=128, kernel=16, groups=4)
    reference = TorchBEATs(**sizes).eval()
    fields = dict(
        embed_dim=32,
        width=64,
        depth=2,
        heads=4,
        mlp=128,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        num_buckets=320,
        max_distance=800,
        deep_norm=True,
        gated_relative_position=True,
    )
    model = beats_weights.make_backbone_from_fields(fields)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    return reference, model, beats_weights.torch_to_flax(state, depth=2)


def test_backbone_matches_the_reference_transcription(torch_and_flax):
    reference, model, params = torch_and_flax
    rng = np.random.default_rng(0)
    fbank = rng.normal(0, 0.5, (2, 96, 64)).astype(np.float32)
    fbank[1, 48:] = 0.0  # the second clip: 3 of 6 time patches padding
    valid = np.asarray(beats_model.token_valid(jnp.asarray(fbank)))
    assert valid[0].all() and valid[1].tolist() == [True] * 12 + [False] * 12  # time-major: 4 frequency patches
    cut = fbank.copy()
    cut[1, 50:] = 0.0  # 50 frames: the 4th time patch is cut by the padding and left out, as the reference's conv
    assert np.asarray(beats_model.token_valid(jnp.asarray(cut)))[1].tolist() == [True] * 12 + [False] * 12
    with torch.no_grad():
        want = reference(torch.from_numpy(fbank), torch.from_numpy(~valid)).numpy()
    got, _ = model.apply({'params': params}, jnp.asarray(fbank))
    got = np.asarray(got)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1, :12], want[1, :12], rtol=1e-4, atol=1e-4)  # padding tokens' outputs are unused


def test_converter_reads_the_old_weight_norm_names(torch_and_flax):
    reference, _, params = torch_and_flax
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    state['encoder.pos_conv.0.weight_g'] = state.pop('encoder.pos_conv.0.parametrizations.weight.original0')
    state['encoder.pos_conv.0.weight_v'] = state.pop('encoder.pos_conv.0.parametrizations.weight.original1')
    jax.tree.map(np.testing.assert_array_equal, beats_weights.torch_to_flax(state, depth=2), params)
    del state['encoder.pos_conv.0.weight_g']
    with pytest.raises(KeyError, match='pos_conv'):
        beats_weights.torch_to_flax(state, depth=2)
    with pytest.raises(ValueError, match='layer_norm_first'):
        beats_weights.read_config({'layer_norm_first': True})


def test_deep_norm_init_and_layer_gradient_decay():
    model = beats_model.make_backbone('micro', layer_grad_decay=0.5)
    spectrogram = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 64)), jnp.float32)
    params = model.init(jax.random.key(0), spectrogram)['params']
    layer = params['encoder']['layers_0']
    beta = (8 * 2) ** -0.25  # DeepNorm's gain for depth 2
    attention = layer['self_attn']
    kernels = {
        'q': (attention['q_proj'], 1.0), 'k': (attention['k_proj'], 1.0), 'v': (attention['v_proj'], beta),
        'out': (attention['out_proj'], beta), 'fc1': (layer['fc1'], beta), 'fc2': (layer['fc2'], beta),
    }  # fmt: skip
    for name, (dense, gain) in kernels.items():
        kernel = np.asarray(dense['kernel'])
        std = gain * (2 / sum(kernel.shape)) ** 0.5  # torch's xavier_normal_: fan_in + fan_out
        np.testing.assert_allclose(np.std(kernel), std, rtol=0.05, err_msg=name)
        assert np.abs(kernel).max() > 3 * std, name  # not truncated (4,096+ draws)
        assert np.all(dense['bias'] == 0), name
    np.testing.assert_allclose(np.std(params['encoder']['relative_attention_bias']), 0.02, rtol=0.1)  # init_bert_params
    np.testing.assert_allclose(np.std(attention['grep_linear']['kernel']), 0.02, rtol=0.25)  # 128 draws
    assert np.all(attention['grep_a'] == 1)

    def grads(decay):
        m = beats_model.make_backbone('micro', layer_grad_decay=decay)
        loss = lambda p: jnp.sum(m.apply({'params': p}, spectrogram)[0] ** 2)
        return jax.jit(jax.grad(loss))(params)

    plain, decayed = grads(1.0), grads(0.5)
    ratio = lambda path: np.linalg.norm(path(decayed)) / np.linalg.norm(path(plain))
    # The gradient is halved on entering each block from above: the top block's parameters keep theirs, block 0's
    # get half, everything below block 0 a quarter; the forward pass is the same.
    np.testing.assert_allclose(ratio(lambda g: g['encoder']['layers_1']['fc1']['kernel']), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ratio(lambda g: g['encoder']['layers_0']['fc1']['kernel']), 0.5, rtol=1e-5)
    np.testing.assert_allclose(ratio(lambda g: g['patch_embedding']['kernel']), 0.25, rtol=1e-5)
    # Forward exactly the same, in bf16 too (the reference's GradMultiply returns x).
    for dtype in (jnp.float32, jnp.bfloat16):
        models = [beats_model.make_backbone('micro', dtype, layer_grad_decay=d) for d in (1.0, 0.6)]
        outputs = [m.apply({'params': params}, spectrogram)[0] for m in models]
        np.testing.assert_array_equal(*outputs)


def test_tokenizer_is_the_nearest_codebook_vector_of_the_projected_patch():
    projection, codebook = beats.random_projection_tokenizer(256, 16, 50, seed=3)
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=1), 1.0, rtol=1e-6)
    assert np.abs(projection).max() <= np.sqrt(6 / (256 + 16))
    patches = np.random.default_rng(0).normal(0, 0.5, (3, 7, 256)).astype(np.float32)
    projected = patches @ projection
    distances = ((projected[..., None, :] - codebook) ** 2).sum(-1)
    got = beats.tokenize(jnp.asarray(patches), jnp.asarray(projection), jnp.asarray(codebook))
    np.testing.assert_array_equal(got, distances.argmin(-1))
    again, _ = beats.random_projection_tokenizer(256, 16, 50, seed=3)
    np.testing.assert_array_equal(again, projection)  # frozen: the seed redraws the same tokenizer


def test_patchify_order_is_the_tokens_time_major_order():
    spectrogram = np.random.default_rng(0).normal(size=(1, 48, 32)).astype(np.float32)
    patches = np.asarray(beats.patchify(jnp.asarray(spectrogram)))
    assert patches.shape == (1, 6, 256)
    for t in range(3):
        for f in range(2):
            want = spectrogram[0, 16 * t : 16 * t + 16, 16 * f : 16 * f + 16].ravel()
            np.testing.assert_array_equal(patches[0, 2 * t + f], want)


@pytest.fixture(scope='module')
def method():
    return beats.Method(load_config('configs/beats.py:runlocal'))


def test_masks_split_the_patches_in_time_order(method):
    sample = method.sample_transform({}, np.random.default_rng(0))
    visible, masked = sample['visible_idx'], sample['masked_idx']
    assert (len(visible), len(masked)) == (6, 18)  # 24 patches of 96 frames x 64 bins, 75% masked
    assert (np.diff(visible) > 0).all() and (np.diff(masked) > 0).all()
    assert sorted(np.concatenate([visible, masked]).tolist()) == list(range(24))


def test_masked_patches_are_hidden_from_the_model_and_the_loss_is_their_cross_entropy(method):
    batch = jax.tree.map(jnp.asarray, method.example_batch(2))
    params, extra = method.init(jax.random.key(0), batch)
    apply = lambda spectrogram: method.model.apply(
        {'params': params}, spectrogram, batch['visible_idx'], batch['masked_idx']
    )
    logits = np.asarray(apply(batch['spectrogram']))
    patches = np.asarray(beats.patchify(batch['spectrogram']))
    time_patch, freq_patch = np.divmod(np.asarray(batch['masked_idx'][0]), 4)
    changed = np.asarray(batch['spectrogram']).copy()
    for t, f in zip(time_patch, freq_patch, strict=True):  # new values in every masked patch of clip 0
        changed[0, 16 * t : 16 * t + 16, 16 * f : 16 * f + 16] += 1.0
    np.testing.assert_allclose(apply(jnp.asarray(changed)), logits, atol=1e-6)
    t, f = divmod(int(batch['visible_idx'][0, 0]), 4)
    changed[0, 16 * t : 16 * t + 16, 16 * f : 16 * f + 16] += 1.0
    assert np.abs(np.asarray(apply(jnp.asarray(changed)))[0] - logits[0]).max() > 1e-3

    labels = (patches @ method.projection @ method.codebook.T).argmax(-1)  # unit codebook: the largest dot product
    labels = np.take_along_axis(labels, np.asarray(batch['masked_idx']), axis=1)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(log_p, labels[..., None], axis=-1).mean()
    loss, (metrics, _) = method.loss(params, extra, batch, jax.random.key(1), 0)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics['accuracy'], np.mean(logits.argmax(-1) == labels), rtol=1e-6)
    assert metrics['codes_used'] == len(np.unique(labels))

    # Padding: clip 1 ends after 40 frames, so its last 4 of 6 time patches (16 tokens) are padding; they leave the
    # loss, the accuracy and the code count.
    padded = np.asarray(batch['spectrogram']).copy()
    padded[1, 40:] = 0.0
    batch = {**batch, 'spectrogram': jnp.asarray(padded)}
    logits = np.asarray(apply(batch['spectrogram']))
    labels = (np.asarray(beats.patchify(batch['spectrogram'])) @ method.projection @ method.codebook.T).argmax(-1)
    labels = np.take_along_axis(labels, np.asarray(batch['masked_idx']), axis=1)
    valid = np.asarray(beats_model.token_valid(batch['spectrogram']))
    keep = np.take_along_axis(valid, np.asarray(batch['masked_idx']), axis=1)
    assert 0 < keep[1].sum() < keep.shape[1] and keep[0].all()
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    loss, (metrics, _) = method.loss(params, extra, batch, jax.random.key(1), 0)
    np.testing.assert_allclose(loss, nll[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics['accuracy'], np.mean((logits.argmax(-1) == labels)[keep]), rtol=1e-6)
    assert metrics['codes_used'] == len(np.unique(labels[keep]))


def test_beats_fbank_is_kaldi_on_16_bit_samples_normalised_before_the_padding():
    rng = np.random.default_rng(0)
    waveform = audio.synthesize_word(3, rng)[:12000]
    want = knf_fbank(waveform * 2**15, 64, 'povey')
    config = load_config('configs/beats.py:runlocal').input
    got = audio.beats_fbank(waveform, config)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=5e-4)
    example = audio.spectrogram(waveform, config)
    frames = len(want)  # 73 of the 96
    np.testing.assert_allclose(example[:frames], (want - 19.418411) / (2 * 3.3530111), rtol=1e-3, atol=1e-3)
    assert not example[frames:].any() and audio.frame_lengths(example) == frames
    base = load_config('configs/beats.py').input
    assert (base.window, base.num_mel_bins, base.target_length) == ('povey', 128, 992)
    assert (base.norm_mean, base.norm_std) == audio.BEATS_STATS


def test_built_in_statistics_are_the_measured_ones():
    config = load_config('configs/beats.py:runlocal')
    mean, std = audio.fbank_stats(config, max_examples=200)
    np.testing.assert_allclose((mean, std), audio.SYNTHETIC_WORDS_BEATS_STATS, atol=0.1)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r'input\.features'):
        load_config('configs/beats.py:runlocal', ["input.features='kaldi_fbank'"])
    with pytest.raises(ConfigError, match=r'input\.target_length'):
        load_config('configs/beats.py:runlocal', ['input.target_length=100'])
    with pytest.raises(ConfigError, match=r'masking\.ratio'):
        load_config('configs/beats.py:runlocal', ['masking.ratio=0.99'])
    with pytest.raises(ConfigError, match=r'model\.predictor_depth'):
        load_config('configs/beats.py:runlocal', ['model.predictor_depth=0'])
    config = load_config('configs/beats.py')
    assert beats.num_tokens(config) == 496  # 62 x 8 patches of a 10 s clip, as the reference
    assert beats.Method(config).num_kept == 124


def test_runlocal_sharded_matches_one_device_and_probes(tmp_path):
    keys = ('loss', 'accuracy', 'codes_used')
    summary, _ = assert_sharded_matches_one_device('configs/beats.py:runlocal', tmp_path, keys=keys)
    for key in ('label/mean_pool/knn', 'label/raw/knn'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0


def test_released_tokenizer_converts_and_labels_as_the_reference(tmp_path):
    """A checkpoint in the released Tokenizer_iter*.pt layout ({'cfg', 'model'}, the micro sizes) -> a params
    directory (python -m jaxssl.models.beats_weights) -> BEATs pretraining labels equal to the reference tokenizer's
    `extract_labels` (transcribed: quantize_layer, L2 normalisation, the nearest codebook row)."""
    torch.manual_seed(1)
    reference = TorchBEATs(embed=32, width=64, depth=2, heads=4, mlp=256, kernel=16, groups=4).eval()
    quantize_layer = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16))
    codebook = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    state = dict(reference.state_dict())
    state.update({f'quantize_layer.{k}': v for k, v in quantize_layer.state_dict().items()})
    state['quantize.embedding.weight'] = codebook
    cfg = dict(
        input_patch_size=16, embed_dim=32, conv_bias=False, encoder_layers=2, encoder_embed_dim=64,
        encoder_ffn_embed_dim=256, encoder_attention_heads=4, activation_fn='gelu', layer_norm_first=False,
        deep_norm=True, conv_pos=16, conv_pos_groups=4, relative_position_embedding=True, num_buckets=320,
        max_distance=800, gru_rel_pos=True, layer_wise_gradient_decay_ratio=0.6, quant_n=8, quant_dim=16,
    )  # fmt: skip
    torch.save({'cfg': cfg, 'model': state}, tmp_path / 'Tokenizer_iter3.pt')
    assert beats_weights.main([str(tmp_path / 'Tokenizer_iter3.pt'), str(tmp_path / 'tokenizer')]) == 0
    backbone_only = {k: v for k, v in state.items() if not k.startswith('quantize')}
    torch.save({'cfg': cfg, 'model': backbone_only}, tmp_path / 'BEATs_iter3.pt')
    assert beats_weights.main([str(tmp_path / 'BEATs_iter3.pt'), str(tmp_path / 'teacher')]) == 0
    assert beats.stored_variant(str(tmp_path / 'teacher'), '', 'teacher') == 'micro'
    assert beats_weights.main([str(tmp_path / 'missing.pt'), str(tmp_path / 'x')]) == 2
    with pytest.raises(ValueError, match='unknown layout'):  # a tensor the converter does not know is not dropped
        beats_weights.convert({'cfg': cfg, 'model': {**state, 'encoder.layers.0.self_attn.bias_k': torch.zeros(64)}})
    with pytest.raises(ValueError, match='unit vectors'):  # codes looked up by cosine must be unit rows
        beats_weights.convert({'cfg': cfg, 'model': {**state, 'quantize.embedding.weight': 2 * codebook}})

    overrides = ['tokenizer.kind=trained', f'tokenizer.path={tmp_path / "tokenizer"}', 'tokenizer.codebook_size=8',
                 'tokenizer.code_dim=16']  # fmt: skip
    method = beats.Method(load_config('configs/beats.py:runlocal', overrides))
    batch = jax.tree.map(jnp.asarray, method.example_batch(2))
    _, extra = method.init(jax.random.key(0), batch)
    fbank = torch.from_numpy(np.array(batch['spectrogram']))
    with torch.no_grad():
        z = torch.nn.functional.normalize(quantize_layer(reference(fbank, torch.zeros(2, 24, dtype=bool))), dim=-1)
        distance = (z**2).sum(-1, keepdim=True) + (codebook**2).sum(-1) - 2 * z @ codebook.T
    want = distance.argmin(-1).numpy()
    assert len(np.unique(want)) > 1
    np.testing.assert_array_equal(method.labels(extra, batch['spectrogram']), want)
