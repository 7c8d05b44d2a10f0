"""Datasets for reranking: typed records, loaders, BM25 first stage, and training-data augmentation.

Everything the rest of the project reads goes through the records defined here:

    Query(qid, text)                  a search query
    Candidate(docid, text, score)     one first-stage hit
    Ranking(query, candidates)        the ordered candidate list of one query
    Qrels = {qid: {docid: grade}}     graded judgments (trec_eval's own layout)

Datasets by name (see DATASETS): dl19, dl20 (TREC DL BM25 top-100, test sets), dl21 (graded MS MARCO v2 queries,
the training seeds; never a test set), scifact (BEIR test split) and scifact-train, for which the project runs its own
BM25 (rank_bm25 with a Lucene-like English analyzer) over the corpus.

The data directory is --data-dir, else $REARANK_DATA, else ./data. Missing files are fetched from their public homes
when the machine is online; offline, the error lists what is missing and where it goes.

    python data.py list                                  # the registry
    python data.py bm25 --dataset scifact                # build/cache the BM25 index, report times
    python data.py augment --dataset dl21 --samples 50 --size 20 --out train.jsonl   # training sets (METHOD §4)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import re
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from rank_bm25 import BM25Okapi

from files import DataError, atomic_write, jsonl, lines, nonneg_float, nonneg_int, positive_int, read_json

# ----------------------------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Query:
    qid: str
    text: str


@dataclass(frozen=True)
class Candidate:
    docid: str
    text: str
    score: float = 0.0


@dataclass
class Ranking:
    """One query's candidates, best first."""

    query: Query
    candidates: list[Candidate]

    def docids(self) -> list[str]:
        return [c.docid for c in self.candidates]


Qrels = dict[str, dict[str, int]]  # qid -> docid -> grade


@dataclass
class Dataset:
    name: str
    rankings: list[Ranking]
    qrels: Qrels
    note: str = ""  # e.g. "never a test set"


# ----------------------------------------------------------------------------------------------------------------------
# the metric: nDCG@k exactly as trec_eval's ndcg_cut computes it (METHOD §8); eval.py and the reward use it


def ndcg_at_k(ranked: Sequence[str], grades: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k of docids in ranked order against one query's graded judgments (trec_eval `ndcg_cut.k`).

    Unjudged documents have gain 0; negative grades count as 0 (trec_eval ignores non-positive gains).
    The ideal DCG sorts *all* judged grades, so a list that misses relevant documents cannot reach 1.

    >>> round(ndcg_at_k(["a", "b", "c"], {"a": 1, "c": 3, "z": 2}, k=3), 4)
    0.525
    >>> ndcg_at_k(["a"], {"a": 0}, k=10)  # nothing relevant is judged: trec_eval reports 0
    0.0
    """
    if len(set(ranked)) != len(ranked):
        raise ValueError(f"duplicate docids in a ranking: {sorted(d for d in set(ranked) if ranked.count(d) > 1)}")
    dcg = sum(max(grades.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def trec_order(scores: Mapping[str, float]) -> list[str]:
    """Docids as trec_eval ranks them: score descending, ties by docid descending (string order).

    >>> trec_order({"d1": 1.0, "d3": 2.0, "d2": 1.0})
    ['d3', 'd2', 'd1']
    """
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def ndcg_bounds(docids: Sequence[str], judged: Mapping[str, int], k: int = 10) -> tuple[float, float]:
    """(r_init, r*): nDCG@k of `docids` as given and sorted by grade, against the query's full judgments.

    >>> [round(r, 4) for r in ndcg_bounds(["a", "b", "c"], {"c": 2, "z": 1}, k=3)]  # 'z' is not in P: r* < 1
    [0.3801, 0.7602]
    """
    best = sorted(docids, key=lambda d: -max(judged.get(d, 0), 0))  # stable: ties keep the initial order
    return ndcg_at_k(docids, judged, k), ndcg_at_k(best, judged, k)


# ----------------------------------------------------------------------------------------------------------------------
# small readers


def load_qrels(path: str | Path) -> Qrels:
    """TREC qrels (`qid 0 docid grade`) or BEIR qrels TSV (`query-id corpus-id score` with a header line).

    A judgment listed twice with the same grade is harmless; with two grades it is an error (which one is meant?).
    A file with no judgments is an error too: every evaluation against it would score nothing.
    """
    qrels: Qrels = {}
    where: dict[tuple[str, str], int] = {}  # (qid, docid) -> the line that judged it first
    for lineno, line in lines(path):
        parts = line.split()
        if lineno == 1 and parts[:1] == ["query-id"]:
            continue  # BEIR header
        if len(parts) == 4:
            qid, _, docid, grade = parts
        elif len(parts) == 3:
            qid, docid, grade = parts
        else:
            raise DataError(f"{path}:{lineno}: expected 'qid 0 docid grade' (or BEIR 'qid docid score'), got {line!r}")
        try:
            value = int(grade)
        except ValueError:
            raise DataError(f"{path}:{lineno}: grade {grade!r} is not an integer") from None
        before = qrels.setdefault(qid, {}).get(docid)
        if before is not None and before != value:
            raise DataError(f"{path}:{lineno}: query {qid} judges {docid} {value}, but line {where[qid, docid]} "
                            f"judged it {before}; keep one judgment")
        qrels[qid][docid] = value
        where.setdefault((qid, docid), lineno)
    if not qrels:
        raise DataError(f"{path}: no judgments in the file")
    return qrels


def load_topics(path: str | Path) -> dict[str, str]:
    """Topics TSV: `qid<TAB>query text` per line; a query id listed twice is an error."""
    topics = {}
    for lineno, line in lines(path):
        qid, sep, text = line.partition("\t")
        if not sep or not text.strip():
            raise DataError(f"{path}:{lineno}: expected 'qid<TAB>query', got {line!r}")
        if qid in topics:
            raise DataError(f"{path}:{lineno}: query {qid} is listed twice")
        topics[qid] = text.strip()
    return topics


def load_run(path: str | Path) -> dict[str, dict[str, float]]:
    """TREC run (`qid Q0 docid rank score tag`) -> {qid: {docid: score}}. Duplicate docids are an error (trec_eval)."""
    run: dict[str, dict[str, float]] = {}
    for lineno, line in lines(path):
        parts = line.split()
        if len(parts) != 6:
            raise DataError(f"{path}:{lineno}: expected 'qid Q0 docid rank score tag', got {line!r}")
        qid, _, docid, _, score, _ = parts
        try:
            value = float(score)
        except ValueError:
            raise DataError(f"{path}:{lineno}: score {score!r} is not a number") from None
        if not math.isfinite(value):  # trec_eval would sort a NaN anywhere: the ranking would be undefined
            raise DataError(f"{path}:{lineno}: score {score!r} is not a finite number")
        if docid in run.setdefault(qid, {}):
            raise DataError(f"{path}:{lineno}: docid {docid} appears twice for query {qid}")
        run[qid][docid] = value
    if not run:
        raise DataError(f"{path}: no run lines in the file")
    return run


def load_rankgpt(path: str | Path) -> list[Ranking]:
    """RankGPT-format JSON (`.json` or `.json.gz`): [{"query": str, "hits": [{"qid", "docid", "content", ...}]}]."""
    items = read_json(path)
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty JSON list of {{'query', 'hits'}} objects")
    rankings, seen = [], {}  # seen: qid -> the entry that listed it first
    for i, item in enumerate(items):
        where = f"{path}: entry {i}"
        if not isinstance(item, dict) or "query" not in item or "hits" not in item:
            raise DataError(f"{where}: expected an object with 'query' and 'hits'")
        if not isinstance(item["query"], str) or not item["query"].strip():
            raise DataError(f"{where}: 'query' must be a non-empty string, got {item['query']!r}")
        hits = item["hits"]
        if not isinstance(hits, list):
            raise DataError(f"{where} (query {item['query']!r}): 'hits' must be a list, got {hits!r:.80}")
        if not hits:
            raise DataError(f"{where} (query {item['query']!r}): empty candidate list")
        candidates = [_hit(h, f"{where}, hit {j}") for j, h in enumerate(hits)]
        qids = {str(h["qid"]) for h in hits}
        if len(qids) != 1:
            raise DataError(f"{where}: the hits name several query ids {sorted(qids)[:5]}; one entry is one query")
        qid = qids.pop()
        if qid in seen:  # a second copy would silently replace the first one's candidates downstream
            raise DataError(f"{where}: query {qid} is listed twice (first in entry {seen[qid]})")
        seen[qid] = i
        rankings.append(Ranking(Query(qid, item["query"]), candidates))
        check_unique(rankings[-1], where)
    return rankings


def _hit(h, where: str) -> Candidate:
    """One RankGPT hit as a Candidate; a missing field, a null or a wrong type is an error naming the hit."""
    if not isinstance(h, dict):
        raise DataError(f"{where}: expected an object with qid, docid, content, got {h!r:.80}")
    for key, kinds in (("qid", (str, int)), ("docid", (str, int)), ("content", (str,))):
        if key not in h:
            raise DataError(f"{where}: missing {key!r}; hits need qid, docid, content")
        if isinstance(h[key], bool) or not isinstance(h[key], kinds):  # a null content must not become "None"
            raise DataError(f"{where}: {key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {h[key]!r:.80}")
    score = h.get("score", 0.0)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(f"{where}: 'score' must be a finite number, got {score!r:.80}")
    return Candidate(str(h["docid"]), h["content"], float(score))


def check_unique(ranking: Ranking, where: str = "") -> None:
    """trec_eval refuses a ranking that lists a docid twice; so do we."""
    seen = set()
    for c in ranking.candidates:
        if c.docid in seen:
            raise DataError(f"{where or 'ranking'}: docid {c.docid} appears twice for query {ranking.query.qid}")
        seen.add(c.docid)


def _beir_record(path, lineno: int, rec: dict, what: str) -> tuple[str, str, str]:
    """(_id, text, title) of one BEIR line: `_id` a string or integer, `text` (and `title`, if any) strings."""
    _id, text, title = rec.get("_id"), rec.get("text"), rec.get("title") or ""
    if isinstance(_id, bool) or not isinstance(_id, (str, int)) or not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: a {what} line needs '_id' (string) and 'text' (string)")
    if not isinstance(title, str):
        raise DataError(f"{path}:{lineno}: 'title' must be a string, got {title!r:.80}")
    return str(_id), text, title


def load_beir_corpus(path: str | Path) -> dict[str, str]:
    """BEIR corpus.jsonl -> {docid: 'Title: {title} Content: {text}'} (METHOD §2; the prompt strips the labels)."""
    corpus: dict[str, str] = {}
    for lineno, doc in jsonl(path):
        docid, text, title = _beir_record(path, lineno, doc, "corpus")
        if docid in corpus:
            raise DataError(f"{path}:{lineno}: document {docid} is listed twice")
        title, text = title.strip(), text.strip()
        corpus[docid] = f"Title: {title} Content: {text}" if title else text
    if not corpus:
        raise DataError(f"{path}: no documents in the file")
    return corpus


def load_beir_queries(path: str | Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for lineno, q in jsonl(path):
        qid, text, _ = _beir_record(path, lineno, q, "query")
        if qid in queries:
            raise DataError(f"{path}:{lineno}: query {qid} is listed twice")
        queries[qid] = text
    return queries


def write_run(path: str | Path, rankings: Iterable[Ranking], tag: str = "rearank") -> None:
    """TREC run file. Scores fall strictly with rank (n, n-1, ..., 1): trec_eval orders by score, not by rank."""
    with atomic_write(path) as f:
        for r in rankings:
            check_unique(r, str(path))
            n = len(r.candidates)
            for i, c in enumerate(r.candidates):
                f.write(f"{r.query.qid} Q0 {c.docid} {i + 1} {n - i} {tag}\n")


def write_rankgpt(path: str | Path, rankings: Iterable[Ranking]) -> None:
    """The inverse of load_rankgpt, so any first stage can be handed to `eval.py --candidates`."""
    items = [
        {
            "query": r.query.text,
            "hits": [
                {"content": c.text, "qid": r.query.qid, "docid": c.docid, "rank": i + 1, "score": c.score}
                for i, c in enumerate(r.candidates)
            ],
        }
        for r in rankings
    ]
    with atomic_write(path) as f:
        f.write(json.dumps(items))


# ----------------------------------------------------------------------------------------------------------------------
# BM25 with rank_bm25 and a Lucene-like English analyzer (what Anserini's BEIR "flat" baseline uses)

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


def cache_dir() -> Path:
    """Where converted models and BM25 indexes live: $REARANK_CACHE, else ~/.cache/rearank."""
    d = Path(os.environ.get("REARANK_CACHE") or Path.home() / ".cache" / "rearank")
    d.mkdir(parents=True, exist_ok=True)
    return d


def bm25_index(corpus: dict[str, str], name: str, log: Callable[[str], None] = print) -> tuple[LuceneBM25, list[str]]:
    """Build (or load from the cache) a BM25 index over `corpus`; returns it with the docids in index order."""
    docids = list(corpus)
    digest = hashlib.sha1("\n".join(f"{d}\t{corpus[d]}" for d in docids).encode()).hexdigest()[:12]
    path = cache_dir() / f"bm25-{name}-{digest}.pkl"
    if path.exists():
        t = time.time()
        with open(path, "rb") as f:
            index = pickle.load(f)
        log(f"bm25: loaded cached index {path} ({len(docids)} docs) in {time.time() - t:.1f}s")
        return index, docids
    t = time.time()
    index = LuceneBM25([analyze(corpus[d]) for d in docids])
    log(f"bm25: indexed {len(docids)} docs in {time.time() - t:.1f}s -> {path}")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(index, f)
    tmp.replace(path)  # atomic: an interrupted run never leaves half an index behind
    return index, docids


def bm25_retrieve(
    corpus: dict[str, str], queries: dict[str, str], name: str, k: int = 100, log: Callable[[str], None] = print
) -> list[Ranking]:
    from tqdm import tqdm

    index, docids = bm25_index(corpus, name, log)
    t = time.time()
    rankings = []
    for qid, text in tqdm(queries.items(), desc=f"bm25 {name}", unit="q", disable=len(queries) < 50):
        hits = index.top_k(analyze(text), k)
        rankings.append(Ranking(Query(qid, text), [Candidate(docids[i], corpus[docids[i]], s) for i, s in hits]))
    log(f"bm25: retrieved top-{k} for {len(queries)} queries in {time.time() - t:.1f}s")
    return rankings


# ----------------------------------------------------------------------------------------------------------------------
# the data directory and its public homes


def data_dir(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get("REARANK_DATA") or "data")


RANK_LLM_DATA = "castorini/rank_llm_data"  # Hugging Face dataset with first-stage results (METHOD, data README)
QRELS_URL = "https://raw.githubusercontent.com/castorini/anserini-tools/master/topics-and-qrels/"
SCIFACT_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip"

# local path (relative to the data directory) -> how to fetch it when missing
REMOTE: dict[str, tuple[str, str]] = {
    "trec_dl/bm25_top100_dl19.rankgpt.json": ("hf", "retrieve_results/BM25/retrieve_results_dl19_top100.json"),
    "trec_dl/bm25_top100_dl20.rankgpt.json": ("hf", "retrieve_results/BM25/retrieve_results_dl20_top100.json"),
    "trec_dl21_msmarco_v2/bm25_top100_dl21.rankgpt.json": (
        "hf", "retrieve_results/BM25/retrieve_results_dl21_top100.json"
    ),
    "trec_dl/qrels.dl19-passage.txt": ("url", QRELS_URL + "qrels.dl19-passage.txt"),
    "trec_dl/qrels.dl20-passage.txt": ("url", QRELS_URL + "qrels.dl20-passage.txt"),
    "trec_dl21_msmarco_v2/qrels.dl21-passage.txt": ("url", QRELS_URL + "qrels.dl21-passage.txt"),
    "beir_scifact/corpus.jsonl": ("beir", "scifact/corpus.jsonl"),
    "beir_scifact/queries.jsonl": ("beir", "scifact/queries.jsonl"),
    "beir_scifact/qrels/test.tsv": ("beir", "scifact/qrels/test.tsv"),
    "beir_scifact/qrels/train.tsv": ("beir", "scifact/qrels/train.tsv"),
}


def _fetch(root: Path, rel: str) -> None:
    kind, src = REMOTE[rel]
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if kind == "hf":
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(RANK_LLM_DATA, src, repo_type="dataset")
        dest.write_bytes(Path(local).read_bytes())
    elif kind == "url":
        urllib.request.urlretrieve(src, dest)
    else:  # the BEIR zip holds every SciFact file at once
        zpath = root / "beir_scifact" / "scifact.zip"
        if not zpath.exists():
            urllib.request.urlretrieve(SCIFACT_URL, zpath)
        with zipfile.ZipFile(zpath) as z:
            dest.write_bytes(z.read(src))


def require(root: Path, rels: list[str]) -> list[Path]:
    """The paths of `rels` under `root`, fetching the missing ones; offline, one error that lists them all."""
    missing = [r for r in rels if not (root / r).exists()]
    failed = []
    for rel in missing:
        try:
            print(f"data: fetching {rel} ...", file=sys.stderr)
            _fetch(root, rel)
        except Exception as e:  # offline, hub down, proxy: we only need to say what to do next
            failed.append(f"  {root / rel}   (from {REMOTE[rel][1]}; {type(e).__name__})")
    if failed:
        raise DataError(
            "missing data files, and fetching them failed (offline?):\n"
            + "\n".join(failed)
            + "\nPut the files there, or point --data-dir / $REARANK_DATA at a directory laid out like this one."
        )
    return [root / r for r in rels]


# ----------------------------------------------------------------------------------------------------------------------
# the registry


def _trec_dl(year: str, folder: str) -> Callable[[Path], Dataset]:
    def load(root: Path) -> Dataset:
        run, qrels = require(root, [f"{folder}/bm25_top100_{year}.rankgpt.json", f"{folder}/qrels.{year}-passage.txt"])
        note = "training/dev queries: never a test set" if year == "dl21" else ""
        return Dataset(year, load_rankgpt(run), load_qrels(qrels), note)

    return load


def _scifact(split: str) -> Callable[[Path], Dataset]:
    def load(root: Path) -> Dataset:
        corpus_p, queries_p, qrels_p = require(
            root, ["beir_scifact/corpus.jsonl", "beir_scifact/queries.jsonl", f"beir_scifact/qrels/{split}.tsv"]
        )
        qrels = load_qrels(qrels_p)
        queries = load_beir_queries(queries_p)
        unknown = [q for q in qrels if q not in queries]
        if unknown:
            raise DataError(f"{qrels_p}: queries {unknown[:5]} are not in {queries_p}")
        corpus = load_beir_corpus(corpus_p)
        rankings = bm25_retrieve(corpus, {q: queries[q] for q in qrels}, "scifact")
        return Dataset("scifact" if split == "test" else f"scifact-{split}", rankings, qrels)

    return load


DATASETS: dict[str, Callable[[Path], Dataset]] = {
    "dl19": _trec_dl("dl19", "trec_dl"),
    "dl20": _trec_dl("dl20", "trec_dl"),
    "dl21": _trec_dl("dl21", "trec_dl21_msmarco_v2"),
    "scifact": _scifact("test"),
    "scifact-train": _scifact("train"),
}


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name](data_dir(root))


# ----------------------------------------------------------------------------------------------------------------------
# training instances: REARANK's "initial state expansion" (METHOD §4)


@dataclass
class TrainInstance:
    """One candidate set P of one query, in its initial order, with what the reward needs to score a reordering.

    `judged` holds the query's positive judgments (all of them, not only P's): the ideal DCG is computed from them.
    """

    qid: str
    query: str
    candidates: list[Candidate]  # P in its initial order
    grades: list[int]  # grade of each candidate (0 when unjudged)
    r_init: float  # nDCG@10 of P as given
    r_star: float  # nDCG@10 of P sorted by grade: the best any reordering can reach
    judged: dict[str, int] = field(default_factory=dict)


def make_instance(query: Query, candidates: list[Candidate], grades: dict[str, int]) -> TrainInstance:
    judged = {d: g for d, g in grades.items() if g > 0}
    r_init, r_star = ndcg_bounds([c.docid for c in candidates], judged)
    return TrainInstance(
        query.qid, query.text, candidates, [grades.get(c.docid, 0) for c in candidates], r_init, r_star, judged
    )


def write_instances(path: str | Path, instances: Iterable[TrainInstance]) -> None:
    """JSONL, one instance a line, written atomically."""
    with atomic_write(path) as f:
        for inst in instances:
            rec = {**inst.__dict__, "candidates": [c.__dict__ for c in inst.candidates]}
            f.write(json.dumps(rec) + "\n")


def read_instances(path: str | Path) -> list[TrainInstance]:
    """Read what write_instances wrote; a malformed line is an error naming the file and line."""
    instances = []
    for lineno, rec in jsonl(path):
        problem = _instance_problem(rec)
        if problem:
            raise DataError(f"{path}:{lineno}: not a training instance ({problem}); `data.py augment` writes them")
        cands = [Candidate(c["docid"], c["text"], float(c.get("score", 0.0))) for c in rec["candidates"]]
        instances.append(TrainInstance(**{**rec, "candidates": cands}))
    if not instances:
        raise DataError(f"{path}: no training instances")
    return instances


def _instance_problem(rec: dict) -> str:
    """What is wrong with one JSON training instance, or "" when nothing is.

    >>> _instance_problem({"qid": "q", "query": "x", "candidates": [{"docid": "d", "text": None}], "grades": [0],
    ...                    "r_init": 0.0, "r_star": 0.0})
    "candidate 0: 'text' must be a string"
    """
    names = {f.name for f in TrainInstance.__dataclass_fields__.values()}
    if missing := sorted(names - {"judged"} - rec.keys()):
        return f"missing {', '.join(missing)}"
    if extra := sorted(rec.keys() - names):
        return f"unknown field {', '.join(extra)}"
    if not all(isinstance(rec[k], str) for k in ("qid", "query")):
        return "'qid' and 'query' must be strings"
    cands, grades = rec["candidates"], rec["grades"]
    if not isinstance(cands, list) or not cands:
        return "'candidates' must be a non-empty list"
    for i, c in enumerate(cands):
        if not isinstance(c, dict):
            return f"candidate {i} must be an object"
        for key in ("docid", "text"):
            if not isinstance(c.get(key), str):
                return f"candidate {i}: {key!r} must be a string"
        if not _finite(c.get("score", 0.0)):
            return f"candidate {i}: 'score' must be a finite number"
    if len({c["docid"] for c in cands}) != len(cands):
        return "a docid appears twice among the candidates"
    if not isinstance(grades, list) or not all(_integer(g) for g in grades):
        return "'grades' must be a list of integers"
    if len(grades) != len(cands):
        return f"{len(grades)} grades for {len(cands)} candidates"
    if not (_finite(rec["r_init"]) and _finite(rec["r_star"])):
        return "'r_init' and 'r_star' must be finite numbers"
    judged = rec.get("judged", {})
    if not isinstance(judged, dict) or not all(_integer(g) for g in judged.values()):
        return "'judged' must map docids to integer grades"
    return ""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class AugmentStats:
    kept: int = 0
    no_relevant: int = 0  # P holds no relevant passage
    below: int = 0  # the filtered nDCG is under the threshold


def augment(
    ds: Dataset, samples: int = 50, size: int = 20, seed: int = 0, min_ndcg: float = 0.1, filter_on: str = "best"
) -> tuple[list[TrainInstance], AugmentStats]:
    """Sample `samples` candidate sets of `size` passages from each judged query's first-stage list (METHOD §4).

    Each set keeps the order it was drawn in (a random initial state, as the method's "initial state expansion"
    asks). Sets with no relevant passage are dropped, then sets whose nDCG@10 is below `min_ndcg`: the paper states
    that filter both on the initial nDCG and on the best reachable one; `filter_on="best"` (the default) filters on
    r*, which keeps badly ordered sets, the ones with the most to learn from; `"init"` filters on r_init.
    Reproducible: one random.Random(seed), queries in file order.
    """
    import random

    if filter_on not in ("best", "init"):
        raise ValueError(f"filter_on must be 'best' or 'init', not {filter_on!r}")
    rng, stats, instances = random.Random(seed), AugmentStats(), []
    for ranking in ds.rankings:
        grades = ds.qrels.get(ranking.query.qid)
        if not grades:
            continue  # an unjudged query cannot be scored
        for _ in range(samples):
            sample = rng.sample(ranking.candidates, min(size, len(ranking.candidates)))
            inst = make_instance(ranking.query, sample, grades)
            if not any(g > 0 for g in inst.grades):
                stats.no_relevant += 1
            elif (inst.r_star if filter_on == "best" else inst.r_init) < min_ndcg:
                stats.below += 1
            else:
                stats.kept += 1
                instances.append(inst)
    return instances, stats


def augment_setwise(
    ds: Dataset, samples: int = 50, size: int = 20, seed: int = 0, min_grade: int = 2
) -> tuple[list[TrainInstance], AugmentStats]:
    """Rank-R1's training sets (METHOD §6): one relevant passage (grade >= `min_grade`) and `size - 1` non-relevant
    ones from the same query's first-stage candidates, shuffled; up to `samples` sets per judged query.

    Non-relevant means judged 0 or unjudged (MS MARCO's convention: an unjudged passage counts as not relevant);
    passages with 0 < grade < min_grade are never used, so the label is unambiguous. A query with no relevant
    candidate, or too few non-relevant ones, gives no sets (counted as `no_relevant` / `below`).
    """
    import random

    rng, stats, instances = random.Random(seed), AugmentStats(), []
    for ranking in ds.rankings:
        grades = ds.qrels.get(ranking.query.qid)
        if not grades:
            continue
        relevant = [c for c in ranking.candidates if grades.get(c.docid, 0) >= min_grade]
        negatives = [c for c in ranking.candidates if grades.get(c.docid, 0) <= 0]
        if not relevant:
            stats.no_relevant += samples
            continue
        if len(negatives) < size - 1:
            stats.below += samples
            continue
        for _ in range(samples):
            chosen = [rng.choice(relevant)] + rng.sample(negatives, size - 1)
            rng.shuffle(chosen)
            instances.append(make_instance(ranking.query, chosen, grades))
            stats.kept += 1
    return instances, stats


# ----------------------------------------------------------------------------------------------------------------------
# command line

# the datasets whose figures the project reports: training on them would make those figures meaningless
TEST_SETS = ("dl19", "dl20", "scifact")


def check_augment_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse types cannot check alone; exits with argparse's usage error, before any data loads."""
    if args.dataset not in DATASETS:
        p.error(f"--dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}")
    if args.dataset in TEST_SETS and not args.allow_test_set:
        p.error(f"--dataset {args.dataset} is a test set: training on it makes its evaluation meaningless; use dl21 or "
                "scifact-train (or --allow-test-set, for an experiment that knows it)")
    if args.size < 2:
        p.error(f"--size {args.size}: a candidate set needs at least 2 passages to have an order")
    if args.min_ndcg > 1:
        p.error(f"--min-ndcg {args.min_ndcg}: nDCG@10 is at most 1, so every set would be dropped")
    out = Path(args.out)
    if out.is_dir():
        p.error(f"--out {out} is a directory; give a file name, e.g. {out / 'train.jsonl'}")
    if out.exists() and not args.overwrite:
        p.error(f"--out {out} exists; give a new file name, or --overwrite to replace it")


def check_kept(instances: list[TrainInstance], out: str, name: str) -> None:
    if not instances:
        raise DataError(f"{name}: no candidate set survived the filters; nothing written to {out} "
                        "(lower --min-ndcg / --min-grade, or raise --samples)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the datasets")
    b = sub.add_parser("bm25", help="run (and cache) BM25 for a dataset, report times")
    b.add_argument("--dataset", default="scifact", help="dataset name")
    b.add_argument("--data-dir", default=None, help="data directory (default $REARANK_DATA or ./data)")
    a = sub.add_parser("augment", help="sample training candidate sets (METHOD §4) into a JSONL file")
    a.add_argument("--dataset", default="dl21", help="dataset whose judged queries seed the sets (dl21, scifact-train)")
    a.add_argument("--method", choices=("listwise", "setwise"), default="listwise",
                   help="listwise: REARANK's sampled sets; setwise: Rank-R1's one relevant + size-1 non-relevant")
    a.add_argument("--min-grade", type=positive_int, default=2,
                   help="setwise: the grade that makes a passage the relevant one")
    a.add_argument("--samples", type=positive_int, default=50, help="candidate sets drawn per query")
    a.add_argument("--size", type=positive_int, default=20, help="passages per candidate set (>= 2)")
    a.add_argument("--seed", type=nonneg_int, default=0, help="random seed: the same seed writes the same file")
    a.add_argument("--min-ndcg", type=nonneg_float, default=0.1, help="drop sets whose nDCG@10 is below this (<= 1)")
    a.add_argument("--filter-on", choices=("best", "init"), default="best", help="filter on r* (best) or r_init")
    a.add_argument("--out", default="train.jsonl", help="output JSONL (an existing file is kept unless --overwrite)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    a.add_argument("--allow-test-set", action="store_true",
                   help=f"build training sets from a test set ({', '.join(TEST_SETS)}): refused without this")
    a.add_argument("--data-dir", default=None, help="data directory (default $REARANK_DATA or ./data)")
    args = p.parse_args(argv)
    if args.cmd == "augment":
        check_augment_args(a, args)
    try:
        if args.cmd == "list":
            for name in DATASETS:
                print(name)
        elif args.cmd == "bm25":
            ds = load_dataset(args.dataset, args.data_dir)
            print(f"{ds.name}: {len(ds.rankings)} queries, {sum(len(r.candidates) for r in ds.rankings)} candidates")
        elif args.cmd == "augment":
            ds = load_dataset(args.dataset, args.data_dir)
            if args.method == "setwise":
                instances, st = augment_setwise(ds, args.samples, args.size, args.seed, args.min_grade)
                check_kept(instances, args.out, ds.name)
                write_instances(args.out, instances)
                print(
                    f"{ds.name}: kept {st.kept} setwise sets, dropped {st.no_relevant + st.below} ({st.no_relevant} "
                    f"for queries with no passage of grade >= {args.min_grade}, {st.below} for too few non-relevant "
                    f"ones); wrote {args.out}"
                )
                return
            instances, st = augment(ds, args.samples, args.size, args.seed, args.min_ndcg, args.filter_on)
            check_kept(instances, args.out, ds.name)
            write_instances(args.out, instances)
            print(
                f"{ds.name}: kept {st.kept}, dropped {st.no_relevant + st.below} ({st.no_relevant} with no relevant "
                f"passage, {st.below} with nDCG@10 ({args.filter_on}) < {args.min_ndcg}); wrote {args.out}"
            )
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
