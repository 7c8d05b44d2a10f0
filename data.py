"""Datasets for reranking: typed records, the metric, loaders, and the dataset registry. The bottom of the project.

Everything the rest of the project reads goes through the records defined here:

    Query(qid, text)                  a search query
    Candidate(docid, text, score)     one first-stage hit
    Ranking(query, candidates)        the ordered candidate list of one query
    Qrels = {qid: {docid: grade}}     graded judgments (trec_eval's own layout)

The metric is here too: `ndcg_at_k` is trec_eval's `ndcg_cut` exactly (METHOD §8), the one nDCG that evaluation,
the reward and augmentation all use.

Datasets by name (see DATASETS): dl19, dl20 (TREC DL BM25 top-100, test sets), dl21 (graded MS MARCO v2 queries,
the training seeds; never a test set), scifact (BEIR test split) and scifact-train, the other BEIR sets of REARANK's
table (trec-covid, nfcorpus, dbpedia-entity; signal1m, trec-news, robust04, whose corpora need TREC's licences) and
the twelve BRIGHT domains (biology, ..., theoremqa_theorems: download.BRIGHT_DOMAINS), for all of which the project
runs its own BM25 (bm25.py) over the corpus. Training sets are drawn from these datasets by augment.py.

The data directory is --data-dir, else $REARANK_DATA, else ./data. Missing files of ./data are fetched from their
public homes (download.py) when the machine is online; offline, the error lists what is missing and where it goes. A
directory the user named (--data-dir, $REARANK_DATA) is never fetched into: a missing file there is an error at once.

Reading order: the records, the metric, the small readers and writers (TREC, RankGPT JSON, BEIR, JSONL records), the
data directory, the registry (`DATASETS`, `load_dataset`), the command line.

    python data.py list                                  # the registry
    python data.py bm25 --dataset scifact                # build/cache the BM25 index, report times
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from bm25 import bm25_retrieve
from download import BRIGHT_DOMAINS, LICENSED, require
from files import DataError, atomic_write, jsonl, lines, read_json

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


# the order a reranker is shown the first stage's top-k in (eval.py --first-stage-order)
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


def _beir_jsonl(path: str | Path, what: str, noun: str) -> dict[str, tuple[str, str]]:
    """{_id: (text, title)} of a BEIR JSONL file: each line's `_id` a string or integer, its `text` (and `title`, if
    any) strings, and no `_id` listed twice. In errors `what` names a line (corpus, query), `noun` an entry."""
    records: dict[str, tuple[str, str]] = {}
    for lineno, rec in jsonl(path):
        _id, text, title = rec.get("_id"), rec.get("text"), rec.get("title") or ""
        if isinstance(_id, bool) or not isinstance(_id, (str, int)) or not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: a {what} line needs '_id' (string) and 'text' (string)")
        if not isinstance(title, str):
            raise DataError(f"{path}:{lineno}: 'title' must be a string, got {title!r:.80}")
        if str(_id) in records:
            raise DataError(f"{path}:{lineno}: {noun} {_id} is listed twice")
        records[str(_id)] = text, title
    return records


def load_beir_corpus(path: str | Path) -> dict[str, str]:
    """BEIR corpus.jsonl -> {docid: 'Title: {title} Content: {text}'} (METHOD §2; the prompt strips the labels)."""
    corpus: dict[str, str] = {}
    for docid, (text, title) in _beir_jsonl(path, "corpus", "document").items():
        title, text = title.strip(), text.strip()
        corpus[docid] = f"Title: {title} Content: {text}" if title else text
    if not corpus:
        raise DataError(f"{path}: no documents in the file")
    return corpus


def load_beir_queries(path: str | Path) -> dict[str, str]:
    """BEIR queries.jsonl -> {qid: text}."""
    return {qid: text for qid, (text, _) in _beir_jsonl(path, "query", "query").items()}


def load_bright_documents(path: str | Path) -> dict[str, str]:
    """BRIGHT's documents (one `{"id", "content"}` a line, the dataset's columns) -> {docid: content}."""
    docs: dict[str, str] = {}
    for lineno, rec in jsonl(path):
        docid, content = rec.get("id"), rec.get("content")
        if not isinstance(docid, str) or not docid or not isinstance(content, str):
            raise DataError(f"{path}:{lineno}: a document line needs 'id' (string) and 'content' (string)")
        if docid in docs:
            raise DataError(f"{path}:{lineno}: document {docid} is listed twice")
        docs[docid] = content
    if not docs:
        raise DataError(f"{path}: no documents in the file")
    return docs


def load_bright_examples(path: str | Path) -> tuple[dict[str, str], Qrels, dict[str, set[str]]]:
    """BRIGHT's examples (one `{"query", "id", "gold_ids", "excluded_ids", ...}` a line) -> (queries, qrels, excluded).

    Every gold id is relevant with grade 1 (BRIGHT's judgments are binary). `excluded_ids` are documents a retriever
    must not return for that query (["N/A"] when none); BRIGHT asserts none of them is gold, and so do we.
    """
    queries: dict[str, str] = {}
    qrels: Qrels = {}
    excluded: dict[str, set[str]] = {}
    for lineno, rec in jsonl(path):
        qid, query = rec.get("id"), rec.get("query")
        gold, skip = rec.get("gold_ids"), rec.get("excluded_ids", [])
        if not isinstance(qid, str) or not isinstance(query, str) or not query.strip():
            raise DataError(f"{path}:{lineno}: an example needs 'id' (string) and 'query' (non-empty string)")
        for key, ids in (("gold_ids", gold), ("excluded_ids", skip)):
            if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids):
                raise DataError(f"{path}:{lineno}: {key!r} must be a list of document ids, got {ids!r:.80}")
        if qid in queries:
            raise DataError(f"{path}:{lineno}: query {qid} is listed twice")
        both = set(gold) & set(skip)
        if both:
            raise DataError(f"{path}:{lineno}: query {qid} both excludes and judges relevant {sorted(both)[:3]}")
        queries[qid] = query.strip()
        qrels[qid] = dict.fromkeys(gold, 1)
        excluded[qid] = set(skip) - {"N/A"}
    if not queries:
        raise DataError(f"{path}: no examples in the file")
    return queries, qrels, excluded


def read_records(path: Path, record: type, check: Callable[[object], str] | None = None, advice: str = "") -> list:
    """A JSONL file of dataclass records, one a line (traces.jsonl). A half-written last line (the run was killed, or
    is still writing) is left out; any other bad line, or a record `check` finds a problem with, is an error naming
    it (`advice` ends the message: what to do instead)."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text{advice}") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            rec = record(**json.loads(line))
            problem = check(rec) if check else ""
        except (json.JSONDecodeError, TypeError) as e:
            if lineno == len(lines):
                break
            problem = f"not a {record.__name__} ({e!r})"
        if problem:
            raise DataError(f"{path}:{lineno}: {problem}{advice}")
        records.append(rec)
    return records


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
# the data directory and the cache


def cache_dir() -> Path:
    """Where converted models and BM25 indexes live: $REARANK_CACHE, else ~/.cache/rearank."""
    d = Path(os.environ.get("REARANK_CACHE") or Path.home() / ".cache" / "rearank")
    d.mkdir(parents=True, exist_ok=True)
    return d


def data_dir(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get("REARANK_DATA") or "data")


# ----------------------------------------------------------------------------------------------------------------------
# the registry


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
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    named = bool(root or os.environ.get("REARANK_DATA"))  # a directory the user named is complete: no fetching
    return DATASETS[name](data_dir(root), not named)


# ----------------------------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the datasets")
    b = sub.add_parser("bm25", help="run (and cache) BM25 for a dataset, report times")
    b.add_argument("--dataset", default="scifact", help="dataset name")
    b.add_argument("--data-dir", default=None, help="data directory (default $REARANK_DATA or ./data)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            for name in DATASETS:
                print(name)
        elif args.cmd == "bm25":
            ds = load_dataset(args.dataset, args.data_dir)
            print(f"{ds.name}: {len(ds.rankings)} queries, {sum(len(r.candidates) for r in ds.rankings)} candidates")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
