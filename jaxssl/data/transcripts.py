"""Transcribed speech for CTC fine-tuning (wav2vec 2.0): fairseq's manifests and letter dictionaries, spellings of the
built-in synthetic words, greedy CTC decoding and error rates.

fairseq's layout (examples/wav2vec/wav2vec_manifest.py + libri_labels.py), in `input.manifest_dir`:
  <split>.tsv    first line the audio root; then one `relative/path.wav<TAB>num_samples` line per utterance
  <split>.ltr    the same utterances' transcripts as letters separated by spaces, `|` ending each word
                 ("H E L L O | W O R L D |")
  dict.ltr.txt   one `letter count` line per letter; ids follow fairseq's Dictionary: <s> (0, the CTC blank),
                 <pad> (1), </s> (2), <unk> (3), then the letters in file order.
Utterances longer than `max_samples` or shorter than `min_samples` (by the manifest's count) are left out and
counted, as fairseq's skip_invalid_size_inputs; unreadable files are skipped and counted by the loader.

The built-in `synthetic_words` are spelled by their sounds: vowels and fricatives as letters (`sh` is two), a
rising or falling pitch as `+` or `-` after its vowel, e.g. word 9 is "e + s h u - |".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxssl.data import audio

SPECIALS = ('<s>', '<pad>', '</s>', '<unk>')
BLANK, PAD, EOS, UNK = 0, 1, 2, 3
WORD_END = '|'
_CONTOURS = {1: '+', -1: '-', 0: '', None: ''}


def spell(word: Sequence[tuple[str, int | None]]) -> str:
    """A synthetic word as fairseq letters: 'o + s |' for (('o', 1), ('s', None))."""
    letters = [ch for sound, contour in word for ch in sound + _CONTOURS[contour]]
    return ' '.join([*letters, WORD_END])


SYNTHETIC_SPELLINGS = tuple(spell(word) for word in audio.SYNTHETIC_WORDS)


class LetterDictionary:
    """fairseq's Dictionary of letters: `SPECIALS`, then `letters` in order."""

    def __init__(self, letters: Sequence[str]):
        self.symbols = [*SPECIALS, *letters]
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_file(cls, path: str) -> LetterDictionary:
        with open(path, encoding='utf-8') as f:
            return cls([line.split()[0] for line in f if line.strip()])

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, letters: str) -> np.ndarray:
        """'H E L L O |' -> int32 ids (unknown letters -> <unk>)."""
        return np.asarray([self.index.get(s, UNK) for s in letters.split()], np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return ' '.join(self.symbols[i] for i in ids)


class SpelledWords:
    """The built-in synthetic words with their spellings: records gain 'transcript', the index of the spelling."""

    def __init__(self, source: audio.SyntheticWordsSource):
        self.source, self.label_keys = source, ('label', 'transcript')
        self.transcripts = list(SYNTHETIC_SPELLINGS)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        return {**record, 'transcript': record['label']}

    def __repr__(self) -> str:
        return f'SpelledWords({self.source!r})'


class ManifestSource:
    """One split of a fairseq manifest (see the module docstring): records of WAV files with 'transcript' (the row
    of `transcripts`, the letters)."""

    label_keys = ('transcript',)

    def __init__(self, manifest_dir: str, split: str, max_samples: int, min_samples: int = 0):
        tsv, ltr = (os.path.join(manifest_dir, f'{split}.{ext}') for ext in ('tsv', 'ltr'))
        for path in (tsv, ltr):
            if not os.path.isfile(path):
                raise FileNotFoundError(f'{path}: no such manifest file')
        with open(tsv, encoding='utf-8') as f:
            root = f.readline().strip()
            rows = [line.rstrip('\n').split('\t') for line in f if line.strip()]
        with open(ltr, encoding='utf-8') as f:
            letters = [line.strip() for line in f.read().splitlines()]  # an empty line is an empty transcript
        if len(letters) != len(rows):
            raise ValueError(f'{ltr}: {len(letters)} transcripts for the {len(rows)} utterances of {tsv}')
        self.name, self.files, self.transcripts, self.skipped = f'{manifest_dir}/{split}', [], [], 0
        self._lengths = []
        for row, text in zip(rows, letters, strict=True):
            if len(row) != 2 or not row[1].isdigit():
                raise ValueError(f'{tsv}: bad line {row!r}; expected path<TAB>num_samples')
            if not min_samples <= int(row[1]) <= max_samples:
                self.skipped += 1
                continue
            self.files.append(os.path.join(root, row[0]))
            self.transcripts.append(text)
            self._lengths.append(int(row[1]))
        if not self.files:
            raise ValueError(f'{tsv}: no utterance of {min_samples} to {max_samples} samples')
        if self.skipped:
            print(f'{tsv}: {self.skipped} utterances outside {min_samples}..{max_samples} samples left out', flush=True)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        return {'name': path, 'audio': path, 'kind': 'file', 'transcript': index}

    def __repr__(self) -> str:
        return f'ManifestSource({self.name!r}, {len(self)} utterances)'

    def lengths(self, sample_rate: int) -> np.ndarray:
        """The manifest's sample counts (fairseq's manifests are at the model's 16 kHz, as input.sample_rate)."""
        del sample_rate
        return np.asarray(self._lengths, np.int64)


def greedy_decode(frame_ids: np.ndarray, frames: int) -> list[int]:
    """fairseq's viterbi (argmax) decoding of one utterance: its first `frames` argmax ids, repeats merged, blanks
    dropped."""
    ids = np.asarray(frame_ids[:frames])
    if ids.size == 0:
        return []
    keep = np.concatenate([[True], ids[1:] != ids[:-1]]) & (ids != BLANK)
    return ids[keep].tolist()


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (unit insert / delete / substitute costs)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def words(letters: Sequence[str]) -> list[str]:
    """Letters with `|` word ends -> words (fairseq's post_process 'letter')."""
    return ''.join(' ' if s == WORD_END else s for s in letters).split()
