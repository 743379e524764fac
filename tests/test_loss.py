"""Known-answer tests for VideoMAE V2's normalised-pixel target and masked loss."""

import numpy as np
import pytest

from jaxssl import masks
from jaxssl.methods import videomae

MEAN = np.array(videomae.IMAGENET_MEAN, np.float32)
STD = np.array(videomae.IMAGENET_STD, np.float32)


def normalise_pixels(pixels):
    return (pixels - MEAN) / STD


def test_patch_targets_hand_computed():
    """One 2x1x1 tube per token, 3 channels: hand-computable mean and unbiased std."""
    pixels = np.zeros((1, 2, 1, 2, 3), np.float32)  # (B, T, H, W, C); patch 1 -> 2 tokens of 2 pixels
    pixels[0, :, 0, 0] = [[0.2, 0.4, 0.6], [0.4, 0.8, 0.6]]  # token 0: time 0 then time 1
    pixels[0, :, 0, 1] = [[0.0, 0.0, 0.0], [1.0, 0.5, 0.25]]
    targets = np.asarray(videomae.patch_targets(normalise_pixels(pixels), patch=1, tubelet=2))
    assert targets.shape == (1, 2, 6)
    # Two values a, b: mean (a+b)/2, unbiased std |a-b|/sqrt(2) -> normalised -+1/sqrt(2) (+1e-6 in the denominator).
    s = 1 / np.sqrt(2)
    # Order (p0 p1 p2 c): time 0's three channels, then time 1's. Channel 2 of token 0 is constant -> 0.
    np.testing.assert_allclose(targets[0, 0], [-s, -s, 0, s, s, 0], atol=1e-4)
    np.testing.assert_allclose(targets[0, 1], [-s, -s, -s, s, s, s], atol=1e-4)


def test_patch_targets_match_loop_implementation():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(size=(2, 4, 8, 12, 3)).astype(np.float32)
    targets = np.asarray(videomae.patch_targets(normalise_pixels(pixels), patch=4, tubelet=2))
    token = 0
    for t in range(2):
        for h in range(2):
            for w in range(3):
                tube = pixels[1, 2 * t : 2 * t + 2, 4 * h : 4 * h + 4, 4 * w : 4 * w + 4]
                flat = tube.reshape(-1, 3).astype(np.float64)  # (p0 p1 p2) rows, channel columns
                want = (flat - flat.mean(0)) / (flat.std(0, ddof=1) + 1e-6)
                np.testing.assert_allclose(targets[1, token], want.reshape(-1), atol=2e-4)
                token += 1


@pytest.mark.parametrize('normalize', [True, False])
def test_patch_targets_of_selected_tokens_equal_selecting_targets(normalize):
    pixels = np.random.default_rng(2).uniform(size=(2, 4, 8, 8, 3)).astype(np.float32)
    idx = np.array([[0, 2, 5], [7, 1, 3]])
    video = normalise_pixels(pixels)
    every = np.asarray(videomae.patch_targets(video, 4, 2, normalize))
    picked = np.asarray(videomae.patch_targets(video, 4, 2, normalize, token_idx=idx))
    np.testing.assert_allclose(picked, np.take_along_axis(every, idx[..., None], axis=1), atol=1e-5)


def test_unnormalised_targets_are_raw_pixels():
    pixels = np.random.default_rng(1).uniform(size=(1, 2, 4, 4, 3)).astype(np.float32)
    targets = np.asarray(videomae.patch_targets(normalise_pixels(pixels), 2, 2, normalize=False))
    np.testing.assert_allclose(targets[0, 0], pixels[0, :, :2, :2].reshape(-1), atol=1e-6)


def test_masked_mse_known_answer():
    prediction = np.zeros((2, 3, 4), np.float32)
    target = np.ones((2, 3, 4), np.float32) * np.array([1, 2, 3], np.float32)[None, :, None]
    weight = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    # Per-token errors 1, 4, 9; counted tokens: 1 + 9 + 4 = 14 over 3 tokens.
    assert float(videomae.masked_mse(prediction, target, weight)) == pytest.approx(14 / 3)


def test_loss_weights_match_reference_boolean_indexing():
    """target_weight reproduces `bool_masked_pos[~decode_masked_pos]` and labels `patches[~decode_masked_pos]`."""
    rng = np.random.default_rng(2)
    grid = (4, 4, 4)
    enc = np.stack([masks.tube_mask(grid, 0.75, rng) for _ in range(3)])
    dec = np.stack([masks.decoder_mask(e, grid, 0.5, rng) for e in enc])
    idx = masks.mask_indices(enc, dec)
    patches = rng.normal(size=(3, 64, 5))
    prediction = rng.normal(size=(3, 32, 5))
    labels = patches[~dec].reshape(3, -1, 5)
    cal_loss_mask = enc[~dec].reshape(3, -1)
    want = (((prediction - labels) ** 2).mean(-1) * cal_loss_mask).sum() / cal_loss_mask.sum()
    gathered = np.take_along_axis(patches, idx['target_idx'][..., None], axis=1)
    got = videomae.masked_mse(prediction, gathered, idx['target_weight'])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
