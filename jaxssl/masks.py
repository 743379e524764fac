"""Token masks as numpy functions run per sample in the input pipeline: VideoMAE V2's dual masking, MAE's
per-sample random shuffle, BEiT / CAE's block-wise masking, GMML's pixel-rectangle group corruption, and SSAST's
cluster and frame masks.

VideoMAE V2 (OpenGVLab/VideoMAEv2 dataset/masking_generator.py): a mask is a flat bool array over the token grid
(T', H', W') in (t, h, w) order, and True means "dropped": hidden from the encoder (encoder mask) or not
reconstructed by the decoder (decoder mask).
MAE (facebookresearch/mae models_mae.py random_masking): argsort of uniform noise; the first int(L * (1 - ratio))
tokens of the shuffle are kept, in shuffle order. See `shuffle_masking`.
BEiT block-wise (microsoft/unilm beit/masking_generator.py, reused by Atten4Vis/CAE furnace/masking_generator.py):
rectangles of at least `min_block` cells and random aspect ratio are added until exactly `num_masked` cells are
covered. See `block_masking`.
SSAST (YuanGongND/ssast src/models/ast_models.py gen_maskid_patch / gen_maskid_frame): see `ssast_cluster_mask`.
Randomness comes from the `np.random.Generator` the pipeline hands each sample, so masks are deterministic and
checkpointable.
"""

from __future__ import annotations

import functools
import math

import numpy as np

Grid = tuple[int, int, int]


def tube_mask(grid: Grid, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Tube masking: one random frame-level mask with int(ratio * H'W') dropped cells, repeated over time."""
    frames, height, width = grid
    per_frame = height * width
    num_masked = int(ratio * per_frame)
    if not 0 <= num_masked < per_frame:
        raise ValueError(f'tube mask ratio {ratio} must leave at least one visible token per frame')
    frame_mask = np.zeros(per_frame, dtype=bool)
    frame_mask[rng.permutation(per_frame)[:num_masked]] = True
    return np.tile(frame_mask, frames)


@functools.lru_cache(maxsize=32)
def running_cell_maps(grid: Grid, ratio: float) -> np.ndarray:
    """The reference's 4 running-cell decoder masks, shape (4, T'*H'*W').

    A 2x2 cell reads a cyclic queue [1]*m + [0]*(4-m) (m = int(4 * ratio); 1 = not reconstructed) from a
    pointer that advances by one every temporal slice; the cell is tiled over the frame. The 4 maps are the
    4 starting pointers. Each spatial position is thus reconstructed in a fixed share of the slices.
    """
    frames, height, width = grid
    num_dropped = int(4 * ratio)
    if not 0 < num_dropped < 4:
        raise ValueError(f'running-cell ratio {ratio} must give 1 to 3 dropped cells of 4 (0.25 <= ratio < 1)')
    if height % 2 or width % 2:
        raise ValueError(f'running-cell masking needs an even token grid, got {height}x{width}')
    queue = np.array([1] * num_dropped + [0] * (4 - num_dropped), dtype=bool)
    maps = []
    for start in range(4):
        slices = []
        for t in range(frames):
            pointer = start + t + 1  # the reference advances the pointer before reading each slice
            cell = queue[(np.arange(4) + pointer) % 4].reshape(2, 2)
            slices.append(np.tile(cell, (height // 2, width // 2)).reshape(-1))
        maps.append(np.concatenate(slices))
    maps = np.stack(maps)
    maps.setflags(write=False)
    return maps


def decoder_mask(encoder_mask: np.ndarray, grid: Grid, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Running-cell decoder mask (one of the 4 maps, chosen at random); ratio 0 gives VideoMAE v1 (NOT encoder mask)."""
    if ratio == 0:
        return ~encoder_mask
    maps = running_cell_maps(tuple(grid), float(ratio))
    return maps[rng.integers(len(maps))].copy()


def mask_indices(encoder_mask: np.ndarray, decoder_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Turns boolean masks (N,) or (B, N) into the static-shape index arrays the model takes.

    Returns visible_idx (tokens the encoder sees), target_idx (tokens the decoder reconstructs), both
    ascending as in the reference's boolean indexing, and target_weight: 1 where a target token was hidden
    from the encoder (the only ones the loss counts), else 0.
    """
    encoder_mask = np.asarray(encoder_mask, dtype=bool)
    decoder_mask = np.asarray(decoder_mask, dtype=bool)
    if encoder_mask.shape != decoder_mask.shape:
        raise ValueError(f'mask shapes differ: {encoder_mask.shape} vs {decoder_mask.shape}')
    batched = encoder_mask.ndim == 2
    enc, dec = np.atleast_2d(encoder_mask), np.atleast_2d(decoder_mask)

    def rows(keep: np.ndarray, what: str) -> np.ndarray:
        counts = keep.sum(axis=1)
        if np.any(counts != counts[0]):
            raise ValueError(f'{what} count differs across the batch: {sorted(set(counts.tolist()))}')
        return np.nonzero(keep)[1].reshape(len(keep), -1).astype(np.int32)

    visible_idx = rows(~enc, 'visible token')
    target_idx = rows(~dec, 'decoder target')
    target_weight = np.take_along_axis(enc, target_idx, axis=1).astype(np.float32)
    out = dict(visible_idx=visible_idx, target_idx=target_idx, target_weight=target_weight)
    return out if batched else {k: v[0] for k, v in out.items()}


def num_kept(num_tokens: int, ratio: float) -> int:
    """Tokens the MAE encoder sees: int(L * (1 - ratio)), the reference's rounding (196 tokens at 0.75 -> 49)."""
    kept = int(num_tokens * (1 - ratio))
    if not 0 < kept <= num_tokens:
        raise ValueError(f'mask ratio {ratio} keeps {kept} of {num_tokens} tokens; it must keep at least one')
    return kept


def shuffle_masking_from_noise(noise: np.ndarray, ratio: float) -> dict[str, np.ndarray]:
    """MAE's random masking for given noise (L,) or (B, L), as the reference computes it.

    ids_shuffle = argsort(noise) (ascending: the smallest noise is kept), ids_restore = argsort(ids_shuffle).
    Returns int32 'ids_keep' (the first num_kept(L, ratio) entries of ids_shuffle, in that order: the encoder sees
    its tokens in noise order, not raster order) and 'ids_restore' (L,): position of each token in the shuffle, so
    token j was masked iff ids_restore[j] >= len(ids_keep). transformers' ViTMAE takes the same `noise`.
    """
    noise = np.asarray(noise)
    ids_shuffle = np.argsort(noise, axis=-1, kind='stable')
    ids_restore = np.argsort(ids_shuffle, axis=-1, kind='stable')
    kept = num_kept(noise.shape[-1], ratio)
    return {'ids_keep': ids_shuffle[..., :kept].astype(np.int32), 'ids_restore': ids_restore.astype(np.int32)}


def shuffle_masking(num_tokens: int, ratio: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One sample's MAE mask from uniform [0, 1) noise drawn from `rng`; see `shuffle_masking_from_noise`."""
    return shuffle_masking_from_noise(rng.random(num_tokens), ratio)


def croco_masking_from_noise(noise: np.ndarray, ratio: float) -> dict[str, np.ndarray]:
    """CroCo's RandomMask (naver/croco models/masking.py) for given noise (L,) or (B, L): num_mask = int(ratio * L)
    and token j is masked iff argsort(noise)[j] < num_mask (the permutation's value at j, not j's rank: the same
    distribution as MAE's, different tokens for the same noise). The encoder sees the visible tokens in raster
    order (the reference's x[~masks]).

    Returns int32 'ids_keep' (the visible tokens, ascending) and 'ids_restore' (L,): each token's place in [visible
    tokens, masked tokens] (each ascending), so that, as for MAE, token j was masked iff ids_restore[j] >=
    len(ids_keep) and the decoder's [visible, mask tokens] list gathered by ids_restore is back in raster order.
    """
    noise = np.asarray(noise)
    num_tokens = noise.shape[-1]
    masked_count = int(ratio * num_tokens)
    if not 0 <= masked_count < num_tokens:
        raise ValueError(f'mask ratio {ratio} masks {masked_count} of {num_tokens} tokens; one must stay visible')
    masked = np.argsort(noise, axis=-1, kind='stable') < masked_count
    # Stable sort of the mask flags: visible tokens first, masked after, each group in raster order.
    ids_shuffle = np.argsort(masked, axis=-1, kind='stable')
    ids_restore = np.argsort(ids_shuffle, axis=-1, kind='stable')
    keep = num_tokens - masked_count
    return {'ids_keep': ids_shuffle[..., :keep].astype(np.int32), 'ids_restore': ids_restore.astype(np.int32)}


def removed_mask(ids_restore: np.ndarray, num_keep: int) -> np.ndarray:
    """The reference's binary mask (float32, 1 = removed from the encoder) from ids_restore; numpy or jax arrays."""
    return (ids_restore >= num_keep).astype(np.float32)


def _add_block(
    mask: np.ndarray, budget: int, min_block: int, log_aspect: tuple[float, float], rng: np.random.Generator
) -> int:
    """One round of the reference's `_mask`: up to 10 tries to place a rectangle of area U(min_block, budget)
    and aspect ratio exp(U(log_aspect)) that adds between 1 and `budget` new cells. Returns the cells added."""
    height, width = mask.shape
    for _ in range(10):
        # random.uniform's formula, which also takes budget < min_block (numpy's uniform refuses high < low).
        area = min_block + (budget - min_block) * rng.random()
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))  # random.randint's upper bound is inclusive
            left = int(rng.integers(0, width - w + 1))
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= budget:
                mask[top : top + h, left : left + w] = True
                return new
    return 0


def block_masking(
    grid: tuple[int, int],
    num_masked: int,
    rng: np.random.Generator,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> np.ndarray:
    """BEiT / CAE block-wise mask over an (H', W') token grid: flat bool (H' * W',), raster order, True = masked,
    with exactly `num_masked` True cells. Each round adds a rectangle whose target area is U(min_block, budget)
    (budget = cells still to mask, capped at `max_block`), aspect ratio log-uniform in [min_aspect, max_aspect]
    (max_aspect defaults to 1 / min_aspect), height and width each smaller than the grid's, counting only the
    cells it newly covers, and never overshooting the count. CAE: 98 of 196 tokens, min_block 16, aspect 0.3."""
    height, width = grid
    if height < 2 or width < 2:
        raise ValueError(f'block masking needs a grid of at least 2x2 tokens, got {height}x{width}')
    if not 0 <= num_masked <= height * width:
        raise ValueError(f'cannot mask {num_masked} of {height * width} tokens')
    if min_block < 1 or not 0 < min_aspect <= (max_aspect or 1 / min_aspect):
        raise ValueError(f'bad block sizes: min_block {min_block}, aspect {min_aspect}..{max_aspect}')
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    cap = num_masked if max_block is None else max_block
    mask = np.zeros(grid, dtype=bool)
    count, rounds = 0, 0
    while count != num_masked:
        count += _add_block(mask, min(num_masked - count, cap), min_block, log_aspect, rng)
        rounds += 1
        if rounds > 100 * height * width:  # the reference loops forever; a 1x1 block always fits eventually
            raise RuntimeError(f'block masking could not reach {num_masked} masked tokens on a {grid} grid')
    return mask.reshape(-1)


def mask_to_ids(mask: np.ndarray) -> dict[str, np.ndarray]:
    """A flat bool mask (L,) (True = masked) -> int32 'ids_keep' (visible tokens, ascending), 'ids_masked' (masked
    tokens, ascending: the reference's boolean indexing order) and 'ids_restore' (L,), each token's position in the
    order [ids_keep, ids_masked], so `removed_mask(ids_restore, len(ids_keep))` gives the mask back."""
    mask = np.asarray(mask, dtype=bool)
    ids_keep, ids_masked = np.flatnonzero(~mask), np.flatnonzero(mask)
    ids_restore = np.argsort(np.concatenate([ids_keep, ids_masked]), kind='stable')
    return {
        'ids_keep': ids_keep.astype(np.int32),
        'ids_masked': ids_masked.astype(np.int32),
        'ids_restore': ids_restore.astype(np.int32),
    }


def group_block_mask(
    height: int, width: int, max_ratio: float, rng: np.random.Generator, align: int = 1, max_block: float = 0.3
) -> np.ndarray:
    """GMML's group mask (Sara-Ahmed/GMML datasets_utils.GMML_drop_rand_patches): a (height, width) bool pixel mask,
    True = corrupted, the union of random rectangles drawn until it covers U(min(0.5, max_ratio), max_ratio) of the
    pixels (overlaps allowed, so the last rectangle may overshoot the target).

    Each rectangle: top-left corner randint(0, H - align) // align * align (numpy's exclusive upper bound, as the
    reference), side min(randint(align, int(H * max_block)), H - top) rounded to a multiple of `align`. align=1
    (the reference's default) gives pixel rectangles not aligned with the patch grid; align=patch aligns them.
    """
    align = max(1, align)
    longest = (int(height * max_block), int(width * max_block))
    if min(longest) <= align:
        raise ValueError(f'max_block {max_block} of {height}x{width} px allows no rectangle wider than align {align}')
    target = rng.uniform(min(0.5, max_ratio), max_ratio) * height * width
    mask = np.zeros((height, width), dtype=bool)
    while mask.sum() < target:
        top = rng.integers(0, height - align) // align * align
        left = rng.integers(0, width - align) // align * align
        h = round(min(rng.integers(align, longest[0]), height - top) / align) * align
        w = round(min(rng.integers(align, longest[1]), width - left) / align) * align
        mask[top : top + h, left : left + w] = True
    return mask


def gmml_corruption(
    size: int,
    rng: np.random.Generator,
    noise_ratio: float = 0.75,
    replace_ratio: float = 0.3,
    replace_prob: float = 0.5,
    align: int = 1,
    max_block: float = 0.3,
) -> dict[str, np.ndarray]:
    """One view's GMML corruption plan: 'mask' (size, size) bool and 'paste' () bool.

    The reference corrupts in two stages: its loader fills U(0.5, noise_ratio) of every crop with N(0, 1) noise,
    then its train loop, per image with probability replace_prob (1 / (drop types + 1) = 0.5 for 'noise'), throws
    that away and pastes blocks covering exactly replace_ratio of the clean crop from a random image of the batch at
    the same place. The plan is drawn here (numpy, per sample, in the Grain pipeline); the pixels are filled on
    device by jaxssl.methods.gmml.corrupt, which sees the batch the pasted blocks come from.
    """
    paste = rng.random() < replace_prob
    ratio = replace_ratio if paste else noise_ratio
    return {'mask': group_block_mask(size, size, ratio, rng, align, max_block), 'paste': np.asarray(paste)}


def ssast_cluster_mask(
    num_patches: int, time_patches: int, num_masked: int, rng: np.random.Generator, cluster: int = 3
) -> np.ndarray:
    """SSAST's patch masking, (num_masked,) int32 token indices, ascending.

    One cluster size C in {3, ..., cluster + 2} per clip; C x C blocks at uniform anchors (index a + i * time_patches
    + j, so a block that runs off a row wraps into the next, and cells outside (0, num_patches) are dropped: token 0
    is never masked) are added until more than `num_masked` distinct tokens are covered; the reference then keeps
    `list(set(ids))[:num_masked]`, which for these small ints is the `num_masked` lowest (CPython iterates such a
    set in ascending order), so the same is kept here.
    """
    if not 0 < num_masked < num_patches - 1:
        raise ValueError(f'SSAST masks 1 to {num_patches - 2} of {num_patches} patches, not {num_masked}')
    size = int(rng.integers(cluster)) + 3
    block = (np.arange(size)[:, None] * time_patches + np.arange(size)[None, :]).ravel()
    covered = np.zeros(num_patches, bool)
    while covered.sum() <= num_masked:
        cells = int(rng.integers(num_patches)) + block
        covered[cells[(cells > 0) & (cells < num_patches)]] = True
    return np.flatnonzero(covered)[:num_masked].astype(np.int32)


def ssast_frame_mask(num_patches: int, num_masked: int, rng: np.random.Generator) -> np.ndarray:
    """SSAST's frame masking (for 128 x 2 frame patches): `num_masked` distinct tokens drawn uniformly, ascending."""
    if not 0 < num_masked < num_patches:
        raise ValueError(f'SSAST masks 1 to {num_patches - 1} of {num_patches} frames, not {num_masked}')
    return np.sort(rng.choice(num_patches, num_masked, replace=False)).astype(np.int32)
