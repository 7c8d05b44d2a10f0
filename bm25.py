"""BM25 with `rank_bm25` and a Lucene-like English analyzer: what Anserini's BEIR "flat" baseline computes, so the
project's own first stage over a corpus (SciFact) matches published BM25 numbers (data.py's registry calls it).

Reading order: the analyzer (`analyze`: Lucene's stopwords, possessives, the Porter stemmer), `LuceneBM25` (Lucene's
idf), the cached index, retrieval. It knows nothing of the project's records: documents and queries are plain
{id: text} dicts, results plain (docid, score) lists.

    python data.py bm25 --dataset scifact        # nDCG@10 0.6768 via `python eval.py --dataset scifact --model bm25`
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
import time
from pathlib import Path
from typing import Callable

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


def bm25_index(corpus: dict[str, str], name: str, cache: Path,
               log: Callable[[str], None] = print) -> tuple[LuceneBM25, list[str]]:
    """Build (or load from `cache`) a BM25 index over `corpus`; returns it with the docids in index order.

    The cached file is named by a digest of the corpus, so an edited corpus is never served a stale index.
    """
    docids = list(corpus)
    digest = hashlib.sha1("\n".join(f"{d}\t{corpus[d]}" for d in docids).encode()).hexdigest()[:12]
    path = cache / f"bm25-{name}-{digest}.pkl"
    if path.exists():
        t = time.time()
        try:
            with open(path, "rb") as f:
                index = pickle.load(f)
            log(f"bm25: loaded cached index {path} ({len(docids)} docs) in {time.time() - t:.1f}s")
            return index, docids
        except Exception as e:  # a cache from another version of this code, or cut short: rebuild it
            log(f"bm25: rebuilding the cached index {path} ({type(e).__name__})")
    t = time.time()
    index = LuceneBM25([analyze(corpus[d]) for d in docids])
    log(f"bm25: indexed {len(docids)} docs in {time.time() - t:.1f}s -> {path}")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(index, f)
    tmp.replace(path)  # atomic: an interrupted run never leaves half an index behind
    return index, docids


def bm25_retrieve(corpus: dict[str, str], queries: dict[str, str], name: str, cache: Path, k: int = 100,
                  log: Callable[[str], None] = print) -> dict[str, list[tuple[str, float]]]:
    """{qid: [(docid, score), ...]} of the top `k` documents of `corpus` for each query, best first."""
    from tqdm import tqdm

    index, docids = bm25_index(corpus, name, cache, log)
    t = time.time()
    hits = {}
    for qid, text in tqdm(queries.items(), desc=f"bm25 {name}", unit="q", disable=len(queries) < 50):
        hits[qid] = [(docids[i], s) for i, s in index.top_k(analyze(text), k)]
    log(f"bm25: retrieved top-{k} for {len(queries)} queries in {time.time() - t:.1f}s")
    return hits
