"""The data of the method: the records (queries, first-stage candidates, judgments), nDCG@k exactly as trec_eval
computes it, the first-stage list a reranker is shown, the dataset registry (`load_dataset`), and the training sets
drawn from it (REARANK's initial state expansion, Rank-R1's one-relevant sets). The file formats are support/formats.py.

    python -m support.datasets list                       # the registry
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from support.bm25 import bm25_retrieve
from support.download import BRIGHT_DOMAINS, LICENSED, require
from support.files import DataError, atomic_write, jsonl
from support.formats import (
    instance_problem, load_beir_corpus, load_beir_queries, load_bright_documents, load_bright_examples, load_qrels,
    load_topics, read_rankgpt,
)

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
# the metric: nDCG@k exactly as trec_eval's ndcg_cut computes it (docs/method.md §8); eval.py and the reward use it


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
# the first stage: the top-k a reranker is shown, in the order eval.py --first-stage-order says

FIRST_STAGE_ORDERS = ("given", "shuffled", "reversed")


def reorder(items: Sequence, how: str, seed: int, qid: str) -> list:
    """One query's first-stage list in the order a reranker will see it: "given" keeps it, "reversed" turns it over,
    "shuffled" draws a permutation from (seed, qid) alone, so a query gets the same shuffle whatever else runs with it
    (--limit, several processes, the same list read from a run file).

    Keeping a shuffled list's order then earns only the shuffled list's nDCG: what a reranker adds beyond it is its
    own judgment of relevance, not the first stage's order passed through.

    >>> [reorder("abcde", how, seed, "q1") for how, seed in (("reversed", 0), ("shuffled", 0), ("shuffled", 1))]
    [['e', 'd', 'c', 'b', 'a'], ['b', 'e', 'a', 'c', 'd'], ['b', 'd', 'a', 'c', 'e']]
    """
    if how == "given":
        return list(items)
    if how == "reversed":
        return list(reversed(items))
    if how == "shuffled":
        out = list(items)
        random.Random(f"{seed} {qid}").shuffle(out)  # a str seed is hashed (sha512): the same on every machine
        return out
    raise ValueError(f"unknown first-stage order {how!r}; choose one of {', '.join(FIRST_STAGE_ORDERS)}")


def first_stage(ranking: Ranking, top_k: int | None, how: str = "given", seed: int = 0) -> Ranking:
    """The top-k candidates of `ranking`, reordered as `reorder` says (the list a reranker is given)."""
    return Ranking(ranking.query, reorder(ranking.candidates[:top_k], how, seed, ranking.query.qid))


# ----------------------------------------------------------------------------------------------------------------------
# the registry: a dataset by name, from the data directory (--data-dir, else $REARANK_DATA, else ./data; files missing
# from ./data are fetched from their public homes, support/download.py) and our own BM25 for corpus datasets


def cache_dir() -> Path:
    """Where converted models and BM25 indexes live: $REARANK_CACHE, else ~/.cache/rearank."""
    d = Path(os.environ.get("REARANK_CACHE") or Path.home() / ".cache" / "rearank")
    d.mkdir(parents=True, exist_ok=True)
    return d


def data_dir(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get("REARANK_DATA") or "data")


def load_rankgpt(path: str | Path) -> list[Ranking]:
    """A RankGPT-format JSON file of first-stage candidates (formats.read_rankgpt) as Rankings."""
    return [Ranking(Query(qid, text), [Candidate(*hit) for hit in hits]) for qid, text, hits in read_rankgpt(path)]


def _trec_dl(year: str, folder: str) -> Callable[[Path, bool], Dataset]:
    def load(root: Path, fetch: bool) -> Dataset:
        run, qrels = require(root, [f"{folder}/bm25_top100_{year}.rankgpt.json", f"{folder}/qrels.{year}-passage.txt"],
                             fetch)
        note = "training/dev queries: never a test set" if year == "dl21" else ""
        return Dataset(year, load_rankgpt(run), load_qrels(qrels), note)

    return load


def _bm25_rankings(corpus: dict[str, str], queries: dict[str, str], name: str,
                   exclude: dict[str, set[str]] | None = None) -> list[Ranking]:
    """Our own BM25 top-100 over `corpus` for each query (bm25.py; the index cached under cache_dir())."""
    hits = bm25_retrieve(corpus, queries, name, cache_dir(), exclude=exclude)
    return [Ranking(Query(q, queries[q]), [Candidate(d, corpus[d], s) for d, s in hits[q]]) for q in hits]


def _beir(name: str, split: str = "test") -> Callable[[Path, bool], Dataset]:
    """A BEIR set: the zip's layout (beir_<name>/corpus.jsonl, queries.jsonl, qrels/<split>.tsv), or for the licensed
    three, Anserini's topics and qrels beside the corpus.jsonl the user converted (download.LICENSED)."""

    def load(root: Path, fetch: bool) -> Dataset:
        folder = f"beir_{name}"
        if name in LICENSED:
            queries_p, qrels_p, corpus_p = require(root, [f"{folder}/topics.test.tsv.gz", f"{folder}/qrels.test.txt",
                                                          f"{folder}/corpus.jsonl"], fetch)
            queries = load_topics(queries_p)
        else:
            corpus_p, queries_p, qrels_p = require(
                root, [f"{folder}/corpus.jsonl", f"{folder}/queries.jsonl", f"{folder}/qrels/{split}.tsv"], fetch
            )
            queries = load_beir_queries(queries_p)
        qrels = load_qrels(qrels_p)
        unknown = [q for q in qrels if q not in queries]
        if unknown:
            raise DataError(f"{qrels_p}: queries {unknown[:5]} are not in {queries_p}")
        rankings = _bm25_rankings(load_beir_corpus(corpus_p), {q: queries[q] for q in qrels}, name)
        return Dataset(name if split == "test" else f"{name}-{split}", rankings, qrels)

    return load


def _bright(domain: str) -> Callable[[Path, bool], Dataset]:
    """A BRIGHT domain: its documents and examples (bright/<domain>/*.jsonl, converted from the Hub's parquet), our
    BM25 over the documents with each query's excluded_ids left out, the gold ids as binary judgments."""

    def load(root: Path, fetch: bool) -> Dataset:
        docs_p, examples_p = require(root, [f"bright/{domain}/documents.jsonl", f"bright/{domain}/examples.jsonl"],
                                     fetch)
        queries, qrels, excluded = load_bright_examples(examples_p)
        rankings = _bm25_rankings(load_bright_documents(docs_p), queries, f"bright-{domain}", excluded)
        return Dataset(domain, rankings, qrels)

    return load


# TREC DL's BM25 top-100 (dl21: the training seeds, never a test set), BEIR's sets of REARANK's table (signal1m,
# trec-news and robust04 need TREC's licences), the twelve BRIGHT domains
DATASETS: dict[str, Callable[[Path, bool], Dataset]] = {
    "dl19": _trec_dl("dl19", "trec_dl"),
    "dl20": _trec_dl("dl20", "trec_dl"),
    "dl21": _trec_dl("dl21", "trec_dl21_msmarco_v2"),
    "scifact": _beir("scifact"),
    "scifact-train": _beir("scifact", "train"),
    **{name: _beir(name) for name in ("trec-covid", "nfcorpus", "dbpedia-entity", "signal1m", "trec-news",
                                      "robust04")},
    **{domain: _bright(domain) for domain in BRIGHT_DOMAINS},
}

# the datasets whose figures the project reports: training on them would make those figures meaningless
TEST_SETS = tuple(name for name in DATASETS if name not in ("dl21", "scifact-train"))


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """The dataset `name` from `root` (else $REARANK_DATA, else ./data). Only ./data is fetched into: a file missing
    from a directory the user named is an error at once."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    named = bool(root or os.environ.get("REARANK_DATA"))  # a directory the user named is complete: no fetching
    return DATASETS[name](data_dir(root), not named)


# ----------------------------------------------------------------------------------------------------------------------
# training sets: REARANK's initial state expansion and Rank-R1's one-relevant sets


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
        problem = instance_problem(rec, {f.name for f in fields(TrainInstance)})
        if problem:
            raise DataError(f"{path}:{lineno}: not a training instance ({problem}); "
                            "`python -m support.augment` writes them")
        cands = [Candidate(c["docid"], c["text"], float(c.get("score", 0.0))) for c in rec["candidates"]]
        instances.append(TrainInstance(**{**rec, "candidates": cands}))
    if not instances:
        raise DataError(f"{path}: no training instances")
    return instances


@dataclass
class AugmentStats:
    kept: int = 0
    no_relevant: int = 0  # P holds no relevant passage
    below: int = 0  # the filtered nDCG is under the threshold


def augment(
    ds: Dataset, samples: int = 50, size: int = 20, seed: int = 0, min_ndcg: float = 0.1, filter_on: str = "best"
) -> tuple[list[TrainInstance], AugmentStats]:
    """Sample `samples` candidate sets of `size` passages from each judged query's first-stage list
    (docs/method.md §4).

    Each set keeps the order it was drawn in (a random initial state, as the method's "initial state expansion"
    asks). Sets with no relevant passage are dropped, then sets whose nDCG@10 is below `min_ndcg`: the paper states
    that filter both on the initial nDCG and on the best reachable one; `filter_on="best"` (the default) filters on
    r*, which keeps badly ordered sets, the ones with the most to learn from; `"init"` filters on r_init.
    Reproducible: one random.Random(seed), queries in file order.
    """
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
    """Rank-R1's training sets (docs/method.md §6): one relevant passage (grade >= `min_grade`) and `size - 1`
    non-relevant ones from the same query's first-stage candidates, shuffled; up to `samples` sets per judged query.

    Non-relevant means judged 0 or unjudged (MS MARCO's convention: an unjudged passage counts as not relevant);
    passages with 0 < grade < min_grade are never used, so the label is unambiguous. A query with no relevant
    candidate, or too few non-relevant ones, gives no sets (counted as `no_relevant` / `below`).
    """
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


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The training instances of `step`: a fresh permutation every epoch, a function of (step, seed) only, so a
    resumed run reads exactly the data an uninterrupted one would.

    >>> batch_indices(0, 3, 4, seed=0) + batch_indices(1, 3, 4, seed=0) == batch_indices(0, 6, 4, seed=0)
    True
    """
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        out.append(np.random.default_rng([seed, epoch]).permutation(n)[pos])
    return [int(i) for i in out]
