"""BM25 baseline (the paper's Table 1 and 2 text-retrieval baseline).

Scoring is ``bm25s`` with its defaults (Lucene variant, k1=1.5, b=0.75).
Tokens are lowercase ``\\w+`` runs: no stemming and no stopword list, so the
ranking depends on nothing but this module and bm25s.

Rankings are deterministic: equal scores are broken by the lower corpus index.
Proponents are the highest-scoring documents among those sharing a word with
the query (score > 0: bm25s's IDF is positive for every indexed word), as a
search engine lists only matches; a query matching fewer than k documents
gets fewer proponents, so documents that share nothing with it are never
credited for ranking by corpus position. BM25 has no notion of a document
that works *against* a query, so its "opponents" are simply the
lowest-scoring documents, lowest first; most of them score 0, so in practice
they are the first corpus documents sharing no word with the query.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence

import bm25s
import numpy as np

# bm25s sets its own logger to DEBUG, so every index build logs a line
# wherever logging is configured (absl: to stderr). Its warnings still show.
logging.getLogger("bm25s").setLevel(logging.WARNING)

# Words, with the combining marks NFKC leaves (no precomposed letter) kept in
# them, not splitting them.
_TOKEN = re.compile(r"\w[\w\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff]*")


def tokenize(text: str) -> list[str]:
  """Case-folded word tokens of ``text``, in Unicode's compatibility form
  (NFKC): "café" typed as "cafe" and a combining accent is the word "café"
  (before 2026-12-07 the word "cafe"), "ﬁle" is "file", "Straße" "strasse"."""
  return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def query_text(query: dict) -> str:
  """The BM25 query for a queries-file record: prompt then target."""
  return f"{query['prompt']} {query['target']}"


def _select(scores: np.ndarray, k: int, lowest: bool) -> np.ndarray:
  """Indices of the k best (highest, or lowest) scores, ties to lower index."""
  n = scores.shape[0]
  if k >= n:
    candidates = np.arange(n)
  else:
    # Take every document tied with the k-th score so the stable sort below,
    # not argpartition's arbitrary choice, decides the ties.
    if lowest:
      kth = np.partition(scores, k - 1)[k - 1]
      candidates = np.flatnonzero(scores <= kth)
    else:
      kth = np.partition(scores, n - k)[n - k]
      candidates = np.flatnonzero(scores >= kth)
  key = scores[candidates] if lowest else -scores[candidates]
  order = np.argsort(key, kind="stable")  # candidates ascend, so ties keep it
  return candidates[order[:k]]


class BM25Index:
  """A BM25 index over a fixed list of texts."""

  def __init__(self, corpus_texts: Sequence[str]):
    if not corpus_texts:
      raise ValueError("BM25 needs a non-empty corpus")
    self.num_docs = len(corpus_texts)
    tokens = [tokenize(t) for t in corpus_texts]
    # Without a word in any document every score is 0 (bm25s cannot index
    # that: "max() arg is an empty sequence").
    self._bm25 = bm25s.BM25() if any(tokens) else None
    if self._bm25 is not None:
      self._bm25.index(tokens, show_progress=False)

  def scores(self, query: str) -> np.ndarray:
    """float32[num_docs] BM25 scores of every document for ``query``."""
    tokens = tokenize(query)
    if not tokens or self._bm25 is None:  # bm25s cannot score no tokens
      return np.zeros(self.num_docs, np.float32)
    return np.asarray(self._bm25.get_scores(tokens), np.float32)

  def search(self, query_texts: Sequence[str], k: int, *,
             lowest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(int64[Q, k'], float32[Q, k']) with k' = min(k, num_docs).

    Highest scores first among the documents matching the query (score > 0),
    the rest of a row padded with index -1 and score NaN; or with ``lowest``
    the lowest scores of all documents first. Ties go to the lower corpus
    index.
    """
    if k < 0:
      raise ValueError(f"k must be non-negative, got {k}")
    k = min(k, self.num_docs)
    indices = np.full((len(query_texts), k), -1, np.int64)
    values = np.full((len(query_texts), k), np.nan, np.float32)
    for i, q in enumerate(query_texts):
      s = self.scores(q)
      idx = _select(s, k, lowest) if k else np.zeros(0, np.int64)
      if not lowest:
        idx = idx[s[idx] > 0]
      indices[i, :len(idx)], values[i, :len(idx)] = idx, s[idx]
    return indices, values


def bm25_topk(corpus_texts: Sequence[str], query_texts: Sequence[str],
              k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-k matching corpus documents for each query: (int64[Q, k],
  float32[Q, k]).

  Best first, ties to the lower index, -1 and NaN past a query's matches; k
  is capped at the corpus size.
  """
  return BM25Index(corpus_texts).search(query_texts, k)


def bm25_bottomk(corpus_texts: Sequence[str], query_texts: Sequence[str],
                 k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k lowest-scoring documents per query (BM25's "opponents")."""
  return BM25Index(corpus_texts).search(query_texts, k, lowest=True)
