"""Sentence-encoder evaluation offline: similarity correlation with human ratings and paraphrase retrieval.

- Lee similarity (jaxssl.data.text.load_lee_similarity): the cosine similarity of the embeddings of each of the 1,225
  document pairs against the mean human rating, Spearman x 100 (as Mirror-BERT's STS evaluation scores STS files).
- Noisy-duplicate retrieval: each held-out sentence (the Lee test documents' sentences) against a copy with a share of
  its words deleted; top-1 accuracy of finding its own copy among all copies by cosine similarity. A proxy for
  paraphrase retrieval; word deletion is not the span masking the model trains on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

from jaxssl.data import text

Embed = Callable[[list[str]], np.ndarray]  # strings -> (N, D) float embeddings


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def spearman_x100(predicted: np.ndarray, gold: np.ndarray) -> float:
    return float(stats.spearmanr(predicted, gold).statistic * 100)


def lee_spearman(embed: Embed) -> float:
    documents, gold = text.load_lee_similarity()
    sims = cosine_matrix(*(embed(documents),) * 2)
    rows, cols = np.triu_indices(len(documents), k=1)
    return spearman_x100(sims[rows, cols], gold)


def delete_words(sentence: str, share: float, rng: np.random.Generator) -> str:
    """The sentence with round(share x words) words deleted at random (at least one word kept)."""
    words = sentence.split()
    drop = min(round(share * len(words)), len(words) - 1)
    keep = np.sort(rng.permutation(len(words))[drop:])
    return ' '.join(words[i] for i in keep)


def retrieval_sentences(max_sentences: int) -> list[str]:
    """Held-out sentences of 6+ words: those of the Lee test documents (never in the 'lee' training corpus)."""
    documents, _ = text.load_lee_similarity()
    sentences = [s for d in documents for s in text.split_sentences(d) if len(s.split()) >= 6]
    return sentences[:max_sentences] if max_sentences > 0 else sentences


def duplicate_retrieval(embed: Embed, max_sentences: int = 0, share: float = 0.5, seed: int = 0) -> float:
    """Top-1 accuracy (%) of retrieving each sentence's word-deleted copy among all copies."""
    sentences = retrieval_sentences(max_sentences)
    rng = np.random.default_rng(seed)
    copies = [delete_words(s, share, rng) for s in sentences]
    sims = cosine_matrix(embed(sentences), embed(copies))
    return float(np.mean(np.argmax(sims, axis=1) == np.arange(len(sentences))) * 100)


def swap_two_words(sentence: str, rng: np.random.Generator) -> str:
    """The sentence (2+ words) with two of its words, drawn at random, exchanged (two different words, so the text
    changes, unless all its words are the same)."""
    words = sentence.split()
    for _ in range(100):
        i, j = rng.choice(len(words), 2, replace=False)
        if words[i] != words[j]:
            words[i], words[j] = words[j], words[i]
            break
    return ' '.join(words)
