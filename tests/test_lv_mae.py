"""LV-MAE: importance masks against a transcription of the reference's, the forward and loss against a torch
transcription of models_mae.py with the same weights, the windows and built-in sequences, and the runlocal recipe
sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sharded_runs import assert_sharded_matches_one_device

from jaxssl.config import ConfigError, load_config
from jaxssl.data import embeddings as embedding_data
from jaxssl.data.decode import DecodeError
from jaxssl.methods import lv_mae as lv_method
from jaxssl.models import lv_mae

CONFIG = 'configs/lv_mae.py:runlocal'


def reference_keep(window, ratio):
    """CombinedData's importance masking of one unpadded window (L, D): the kept indices, in kept order."""
    x = torch.from_numpy(window)
    similarity = torch.cat([torch.zeros(1), F.cosine_similarity(x[:-1], x[1:], dim=-1, eps=1e-8)])
    n_keep = int(len(window) * (1 - ratio))
    return torch.argsort(similarity)[:n_keep].numpy()


def test_importance_masks_equal_the_reference():
    config = load_config(CONFIG)
    method = lv_method.Method(config)
    rng = np.random.default_rng(0)
    t, d = config.input.max_len, config.input.embedding_dim
    lengths = np.array([2, 3, 7, 20, t])
    x = np.zeros((len(lengths), t, d), np.float32)
    for i, n in enumerate(lengths):
        x[i, :n] = rng.normal(size=(n, d))
    num_keep = (lengths * 0.5).astype(np.int32)
    batch = {'embeddings': jnp.asarray(x), 'length': jnp.asarray(lengths), 'num_keep': jnp.asarray(num_keep)}
    visible, valid, masked = method.masks(batch, jax.random.key(0))
    for i, n in enumerate(lengths):
        want = reference_keep(x[i, :n], 0.5)
        np.testing.assert_array_equal(np.asarray(visible[i])[np.asarray(valid[i])], want)
        assert np.asarray(masked[i]).sum() == n - len(want) and not np.asarray(masked[i, n:]).any()
    assert lv_method.min_segments(0.5) == 2 and lv_method.min_segments(0.7) == 4  # N (1 - r) >= 1
    # Random masks: the same counts, drawn among the window only.
    config = load_config(CONFIG, ['mask.type=random'])
    visible, valid, masked = lv_method.Method(config).masks(batch, jax.random.key(1))
    assert (np.asarray(visible)[np.asarray(valid)] < np.repeat(lengths, num_keep)).all()


# --- the model against a torch transcription of models_mae.py -------------------------------------------------------
class TorchBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6), torch.nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x, padded):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5
        attn = attn.masked_fill(padded[:, None, None, :], float('-inf')).softmax(dim=-1)
        x = x + self.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TorchLVMAE(torch.nn.Module):
    """MaskedAutoencoderViT.forward with the dataset's padded inputs (kept tokens in ids_shuffle order, zeros to T)."""

    def __init__(self, dim, depth, heads, dec_dim, dec_depth, dec_heads, max_len):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.from_numpy(lv_mae.position_table(max_len, dim))[None]
        self.blocks = torch.nn.ModuleList([TorchBlock(dim, heads) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = torch.nn.Linear(dim, dec_dim)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = torch.from_numpy(lv_mae.position_table(max_len, dec_dim))[None]
        self.decoder_blocks = torch.nn.ModuleList([TorchBlock(dec_dim, dec_heads) for _ in range(dec_depth)])
        self.decoder_norm = torch.nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = torch.nn.Linear(dec_dim, dim)

    def forward(self, padded, target, ids_shuffle, length, n_keep, mask):
        b, t, _ = padded.shape
        pos = torch.zeros_like(padded)
        for i in range(b):
            pos[i, : length[i]] = self.pos_embed[0, 1 : length[i] + 1][ids_shuffle[i, : length[i]]]
        x = torch.cat([self.cls_token.expand(b, -1, -1) + self.pos_embed[:, :1], padded + pos], dim=1)
        key_pad = torch.tensor([[False] * (k + 1) + [True] * (t - k) for k in n_keep])
        for block in self.blocks:
            x = block(x, key_pad)
        x = self.decoder_embed(self.norm(x))
        rows, key_pad = [], []
        for i in range(b):
            n, k = int(length[i]), int(n_keep[i])
            tokens = torch.cat([x[i, 1 : 1 + k], self.mask_token[0].expand(n - k, -1)])
            restore = torch.argsort(ids_shuffle[i, :n])
            tokens = torch.cat([x[i, :1], tokens[restore]]) + self.decoder_pos_embed[0, : n + 1]
            rows.append(torch.cat([tokens, torch.zeros(t - n, tokens.shape[1])]))
            key_pad.append([False] * (n + 1) + [True] * (t - n))
        x = torch.stack(rows)
        for block in self.decoder_blocks:
            x = block(x, torch.tensor(key_pad))
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


def load_into_torch(model, params, rng):
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    linear = lambda module, p: (module.weight.copy_(t(p['kernel']).T), module.bias.copy_(t(p['bias'])))
    norm = lambda module, p: (module.weight.copy_(t(p['scale'])), module.bias.copy_(t(p['bias'])))

    def blocks(modules, p):
        for i, block in enumerate(modules):
            q = p[f'block_{i:02d}']
            norm(block.norm1, q['norm1'])
            norm(block.norm2, q['norm2'])
            block.qkv.weight.copy_(t(q['attn']['qkv']['kernel']).T)
            # A random k bias: it shifts all of a query's logits alike, so the outputs must not change.
            k_bias = torch.from_numpy(rng.normal(size=q['attn']['q_bias'].shape).astype(np.float32))
            block.qkv.bias.copy_(torch.cat([t(q['attn']['q_bias']), k_bias, t(q['attn']['v_bias'])]))
            linear(block.proj, q['attn']['proj'])
            linear(block.fc1, q['mlp']['fc1'])
            linear(block.fc2, q['mlp']['fc2'])

    with torch.no_grad():
        model.cls_token.copy_(t(params['cls_token'])[None, None])
        model.mask_token.copy_(t(params['mask_token'])[None, None])
        blocks(model.blocks, params['encoder'])
        norm(model.norm, params['encoder']['norm'])
        linear(model.decoder_embed, params['decoder_embed'])
        blocks(model.decoder_blocks, params['decoder'])
        norm(model.decoder_norm, params['decoder']['norm'])
        linear(model.decoder_pred, params['decoder_pred'])


def test_forward_and_loss_equal_the_reference():
    config = load_config(CONFIG)
    method = lv_method.Method(config)
    rng = np.random.default_rng(1)
    t, d = config.input.max_len, config.input.embedding_dim
    lengths = np.array([2, 9, 17, t], np.int32)
    x = np.zeros((len(lengths), t, d), np.float32)
    for i, n in enumerate(lengths):
        window = rng.normal(size=(n, d))
        x[i, :n] = window / np.linalg.norm(window, axis=1, keepdims=True)
    num_keep = (lengths * 0.5).astype(np.int32)
    batch = {'embeddings': jnp.asarray(x), 'length': jnp.asarray(lengths), 'num_keep': jnp.asarray(num_keep)}
    params, _ = method.init(jax.random.key(0), batch)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    loss, _ = jax.jit(method.loss)(params, {}, batch, jax.random.key(3), 0)

    reference = TorchLVMAE(d, 2, 4, 32, 1, 4, t)
    load_into_torch(reference, params, rng)
    ids_shuffle = np.zeros((len(lengths), t), np.int64)
    padded, mask = np.zeros_like(x), np.zeros((len(lengths), t), np.float32)
    for i, n in enumerate(lengths):
        order = np.argsort(np.concatenate([[0.0], (x[i, 1:n] * x[i, : n - 1]).sum(-1)]), kind='stable')
        ids_shuffle[i, :n] = order
        padded[i, : num_keep[i]] = x[i, order[: num_keep[i]]]
        mask[i, order[num_keep[i] :]] = 1
    with torch.no_grad():
        want = reference(*map(torch.from_numpy, (padded, x, ids_shuffle)), lengths, num_keep, torch.from_numpy(mask))
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-5)


def test_encode_reads_only_the_video():
    config = load_config(CONFIG)
    method = lv_method.Method(config)
    batch = jax.tree.map(jnp.asarray, method.example_batch(3))
    params, _ = method.init(jax.random.key(0), batch)
    batch['length'] = jnp.asarray([5, 12, 32])
    out = jax.jit(method.represent)(params, {}, batch)
    assert out['mean_pool'].shape == (3, 32) and out['cls'].shape == (3, 32)
    changed = dict(batch, embeddings=batch['embeddings'].at[0, 5:].set(7.0))  # past the video's end
    again = jax.jit(method.represent)(params, {}, changed)
    np.testing.assert_allclose(again['mean_pool'][0], out['mean_pool'][0], atol=1e-6)
    np.testing.assert_allclose(again['cls'][0], out['cls'][0], atol=1e-6)


# --- data -------------------------------------------------------------------------------------------------------------
def test_windows_tiling_and_evaluation_inputs():
    c = load_config(CONFIG).input
    rng = np.random.default_rng(0)
    video = rng.normal(size=(100, c.embedding_dim)).astype(np.float32)
    lengths = [int(embedding_data.window(video, c, rng)['length']) for _ in range(400)]
    assert min(lengths) == 2 and max(lengths) == c.max_len  # duration // 5 over U{10 .. 160} s
    sample = embedding_data.window(video[:3], c, np.random.default_rng(1))  # 3 segments: the window tiled x3
    n = int(sample['length']) // 3
    assert int(sample['length']) % 3 == 0 and 2 <= n <= 3
    np.testing.assert_array_equal(sample['embeddings'][:n], sample['embeddings'][n : 2 * n])
    evaluation = embedding_data.window(video, c)
    assert int(evaluation['length']) == c.max_len
    np.testing.assert_array_equal(evaluation['embeddings'], video[: c.max_len])
    record = {'name': 'v', 'embeddings': video * 3, 'kind': 'array'}
    unit = embedding_data.decode_embeddings(record, c.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-5)
    for bad, message in ((video[:, :5], 'shape'), (video[:1], 'fewer'), (video * np.nan, 'non-finite')):
        with pytest.raises(DecodeError, match=message):
            embedding_data.decode_embeddings({**record, 'embeddings': bad}, c.embedding_dim, min_segments=2)


def test_synthetic_sequences_and_folders(tmp_path):
    for stay, move in embedding_data.HMM_CLASSES:
        transitions = embedding_data.hmm_transitions(stay, move)
        np.testing.assert_allclose(transitions.sum(axis=1), 1)
        np.testing.assert_allclose(np.full(8, 1 / 8) @ transitions, np.full(8, 1 / 8))  # uniform stationary
    source = embedding_data.SyntheticHmmSource('train', 16, 40)
    assert len(source) == 1200 and source[7]['label'] == 1
    np.testing.assert_array_equal(source[7]['embeddings'], source[7]['embeddings'])
    assert 6 <= len(source[7]['embeddings']) <= 40
    for name in ('a', 'b'):
        (tmp_path / 'train' / name).mkdir(parents=True)
    np.save(tmp_path / 'train' / 'a' / 'one.npy', np.ones((10, 16), np.float32))
    (tmp_path / 'train' / 'b' / 'bad.npy').write_bytes(b'not an array')
    folder = embedding_data.EmbeddingFolderSource(str(tmp_path / 'train'))
    assert len(folder) == 2 and folder.classes == ['a', 'b']
    assert embedding_data.decode_embeddings(folder[0], 16).shape == (10, 16)
    with pytest.raises(DecodeError):
        embedding_data.decode_embeddings(folder[1], 16)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r'input\.embedding_dim'):
        load_config(CONFIG, ['input.embedding_dim=30'])  # 4 heads
    with pytest.raises(ConfigError, match=r'mask\.ratio'):
        load_config(CONFIG, ['mask.ratio=1.0'])
    with pytest.raises(ConfigError, match=r'input\.min_seconds'):
        load_config(CONFIG, ['input.min_seconds=1000'])
    with pytest.raises(ConfigError, match=r'mask\.type'):
        load_config(CONFIG, ['mask.type=block'])


@pytest.mark.slow
def test_runlocal_sharded_matches_one_device_and_probes(tmp_path):
    summary, rows = assert_sharded_matches_one_device(CONFIG, tmp_path, atol=1e-5)
    assert 0.0 <= summary['final_eval/label/mean_pool/knn'] <= 1.0 and rows[0]['masked_segments'] > 0
