"""SpeechT5's text pre-training input (microsoft/SpeechT5: speecht5/data/text_dataset.py, tasks/speecht5.py), host-side
numpy: sentences spelled in characters, each one sample framed as <s> ... </s>, corrupted by BART's text infilling.

- vocabulary (`CharDictionary`): fairseq's Dictionary (<s> 0, <pad> 1, </s> 2, <unk> 3, the symbols by falling
  count, then <mask> appended by the task) over the corpus's characters, as the reference's character-level
  SentencePiece model (its spm_char model: 4 specials + 75 pieces + <mask> + <ctc_blank>; the CTC blank is left out
  here: no pre-training term reads it).
- samples longer than `max_len` tokens are dropped, as the task's size filter (max_text_positions 600).
- noise (jaxssl.data.text_noise.text_infilling): ceil(0.3 x (n - 2)) tokens in Poisson(3.5) spans, each span one
  <mask> (10% of them, and of the zero-length spans' inserts rounded up, a random symbol instead: BART's
  mask_random 0.1); no whole-word masking (the reference passes no --bpe), no permutation, rotation or insertion.
  The random symbols leave out <s> and <pad> (the reference's draw from [1, V) can pick <pad>, which its encoder then
  takes for padding).
- decoder: reads [</s>, <s>, t1, ..., tn] and predicts the clean [<s>, t1, ..., tn, </s>].
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from jaxssl.data import text_noise
from jaxssl.data.transcripts import EOS, PAD, SPECIALS

BOS = 0
MASK = '<mask>'


class CharDictionary:
    """fairseq's Dictionary of a corpus's characters: SPECIALS, the characters seen at least `min_count` times by
    falling count (ties by code point, so every process builds the same ids), then <mask>."""

    def __init__(self, sentences: Sequence[str], min_count: int = 1):
        counts = collections.Counter(ch for s in sentences for ch in s)
        chars = sorted((ch for ch, n in counts.items() if n >= min_count), key=lambda ch: (-counts[ch], ch))
        self.symbols = [*SPECIALS, *chars, MASK]
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.mask_id = self.index[MASK]

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, sentence: str) -> np.ndarray:
        """[<s>, the characters' ids (unknown ones <unk>), </s>] int32."""
        unk = SPECIALS.index('<unk>')
        return np.asarray([BOS, *(self.index.get(ch, unk) for ch in sentence), EOS], np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return ''.join(self.symbols[i] if i >= len(SPECIALS) else '' for i in ids)


def make_noise(dictionary: CharDictionary, mask_ratio: float, poisson_lambda: float, random_ratio: float):
    """text_noise's settings for BART's text infilling alone (no shuffle, no replacement pass)."""
    return text_noise.Noise(
        mask_id=dictionary.mask_id, pad_id=PAD, special_ids=(BOS, PAD, EOS), vocab_size=len(dictionary),
        never_drawn=(BOS, PAD), mask_ratio=mask_ratio, poisson_lambda=poisson_lambda, shuffle=False,
        replace_ratio=0.0, random_ratio=random_ratio,
    )  # fmt: skip


def denoising_rows(
    samples: Sequence[np.ndarray], noise: text_noise.Noise, rng: np.random.Generator, max_len: int
) -> dict[str, np.ndarray]:
    """Encoded samples ([<s>, ..., </s>], at most max_len long) -> (len(samples), max_len) int32 rows padded with
    <pad>: 'text_source' (the noised sample) with 'text_source_mask', 'text_prev' (the decoder's input: </s> then the
    clean sample but its last token), 'text_target' (the clean sample) with 'text_target_mask'."""
    n = len(samples)
    out = {k: np.full((n, max_len), PAD, np.int32) for k in ('text_source', 'text_prev', 'text_target')}
    out |= {k: np.zeros((n, max_len), np.int32) for k in ('text_source_mask', 'text_target_mask')}
    for i, sample in enumerate(samples):
        if len(sample) > max_len:
            raise ValueError(f'a sample of {len(sample)} tokens is longer than max_len {max_len}')
        source = text_noise.text_infilling(sample, noise, rng, max_len)
        out['text_source'][i, : len(source)], out['text_source_mask'][i, : len(source)] = source, 1
        out['text_target'][i, : len(sample)], out['text_target_mask'][i, : len(sample)] = sample, 1
        out['text_prev'][i, : len(sample)] = np.concatenate([[EOS], sample[:-1]])
    return out
