"""The files datasets and runs come in: TREC qrels, topics and run files, RankGPT JSON, BEIR and BRIGHT JSONL, and
JSONL records (traces.jsonl, training sets). Every reader checks what it reads and names the file and line of what is
wrong; every writer writes atomically (files.atomic_write). data.py makes its records from what these return.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

from support.files import DataError, atomic_write, jsonl, lines, read_json

# ----------------------------------------------------------------------------------------------------------------------
# TREC: qrels, topics, run files


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC qrels (`qid 0 docid grade`) or BEIR qrels TSV (`query-id corpus-id score` with a header line).

    A judgment listed twice with the same grade is harmless; with two grades it is an error (which one is meant?).
    A file with no judgments is an error too: every evaluation against it would score nothing.
    """
    qrels: dict[str, dict[str, int]] = {}
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


def write_run(path: str | Path, rankings: Iterable, tag: str = "rearank") -> None:
    """A TREC run file of data.Ranking records. Scores fall strictly with rank (n, n-1, ..., 1): trec_eval orders by
    score, not by rank."""
    with atomic_write(path) as f:
        for r in rankings:
            check_unique(r.query.qid, r.docids(), str(path))
            n = len(r.candidates)
            for i, c in enumerate(r.candidates):
                f.write(f"{r.query.qid} Q0 {c.docid} {i + 1} {n - i} {tag}\n")


# ----------------------------------------------------------------------------------------------------------------------
# RankGPT JSON: a first stage's candidates, with their text


def read_rankgpt(path: str | Path) -> list[tuple[str, str, list[tuple[str, str, float]]]]:
    """RankGPT-format JSON (`.json` or `.json.gz`): [{"query": str, "hits": [{"qid", "docid", "content", ...}]}] ->
    one (qid, query, [(docid, content, score), ...]) per entry, checked; data.load_rankgpt makes them Rankings."""
    items = read_json(path)
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty JSON list of {{'query', 'hits'}} objects")
    entries, seen = [], {}  # seen: qid -> the entry that listed it first
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
        candidates = [rankgpt_hit(h, f"{where}, hit {j}") for j, h in enumerate(hits)]
        qids = {str(h["qid"]) for h in hits}
        if len(qids) != 1:
            raise DataError(f"{where}: the hits name several query ids {sorted(qids)[:5]}; one entry is one query")
        qid = qids.pop()
        if qid in seen:  # a second copy would silently replace the first one's candidates downstream
            raise DataError(f"{where}: query {qid} is listed twice (first in entry {seen[qid]})")
        seen[qid] = i
        entries.append((qid, item["query"], candidates))
        check_unique(qid, [docid for docid, _, _ in candidates], where)
    return entries


def rankgpt_hit(h, where: str) -> tuple[str, str, float]:
    """One RankGPT hit as (docid, content, score); a missing field, a null or a wrong type is an error naming the
    hit."""
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
    return str(h["docid"]), h["content"], float(score)


def check_unique(qid: str, docids: Sequence[str], where: str = "") -> None:
    """trec_eval refuses a ranking that lists a docid twice; so do we."""
    seen = set()
    for docid in docids:
        if docid in seen:
            raise DataError(f"{where or 'ranking'}: docid {docid} appears twice for query {qid}")
        seen.add(docid)


def write_rankgpt(path: str | Path, rankings: Iterable) -> None:
    """data.Ranking records as RankGPT JSON (the inverse of `read_rankgpt`), so any first stage can be handed to
    `eval.py --candidates`."""
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
# BEIR and BRIGHT: a corpus and its queries (our own BM25 draws the candidates)


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
    """BEIR corpus.jsonl -> {docid: 'Title: {title} Content: {text}'} (the prompt strips the labels again:
    docs/method.md §2)."""
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


def load_bright_examples(path: str | Path) -> tuple[dict[str, str], dict[str, dict[str, int]], dict[str, set[str]]]:
    """BRIGHT's examples (one `{"query", "id", "gold_ids", "excluded_ids", ...}` a line) -> (queries, qrels, excluded).

    Every gold id is relevant with grade 1 (BRIGHT's judgments are binary). `excluded_ids` are documents a retriever
    must not return for that query (["N/A"] when none); BRIGHT asserts none of them is gold, and so do we.
    """
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
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


# ----------------------------------------------------------------------------------------------------------------------
# JSONL records: traces.jsonl, training sets


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


def instance_problem(rec: dict, names: set[str]) -> str:
    """What is wrong with one JSON line of a training set (a data.TrainInstance, whose field `names` are given), or ""
    when nothing is.

    >>> names = {"qid", "query", "candidates", "grades", "r_init", "r_star", "judged"}
    >>> instance_problem({"qid": "q", "query": "x", "candidates": [{"docid": "d", "text": None}], "grades": [0],
    ...                   "r_init": 0.0, "r_star": 0.0}, names)
    "candidate 0: 'text' must be a string"
    """
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
