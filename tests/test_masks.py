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


# --- BEiT / CAE block-wise masking -----------------------------------------------------------------------------------
class ScriptedRng:
    """Stands in for np.random.Generator with scripted draws, recording the integer bounds asked for."""

    def __init__(self, randoms, uniforms, integers):
        self.randoms, self.uniforms, self.integers_ = list(randoms), list(uniforms), list(integers)
        self.bounds = []

    def random(self):
        return self.randoms.pop(0)

    def uniform(self, low, high):
        value = self.uniforms.pop(0)
        assert low <= value <= high
        return value

    def integers(self, low, high):
        self.bounds.append((low, high))
        return self.integers_.pop(0)


def test_block_masking_known_answer():
    # 6x6 grid, 8 tokens, min block 4. Round 1: area 4 + (8 - 4) * 0.5 = 6, aspect 1 -> 2x2 (round(sqrt 6) = 2)
    # at top 1, left 2: 4 new cells. Round 2 (budget 4): area 4, aspect 0.3 -> h = round(1.10) = 1,
    # w = round(3.65) = 4, at (0, 0): 4 new cells. Top / left bounds are randint's inclusive 0..6-h, 0..6-w.
    rng = ScriptedRng(randoms=[0.5, 0.9], uniforms=[0.0, np.log(0.3)], integers=[1, 2, 0, 0])
    mask = masks.block_masking((6, 6), 8, rng, min_block=4).reshape(6, 6)
    want = np.zeros((6, 6), bool)
    want[1:3, 2:4] = True
    want[0, 0:4] = True
    np.testing.assert_array_equal(mask, want)
    assert rng.bounds == [(0, 5), (0, 5), (0, 6), (0, 3)]


def test_block_masking_rejects_overshoot_and_no_new_cells():
    # 6x6 grid, 7 tokens, min block 4. Round 1: area 4 + 3 * 0.5 = 5.5, aspect 1 -> 2x2 at (1, 2): 4 new, budget 3.
    # Round 2: area 4 (budget < min block: r 0 gives 4), 2x2 at (3, 3) adds 4 > 3: rejected; then aspect 1/0.3 ->
    # 4x1 at (0, 2), overlapping 2 masked cells: 2 new, budget 1. Round 3: a 2x2 at (4, 4) adds 4 > 1: rejected;
    # r 0.999 gives area 4 - 3 * 0.999 -> 1x1 at (5, 5): done.
    rng = ScriptedRng(
        randoms=[0.5, 0.0, 0.0, 0.0, 0.999],
        uniforms=[0.0, 0.0, np.log(1 / 0.3), 0.0, 0.0],
        integers=[1, 2, 3, 3, 0, 2, 4, 4, 5, 5],
    )
    mask = masks.block_masking((6, 6), 7, rng, min_block=4).reshape(6, 6)
    want = np.zeros((6, 6), bool)
    want[1:3, 2:4] = True
    want[0:4, 2] = True
    want[5, 5] = True
    np.testing.assert_array_equal(mask, want)
    assert not rng.randoms and not rng.integers_  # every scripted draw was used: the rejected tries happened


@pytest.mark.parametrize(('grid', 'count', 'min_block'), [((14, 14), 98, 16), ((14, 14), 75, 16), ((8, 8), 32, 4),
                                                          ((4, 6), 20, 2), ((7, 5), 1, 16)])  # fmt: skip
def test_block_masking_count_is_exact(grid, count, min_block):
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = masks.block_masking(grid, count, rng, min_block=min_block)
        assert mask.shape == (grid[0] * grid[1],) and mask.dtype == bool and mask.sum() == count


def test_block_masking_blocks_are_rectangles_of_bounded_size_and_aspect():
    # One round on an empty 14x14 grid (CAE's min block 16, budget 98, aspect in [0.3, 1/0.3]): the new cells are
    # one full rectangle, each side shorter than the grid, whose sides are roundings (+-0.5) of sides x, y with
    # x * y in [16, 98] and x / y in [0.3, 1/0.3].
    rng = np.random.default_rng(1)
    areas = []
    for _ in range(500):
        mask = np.zeros((14, 14), bool)
        added = masks._add_block(mask, 98, 16, (np.log(0.3), np.log(1 / 0.3)), rng)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert added == mask.sum() == h * w and h < 14 and w < 14
        assert (h + 0.5) * (w + 0.5) >= 16 and (h - 0.5) * (w - 0.5) <= 98
        assert (h + 0.5) / (w - 0.5) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
        areas.append(added)
    assert max(areas) > 60  # targets reach up to the budget, not only the minimum


def test_block_masking_is_blocky_and_covers_every_position():
    rng = np.random.default_rng(2)
    draws = np.stack([masks.block_masking((14, 14), 98, rng).reshape(14, 14) for _ in range(400)])
    # Blocks: a masked token's right neighbour is masked far more often than the 50% of a random mask.
    same = (draws[:, :, :-1] & draws[:, :, 1:]).sum() / draws[:, :, :-1].sum()
    assert same > 0.8
    assert (draws.mean(axis=0) > 0.02).all()  # no position is left out (corners are rarest: about 5%)


def test_mask_to_ids():
    ids = masks.mask_to_ids(np.array([0, 1, 1, 0, 1, 0], bool))
    np.testing.assert_array_equal(ids['ids_keep'], [0, 3, 5])
    np.testing.assert_array_equal(ids['ids_masked'], [1, 2, 4])
    np.testing.assert_array_equal(ids['ids_restore'], [0, 3, 4, 1, 5, 2])
    np.testing.assert_array_equal(masks.removed_mask(ids['ids_restore'], 3), [0, 1, 1, 0, 1, 0])


def test_block_masking_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match='2x2'):
        masks.block_masking((1, 8), 2, rng)
    with pytest.raises(ValueError, match='cannot mask'):
        masks.block_masking((4, 4), 17, rng)
