"""BM25 with a Lucene-like English analyzer: what Anserini's BEIR "flat" baseline computes, so the project's own first
stage over a corpus (SciFact, the other BEIR sets, BRIGHT) matches published BM25 numbers (data.py's registry calls it).
`LuceneBM25` is the reference (`rank_bm25` with Lucene's idf); `InvertedBM25` gives the same scores from an inverted
index, for corpora of millions of documents. Documents and queries are plain {id: text} dicts.

    python -m support.datasets bm25 --dataset scifact      # build and cache the index
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Callable, Collection, Mapping

import numpy as np
from rank_bm25 import BM25Okapi

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with".split()
)
_TOKEN = re.compile(r"\w+")
_stemmer = None


def analyze(text: str) -> list[str]:
    """Lowercase, drop possessive 's, split on non-word characters, drop Lucene's stopwords, Porter-stem.

    >>> analyze("The Cats' owner's dogs are running")
    ['cat', 'owner', 'dog', 'run']
    """
    global _stemmer
    if _stemmer is None:
        import Stemmer  # PyStemmer: Snowball's C stemmers; "porter" is Lucene's PorterStemFilter algorithm

        _stemmer = Stemmer.Stemmer("porter")
    text = re.sub(r"['\u2019]s\b", "", text.lower())
    return _stemmer.stemWords([t for t in _TOKEN.findall(text) if t not in STOPWORDS])


class LuceneBM25(BM25Okapi):
    """rank_bm25's BM25Okapi with Lucene's idf, log(1 + (N - df + 0.5) / (df + 0.5)), which is never negative.

    rank_bm25's own idf goes negative for terms in over half the corpus and patches that with an epsilon floor;
    Lucene (and so Anserini, whose numbers we compare with) does not. k1=0.9, b=0.4 are Anserini's defaults.
    """

    def __init__(self, corpus_tokens: list[list[str]], k1: float = 0.9, b: float = 0.4):
        super().__init__(corpus_tokens, k1=k1, b=b)

    def _calc_idf(self, nd: dict[str, int]) -> None:
        self.idf = {w: math.log(1 + (self.corpus_size - df + 0.5) / (df + 0.5)) for w, df in nd.items()}

    def top_k(self, query_tokens: list[str], k: int) -> list[tuple[int, float]]:
        """(document index, score) of the k best documents; ties broken by index for determinism."""
        scores = self.get_scores(query_tokens)
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        return [(int(i), float(scores[i])) for i in order]


class InvertedBM25:
    """LuceneBM25's scores, bit for bit, from an inverted index: each term's postings (document, BM25 weight) in numpy
    arrays. rank_bm25 walks every document for every query word in Python, which takes hours for BRIGHT's long queries
    over LeetCode's 414k documents and needs a dict per document (DBPedia: 4.6M); here a query word costs its postings.

    The weight is rank_bm25's expression evaluated in the same order, and a query adds its words' weights in its own
    order, so every score (and so every tie) is the one LuceneBM25 gives; tests/test_suite.py checks it.
    """

    def __init__(self, corpus_tokens: list[list[str]], k1: float = 0.9, b: float = 0.4):
        vocab: dict[str, int] = {}
        terms, docs, tfs = array("l"), array("l"), array("l")  # compact: a Python list of ints would be 10x bigger
        lengths = np.array([len(t) for t in corpus_tokens], dtype=np.int64)
        for d, tokens in enumerate(corpus_tokens):
            counts = Counter(tokens)
            terms.extend(vocab.setdefault(word, len(vocab)) for word in counts)
            tfs.extend(counts.values())
            docs.extend([d] * len(counts))
        terms, docs, tfs = (np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64)
                            for a in (terms, docs, tfs))
        order = np.argsort(terms, kind="stable")  # postings by term, documents ascending within a term
        self.vocab, self.n = vocab, len(corpus_tokens)
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(terms, minlength=len(vocab)))])
        self.docs = docs[order]
        df = np.diff(self.indptr)
        idf = np.array([math.log(1 + (self.n - f + 0.5) / (f + 0.5)) for f in df.tolist()])  # math.log, as rank_bm25
        avgdl = int(lengths.sum()) / self.n
        tf, dl = tfs[order], lengths[self.docs]
        self.weights = idf[terms[order]] * (tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl)))

    def get_scores(self, query_tokens: list[str]) -> np.ndarray:
        scores = np.zeros(self.n)
        for word in query_tokens:  # a repeated word counts again, as in rank_bm25 (and a Lucene bag of words)
            t = self.vocab.get(word)
            if t is not None:
                s, e = self.indptr[t], self.indptr[t + 1]
                scores[self.docs[s:e]] += self.weights[s:e]  # a term lists each document once: no lost updates
        return scores

    def top_k(self, query_tokens: list[str], k: int, exclude: Collection[int] = ()) -> list[tuple[int, float]]:
        """(document index, score) of the k best documents, ties broken by index; `exclude`d documents never appear."""
        scores = self.get_scores(query_tokens)
        keep = np.ones(self.n, dtype=bool)
        keep[list(exclude)] = False
        idx = np.flatnonzero(keep)
        order = idx[np.lexsort((idx, -scores[idx]))[:k]]
        return [(int(i), float(scores[i])) for i in order]


def bm25_index(corpus: dict[str, str], name: str, cache: Path,
               log: Callable[[str], None] = print) -> tuple[InvertedBM25, list[str]]:
    """Build (or load from `cache`) a BM25 index over `corpus`; returns it with the docids in index order.

    The cached file is named by a digest of the corpus, so an edited corpus is never served a stale index.
    """
    docids = list(corpus)
    digest = hashlib.sha1("\n".join(f"{d}\t{corpus[d]}" for d in docids).encode()).hexdigest()[:12]
    path = cache / f"bm25inv-{name}-{digest}.pkl"
    if path.exists():
        t = time.time()
        try:
            with open(path, "rb") as f:
                index = pickle.load(f)
            if not isinstance(index, InvertedBM25):
                raise TypeError(type(index).__name__)
            log(f"bm25: loaded cached index {path} ({len(docids)} docs) in {time.time() - t:.1f}s")
            return index, docids
        except Exception as e:  # a cache from another version of this code, or cut short: rebuild it
            log(f"bm25: rebuilding the cached index {path} ({type(e).__name__})")
    t = time.time()
    index = InvertedBM25([analyze(corpus[d]) for d in docids])
    log(f"bm25: indexed {len(docids)} docs in {time.time() - t:.1f}s -> {path}")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(index, f)
    tmp.replace(path)  # atomic: an interrupted run never leaves half an index behind
    return index, docids


def bm25_retrieve(corpus: dict[str, str], queries: dict[str, str], name: str, cache: Path, k: int = 100,
                  log: Callable[[str], None] = print,
                  exclude: Mapping[str, Collection[str]] | None = None) -> dict[str, list[tuple[str, float]]]:
    """{qid: [(docid, score), ...]} of the top `k` documents of `corpus` for each query, best first. `exclude[qid]`:
    documents never returned for that query (BRIGHT's excluded_ids: e.g. the post the query was written from)."""
    from tqdm import tqdm

    index, docids = bm25_index(corpus, name, cache, log)
    position = {d: i for i, d in enumerate(docids)} if exclude else {}
    t = time.time()
    hits = {}
    for qid, text in tqdm(queries.items(), desc=f"bm25 {name}", unit="q", disable=len(queries) < 50):
        skip = [position[d] for d in (exclude or {}).get(qid, ()) if d in position]
        hits[qid] = [(docids[i], s) for i, s in index.top_k(analyze(text), k, skip)]
    log(f"bm25: retrieved top-{k} for {len(queries)} queries in {time.time() - t:.1f}s")
    return hits
