"""Sentences for text pretraining, offline: corpora, Mirror-BERT's span masking, and a Grain pipeline of two tokenised
views per sentence.

Built-in corpora: `input.corpus='lee'`, the sentences of gensim's bundled Lee news corpus (lee_background.cor, 300
Australian news articles, about 2.6k sentences; the gensim wheel ships it under gensim/test/test_data); 'wiki', the
prose sentences of the Wikipedia excerpt gensim ships for its WikiCorpus tests (106 articles, ~18.8k sentences, 7x
Lee). Any other `input.corpus` is a UTF-8 text file with one sentence per line (the reference's training files have
that format).

Built-in similarity set: the Lee document-similarity benchmark (Lee, Pincombe & Welsh 2005; gensim ships it as lee.cor
and similarities0-1.txt): 50 short news documents (disjoint from lee_background) and the mean human similarity rating
of each of their 1,225 pairs, the STS-like set this project can score sentence encoders on offline.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["\'A-Z])')
MASK = '[MASK]'


def gensim_test_file(name: str) -> str:
    """A file of gensim's bundled test data, found without importing gensim."""
    spec = importlib.util.find_spec('gensim')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError('the built-in text data needs the gensim wheel: pip install gensim (or jaxssl[text])')
    return os.path.join(spec.submodule_search_locations[0], 'test', 'test_data', name)


def split_sentences(document: str) -> list[str]:
    """A document's sentences: cut after . ! ? followed by whitespace and a capital or quote."""
    return [s.strip() for s in SENTENCE_END.split(document) if s.strip()]


WIKI_DUMP = 'enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
# Prose lines of the wiki dump: at least this many characters, and not a heading, list, table or template line.
WIKI_MIN_LINE = 40
WIKI_MARKUP_STARTS = tuple('=*#|{:!;<')


def load_wiki_sentences() -> list[str]:
    """The prose sentences (4+ words) of gensim's bundled Wikipedia excerpt (106 English articles after the redirects,
    ~18.8k sentences, ~409k words): each page's wiki markup stripped by gensim's filter_wiki, bold / italic quotes
    removed, heading / list / table lines and short lines dropped, the rest cut into sentences."""
    import bz2

    from gensim.corpora import wikicorpus

    sentences = []
    with bz2.BZ2File(gensim_test_file(WIKI_DUMP)) as dump:
        for _, page, _ in wikicorpus.extract_pages(dump):
            plain = wikicorpus.filter_wiki(page)
            if plain.lstrip().upper().startswith('#REDIRECT'):
                continue
            for line in plain.splitlines():
                line = re.sub(r'\s+', ' ', re.sub(r"'{2,}", '', line)).strip()
                if len(line) >= WIKI_MIN_LINE and not line.startswith(WIKI_MARKUP_STARTS):
                    sentences += [s for s in split_sentences(line) if len(s.split()) >= 4]
    return sentences


def load_corpus(corpus: str) -> list[str]:
    """The sentences of `input.corpus`: 'lee', 'wiki' or a one-sentence-per-line text file (blank lines skipped)."""
    if corpus == 'lee':
        with open(gensim_test_file('lee_background.cor'), encoding='latin-1') as f:
            return [s for line in f for s in split_sentences(line)]
    if corpus == 'wiki':
        return load_wiki_sentences()
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus '{corpus}' not found: 'lee', 'wiki' or a text file with one sentence per line")
    with open(corpus, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


def load_lee_similarity() -> tuple[list[str], np.ndarray]:
    """(the 50 Lee documents, (1225,) human similarity of each pair i < j in row-major order)."""
    with open(gensim_test_file('lee.cor'), encoding='latin-1') as f:
        documents = [line.strip() for line in f if line.strip()]
    ratings = np.loadtxt(gensim_test_file('similarities0-1.txt'))
    if ratings.shape != (len(documents), len(documents)):
        raise ValueError(f'Lee ratings {ratings.shape} do not match {len(documents)} documents')
    rows, cols = np.triu_indices(len(documents), k=1)
    return documents, ratings[rows, cols]


def span_mask(sentence: str, span: int, min_chars: int, rng: np.random.Generator) -> str:
    """Mirror-BERT's random span masking (erase_and_mask): `span` consecutive characters starting at a uniform
    position in [0, len - span) are replaced by ' [MASK] ' (joined with spaces). Sentences shorter than `min_chars`
    characters (the reference's 30) or not longer than `span` are returned unchanged; span 0 disables it."""
    if span <= 0 or len(sentence) <= span or len(sentence) < min_chars:
        return sentence
    start = int(rng.integers(len(sentence) - span))
    return ' '.join([sentence[:start], MASK, sentence[start + span :]])


class CorpusVocabulary:
    """A tokenizer's ids restricted to those a corpus uses at least `min_count` times, renumbered 0..V-1 in the
    tokenizer's order (the special tokens always kept); every other id becomes [UNK]. A model trained from scratch on
    a small corpus then carries no embeddings and no softmax columns for ids it never sees (the Lee corpus uses 7.4k
    of the MiniLM vocabulary's 30.5k ids, 4.5k of them at least twice). Deterministic: the same corpus gives the same
    ids in every process and run."""

    def __init__(self, tokenizer: Any, sentences: list[str], min_count: int, max_len: int = 512):
        ids, mask = tokenizer(sentences, max_len)
        counts = np.bincount(ids[mask.astype(bool)], minlength=tokenizer.vocab_size)
        keep = counts >= min_count
        keep[[*tokenizer.special_ids, tokenizer.unk_id, tokenizer.mask_id]] = True
        self.kept = np.flatnonzero(keep)  # new id -> the tokenizer's id
        self._lookup = np.full(tokenizer.vocab_size, -1, np.int32)
        self._lookup[self.kept] = np.arange(len(self.kept), dtype=np.int32)
        self._lookup[~keep] = self._lookup[tokenizer.unk_id]
        self._tokenizer = tokenizer
        self.vocab_size = len(self.kept)
        self.pad_id, self.unk_id, self.mask_id = (
            int(self._lookup[i]) for i in (tokenizer.pad_id, tokenizer.unk_id, tokenizer.mask_id)
        )
        self.special_ids = tuple(int(self._lookup[i]) for i in tokenizer.special_ids)
        self.mask_token = tokenizer.mask_token

    def __call__(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self._tokenizer(texts, max_len)
        return self._lookup[ids], mask


class SentenceSource:
    """Random access to sentence indices (Grain batches integers; the sentences stay in this process)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, position: int) -> np.int64:
        return np.int64(position)


def two_view_batch(
    sentences: list[str],
    indices: np.ndarray,
    tokenize: Callable[[list[str], int], tuple[np.ndarray, np.ndarray]],
    max_len: int,
    span: int,
    min_chars: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The two views of each sentence, adjacent: rows 2i (the sentence) and 2i + 1 (span-masked, as the reference's
    view 2); 'tokens' and 'mask' (2B, max_len) int32, 'index' (B,)."""
    texts = []
    for i in indices:
        s = sentences[int(i)]
        texts += [s, span_mask(s, span, min_chars, rng)]
    tokens, mask = tokenize(texts, max_len)
    return {'tokens': tokens, 'mask': mask, 'index': np.asarray(indices, np.int64)}


def shuffled_batches(
    count: int,
    global_batch: int,
    seed: int,
    process_index: int,
    process_count: int,
    make: Callable[[np.ndarray, np.random.Generator, slice], dict[str, np.ndarray]],
) -> Any:
    """Host-local batches `make(indices, rng, rows)` of the shuffled, repeated indices 0..count-1 (sentences or
    rows) of each global batch (whole batches only, drop_last as the references); `rows` is this process's share of
    the global batch. Every process draws the same global batch, so the stream does not depend on the process count."""
    if global_batch % process_count:
        raise ValueError(f'global batch {global_batch} is not divisible by {process_count} processes')
    if count < global_batch:
        raise ValueError(f'{count} sentences or rows are fewer than one global batch of {global_batch}')
    shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence([seed, 11]).generate_state(2))
    local = global_batch // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    ds = grain.MapDataset.source(SentenceSource(count)).shuffle(seed=shuffle_seed).repeat()
    batches = ds.batch(global_batch, drop_remainder=True)
    return batches.random_map(lambda indices, rng: make(indices, rng, rows), seed=map_seed).to_iter_dataset()


def make_pretrain_dataset(
    sentences: list[str],
    tokenize: Callable[[list[str], int], tuple[np.ndarray, np.ndarray]],
    global_batch: int,
    max_len: int,
    span: int,
    min_chars: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Any:
    """Host-local batches of two views per sentence (Mirror-BERT), shuffled, repeated, whole batches only."""

    def views(indices: np.ndarray, rng: np.random.Generator, rows: slice) -> dict[str, np.ndarray]:
        batch = two_view_batch(sentences, indices, tokenize, max_len, span, min_chars, rng)
        view_rows = slice(2 * rows.start, 2 * rows.stop)  # the views of this process's sentences
        return {'tokens': batch['tokens'][view_rows], 'mask': batch['mask'][view_rows], 'index': batch['index'][rows]}

    return shuffled_batches(len(sentences), global_batch, seed, process_index, process_count, views)


def pack_sentences(
    tokenize: Callable[[list[str], int], tuple[np.ndarray, np.ndarray]],
    sentences: list[str],
    max_len: int,
    cls_id: int,
    chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """The corpus as one stream of tokens in its order, each sentence followed by its [SEP], cut into rows of [CLS]
    and the next max_len - 1 stream tokens (the last row padded): ids and masks (rows, max_len) int32. Every position
    holds text, as BERT's blocks of consecutive sentences and GPT-1's contiguous spans (a row of one padded sentence
    wastes most of a long max_len). Sentences longer than 512 tokens are truncated."""
    parts = []
    for lo in range(0, len(sentences), chunk):
        ids, mask = tokenize(sentences[lo : lo + chunk], 512)
        parts += [row[1 : int(m.sum())] for row, m in zip(ids, mask, strict=True)]  # drops [CLS], keeps [SEP]
    stream = np.concatenate(parts).astype(np.int32)
    body = max_len - 1
    rows = -(-len(stream) // body)
    tokens = np.zeros((rows, max_len), np.int32)
    mask = np.zeros((rows, max_len), np.int32)
    flat = np.zeros(rows * body, np.int32)
    flat[: len(stream)] = stream
    tokens[:, 0], tokens[:, 1:] = cls_id, flat.reshape(rows, body)
    mask[:, 0] = 1
    mask[:, 1:] = (np.arange(rows * body) < len(stream)).reshape(rows, body)
    return tokens, mask


def make_sentence_dataset(
    sentences: list[str],
    tokenize: Callable[[list[str], int], tuple[np.ndarray, np.ndarray]],
    global_batch: int,
    max_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Any:
    """Host-local batches of tokenised sentences, one a row ('tokens', 'mask' (B, max_len) int32, 'index' (B,)),
    shuffled, repeated, whole batches only (language-model pretraining draws its masks on the device)."""

    def one_view(indices: np.ndarray, rng: np.random.Generator, rows: slice) -> dict[str, np.ndarray]:
        del rng
        tokens, mask = tokenize([sentences[int(i)] for i in indices[rows]], max_len)
        return {'tokens': tokens, 'mask': mask, 'index': np.asarray(indices[rows], np.int64)}

    return shuffled_batches(len(sentences), global_batch, seed, process_index, process_count, one_view)


def make_row_dataset(
    tokens: np.ndarray,
    mask: np.ndarray,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Any:
    """Host-local batches of pre-tokenised rows (`pack_sentences`), shuffled, repeated, whole batches only."""

    def gather(indices: np.ndarray, rng: np.random.Generator, rows: slice) -> dict[str, np.ndarray]:
        del rng
        mine = np.asarray(indices[rows], np.int64)
        return {'tokens': tokens[mine], 'mask': mask[mine], 'index': mine}

    return shuffled_batches(len(tokens), global_batch, seed, process_index, process_count, gather)
