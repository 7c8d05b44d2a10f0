"""An evaluation's --out folder read back: one `Run`, with a `QueryView` per judged query, for report.py to draw.

    run = read_run("runs/dl19-smollm2")
    run.queries[0].traces     # the windows (or setwise calls) of the first judged query, in the order they ran

`read_run` reads metrics.json (the config, the command, per-query nDCG, the run statistics), run.trec (the reranked
order) and traces.jsonl (read, never repaired: a half-written last line of a run still writing is left out), and
reloads the queries, the first-stage order, the passages and the judgments from the dataset the saved config names
(honouring its top_k and limit).

Reading order: after evalconfig.py (the config record, read back from metrics.json) and traces.py (which record a
line of traces.jsonl holds); report.py draws what it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Union

from data import DataError, first_stage, load_dataset, load_qrels, load_rankgpt, load_run, read_records, trec_order
from evalconfig import EvalConfig
from rearank import WindowTrace
from scoring import evaluate
from setwise import SetwiseTrace
from traces import trace_record

Trace = Union[WindowTrace, SetwiseTrace]


@dataclass
class QueryView:
    """Everything the page shows about one judged query."""

    qid: str
    text: str
    first: list[str]  # first-stage docids, best first
    reranked: list[str]  # run.trec's docids, best first
    passages: dict[str, str]  # docid -> text
    grades: dict[str, int]  # judged docids -> grade (absent: unjudged)
    before: dict[str, float]  # first-stage nDCG@k
    after: dict[str, float]  # reranked nDCG@k, as metrics.json holds it
    traces: list[Trace]  # this query's windows or setwise calls, in the order they ran

    @cached_property
    def was(self) -> dict[str, int]:  # docid -> 0-based first-stage rank
        return {d: r for r, d in enumerate(self.first)}

    @cached_property
    def now(self) -> dict[str, int]:  # docid -> 0-based reranked rank
        return {d: r for r, d in enumerate(self.reranked)}


@dataclass
class Run:
    """One evaluation's --out folder, read back (`read_run`)."""

    out: Path
    metrics: dict  # metrics.json as written
    cfg: EvalConfig  # metrics.json's config
    queries: list[QueryView]  # judged queries, in dataset order

    @property
    def setwise(self) -> bool:
        return self.cfg.method == "setwise"

    @property
    def name(self) -> str:
        return f"{self.cfg.model} {self.cfg.method}" + (f" ({self.cfg.prompt})" if not self.setwise else "")

    @property
    def ks(self) -> list[int]:  # the cut-offs metrics.json holds: nDCG@1, @5, @10
        return [int(name.split("@")[1]) for name in self.metrics["mean"]]

    def first_mean(self, k: int) -> float:
        return sum(q.before[f"nDCG@{k}"] for q in self.queries) / max(len(self.queries), 1)


def read_json(path: Path) -> dict:
    if not path.exists():
        raise DataError(f"{path}: not found; is {path.parent} the --out folder of an evaluation?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None


def read_run(out: str | Path) -> Run:
    """An evaluation's --out folder, with its dataset reloaded from the config saved in metrics.json."""
    out = Path(out)
    metrics = read_json(out / "metrics.json")
    known = {f.name for f in fields(EvalConfig)}  # a config saved by another version may hold other keys
    cfg = EvalConfig(**{k: v for k, v in metrics.get("config", {}).items() if k in known})
    if not (cfg.dataset or cfg.candidates):
        raise DataError(f"{out}/metrics.json: a scored run file (--run) has no passages or traces to draw")
    if cfg.dataset:
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        rankings, qrels = ds.rankings, ds.qrels
    else:
        rankings, qrels = load_rankgpt(cfg.candidates), load_qrels(cfg.qrels)
    rankings = rankings[: cfg.limit]
    ks = [int(name.split("@")[1]) for name in metrics.get("mean", {})]
    ranked = {qid: trec_order(scores) for qid, scores in load_run(out / "run.trec").items()} if (
        out / "run.trec").exists() else {}
    traces = read_records(out / "traces.jsonl", trace_record(cfg))
    by_query: dict[str, list[Trace]] = {}
    for t in traces:
        by_query.setdefault(t.qid, []).append(t)
    per_query = metrics.get("per_query", {})
    queries = []
    for r in rankings:
        qid = r.query.qid
        if qid not in per_query:
            continue  # unjudged: metrics.json counts it as skipped
        first = first_stage(r, cfg.top_k, cfg.first_stage_order, cfg.seed).docids()  # the list the reranker saw
        if qid not in ranked:
            raise DataError(f"{out}/run.trec: query {qid} of metrics.json is missing")
        queries.append(QueryView(
            qid, r.query.text, first, ranked[qid], {c.docid: c.text for c in r.candidates[: cfg.top_k]},
            qrels.get(qid, {}), evaluate({qid: first}, qrels, ks).per_query[qid], per_query[qid],
            by_query.get(qid, []),
        ))
    missing = set(per_query) - {q.qid for q in queries}
    if missing:
        raise DataError(f"{out}/metrics.json: queries {sorted(missing)[:5]} are not in the dataset its config names")
    return Run(out, metrics, cfg, queries)
