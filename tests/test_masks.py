"""Known-answer and property tests of VideoMAE V2's tube and running-cell masks."""

import numpy as np
import pytest

from jaxssl import masks


def reference_running_cell(grid, ratio):
    """A literal transcription of the reference's stateful Cell / RunningCellMaskingGenerator."""
    frames, height, width = grid
    num_masks = int(4 * ratio)
    queue = np.hstack([np.ones(num_masks), np.zeros(4 - num_masks)])
    maps = []
    for start in range(4):
        pointer = start
        rows = []
        for _ in range(frames):
            pointer += 1
            cell = queue[(np.arange(4) + pointer) % 4].reshape(2, 2)
            rows.append(np.tile(cell, [height // 2, width // 2]).flatten())
        maps.append(np.stack(rows).reshape(-1))
    return np.stack(maps).astype(bool)


@pytest.mark.parametrize('grid', [(8, 14, 14), (8, 16, 16), (2, 4, 6)])
@pytest.mark.parametrize('ratio', [0.25, 0.5, 0.75])
def test_running_cell_matches_reference_process(grid, ratio):
    np.testing.assert_array_equal(masks.running_cell_maps(grid, ratio), reference_running_cell(grid, ratio))


def test_running_cell_first_cells_known_answer():
    # Start 0, first slice: pointer 1 reads queue [1,1,0,0] at [1,2,3,0] -> [1,0,0,1].
    maps = masks.running_cell_maps((2, 2, 2), 0.5)
    np.testing.assert_array_equal(maps[0], [1, 0, 0, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(maps[3], [1, 1, 0, 0, 1, 0, 0, 1])


def test_each_position_reconstructed_in_half_the_slices():
    maps = masks.running_cell_maps((8, 14, 14), 0.5)
    kept = ~maps.reshape(4, 8, 196)
    np.testing.assert_array_equal(kept.sum(axis=1), 4)  # every spatial position kept in 4 of 8 slices
    assert (kept.sum(axis=(1, 2)) == 784).all()


def test_tube_mask_counts_and_tubes():
    rng = np.random.default_rng(0)
    mask = masks.tube_mask((8, 14, 14), 0.9, rng).reshape(8, 196)
    assert mask.dtype == bool
    assert (mask == mask[0]).all()  # the same frame mask in every temporal slice
    assert mask[0].sum() == 176 and (~mask).sum() == 160


def test_tube_mask_is_uniform_over_positions():
    rng = np.random.default_rng(1)
    freq = np.mean([masks.tube_mask((1, 4, 4), 0.5, rng) for _ in range(4000)], axis=0)
    np.testing.assert_allclose(freq, 0.5, atol=0.04)


@pytest.mark.parametrize(('grid', 'visible', 'loss_tokens'), [((8, 14, 14), 160, 704), ((8, 16, 16), 208, 920)])
def test_loss_token_counts(grid, visible, loss_tokens):
    """16x224x224 at patch 16 gives 704 loss tokens; ViT-g/14 gives 920, whatever the random draw."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        enc = masks.tube_mask(grid, 0.9, rng)
        idx = masks.mask_indices(enc, masks.decoder_mask(enc, grid, 0.5, rng))
        assert idx['visible_idx'].shape == (visible,)
        assert idx['target_idx'].shape == (np.prod(grid) // 2,)
        assert idx['target_weight'].sum() == loss_tokens


def test_decoder_ratio_zero_is_videomae_v1():
    rng = np.random.default_rng(0)
    enc = masks.tube_mask((8, 14, 14), 0.9, rng)
    dec = masks.decoder_mask(enc, (8, 14, 14), 0.0, rng)
    np.testing.assert_array_equal(dec, ~enc)
    idx = masks.mask_indices(enc, dec)
    np.testing.assert_array_equal(idx['target_idx'], np.flatnonzero(enc))
    assert (idx['target_weight'] == 1).all()


def test_mask_indices_order_and_batch():
    enc = np.array([[1, 0, 1, 0], [0, 1, 1, 0]], bool)
    dec = np.array([[0, 0, 1, 1], [1, 0, 0, 1]], bool)
    idx = masks.mask_indices(enc, dec)
    np.testing.assert_array_equal(idx['visible_idx'], [[1, 3], [0, 3]])
    np.testing.assert_array_equal(idx['target_idx'], [[0, 1], [1, 2]])
    np.testing.assert_array_equal(idx['target_weight'], [[1, 0], [1, 1]])


def test_bad_masks_fail_clearly():
    with pytest.raises(ValueError, match='even token grid'):
        masks.running_cell_maps((8, 7, 7), 0.5)
    with pytest.raises(ValueError, match='running-cell ratio'):
        masks.running_cell_maps((8, 14, 14), 0.1)
    with pytest.raises(ValueError, match='count differs'):
        masks.mask_indices(np.array([[1, 0], [1, 1]], bool), np.zeros((2, 2), bool))
