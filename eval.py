"""Evaluate a reranker with nDCG@10, exactly as trec_eval's `ndcg_cut` computes it.

    python eval.py --dataset dl19 --model bm25             # the first stage alone: nDCG@10 0.5058
    python eval.py --dataset dl19 --model smollm2 --top-k 20   # rerank with the embedded model (REARANK prompt)
    python eval.py --dataset dl19 --model le723z/Rearank-7B    # the paper's model (the default on a GPU)
    python eval.py --run RUN.trec --qrels QRELS            # score any TREC run
    python eval.py --candidates FILE.json --qrels QRELS    # a user's RankGPT-format candidates
    python eval.py --report OUT [--against OUT_B]          # redraw OUT/report.html (report.py), or compare two runs
    torchrun --nproc_per_node 2 eval.py --dataset dl19 --model smollm2   # the queries split over 2 processes

Every evaluation writes, under --out, `run.trec` (scores fall with rank), `metrics.json` (per-query values, the
config, and the command line). Reranking with a model also writes `traces.jsonl`, one line per window (qid, span,
docids shown, completion, parsed order), appended as each batch of windows finishes: run the same command again after
an interruption and the finished windows are replayed from it instead of recomputed. Last, `report.html` (report.py)
shows it all in a browser: per-query nDCG before and after, each window's reasoning, each passage's move.

The metric is `data.ndcg_at_k`; the reward (reward.py) imports the same function, so training and evaluation can never
disagree about what nDCG means. trec_eval semantics (METHOD §8): gain = the qrels grade (linear), discount
log2(rank + 1), ideal DCG from *all* judged documents of the query, a run ordered by score descending with ties broken
by docid descending, queries without judgments skipped (and counted), duplicate docids an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import dist
from data import (
    DataError, Dataset, Qrels, Ranking,
    load_dataset, load_qrels, load_rankgpt, load_run, ndcg_at_k, read_records, trec_order, write_run,
)
from files import check_out_dir, nonneg_int, positive_int, read_json, write_text
from rearank import MAX_CHARS, WindowTrace, answer_format, window_spans

KS = (1, 5, 10)

# ----------------------------------------------------------------------------------------------------------------------
# scoring runs (the metric itself, ndcg_at_k, is data.py's)


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


def compare(a: Evaluation, b: Evaluation, metric: str = "nDCG@10", resamples: int = 10000, flips: int = 100000,
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


# ----------------------------------------------------------------------------------------------------------------------
# command line


@dataclass
class EvalConfig:
    dataset: str | None = None
    candidates: str | None = None
    run: str | None = None
    qrels: str | None = None
    data_dir: str | None = None
    model: str | None = None  # None: backend.default_model() (the embedded model without a GPU)
    method: str = "listwise"  # listwise: REARANK sliding windows; setwise: Rank-R1 heap sort
    prompt: str = "rearank"
    top_k: int = 100
    window: int = 20
    step: int = 10
    batch_size: int | None = None  # None: default_batch_size (8 on CPU, one window position of every query on CUDA)
    limit: int | None = None
    max_new_tokens: int = 2048
    num_child: int = 19
    k: int = 10
    seed: int = 0
    out: str | None = None
    compare: list[str] | None = None  # two runs (files or --out directories) to compare query by query
    report: str | None = None  # redraw this folder's report.html (report.py), nothing evaluated
    against: str | None = None  # with report: a comparison page of the two runs
    overwrite: bool = False
    command: str = ""  # the command line, saved with the metrics so every number says how it was made


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", help="a registered dataset: dl19, dl20, dl21, scifact, scifact-train")
    src.add_argument("--candidates", help="RankGPT-format JSON (.json or .json.gz) of first-stage candidates")
    src.add_argument("--run", help="a TREC run file to score as it is")
    src.add_argument("--report", metavar="OUT", help="redraw OUT/report.html from the files an evaluation left in OUT")
    p.add_argument("--against", metavar="OUT_B", help="with --report OUT: OUT/compare-OUT_B.html, runs side by side")
    p.add_argument("--qrels", help="TREC qrels (required with --candidates and --run; with --dataset, they replace "
                                   "the dataset's own judgments)")
    p.add_argument("--data-dir", help="data directory (default: $REARANK_DATA, else ./data)")
    p.add_argument(
        "--model",
        default=None,
        help="'bm25' = the first stage, no reranking; 'smollm2' = the embedded SmolLM2-135M-Instruct; or a hub id / "
        "local checkpoint directory (default: le723z/Rearank-7B with CUDA, else smollm2)",
    )
    p.add_argument("--method", default="listwise", choices=["listwise", "setwise"],
                   help="listwise: REARANK sliding windows; setwise: Rank-R1 heap sort (best of a set, reasons first)")
    p.add_argument("--prompt", default="rearank", choices=sorted(MAX_CHARS), help="REARANK (reasoning) or RankGPT")
    p.add_argument("--top-k", type=positive_int, default=100, help="candidates per query to consider")
    p.add_argument("--window", type=positive_int, default=20, help="passages per window")
    p.add_argument("--step", type=positive_int, default=10, help="how far the window moves up each time (<= --window)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="windows (of different queries) generated together (default: 8 on CPU; on CUDA the window of "
                   "every query at one position, at most 64)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N queries")
    p.add_argument("--max-new-tokens", type=positive_int, default=2048, help="generation budget per window (paper: 2048)")
    p.add_argument("--num-child", type=positive_int, default=19,
                   help="setwise: children per heap node (a call shows 1 + this)")
    p.add_argument("--k", type=positive_int, default=10, help="setwise: how many top documents the heap sort extracts")
    p.add_argument("--seed", type=nonneg_int, default=0, help="setwise: seed of the per-call document shuffles")
    p.add_argument("--out", help="output directory (default: runs/<dataset>-<model>, then the settings that differ "
                                 "from the defaults, e.g. runs/dl19-smollm2-top20-limit2-tok256)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished (or interrupted) run in --out made with other settings")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two runs (TREC files or eval.py --out directories) query by query: mean nDCG@10 "
                   "delta B - A, 95%% paired bootstrap interval, sign-flip p-value, wins/ties/losses; judged by "
                   "--qrels or --dataset's qrels; --seed seeds the resampling")
    args = p.parse_args(argv)
    if args.compare and (args.candidates or args.run or not (args.qrels or args.dataset)):
        p.error("--compare takes --qrels or --dataset (for its qrels), not --candidates or --run")
    if not (args.compare or args.dataset or args.candidates or args.run or args.report):
        p.error("one of --dataset, --candidates, --run, --report or --compare is required")
    if (args.candidates or args.run) and not args.qrels:
        p.error("--candidates and --run need --qrels")
    if args.against and not args.report:
        p.error("--against needs --report")
    if args.step > args.window:
        p.error(f"--step {args.step} is larger than --window {args.window}: the windows would skip passages")
    command = shlex.join(["python", "eval.py", *(sys.argv[1:] if argv is None else argv)])
    return EvalConfig(**vars(args), command=command)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name if Path(text).exists() else text).strip("_")


def path_tag(*paths: str | None) -> str:
    """A short digest of where the input files are, so two files with one basename get different default folders."""
    where = "\n".join(str(Path(p).resolve()) for p in paths if p)
    return hashlib.sha1(where.encode()).hexdigest()[:6]


# how each setting shows in a default --out name when it differs from its default
NAME_PARTS = {"prompt": "{}", "top_k": "top{}", "window": "win{}", "step": "step{}", "limit": "limit{}",
              "max_new_tokens": "tok{}", "num_child": "child{}", "k": "k{}", "seed": "seed{}"}


def output_keys(cfg: EvalConfig) -> tuple[str, ...]:
    """The settings that change what this evaluation writes: inputs, model, and the knobs its method reads."""
    if cfg.run:
        return ("run", "qrels")
    keys = ("dataset", "candidates", "qrels", "model", "top_k", "limit")
    if cfg.model == "bm25":
        return keys
    keys += ("method", "prompt", "max_new_tokens")
    return keys + (("window", "step") if cfg.method == "listwise" else ("num_child", "k", "seed"))


def default_out(cfg: EvalConfig) -> Path:
    """runs/<input>-<model>[-setwise], then each setting that differs from its default (--model resolved first).

    >>> str(default_out(EvalConfig(dataset="dl19", model="smollm2", top_k=20, limit=2, max_new_tokens=256)))
    'runs/dl19-smollm2-top20-limit2-tok256'
    """
    if cfg.run:
        return Path("runs") / f"{slug(cfg.run)}-{path_tag(cfg.run, cfg.qrels)}"
    if cfg.dataset:
        name = cfg.dataset + (f"-qrels{path_tag(cfg.qrels)}" if cfg.qrels else "")
    else:
        name = f"{slug(cfg.candidates)}-{path_tag(cfg.candidates, cfg.qrels)}"
    parts = [name, slug(cfg.model)] + (["setwise"] if cfg.method == "setwise" else [])
    defaults = EvalConfig()
    parts += [fmt.format(getattr(cfg, k)) for k, fmt in NAME_PARTS.items()
              if k in output_keys(cfg) and getattr(cfg, k) != getattr(defaults, k)]
    return Path("runs") / "-".join(parts)


OUTPUTS = ("run.trec", "metrics.json", "traces.jsonl", "rerank_config.json", "report.html")


def prepare_out(out: Path, cfg: EvalConfig) -> None:
    """Make --out ready, never replacing finished work: a run there made with other settings (or of another kind) is
    refused unless --overwrite, which deletes it first. The same settings continue it (traces are replayed)."""
    check_out_dir(out, create=False)  # created when the first output is written
    if cfg.overwrite:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        return
    if not (out / "metrics.json").exists():
        return  # nothing finished here; an interrupted model run is checked against rerank_config.json later
    record = read_json(out / "metrics.json")
    before = record.get("config") if isinstance(record, dict) else None
    if not isinstance(before, dict):
        raise DataError(f"{out / 'metrics.json'}: not an eval.py metrics file; use another --out, or --overwrite")
    changed = {k: (before.get(k), getattr(cfg, k)) for k in output_keys(cfg) if before.get(k) != getattr(cfg, k)}
    if changed:
        raise DataError(
            f"{out} holds a finished evaluation made with other settings {changed} (before, now): use a new --out "
            "(or drop --out: the default names the settings), or pass --overwrite to replace it"
        )


def check_judged(ev: Evaluation, what: str) -> None:
    """An evaluation that scores no query is an error, not a mean of 0.0000 (the run and the qrels do not match)."""
    if not ev.per_query:
        some = ", ".join(ev.skipped[:3])
        raise DataError(f"{what}: no query of the run is judged (run queries {some}...): are these the right qrels?")


def print_metrics(ev: Evaluation, label: str = "") -> None:
    for k, v in ev.mean.items():
        print(f"{label}{k} {v:.4f}")
    print(f"{label}queries {len(ev.per_query)} judged, {len(ev.skipped)} skipped (no judgments)")


def save_metrics(path: Path, cfg: EvalConfig, ev: Evaluation, **extra) -> None:
    record = {
        "command": cfg.command,
        "config": asdict(cfg),
        "mean": ev.mean,
        "judged": len(ev.per_query),
        "skipped": ev.skipped,
        "per_query": ev.per_query,
        **extra,
    }
    write_text(path, json.dumps(record, indent=1))


def default_batch_size(queries: int, cuda: bool, cap: int = 64) -> int:
    """--batch-size when none is given. On CPU 8 (a bigger batch only adds padding there). On CUDA the k-th window of
    every query at once: DL19's 43 queries at top-100 take 9 generate calls instead of 54, and a GPU decoding 8 rows
    is mostly idle. At most 64, so a 7B model's KV cache (57 KB a token in bf16 for Qwen2.5-7B: 64 windows of
    2,300 + 2,048 tokens = 16 GB) stays well beside its 15 GB of weights on an 80 GB GPU.

    >>> default_batch_size(43, cuda=True), default_batch_size(43, cuda=False), default_batch_size(300, cuda=True)
    (43, 8, 64)
    """
    return max(1, min(queries, cap)) if cuda else 8


def load_input(cfg: EvalConfig) -> Dataset:
    if cfg.dataset:
        ds = load_dataset(cfg.dataset, cfg.data_dir)
        if cfg.qrels:  # said out loud: the numbers are then not the dataset's published ones
            ds.qrels = load_qrels(cfg.qrels)
            print(f"qrels: {cfg.qrels} (given with --qrels) instead of {ds.name}'s own judgments")
        return ds
    return Dataset(slug(cfg.candidates), load_rankgpt(cfg.candidates), load_qrels(cfg.qrels))


# ----------------------------------------------------------------------------------------------------------------------
# reranking with a model, resumable from traces.jsonl

# the settings that change what the model is asked or how it answers: a resumed run must share them
RESUME_KEYS = ("dataset", "candidates", "model", "method", "prompt", "top_k", "window", "step", "max_new_tokens",
               "num_child", "k", "seed")


def read_traces(path: Path, record: type = WindowTrace, rewrite: bool = True) -> list:
    """traces.jsonl back into records (WindowTrace or SetwiseTrace). A half-written last line (the run was killed
    mid-write) is dropped (and, with `rewrite`, cut from the file: only the process that appends to it may)."""
    traces = read_records(path, record, trace_problem, "; use another --out, or --overwrite to start afresh")
    # rewrite what survived, so new lines never land on the tail of a half-written one
    if rewrite and path.exists():
        write_text(path, "".join(json.dumps(asdict(t)) + "\n" for t in traces))
    return traces


def trace_problem(t) -> str:
    """What is wrong with a trace read back from disk ("" when nothing): replaying a damaged one would crash later."""
    if not isinstance(t.qid, str) or not isinstance(t.completion, str):
        return "'qid' and 'completion' must be strings"
    if isinstance(t, WindowTrace):
        ints = (t.start, t.end, *t.order) if isinstance(t.order, list) else ()
        if not ints or not all(isinstance(i, int) and not isinstance(i, bool) for i in ints):
            return "'start', 'end' and 'order' must be integers"
        if sorted(t.order) != list(range(t.end - t.start)):
            return f"'order' is not a permutation of the window ({t.start}, {t.end})"
        return ""
    if not isinstance(t.shown, list) or not all(isinstance(d, str) for d in t.shown):
        return "'shown' must be a list of docids"
    if t.pick is not None and (not isinstance(t.pick, int) or isinstance(t.pick, bool) or
                               not 0 <= t.pick < len(t.shown)):
        return f"'pick' must be null or an index into the {len(t.shown)} documents shown"
    return ""


def check_resumable(out: Path, cfg: EvalConfig) -> None:
    """Refuse to mix windows made under other settings into this run's traces."""
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    path = out / "rerank_config.json"
    if path.exists() and ((out / "traces.jsonl").exists() or any(out.glob("traces.rank*.jsonl"))):
        before = read_json(path)
        if not isinstance(before, dict):
            raise DataError(f"{path}: not a settings object; use another --out, or --overwrite to start afresh")
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise DataError(
                f"{out}/traces.jsonl was made with other settings {changed} (before, now): rerun with those "
                "settings to continue it, use another --out, or pass --overwrite to start afresh"
            )
    write_text(path, json.dumps(settings, indent=1))


def load_generator(cfg: EvalConfig):
    """The model as a greedy `Generate` (backend.HFGenerator), with its load time printed."""
    from backend import HFGenerator, load_model

    t = time.time()
    model, tokenizer = load_model(cfg.model)
    print(f"model {cfg.model}: loaded in {time.time() - t:.1f}s on {model.device}; greedy, {cfg.max_new_tokens} tokens")
    generate = HFGenerator(model, tokenizer, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    return generate


def append_traces(f, bar):
    """A callback that appends new trace records to the open traces.jsonl and advances the progress bar."""

    def on_new(new: list) -> None:
        f.writelines(json.dumps(asdict(t)) + "\n" for t in new)
        f.flush()  # a killed run loses at most the batch in flight
        bar.update(len(new))

    return on_new


def rerank_with_model(cfg: EvalConfig, rankings: list[Ranking], out: Path) -> tuple[list[Ranking], dict]:
    """Rerank with cfg.model, appending each finished batch of windows to the traces; returns run statistics.

    Under torchrun / accelerate launch each process takes one block of the queries (dist.shard) and appends to its
    own traces.rank{r}.jsonl; the results are gathered on every rank and the main process writes traces.jsonl in the
    order one process writes it (`one_process_order`)."""
    from tqdm import tqdm

    from rearank import rerank

    record = trace_record(cfg)
    start_traces(out, cfg, record)
    rank, world = dist.rank(), dist.world_size()
    mine = dist.shard(rankings, rank, world)
    trace_path = out / ("traces.jsonl" if world == 1 else f"traces.rank{rank}.jsonl")
    qids = {r.query.qid for r in mine}
    done = [t for t in read_traces(out / "traces.jsonl", record, rewrite=False) if t.qid in qids]
    if cfg.method == "setwise":
        return setwise_with_model(cfg, rankings, mine, done, out, trace_path)
    all_windows = {(r.query.qid, *s) for r in mine for s in window_spans(len(r.candidates), cfg.window, cfg.step)}
    resumed = sum((t.qid, t.start, t.end) in all_windows for t in done)
    if resumed:
        print(f"resuming: {resumed} of {len(all_windows)} windows already in {out / 'traces.jsonl'}")
    generate = load_generator(cfg)
    bar = tqdm(total=len(all_windows), initial=resumed, desc="windows", unit="win", disable=not dist.is_main())
    with open(trace_path, "a") as f:
        reranked, traces = rerank(
            mine, generate, window=cfg.window, step=cfg.step, style=cfg.prompt, batch_size=cfg.batch_size,
            traces=done, on_window=append_traces(f, bar),
        )
    bar.close()
    reranked, traces, counts = gather_results(reranked, traces, generate, resumed)
    finish_traces(out, one_process_order(traces, rankings, cfg))
    formats = [answer_format(w.completion) for w in traces]
    stats = {
        "windows": len(traces),
        "resumed_windows": counts["resumed"],
        "think_and_answer": sum(f1 for f1, _ in formats) / max(len(formats), 1),
        "answer_is_ranking_list": sum(f2 for _, f2 in formats) / max(len(formats), 1),
        **counts["generation"],
        **({"processes": world} if world > 1 else {}),
    }
    print(
        f"{stats['windows'] - counts['resumed']} windows generated in {stats['generate_seconds']:.0f}s "
        f"({stats['generated_tokens']} new tokens); answers: {stats['think_and_answer']:.0%} with <think> and "
        f"<answer>, {stats['answer_is_ranking_list']:.0%} a ranking list"
    )
    return reranked, stats


def setwise_with_model(cfg: EvalConfig, rankings: list[Ranking], mine: list[Ranking], done: list, out: Path,
                       trace_path: Path) -> tuple[list[Ranking], dict]:
    """Rank-R1's heap sort with cfg.model over this process's queries (`mine`), one trace per LLM call appended to
    `trace_path` (replayed on resume)."""
    from tqdm import tqdm

    from setwise import setwise_rerank

    if done:
        print(f"resuming: {len(done)} calls already in {out / 'traces.jsonl'}")
    generate = load_generator(cfg)

    def truncate(text: str) -> str:  # Rank-R1 cuts passages to 512 tokens on TREC DL (METHOD §6)
        ids = generate.tokenizer(text, add_special_tokens=False).input_ids
        return text if len(ids) <= 512 else generate.tokenizer.decode(ids[:512])

    # the count per query depends on the answers
    bar = tqdm(desc="setwise calls", unit="call", initial=len(done), disable=not dist.is_main())
    with open(trace_path, "a") as f:
        reranked, _, traces = setwise_rerank(
            mine, generate, k=cfg.k, num_child=cfg.num_child, seed=cfg.seed, batch_size=cfg.batch_size,
            truncate=truncate, traces=done, on_calls=append_traces(f, bar),
        )
    bar.close()
    reranked, traces, counts = gather_results(reranked, traces, generate, len(done))
    finish_traces(out, one_process_order(traces, rankings, cfg))
    n = max(len(rankings), 1)
    gen = counts["generation"]
    stats = {
        "llm_calls": len(traces),
        "calls_per_query": len(traces) / n,
        "resumed_calls": counts["resumed"],
        "unparseable_answers": sum(t.pick is None for t in traces) / max(len(traces), 1),
        "prompt_tokens": gen["prompt_tokens"],
        "generated_tokens": gen["generated_tokens"],
        "generated_tokens_per_query": gen["generated_tokens"] / n,
        "generate_seconds": gen["generate_seconds"],
        **({"processes": dist.world_size()} if dist.world_size() > 1 else {}),
    }
    print(
        f"LLM calls per query {stats['calls_per_query']:.1f} ({len(traces)} calls, {counts['resumed']} replayed); "
        f"{gen['generated_tokens']} new tokens in {gen['generate_seconds']:.0f}s; "
        f"unparseable answers {stats['unparseable_answers']:.0%}"
    )
    return reranked, stats


# ----------------------------------------------------------------------------------------------------------------------
# several processes (torchrun / accelerate launch): each reranks a block of the queries, the main process merges


def trace_record(cfg: EvalConfig) -> type:
    if cfg.method == "setwise":
        from setwise import SetwiseTrace

        return SetwiseTrace
    return WindowTrace


def write_traces(path: Path, traces: list) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(t)) + "\n" for t in traces))
    tmp.replace(path)  # atomic: a kill leaves the old file or the new one, never half of one


def start_traces(out: Path, cfg: EvalConfig, record: type) -> None:
    """On the main process, before any rank reads: check the settings, and fold the per-rank files an interrupted
    multi-process run left into traces.jsonl, so the run resumes whatever number of processes it is started with."""
    if dist.is_main():
        check_resumable(out, cfg)
        traces = read_traces(out / "traces.jsonl", record)  # cuts a half-written last line
        parts = sorted(out.glob("traces.rank*.jsonl"))
        if parts:
            seen = {json.dumps(asdict(t)) for t in traces}  # a kill between the merge and the unlinks repeats them
            for part in parts:
                traces += [t for t in read_traces(part, record, rewrite=False) if json.dumps(asdict(t)) not in seen]
            write_traces(out / "traces.jsonl", traces)
            for part in parts:
                part.unlink()
    dist.barrier()  # the others read traces.jsonl only once it is whole


def gather_results(reranked: list[Ranking], traces: list, generate, resumed: int) -> tuple[list[Ranking], list, dict]:
    """Every rank's reranked queries (in query order, as shard's blocks concatenate) and traces, and the summed
    generation counts; the identity in one process. generate_seconds sums over processes (device-seconds)."""
    mine = {"prompt_tokens": generate.prompt_tokens, "generated_tokens": generate.generated_tokens,
            "generate_seconds": generate.seconds, "resumed": resumed}  # fmt: skip
    parts = dist.gather((reranked, traces, mine))
    generation = {k: sum(p[2][k] for p in parts) for k in ("prompt_tokens", "generated_tokens", "generate_seconds")}
    generation["generate_seconds"] = round(generation["generate_seconds"], 1)
    counts = {"resumed": sum(p[2]["resumed"] for p in parts), "generation": generation}
    return [r for p in parts for r in p[0]], [t for p in parts for t in p[1]], counts


def finish_traces(out: Path, traces: list) -> None:
    """The main process writes all traces to traces.jsonl and drops the per-rank files they came from."""
    if dist.is_main():
        write_traces(out / "traces.jsonl", traces)
        for part in out.glob("traces.rank*.jsonl"):
            part.unlink()
    dist.barrier()


def one_process_order(traces: list, rankings: list[Ranking], cfg: EvalConfig) -> list:
    """`traces` (each query's own in the order they were made) in the order one process appends them.

    Listwise (rearank.rerank): window position k of every query, sorted by prompt length (a stable sort of the
    queries in input order). Setwise (setwise.setwise_rerank): rounds in which the first `batch_size` queries with a
    call left each make their next call.
    """
    index = {r.query.qid: i for i, r in enumerate(rankings)}
    if cfg.method == "setwise":
        queues = {i: [] for i in range(len(rankings))}
        for t in traces:
            queues[index[t.qid]].append(t)
        order = []
        while active := [q for q in queues.values() if q][: cfg.batch_size]:
            order += [q.pop(0) for q in active]
        return order
    from rearank import build_prompt

    texts = [{c.docid: c.text for c in r.candidates} for r in rankings]

    def key(t: WindowTrace) -> tuple[int, int, int]:
        i = index[t.qid]
        k = window_spans(len(rankings[i].candidates), cfg.window, cfg.step).index((t.start, t.end))
        prompt = build_prompt(rankings[i].query.text, [texts[i][d] for d in t.docids], cfg.prompt)
        return k, sum(len(m["content"]) for m in prompt), i

    return sorted(traces, key=key)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if dist.world_size() > 1:  # torchrun / accelerate launch: only the main process prints and writes the outputs
        dist.init()
        if not dist.is_main():
            sys.stdout = open(os.devnull, "w")
    try:
        if cfg.compare:
            qrels = load_qrels(cfg.qrels) if cfg.qrels else load_dataset(cfg.dataset, cfg.data_dir).qrels
            a, b = (evaluate_run_file(run_path(r), qrels) for r in cfg.compare)
            print(format_comparison(compare(a, b, seed=cfg.seed), *cfg.compare))
            return
        if cfg.report:  # pages from a finished run's files: no model, nothing scored
            import report

            path = report.write_comparison(cfg.report, cfg.against) if cfg.against else report.write_report(cfg.report)
            print(f"wrote {path}")
            return
        if not dist.is_main() and (cfg.run or cfg.model == "bm25"):
            return  # nothing to split: the main process does it all
        if cfg.run:  # score a run file as it is: no reranking, no run written back
            out = Path(cfg.out) if cfg.out else default_out(cfg)
            prepare_out(out, cfg)
            ev = evaluate_run_file(cfg.run, load_qrels(cfg.qrels))
            check_judged(ev, f"{cfg.run} against {cfg.qrels}")
            print_metrics(ev)
            save_metrics(out / "metrics.json", cfg, ev)
            print(f"wrote {out / 'metrics.json'}")
            return
        if cfg.model is None:
            from backend import default_model

            cfg.model = default_model()
        out = Path(cfg.out) if cfg.out else default_out(cfg)
        if dist.is_main() or not cfg.overwrite:  # only the main process deletes what --overwrite replaces
            prepare_out(out, cfg)  # before the data and the model load: a refused --out fails at once
        t = time.time()
        ds = load_input(cfg)
        rankings = [type(r)(r.query, r.candidates[: cfg.top_k]) for r in ds.rankings[: cfg.limit]]
        print(f"{ds.name}: {len(rankings)} queries, top-{cfg.top_k} candidates (loaded in {time.time() - t:.1f}s)")
        if ds.note:
            print(f"note: {ds.name} is {ds.note}")
        first = evaluate_rankings(rankings, ds.qrels)
        check_judged(first, f"{cfg.candidates} against {cfg.qrels}" if cfg.candidates else cfg.dataset)
        extra = {}
        if cfg.model != "bm25":
            if cfg.batch_size is None:
                import torch

                cfg.batch_size = default_batch_size(len(rankings), torch.cuda.is_available())
            print("config: " + json.dumps(asdict(cfg)))
            print_metrics(first, "first stage ")
            rankings, extra = rerank_with_model(cfg, rankings, out)
            if not dist.is_main():
                return
            print_metrics(ev := evaluate_rankings(rankings, ds.qrels), "reranked ")
        else:
            print_metrics(ev := first)
        write_run(out / "run.trec", rankings, tag=slug(cfg.model))
        save_metrics(out / "metrics.json", cfg, ev, seconds=round(time.time() - t, 1), **extra)
        print(f"wrote {out / 'run.trec'} and {out / 'metrics.json'}" + (f" ({time.time() - t:.0f}s)" if extra else ""))
        if extra:  # a model ran: draw what it thought
            import report

            print(f"wrote {report.write_report(out)}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
