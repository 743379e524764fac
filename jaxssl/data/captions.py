"""Image-caption pairs for CLIP on Grain: caption sources, the tokenizer, and the pretraining pipeline.

Sources return the image records of jaxssl.data.images plus 'captions', a list of strings (one is drawn per step,
as for datasets with several captions per image, e.g. COCO's five or DataCompDR's synthetic ones):
  CaptionCsvSource     open_clip's CSV format (`--csv-img-key filepath --csv-caption-key title`, tab separated);
                       relative image paths are read from the CSV's folder. Rows without an image path or a caption
                       are left out and counted; unreadable images are skipped and counted by the loader.
  DigitCaptionSource   'mnist_digits', the built-in set: the 5,000 real MNIST digits (jaxssl.data.images), each with
                       five captions generated from its label and from what its pixels show: stroke weight and
                       slant (each a tertile of the 5,000 digits), e.g. "a bold handwritten seven, leaning right.".

Tokens: [start-of-text] + BPE ids + [end-of-text], truncated to the context length with end-of-text kept last
(open_clip's tokenize), padded with 0. `text.tokenizer` names a tokenizer.json (or a folder holding one: every
transformers CLIP checkpoint has it), read offline with the `tokenizers` library; its normaliser lower-cases as
CLIP's. The built-in captions use a word-level vocabulary of their own words instead (no download, no training).
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxssl.data import images as image_data

START, END = '<|startoftext|>', '<|endoftext|>'
DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
WEIGHTS = ('thin', 'regular', 'bold')
SLANTS = ('leaning left', 'upright', 'leaning right')
DIGIT_TEMPLATES = (
    'a photo of the number {word}.',
    'a handwritten {word}.',
    'a {weight} {word}.',
    'the digit {numeral}, {slant}.',
    'a {weight} handwritten {word}, {slant}.',
)
# Zero-shot prompts for the built-in digits: class names are DIGIT_WORDS.
DIGIT_ZERO_SHOT_TEMPLATES = ('a photo of the number {}.', 'a handwritten {}.')
# CLIP's seven-template ImageNet ensemble (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb): the default
# zero-shot prompts for class folders, whose class names are the folder names.
IMAGENET_TEMPLATES = (
    'itap of a {}.',
    'a bad photo of the {}.',
    'a origami {}.',
    'a photo of the large {}.',
    'a {} in a video game.',
    'art of the {}.',
    'a photo of the small {}.',
)


class CaptionTokenizer:
    """Strings -> int32 (N, context_length) token ids, as open_clip's tokenize: start, ids, end, zeros; a caption too
    long keeps its first context_length - 1 tokens and ends with end-of-text."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.sot_id, self.eot_id = tokenizer.token_to_id(START), tokenizer.token_to_id(END)
        if self.sot_id is None or self.eot_id is None:
            raise ValueError(f'the tokenizer has no {START} / {END} tokens (not a CLIP tokenizer)')
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_file(cls, path: str) -> CaptionTokenizer:
        """A tokenizer.json, or a folder holding one (a transformers CLIP checkpoint)."""
        from tokenizers import Tokenizer

        file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f'{path}: no tokenizer.json')
        return cls(Tokenizer.from_file(file))

    def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
        out = np.zeros((len(texts), context_length), np.int32)
        for i, encoding in enumerate(
            self._tok.encode_batch([' '.join(t.split()) for t in texts], add_special_tokens=False)
        ):
            row = [*[self.sot_id, *encoding.ids][: context_length - 1], self.eot_id]
            out[i, : len(row)] = row
        return out

    def __getstate__(self) -> dict[str, Any]:  # Grain workers get a copy: the tokenizer travels as its JSON
        return {'json': self._tok.to_str()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_str(state['json']))


def word_tokenizer(words: Sequence[str]) -> CaptionTokenizer:
    """A word-level CLIP-style tokenizer over `words` (lower-cased; words and punctuation split as BERT's
    pre-tokenizer): id 0 pads, then '<unk>', the sorted words, start and end of text (end last, as CLIP's)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = ['<pad>', '<unk>', *sorted({w.lower() for w in words}), START, END]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token='<unk>'))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return CaptionTokenizer(tokenizer)


def digit_vocabulary() -> list[str]:
    """Every word and punctuation mark the built-in captions and zero-shot prompts use."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    texts = [*DIGIT_TEMPLATES, *DIGIT_ZERO_SHOT_TEMPLATES, *DIGIT_WORDS, *WEIGHTS, *SLANTS, *map(str, range(10))]
    return sorted({piece for text in texts for piece, _ in split(text.replace('{', ' ').replace('}', ' '))})


# --- sources ---------------------------------------------------------------------------------------------------------


def digit_attributes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ink, slant) of uint8 digits (N, 28, 28): mean intensity, and the horizontal shear of the ink's second moments
    (positive: the top leans right; rows count downwards)."""
    ink = images.astype(np.float64) / 255.0
    mass = ink.sum(axis=(1, 2))
    rows, cols = np.mgrid[: images.shape[1], : images.shape[2]]
    mean_r = (ink * rows).sum(axis=(1, 2)) / mass
    mean_c = (ink * cols).sum(axis=(1, 2)) / mass
    dr, dc = rows[None] - mean_r[:, None, None], cols[None] - mean_c[:, None, None]
    cov = (ink * dr * dc).sum(axis=(1, 2)) / mass
    var_r = (ink * dr * dr).sum(axis=(1, 2)) / mass
    return mass / ink[0].size, -cov / var_r


@functools.cache
def _digit_captions() -> list[list[str]]:
    """The five captions of each of the 5,000 digits, in jaxssl.data.images' order; attribute tertiles over all."""
    digits, labels, _ = image_data._digits()
    ink, slant = digit_attributes(digits)
    tertile = lambda values: np.searchsorted(np.quantile(values, [1 / 3, 2 / 3]), values)
    weight, lean = tertile(ink), tertile(slant)
    return [
        [t.format(word=DIGIT_WORDS[y], numeral=y, weight=WEIGHTS[w], slant=SLANTS[s]) for t in DIGIT_TEMPLATES]
        for y, w, s in zip(labels, weight, lean, strict=True)
    ]


class DigitCaptionSource(image_data.DigitsSource):
    """The built-in digits with five generated captions each (see the module docstring); labels kept for probes."""

    def __init__(self, split: str = 'train'):
        super().__init__(split)
        captions = _digit_captions()
        self._captions = [captions[i] for i in self._index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**super().__getitem__(index), 'captions': self._captions[index]}

    def __repr__(self) -> str:
        return f'DigitCaptionSource({self.split!r}, {len(self)} images)'


class CaptionCsvSource:
    """Image-caption pairs listed in a CSV file (open_clip's CsvDataset): one row per pair, an image path column and
    a caption column. Rows missing either are left out and counted in `skipped_rows`."""

    def __init__(self, path: str, image_key: str = 'filepath', caption_key: str = 'title', separator: str = '\t'):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path}: no such caption file')
        root = os.path.dirname(os.path.abspath(path))
        self.path, self.label_keys = path, ()
        self._rows: list[tuple[str, str]] = []
        self.skipped_rows = 0
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f, delimiter=separator)
            missing = {image_key, caption_key} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f'{path}: no column {", ".join(sorted(missing))} (columns: {reader.fieldnames})')
            for row in reader:
                image, caption = (row.get(image_key) or '').strip(), (row.get(caption_key) or '').strip()
                if not image or not caption:
                    self.skipped_rows += 1
                    continue
                self._rows.append((os.path.join(root, image), caption))
        if not self._rows:
            raise ValueError(f'{path}: no row with both an image path and a caption')
        if self.skipped_rows:
            print(f'{path}: {self.skipped_rows} rows without an image path or a caption left out', flush=True)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, caption = self._rows[index]
        return {'name': image, 'image': image, 'kind': 'file', 'captions': [caption]}

    def __repr__(self) -> str:
        return f'CaptionCsvSource({self.path!r}, {len(self)} pairs)'


# --- the pretraining pipeline -----------------------------------------------------------------------------------------


def decode_pair(record: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """(uint8 RGB image, its captions); DecodeError for an unreadable image (the loader skips and counts it)."""
    return image_data.decode_image(record), record['captions']


class PairView:
    """(image, captions) -> {'image': one augmented view, 'tokens': one caption drawn at random, tokenised}."""

    def __init__(self, image_view: image_data.View, tokenizer: CaptionTokenizer, context_length: int):
        self.image_view, self.tokenizer, self.context_length = image_view, tokenizer, context_length

    def __call__(self, pair: tuple[np.ndarray, list[str]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, captions = pair
        caption = captions[int(rng.integers(len(captions)))]
        return {'image': self.image_view(image, rng), 'tokens': self.tokenizer([caption], self.context_length)[0]}
