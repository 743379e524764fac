"""EnCodec 24 kHz (MERT's acoustic teacher): the encoder and residual VQ against transformers' EncodecModel with
converted weights, both checkpoint layouts, the converter's CLI and refusals, and MERT labelling with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxssl.config import ConfigError, load_config
from jaxssl.methods import mert as mert_method
from jaxssl.models import encodec, encodec_weights


@pytest.fixture(scope='module')
def reference():
    """A random transformers EncodecModel (24 kHz config) with non-trivial weight-norm gains, LSTM biases and
    codebooks."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    model = EncodecModel(EncodecConfig()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('original0') or name.endswith('weight_g'):
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            if 'lstm.bias' in name:
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith('codebook.embed'):
                b.normal_(0, 1)
    return model


def package_layout(state):
    """transformers' key names -> the encodec package's (encoder.model.i.conv.conv.weight_g, quantizer.vq.layers.k.
    _codebook.embed)."""
    out = {}
    for key, value in state.items():
        key = key.replace('parametrizations.weight.original0', 'weight_g').replace(
            'parametrizations.weight.original1', 'weight_v'
        )
        if key.startswith('encoder.'):
            key = key.replace('encoder.layers.', 'encoder.model.').replace('.conv.', '.conv.conv.')
        key = key.replace('quantizer.layers.', 'quantizer.vq.layers.').replace('.codebook.', '._codebook.')
        out[key] = value
    return out


@pytest.mark.parametrize('layout', ['transformers', 'encodec'])
def test_codes_equal_transformers(reference, layout):
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = encodec_weights.convert(package_layout(state) if layout == 'encodec' else state)
    assert params['codebooks'].shape == (32, 1024, 128)
    x = np.random.default_rng(0).normal(size=(2, 24000 - 77)).astype(np.float32) * 0.3
    with torch.no_grad():
        want_embeddings = reference.encoder(torch.from_numpy(x)[:, None]).numpy().transpose(0, 2, 1)
        want = reference.encode(torch.from_numpy(x)[:, None], bandwidth=6.0).audio_codes[0].numpy()
    embeddings = encodec.Encoder().apply({'params': params['encoder']}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(embeddings), want_embeddings, atol=1e-5 * np.abs(want_embeddings).max())
    codes = encodec.encode(params, jnp.asarray(x), encodec.codebooks_for_bandwidth(6.0))
    assert codes.shape == want.shape == (2, 8, encodec.codec_frames(24000 - 77))
    np.testing.assert_array_equal(np.asarray(codes), want)


def test_short_inputs_pad_as_transformers(reference):
    """Fewer samples than a layer's padding: transformers pads zeros before reflecting."""
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = encodec_weights.convert(state)
    x = np.random.default_rng(1).normal(size=(1, 700)).astype(np.float32)
    with torch.no_grad():
        want = reference.encoder(torch.from_numpy(x)[:, None]).numpy().transpose(0, 2, 1)
    got = encodec.Encoder().apply({'params': params['encoder']}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())


def test_converter_cli_and_mert_labels(reference, tmp_path):
    """A transformers folder converts through the CLI; MERT with teacher.kind=encodec labels each encoder frame
    with the codec's codes of the clean clip, and its loss runs."""
    folder, out = tmp_path / 'hf', tmp_path / 'converted'
    reference.save_pretrained(folder)
    assert encodec_weights.main([str(folder), str(out)]) == 0
    assert encodec_weights.main([str(folder), str(out)]) == 2  # refuses to overwrite
    config = load_config(
        'configs/mert.py:runlocal',
        ['teacher.kind=encodec', f'teacher.path={out}', 'mixture.prob=1.0', 'input.max_samples=4000'],
    )
    method = mert_method.Method(config)
    assert method.model.codebook_sizes == (1028,) * 8  # + fairseq's 4 special symbols
    batch = jax.tree.map(jnp.asarray, method.example_batch(4))
    assert 'labels' not in batch
    params, extra = method.init(jax.random.key(0), batch)
    labels = method.teacher_labels(extra, batch)
    frames = batch['time_mask'].shape[1]
    with torch.no_grad():
        want = reference.encode(torch.from_numpy(np.array(batch['waveform']))[:, None], bandwidth=6.0)
    np.testing.assert_array_equal(np.asarray(labels), want.audio_codes[0].numpy()[:, :, :frames])
    loss, (metrics, _) = jax.jit(method.loss)(params, extra, batch, jax.random.key(1), 0)
    assert np.isfinite(float(loss)) and len([k for k in metrics if k.startswith('accuracy_')]) == 8
    # the teacher's labels come from the clean clips: mixing noise in does not change them
    assert (np.asarray(method.teacher_labels(extra, batch)) == np.asarray(labels)).all()


def test_refusals(reference, tmp_path):
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    with pytest.raises(ValueError, match='missing tensor'):
        encodec_weights.convert({k: v for k, v in state.items() if 'lstm.weight_hh_l1' not in k})
    with pytest.raises(ValueError, match='unexpected tensors'):
        encodec_weights.convert({**state, 'encoder.layers.16.conv.bias': np.zeros(3)})
    with pytest.raises(ValueError, match='24 kHz'):
        encodec_weights.check_config({'sampling_rate': 48000, 'audio_channels': 2})
    with pytest.raises(ConfigError, match=r'teacher\.path'):
        mert_method.Method(load_config('configs/mert.py'))  # the default needs converted weights
    assert encodec.codebooks_for_bandwidth(6.0) == 8 and encodec.codebooks_for_bandwidth(24.0) == 32
