"""Evaluate a reranker with nDCG@10, exactly as trec_eval's `ndcg_cut` computes it.

    python eval.py --dataset dl19 --model bm25             # the first stage alone: nDCG@10 0.5058
    python eval.py --run RUN.trec --qrels QRELS            # score any TREC run
    python eval.py --candidates FILE.json --qrels QRELS    # a user's RankGPT-format candidates

Every evaluation writes, under --out, `run.trec` (scores fall with rank), `metrics.json` (per-query values, the
config, and the command line).

The metric lives here, in `ndcg_at_k`; the reward (reward.py) imports it, so training and evaluation can never
disagree about what nDCG means. trec_eval semantics (METHOD §8): gain = the qrels grade (linear), discount
log2(rank + 1), ideal DCG from *all* judged documents of the query, a run ordered by score descending with ties broken
by docid descending, queries without judgments skipped (and counted), duplicate docids an error.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from data import DataError, Dataset, Qrels, Ranking, load_dataset, load_qrels, load_rankgpt, load_run, write_run

KS = (1, 5, 10)

# ----------------------------------------------------------------------------------------------------------------------
# the metric


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


@dataclass
class Evaluation:
    """Per-query and mean nDCG@k over the judged queries of a run."""

    per_query: dict[str, dict[str, float]]  # qid -> {"nDCG@10": ...}
    mean: dict[str, float]
    skipped: list[str] = field(default_factory=list)  # run queries with no judgments (not averaged, like trec_eval)


def evaluate(ranked: Mapping[str, Sequence[str]], qrels: Qrels, ks: Sequence[int] = KS) -> Evaluation:
    """Score {qid: docids in rank order}. Queries absent from qrels are skipped; judged queries absent from the run
    are not counted either (trec_eval without -c)."""
    per_query, skipped = {}, []
    for qid, docids in ranked.items():
        if qid not in qrels:
            skipped.append(qid)
            continue
        per_query[qid] = {f"nDCG@{k}": ndcg_at_k(docids, qrels[qid], k) for k in ks}
    n = len(per_query)
    mean = {f"nDCG@{k}": sum(v[f"nDCG@{k}"] for v in per_query.values()) / n if n else 0.0 for k in ks}
    return Evaluation(per_query, mean, skipped)


def evaluate_rankings(rankings: Sequence[Ranking], qrels: Qrels, ks: Sequence[int] = KS) -> Evaluation:
    return evaluate({r.query.qid: r.docids() for r in rankings}, qrels, ks)


def evaluate_run_file(path: str | Path, qrels: Qrels, ks: Sequence[int] = KS) -> Evaluation:
    return evaluate({qid: trec_order(scores) for qid, scores in load_run(path).items()}, qrels, ks)


# ----------------------------------------------------------------------------------------------------------------------
# command line


@dataclass
class EvalConfig:
    dataset: str | None = None
    candidates: str | None = None
    run: str | None = None
    qrels: str | None = None
    data_dir: str | None = None
    model: str = "bm25"
    top_k: int = 100
    out: str | None = None


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a registered dataset: dl19, dl20, dl21, scifact, scifact-train")
    src.add_argument("--candidates", help="RankGPT-format JSON (.json or .json.gz) of first-stage candidates")
    src.add_argument("--run", help="a TREC run file to score as it is")
    p.add_argument("--qrels", help="TREC qrels (required with --candidates and --run)")
    p.add_argument("--data-dir", help="data directory (default: $REARANK_DATA, else ./data)")
    p.add_argument("--model", default="bm25", help="'bm25' = the first stage, no reranking")
    p.add_argument("--top-k", type=int, default=100, help="candidates per query to consider")
    p.add_argument("--out", help="output directory (default: runs/<dataset>-<model>)")
    args = p.parse_args(argv)
    if (args.candidates or args.run) and not args.qrels:
        p.error("--candidates and --run need --qrels")
    return EvalConfig(**vars(args))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name if Path(text).exists() else text).strip("_")


def print_metrics(ev: Evaluation, label: str = "") -> None:
    for k, v in ev.mean.items():
        print(f"{label}{k} {v:.4f}")
    print(f"{label}queries {len(ev.per_query)} judged, {len(ev.skipped)} skipped (no judgments)")


def save_metrics(path: Path, cfg: EvalConfig, ev: Evaluation, **extra) -> None:
    record = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": asdict(cfg),
        "mean": ev.mean,
        "judged": len(ev.per_query),
        "skipped": ev.skipped,
        "per_query": ev.per_query,
        **extra,
    }
    path.write_text(json.dumps(record, indent=1))


def load_input(cfg: EvalConfig) -> Dataset:
    if cfg.dataset:
        return load_dataset(cfg.dataset, cfg.data_dir)
    return Dataset(slug(cfg.candidates), load_rankgpt(cfg.candidates), load_qrels(cfg.qrels))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        if cfg.run:  # score a run file as it is: no reranking, no run written back
            ev = evaluate_run_file(cfg.run, load_qrels(cfg.qrels))
            out = Path(cfg.out or f"runs/{slug(cfg.run)}")
            out.mkdir(parents=True, exist_ok=True)
            print_metrics(ev)
            save_metrics(out / "metrics.json", cfg, ev)
            print(f"wrote {out / 'metrics.json'}")
            return
        t = time.time()
        ds = load_input(cfg)
        rankings = [type(r)(r.query, r.candidates[: cfg.top_k]) for r in ds.rankings]
        print(f"{ds.name}: {len(rankings)} queries, top-{cfg.top_k} candidates (loaded in {time.time() - t:.1f}s)")
        if ds.note:
            print(f"note: {ds.name} is {ds.note}")
        out = Path(cfg.out or f"runs/{ds.name}-{slug(cfg.model)}")
        out.mkdir(parents=True, exist_ok=True)
        if cfg.model != "bm25":
            raise DataError(f"--model {cfg.model}: reranking with a model is not available yet; use --model bm25")
        ev = evaluate_rankings(rankings, ds.qrels)
        print_metrics(ev)
        write_run(out / "run.trec", rankings, tag=slug(cfg.model))
        save_metrics(out / "metrics.json", cfg, ev, seconds=round(time.time() - t, 1))
        print(f"wrote {out / 'run.trec'} and {out / 'metrics.json'}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
