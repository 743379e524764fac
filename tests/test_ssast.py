"""SSAST: masks against a transcription of the reference's generators, the InfoNCE / MSE objectives against its
per-clip loops, the patch order against torch's Unfold, the model's masking, and a run on the one trainer."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sharded_runs import assert_sharded_matches_one_device

from jaxssl import masks
from jaxssl.config import ConfigError, load_config
from jaxssl.methods import ssast
from jaxssl.models import ssast as ssast_model


class _Random:
    """Python's `random` calls the reference makes, drawn from a numpy Generator (so both sides see one stream)."""

    def __init__(self, rng):
        self.rng = rng

    def randrange(self, n):
        return int(self.rng.integers(n))


def reference_cluster_mask(r, sequence_len, p_t_dim, mask_size, cluster=3):
    """ast_models.py gen_maskid_patch, line by line (python's set and its iteration order included)."""
    mask_id = []
    cur_clus = r.randrange(cluster) + 3
    while len(list(set(mask_id))) <= mask_size:
        start_id = r.randrange(sequence_len)
        cur_mask = []
        for i in range(0, cur_clus):
            for j in range(0, cur_clus):
                mask_cand = start_id + p_t_dim * i + j
                if mask_cand > 0 and mask_cand < sequence_len:
                    cur_mask.append(mask_cand)
        mask_id = mask_id + cur_mask
    return list(set(mask_id))[:mask_size]


@pytest.mark.parametrize('grid, num_masked', [((8, 64), 400), ((4, 6), 18), ((8, 12), 50)])
def test_cluster_mask_equals_the_reference_generator(grid, num_masked):
    total = grid[0] * grid[1]
    for seed in range(20):
        want = reference_cluster_mask(_Random(np.random.default_rng(seed)), total, grid[1], num_masked)
        got = masks.ssast_cluster_mask(total, grid[1], num_masked, np.random.default_rng(seed))
        assert got.tolist() == want and got.dtype == np.int32
        assert len(set(got.tolist())) == num_masked and 0 not in got


def test_frame_mask_is_uniform_without_repeats():
    rng = np.random.default_rng(0)
    draws = np.stack([masks.ssast_frame_mask(16, 12, rng) for _ in range(2000)])
    assert all(len(set(d)) == 12 and (np.diff(d) > 0).all() for d in draws)
    np.testing.assert_allclose(np.bincount(draws.ravel(), minlength=16) / 2000, 12 / 16, atol=0.03)
    assert 0 in draws  # unlike the cluster mask, the first frame can be masked


def reference_losses(encode_samples, pred_c, pred_g, target_g):
    """traintest_mask.py's mpc / mpg objectives with torch, per clip as the reference loops."""
    encode_samples, pred_c = torch.tensor(encode_samples), torch.tensor(pred_c)
    batch, n = pred_c.shape[:2]
    nce, correct = torch.tensor(0.0), torch.tensor(0.0)
    for i in range(batch):
        total = torch.mm(encode_samples[i], torch.transpose(pred_c[i], 0, 1))
        correct += torch.sum(torch.eq(torch.argmax(torch.softmax(total, dim=-1), dim=0), torch.arange(0, n)))
        nce += torch.sum(torch.diag(torch.log_softmax(total, dim=-1)))
    mse = torch.mean((torch.tensor(pred_g) - torch.tensor(target_g)) ** 2)
    return float(nce / (-1.0 * batch * n)), float(correct / (batch * n)), float(mse)


def test_objectives_match_the_reference_loops():
    rng = np.random.default_rng(0)
    targets, predictions = rng.normal(size=(2, 3, 7, 16)).astype(np.float32)
    predictions[:, :3] = targets[:, :3] * 2  # some predictions right, so the accuracy is not ~0
    pred_g, target_g = rng.normal(size=(2, 3, 5, 16)).astype(np.float32)
    want_nce, want_acc, want_mse = reference_losses(targets, predictions, pred_g, target_g)
    nce, acc = ssast.nce_loss(jnp.asarray(predictions), jnp.asarray(targets))
    np.testing.assert_allclose([nce, acc], [want_nce, want_acc], rtol=1e-5)
    assert 0 < want_acc < 1
    np.testing.assert_allclose(jnp.mean(jnp.square(pred_g - target_g)), want_mse, rtol=1e-6)


def test_patchify_is_torch_unfold_of_the_reference_layout():
    x = np.random.default_rng(0).normal(size=(2, 12, 8)).astype(np.float32)  # (B, frames, mel bins)
    reference_input = torch.tensor(x).unsqueeze(1).transpose(2, 3)  # forward(): (B, 1, F, T)
    want = torch.nn.Unfold(kernel_size=(4, 3), stride=(4, 3))(reference_input).transpose(1, 2)
    np.testing.assert_array_equal(ssast_model.patchify(jnp.asarray(x), (4, 3)), want.numpy())


@pytest.fixture(scope='module')
def method():
    return ssast.Method(load_config('configs/ssast.py:runlocal'))


def test_masked_patches_are_hidden_and_token_order_is_frequency_major(method):
    batch = method.example_batch(2)
    params, _ = method.init(jax.random.key(0), batch)
    model, spec = method.model, jnp.asarray(batch['spectrogram'])
    assert model.grid == (4, 6) and params['pos_embed'].shape == (1, 26, 64)
    # Reference inits: timm's N(0, 0.02) on the encoder's Linear layers, torch's xavier_normal N(0, 1/D) mask embedding,
    # torch's U(+-1/sqrt(fan_in)) heads.
    np.testing.assert_allclose(np.std(params['encoder']['block_00']['mlp']['fc1']['kernel']), 0.02, rtol=0.1)
    np.testing.assert_allclose(np.std(params['mask_embed']), 64**-0.5, rtol=0.3)
    assert np.abs(params['cpred']['fc2']['kernel']).max() <= 64**-0.5
    masked = np.zeros((2, 24), bool)
    masked[:, [7, 8, 13]] = True
    encode = jax.jit(lambda s: model.apply({'params': params}, s, jnp.asarray(masked), method=model.encode)[0])
    # Token 7 (frequency patch 1, time patch 1) covers mel bins 16-31 of frames 16-31: changing them under the mask
    # changes nothing, changing a visible patch's pixels does.
    hidden = spec.at[:, 16:32, 16:32].add(5.0)
    np.testing.assert_allclose(encode(hidden), encode(spec), atol=1e-5)
    assert not np.allclose(encode(spec.at[:, 0:16, 16:32].add(5.0)), encode(spec), atol=1e-3)
    # The two passes run as one batch of 2B: the heads see the masked tokens of their own pass only.
    mpc, mpg = model.apply({'params': params}, spec, batch['mpc_idx'], batch['mpg_idx'])
    assert mpc.shape == mpg.shape == (2, 18, 256) and mpc.dtype == jnp.float32


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r'masking\.num_masked'):
        load_config('configs/ssast.py:runlocal', ['masking.num_masked=23'])
    with pytest.raises(ConfigError, match=r'model\.patch'):
        load_config('configs/ssast.py:runlocal', ['input.target_length=100'])
    with pytest.raises(ConfigError, match=r'model\.variant'):
        load_config('configs/ssast.py:runlocal', ['model.variant=huge'])
    config = load_config('configs/ssast.py:variant=tiny,patch=frame')
    assert (config.masking.kind, config.input.global_batch, config.model.variant) == ('frame', 120, 'tiny')
    assert ssast.Method(config).grid == (1, 512)


def test_runlocal_sharded_matches_one_device_and_probes(tmp_path):
    # The InfoNCE is blind to cpred's output bias (it shifts every score of a row alike), so that bias gets a zero
    # gradient up to rounding, which Adam with eps 1e-8 would blow up into +-lr steps of arbitrary sign; a larger
    # eps keeps rounding noise out of the comparison without hiding real gradients.
    keys = ('loss', 'nce', 'mse', 'nce_accuracy')
    summary, _ = assert_sharded_matches_one_device('configs/ssast.py:runlocal', tmp_path, 'optim.eps=1e-3', keys=keys)
    for key in ('label/cls/knn', 'label/mean_pool/knn', 'label/raw/knn'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0


def test_reference_set_order_assumption():
    """The reference truncates `list(set(ids))`; for ints below the set's table size CPython iterates ascending."""
    ids = random.Random(0).sample(range(1, 512), 420)
    assert list(set(ids)) == sorted(ids)
