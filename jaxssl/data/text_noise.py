"""E2S2's input corruption of a token row (Zhong et al., arXiv 2205.14912; the authors' fairseq patch,
WHU-ZQH/E2S2 fairseq-E2S2/data/denoising_dataset.py), host-side numpy in the input pipeline, as fairseq's dataset.

A row is [bos] tokens [eos] (here [CLS] ... [SEP]). In order:
1. BART's text infilling (`text_infilling`, stock fairseq add_whole_word_mask with replace_length 1): ceil(ratio x
   (n - 2)) tokens to mask, spent on spans of Poisson(lambda) lengths; each span's first token becomes [MASK] and
   the rest are deleted (a span of k tokens -> one [MASK]), zero-length spans insert a [MASK]. The first and last
   tokens are never masked. Every token counts as a word start: the reference's command passes no --bpe, so fairseq
   builds no whole-word table and masks sub-words. With `random_ratio` (BART's mask_random; 0 in E2S2, 0.1 in
   SpeechT5), that share of the spans, and of the inserts rounded up, get a random id instead of [MASK].
   The row after this step is the "mask-only" input of E2S2's contrastive term.
2. local shuffle (`local_shuffle`, add_shuffle): among the tokens other than [CLS] / [SEP] / [MASK], in consecutive
   blocks of 18, one token a block is a centre; in position order, each centre whose two neighbours are not special
   either has its 3-token window permuted at random (the identity included), until min(26, max(1, round(0.15 / 3 x
   the row's length))) windows are permuted. Label 1 on every token that changed.
3. random replacement (`random_replacement`, add_random_noise; the rate is hard-coded 0.15 there): ceil(0.15 x the
   row's length) positions drawn among all but the first and last; those still labelled 0 get a uniformly random
   id (any but [PAD] and [CLS], the reference's [2, V)) and label 2, even where the id happens to be the same.
   As the reference, a [MASK] can be replaced (its special-token guard reads the wrong tensor).

The fairseq run draws with torch's and Python's global generators (outside its per-sample seed); here each row draws
from its own numpy Generator, seeded by the batch's seed and the row's place in the global batch, so a run's
corruption does not depend on the process count.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

SHUFFLE_BLOCK = 18  # int(1 / 0.15) x 3: one centre per this many tokens
MAX_SHUFFLES = 26  # int(ceil(512 x 0.15 / 10) x 10 / 3)
SHUFFLE_RATE = 0.15 / 3  # of the row's length, rounded (0.049999..., so a length of 30 rounds 1.4999... down)
ORIGINAL, SHUFFLED, REPLACED = 0, 1, 2


@dataclass(frozen=True)
class Noise:
    """The ids and rates of the corruption."""

    mask_id: int
    pad_id: int
    special_ids: tuple[int, ...]  # [CLS], [SEP] (and [PAD]): never shuffle centres or window members
    vocab_size: int
    never_drawn: tuple[int, ...]  # ids the replacement never draws ([PAD], [CLS])
    mask_ratio: float = 0.15
    poisson_lambda: float = 3.0
    shuffle: bool = True
    replace_ratio: float = 0.15
    # BART's mask_random: the share of masked spans, and (rounded up) of inserted tokens, given a random id in place
    # of [MASK] (from the ids but `never_drawn`). E2S2 keeps fairseq's default 0; SpeechT5's text task 0.1.
    random_ratio: float = 0.0


@functools.cache  # once per run, not per row
def span_length_probabilities(poisson_lambda: float) -> np.ndarray:
    """fairseq's span-poisson distribution: P(k) of Poisson(lambda) for k = 0, 1, ... up to the first k whose
    probability falls under 1e-7 (included), normalised (torch's Categorical normalises)."""
    ps, term = [], math.exp(-poisson_lambda)
    for k in range(128):
        ps.append(term)
        if term < 1e-7:
            break
        term *= poisson_lambda / (k + 1)
    ps = np.asarray(ps)
    return ps / ps.sum()


def span_lengths(budget: int, probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Span lengths whose total is exactly `budget`: draws of `budget` lengths until their running sum reaches it,
    cut at the first span that reaches it, that span shortened to fit (zero lengths kept: they become inserts)."""
    draw = lambda: rng.choice(len(probabilities), size=budget, p=probabilities)
    lengths = draw()
    while lengths.sum() < budget:
        lengths = np.concatenate([lengths, draw()])
    total = np.cumsum(lengths)
    last = int(np.argmax(total >= budget))
    lengths = lengths[: last + 1].copy()
    lengths[last] = budget - (total[last - 1] if last else 0)
    return lengths


def text_infilling(row: np.ndarray, noise: Noise, rng: np.random.Generator, max_len: int) -> np.ndarray:
    """BART's span masking of one unpadded row (first and last tokens kept); the result is at most `max_len`
    long (inserted [MASK]s beyond it are dropped: a row only grows when zero-length spans outnumber the deleted
    tokens, and only by them)."""
    row = row.copy()
    n = len(row)
    budget = math.ceil(float(np.float32(n - 2) * np.float32(noise.mask_ratio)))  # float32, as fairseq's tensor sum
    if budget == 0:
        return row
    lengths = span_lengths(budget, span_length_probabilities(noise.poisson_lambda), rng)
    inserts = int((lengths == 0).sum())
    lengths = lengths[lengths > 0]
    keep = np.ones(n, bool)
    if len(lengths):
        starts = rng.permutation(np.arange(1, n - 1))[: len(lengths)]  # distinct word starts, bos / eos excluded
        lengths = lengths[: len(starts)]
        row[starts] = noise.mask_id
        if noise.random_ratio > 0:
            randomised = starts[rng.random(len(starts)) < noise.random_ratio]
            row[randomised] = rng.choice(replacement_ids(noise.vocab_size, noise.never_drawn), len(randomised))
        # Each span deletes the next length - 1 tokens after its [MASK], never the last token; a span running into
        # another's [MASK] deletes it (the spans merge), as the reference's walk.
        for start, length in zip(starts, lengths, strict=True):
            end = min(start + length, n - 1)
            keep[start + 1 : end] = False
    row = row[keep]
    inserts = min(inserts, max_len - len(row))
    if inserts > 0:  # add_insertion_noise: [MASK]s at distinct random places between the first and last tokens
        total = len(row) + inserts
        places = rng.permutation(total - 2)[:inserts] + 1
        out = np.full(total, noise.mask_id, row.dtype)
        if noise.random_ratio > 0:  # add_insertion_noise: the first ceil(ratio x inserts) places get random ids
            randomised = places[: math.ceil(inserts * noise.random_ratio)]
            out[randomised] = rng.choice(replacement_ids(noise.vocab_size, noise.never_drawn), len(randomised))
        others = np.ones(total, bool)
        others[places] = False
        out[others] = row
        row = out
    return row


def local_shuffle(row: np.ndarray, noise: Noise, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(the row with up to MAX_SHUFFLES 3-token windows permuted, labels: SHUFFLED where a token changed)."""
    special = np.isin(row, [*noise.special_ids, noise.mask_id])
    candidates = np.flatnonzero(~special)
    budget = min(MAX_SHUFFLES, max(1, round(len(row) * SHUFFLE_RATE)))  # Python's round, as the reference
    centres = [
        candidates[lo + int(rng.integers(min(SHUFFLE_BLOCK, len(candidates) - lo)))]
        for lo in range(0, len(candidates), SHUFFLE_BLOCK)
    ]
    out, done = row.copy(), 0
    for centre in centres:
        window = slice(centre - 1, centre + 2)
        if centre + 1 < len(out) and not np.isin(out[window], [*noise.special_ids, noise.mask_id]).any():
            out[window] = out[window][rng.permutation(3)]
            done += 1
        if done >= budget:
            break
    return out, np.where(out != row, SHUFFLED, ORIGINAL).astype(np.int32)


@functools.cache  # once per run, not per row (a sort of the whole vocabulary)
def replacement_ids(vocab_size: int, never_drawn: tuple[int, ...]) -> np.ndarray:
    """The ids a replacement draws from: the vocabulary but `never_drawn`."""
    return np.setdiff1d(np.arange(vocab_size), never_drawn)


def random_replacement(
    row: np.ndarray, labels: np.ndarray, noise: Noise, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(the row with ceil(replace_ratio x length) drawn positions, those still ORIGINAL, set to random ids; labels
    REPLACED there)."""
    n = len(row)
    count = math.ceil(n * noise.replace_ratio)
    positions = rng.permutation(n - 2)[:count] + 1
    positions = positions[labels[positions] == ORIGINAL]
    allowed = replacement_ids(noise.vocab_size, noise.never_drawn)
    row, labels = row.copy(), labels.copy()
    row[positions] = rng.choice(allowed, size=len(positions))
    labels[positions] = REPLACED
    return row, labels


def corrupt(row: np.ndarray, noise: Noise, rng: np.random.Generator, max_len: int) -> dict[str, np.ndarray]:
    """One unpadded row -> {'noisy': every step, 'masked': text infilling only, 'labels': per noisy token}; noisy
    and masked have the same length (shuffling and replacing keep it)."""
    masked = text_infilling(row, noise, rng, max_len)
    noisy, labels = local_shuffle(masked, noise, rng) if noise.shuffle else (masked, np.zeros(len(masked), np.int32))
    if noise.replace_ratio > 0:
        noisy, labels = random_replacement(noisy, labels, noise, rng)
    return {'noisy': noisy, 'masked': masked, 'labels': labels}


def corrupt_batch(
    tokens: np.ndarray, mask: np.ndarray, noise: Noise, seed: int, first_row: int = 0
) -> dict[str, np.ndarray]:
    """Padded rows (B, L) -> 'noisy', 'noisy_mask', 'masked', 'labels' (B, L) int32, right-padded (the masked rows
    share noisy_mask: they have the same lengths). Row i draws from the Generator of (seed, first_row + i): its
    place in the global batch."""
    b, max_len = tokens.shape
    out = {k: np.zeros((b, max_len), np.int32) for k in ('noisy_mask', 'labels')}
    out['noisy'], out['masked'] = (np.full((b, max_len), noise.pad_id, np.int32) for _ in range(2))
    for i in range(b):
        n = int(mask[i].sum())
        got = corrupt(tokens[i, :n], noise, np.random.default_rng([seed, first_row + i]), max_len)
        length = len(got['noisy'])
        out['noisy'][i, :length], out['masked'][i, :length], out['labels'][i, :length] = (
            got['noisy'],
            got['masked'],
            got['labels'],
        )
        out['noisy_mask'][i, :length] = 1
    return out
