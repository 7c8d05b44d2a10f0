"""Scoring runs with nDCG@k query by query (data.ndcg_at_k, averaged as trec_eval does), and comparing two runs on
the queries both judged (a seeded bootstrap interval and a paired sign-flip test).

    score_run({qid: docids best first}, qrels)  # -> RunScores: nDCG@1/5/10 per judged query, their mean, the skipped
    compare(a, b)                               # -> Comparison of B with A: mean delta, 95% interval, p-value, wins
    python eval.py --compare RUN_A RUN_B --dataset dl19    # the same from the command line (format_comparison)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from data import DataError, Qrels, Ranking, ndcg_at_k, trec_order
from support.formats import load_run

KS = (1, 5, 10)

# ----------------------------------------------------------------------------------------------------------------------
# scoring runs (the metric itself, ndcg_at_k, is data.py's)


@dataclass
class RunScores:
    """Per-query and mean nDCG@k over the judged queries of a run."""

    per_query: dict[str, dict[str, float]]  # qid -> {"nDCG@10": ...}
    mean: dict[str, float]
    skipped: list[str] = field(default_factory=list)  # run queries with no judgments (not averaged, like trec_eval)


def score_run(ranked: Mapping[str, Sequence[str]], qrels: Qrels, ks: Sequence[int] = KS) -> RunScores:
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
    return RunScores(per_query, mean, skipped)


def score_rankings(rankings: Sequence[Ranking], qrels: Qrels, ks: Sequence[int] = KS) -> RunScores:
    return score_run({r.query.qid: r.docids() for r in rankings}, qrels, ks)


def score_run_file(path: str | Path, qrels: Qrels, ks: Sequence[int] = KS) -> RunScores:
    return score_run({qid: trec_order(scores) for qid, scores in load_run(path).items()}, qrels, ks)


# ----------------------------------------------------------------------------------------------------------------------
# comparing two runs, query by query (`--compare RUN_A RUN_B`)

TIE = 1e-9  # |delta| below this is a tie: two runs ranking a query's top 10 alike differ by float noise at most


@dataclass
class Comparison:
    """B against A on the queries judged in both: per-query deltas (B - A), their mean, a 95% paired bootstrap
    interval of the mean, a two-sided paired sign-flip p-value, and wins / ties / losses of B."""

    metric: str
    mean_a: float
    mean_b: float
    deltas: dict[str, float]
    interval: tuple[float, float]
    p_value: float
    wins: int
    ties: int
    losses: int
    only_a: list[str] = field(default_factory=list)  # judged queries in one run only: left out of the pairing
    only_b: list[str] = field(default_factory=list)

    @property
    def mean_delta(self) -> float:
        return sum(self.deltas.values()) / len(self.deltas) if self.deltas else 0.0


def bootstrap_interval(deltas: Sequence[float], resamples: int = 10000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired deltas: resample the queries with replacement.

    >>> bootstrap_interval([0.1, 0.1, 0.1])  # no spread, no uncertainty
    (0.1, 0.1)
    """

    n = len(deltas)
    if n == 0:
        return 0.0, 0.0
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(deltas, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    lo, hi = means[int(tail * resamples)], means[min(resamples - 1, math.ceil((1 - tail) * resamples) - 1)]
    return round(lo, 12), round(hi, 12)


def sign_flip_p(deltas: Sequence[float], flips: int = 100000, seed: int = 0, exact_up_to: int = 16) -> float:
    """Two-sided paired randomization test of "mean delta = 0": under the null each query's delta is as likely to
    have either sign, so p = the share of sign assignments whose |mean| reaches the observed one.

    Every one of the 2^n assignments when the n non-zero deltas are at most `exact_up_to` (the exact p-value);
    otherwise `flips` random ones, counting the observed assignment among them ((hits + 1) / (flips + 1), never 0).

    >>> sign_flip_p([1.0, 2.0, 3.0])  # only all-plus and all-minus reach |mean| 2: 2 of 8
    0.25
    """

    deltas = [d for d in deltas if d != 0]  # a zero is the same under either sign: dropping it changes no sum
    n = len(deltas)
    if n == 0:
        return 1.0
    observed = abs(sum(deltas)) - 1e-12  # the same sum computed in another order may differ in its last bits
    if n <= exact_up_to:
        hits = 0
        for signs in range(1 << n):
            total = sum(-d if signs >> i & 1 else d for i, d in enumerate(deltas))
            hits += abs(total) >= observed
        return hits / (1 << n)
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in deltas)) >= observed for _ in range(flips))
    return (hits + 1) / (flips + 1)


def compare(a: RunScores, b: RunScores, metric: str = "nDCG@10", resamples: int = 10000, flips: int = 100000,
            seed: int = 0) -> Comparison:
    """Pair the queries both evaluations judged and compare B with A (delta = B - A)."""
    common = sorted(set(a.per_query) & set(b.per_query))
    deltas = {q: b.per_query[q][metric] - a.per_query[q][metric] for q in common}
    values = list(deltas.values())
    n = len(values) or 1
    return Comparison(
        metric=metric,
        mean_a=sum(a.per_query[q][metric] for q in common) / n,
        mean_b=sum(b.per_query[q][metric] for q in common) / n,
        deltas=deltas,
        interval=bootstrap_interval(values, resamples, seed=seed),
        p_value=sign_flip_p(values, flips, seed=seed),
        wins=sum(d > TIE for d in values),
        ties=sum(abs(d) <= TIE for d in values),
        losses=sum(d < -TIE for d in values),
        only_a=sorted(set(a.per_query) - set(b.per_query)),
        only_b=sorted(set(b.per_query) - set(a.per_query)),
    )


def run_path(path: str) -> Path:
    """A TREC run file, or an `eval.py --out` directory (its run.trec)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "run.trec").exists():
            raise DataError(f"{p}: a directory without run.trec (an eval.py --out directory holds one)")
        return p / "run.trec"
    if not p.exists():
        raise DataError(f"{p}: no such run file or directory")
    return p


def format_comparison(c: Comparison, label_a: str, label_b: str) -> str:
    lo, hi = c.interval
    lines = [
        f"A {label_a}: {c.metric} {c.mean_a:.4f}",
        f"B {label_b}: {c.metric} {c.mean_b:.4f}",
        f"delta (B - A) {c.mean_delta:+.4f}, 95% paired bootstrap interval [{lo:+.4f}, {hi:+.4f}], "
        f"p = {c.p_value:.4f} (two-sided paired sign-flip test), {len(c.deltas)} queries",
        f"B wins / ties / losses: {c.wins} / {c.ties} / {c.losses}",
    ]
    if c.only_a or c.only_b:
        lines.append(f"not paired: {len(c.only_a)} judged queries only in A, {len(c.only_b)} only in B")
    return "\n".join(lines)
