"""Training sets for GRPO: REARANK's "initial state expansion" (METHOD §4) and Rank-R1's one-relevant sets (§6).

REARANK trains on only 179 labelled queries. From each, it samples many candidate sets P of 20 passages from the
query's BM25 top-100, each in the random order it was drawn in: every set is a new starting point whose order the
model must improve, scored against the same judgments. `TrainInstance` holds one set with what the reward needs
(r_init, r*, the query's positive judgments).

Reading order: `TrainInstance` and `make_instance`, the JSONL round trip, `augment` (listwise sets, with the nDCG
filter), `augment_setwise` (one relevant + size-1 non-relevant, shuffled), `batch_indices` (the order grpo.py reads
them in: a function of the step and the seed, so a resumed run reads what an uninterrupted one would), the command
line.

    python augment.py --dataset dl21 --samples 50 --size 20 --out train.jsonl           # --seed 0 --min-ndcg 0.1
    python augment.py --dataset dl21 --method setwise --samples 50 --out setwise.jsonl  # Rank-R1's sets
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from cli import nonneg_float, nonneg_int, positive_int
from data import DATASETS, TEST_SETS, Candidate, DataError, Dataset, Query, load_dataset, ndcg_bounds
from files import atomic_write, jsonl


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
            raise DataError(f"{path}:{lineno}: not a training instance ({problem}); `augment.py` writes them")
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


# ----------------------------------------------------------------------------------------------------------------------
# command line


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
    p.add_argument("--dataset", default="dl21", help="dataset whose judged queries seed the sets (dl21, scifact-train)")
    p.add_argument("--method", choices=("listwise", "setwise"), default="listwise",
                   help="listwise: REARANK's sampled sets; setwise: Rank-R1's one relevant + size-1 non-relevant")
    p.add_argument("--min-grade", type=positive_int, default=2,
                   help="setwise: the grade that makes a passage the relevant one")
    p.add_argument("--samples", type=positive_int, default=50, help="candidate sets drawn per query")
    p.add_argument("--size", type=positive_int, default=20, help="passages per candidate set (>= 2)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed: the same seed writes the same file")
    p.add_argument("--min-ndcg", type=nonneg_float, default=0.1, help="drop sets whose nDCG@10 is below this (<= 1)")
    p.add_argument("--filter-on", choices=("best", "init"), default="best", help="filter on r* (best) or r_init")
    p.add_argument("--out", default="train.jsonl", help="output JSONL (an existing file is kept unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--allow-test-set", action="store_true",
                   help=f"build training sets from a test set ({', '.join(TEST_SETS)}): refused without this")
    p.add_argument("--data-dir", default=None, help="data directory (default $REARANK_DATA or ./data)")
    args = p.parse_args(argv)
    check_augment_args(p, args)
    try:
        ds = load_dataset(args.dataset, args.data_dir)
        if args.method == "setwise":
            instances, st = augment_setwise(ds, args.samples, args.size, args.seed, args.min_grade)
            why = (f"{st.no_relevant} for queries with no passage of grade >= {args.min_grade}, "
                   f"{st.below} for too few non-relevant ones")
        else:
            instances, st = augment(ds, args.samples, args.size, args.seed, args.min_ndcg, args.filter_on)
            why = (f"{st.no_relevant} with no relevant passage, {st.below} with nDCG@10 ({args.filter_on}) < "
                   f"{args.min_ndcg}")
        check_kept(instances, args.out, ds.name)
        write_instances(args.out, instances)
        kind = " setwise sets" if args.method == "setwise" else ""
        print(f"{ds.name}: kept {st.kept}{kind}, dropped {st.no_relevant + st.below} ({why}); wrote {args.out}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
