"""Evaluate a reranker with nDCG@10, exactly as trec_eval's `ndcg_cut` computes it (docs/method.md §8).

    python eval.py --dataset dl19 --model bm25             # the first stage alone
    python eval.py --dataset dl19 --model smollm2 --top-k 20   # rerank with the embedded model (REARANK prompt)
    python eval.py --dataset dl19 --model le723z/Rearank-7B    # the paper's model (the default on a GPU)
    python eval.py --run RUN.trec --qrels QRELS            # score any TREC run
    python eval.py --candidates FILE.json --qrels QRELS    # a user's RankGPT-format candidates
    python eval.py --report OUT [--against OUT_B]          # redraw OUT/report.html, or compare two runs
    python eval.py --suite standard --model bm25           # DL19, DL20, BEIR's seven: one table
    torchrun --nproc_per_node 2 eval.py --dataset dl19 --model smollm2   # the queries split over 2 processes

Under --out: `run.trec`, `metrics.json` (per-query values, the config, the command line) and, with a model,
`traces.jsonl` (one line per window, appended as each batch finishes: the same command resumes an interrupted run)
and `report.html` (per-query nDCG before and after, each window's reasoning, each passage's move).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from support import dist
from support.cli import dataclass_parser
from data import (
    Candidate, DataError, Dataset, Query, Ranking, first_stage, load_dataset, load_rankgpt, reorder, trec_order,
)
from support.evalconfig import EvalConfig, default_out, prepare_out, slug
from support.files import check_out_dir, read_json, write_text
from support.formats import load_qrels, load_run, write_run
from rearank import answer_format, window_spans
from support.scoring import (
    RunScores,
    compare,
    format_comparison,
    run_path,
    score_rankings,
    score_run,
    score_run_file,
)
from support.traces import (
    append_traces,
    finish_traces,
    gather_results,
    one_process_order,
    read_traces,
    start_traces,
    trace_record,
)

# ----------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = dataclass_parser(EvalConfig, __doc__)  # the flags, their defaults and help: evalconfig.EvalConfig
    args = p.parse_args(argv)
    if args.compare and (args.candidates or args.run or not (args.qrels or args.dataset)):
        p.error("--compare takes --qrels or --dataset (for its qrels), not --candidates or --run")
    if not (args.compare or args.dataset or args.suite or args.candidates or args.run or args.report):
        p.error("one of --dataset, --suite, --candidates, --run, --report or --compare is required")
    if (args.candidates or args.run) and not args.qrels:
        p.error("--candidates and --run need --qrels")
    if args.suite and args.qrels:
        p.error("--suite evaluates each dataset against its own judgments: --qrels would replace them all")
    if args.against and not args.report:
        p.error("--against needs --report")
    if args.first_stage_order != "given" and (args.compare or args.report):
        p.error("--first-stage-order reorders a first stage before it is scored or reranked; --compare and --report "
                "read finished runs (evaluate each run with it, then compare or draw their --out folders)")
    if args.answer_start and args.method != "listwise":
        p.error("--answer-start opens a listwise answer; setwise has Rank-R1's own prompt")
    if args.step > args.window:
        p.error(f"--step {args.step} is larger than --window {args.window}: the windows would skip passages")
    command = shlex.join(["python", "eval.py", *(sys.argv[1:] if argv is None else argv)])
    return EvalConfig(**vars(args), command=command)


def score_reordered_run(cfg: EvalConfig, out: Path) -> RunScores:
    """A --run file with each query's list (in trec_eval's order) reordered as --first-stage-order says, scored, and
    written to out/run.trec with scores falling with the new rank (trec_eval sorts by score)."""
    ranked = {qid: reorder(trec_order(scores), cfg.first_stage_order, cfg.seed, qid)
              for qid, scores in load_run(cfg.run).items()}
    write_run(out / "run.trec", [Ranking(Query(q, ""), [Candidate(d, "") for d in ds]) for q, ds in ranked.items()],
              tag=f"{slug(cfg.run)}-{cfg.first_stage_order}")
    print(f"wrote {out / 'run.trec'} ({cfg.run}, each query's list {cfg.first_stage_order})")
    return score_run(ranked, load_qrels(cfg.qrels))


def check_judged(ev: RunScores, what: str) -> None:
    """An evaluation that scores no query is an error, not a mean of 0.0000 (the run and the qrels do not match)."""
    if not ev.per_query:
        some = ", ".join(ev.skipped[:3])
        raise DataError(f"{what}: no query of the run is judged (run queries {some}...): are these the right qrels?")


def print_metrics(ev: RunScores, label: str = "") -> None:
    for k, v in ev.mean.items():
        print(f"{label}{k} {v:.4f}")
    print(f"{label}queries {len(ev.per_query)} judged, {len(ev.skipped)} skipped (no judgments)")


def save_metrics(path: Path, cfg: EvalConfig, ev: RunScores, **extra) -> None:
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
# reranking with a model, resumable from traces.jsonl (traces.py)


def load_generator(cfg: EvalConfig):
    """The model as a greedy `Generate` (backend.HFGenerator), with its load time printed."""
    from support.backend import HFGenerator, load_model

    t = time.time()
    model, tokenizer = load_model(cfg.model)
    print(f"model {cfg.model}: loaded in {time.time() - t:.1f}s on {model.device}; greedy, {cfg.max_new_tokens} tokens")
    generate = HFGenerator(model, tokenizer, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    return generate


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
            mine, generate, window=cfg.window, step=cfg.step, style=cfg.prompt, answer_start=cfg.answer_start,
            batch_size=cfg.batch_size, traces=done, on_window=append_traces(f, bar),
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

    def truncate(text: str) -> str:  # Rank-R1 cuts passages to 512 tokens on TREC DL (docs/method.md §6)
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
# --suite: every dataset of the paper's table, then one table (suite.py)


def dataset_argv(cfg: EvalConfig, name: str, out: Path) -> list[str]:
    """The command line that evaluates dataset `name` into `out` with every other setting of `cfg`: each flag whose
    value differs from its default, as typed.

    >>> dataset_argv(EvalConfig(suite="standard", model="bm25", top_k=20), "dl19", Path("o/dl19"))
    ['--model', 'bm25', '--top-k', '20', '--dataset', 'dl19', '--out', 'o/dl19']
    """
    argv = []
    for f in fields(EvalConfig):
        value = getattr(cfg, f.name)
        if "help" not in f.metadata or f.name in ("suite", "dataset", "out") or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag] if value is True else [flag, *map(str, value if isinstance(value, list) else [value])]
    return argv + ["--dataset", name, "--out", str(out)]


def run_suite(cfg: EvalConfig) -> None:
    """Each dataset of cfg.suite evaluated as `eval.py --dataset NAME --out OUT/NAME` (same settings, same figures,
    resumable); one that stops with an error (offline, a licensed corpus) becomes a row saying what it needs. Then
    the table, printed and written as OUT/suite.md and OUT/suite.json."""
    from support import suite

    if cfg.model is None:  # one model for every dataset
        from support.backend import default_model

        cfg.model = default_model()
    from support.backend import SMOLLM2, ModelError, check_loadable

    if cfg.model not in ("bm25", SMOLLM2):  # a model that cannot load ends the suite now, not once per dataset
        try:
            check_loadable(cfg.model)
        except ModelError as e:
            sys.exit(f"error: {e}")
    root = check_out_dir(Path(cfg.out) if cfg.out else default_out(replace(cfg, dataset=f"suite-{cfg.suite}")),
                         create=False)
    rows = []
    for name in suite.SUITES[cfg.suite]:
        print(f"== {cfg.suite}: {name}")
        try:
            main(dataset_argv(cfg, name, root / name))
        except SystemExit as e:  # main's `error: ...` line for this dataset: a row of the table, not the suite's end
            print(e.code, file=sys.stderr)
            rows.append(suite.failed(name, str(e.code)))
            continue
        if dist.is_main():  # the main process wrote it
            rows.append(suite.row(name, read_json(root / name / "metrics.json")))
    if dist.is_main():
        print(suite.write(root, cfg.suite, rows, cfg.model, cfg.command), end="")
        print(f"wrote {root / 'suite.md'} and {root / 'suite.json'}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if dist.world_size() > 1:  # torchrun / accelerate launch: only the main process prints and writes the outputs
        dist.init()
        dist.quiet_unless_main()
    try:
        if cfg.suite:
            return run_suite(cfg)
        if cfg.compare:
            qrels = load_qrels(cfg.qrels) if cfg.qrels else load_dataset(cfg.dataset, cfg.data_dir).qrels
            a, b = (score_run_file(run_path(r), qrels) for r in cfg.compare)
            print(format_comparison(compare(a, b, seed=cfg.seed), *cfg.compare))
            return
        if cfg.report:  # pages from a finished run's files: no model, nothing scored
            from support import report

            path = report.write_comparison(cfg.report, cfg.against) if cfg.against else report.write_report(cfg.report)
            print(f"wrote {path}")
            return
        if not dist.is_main() and (cfg.run or cfg.model == "bm25"):
            return  # nothing to split: the main process does it all
        if cfg.run:  # score a run file as it is (or reordered): no reranking
            out = Path(cfg.out) if cfg.out else default_out(cfg)
            prepare_out(out, cfg)
            if cfg.first_stage_order == "given":
                ev = score_run_file(cfg.run, load_qrels(cfg.qrels))
            else:
                ev = score_reordered_run(cfg, out)
            check_judged(ev, f"{cfg.run} against {cfg.qrels}")
            print_metrics(ev)
            save_metrics(out / "metrics.json", cfg, ev)
            print(f"wrote {out / 'metrics.json'}")
            return
        if cfg.model is None:
            from support.backend import default_model

            cfg.model = default_model()
        out = Path(cfg.out) if cfg.out else default_out(cfg)
        if dist.is_main() or not cfg.overwrite:  # only the main process deletes what --overwrite replaces
            prepare_out(out, cfg)  # before the data and the model load: a refused --out fails at once
        t = time.time()
        ds = load_input(cfg)
        rankings = [first_stage(r, cfg.top_k, cfg.first_stage_order, cfg.seed) for r in ds.rankings[: cfg.limit]]
        order = {"given": "", "reversed": ", reversed", "shuffled": f", shuffled (seed {cfg.seed})"}
        print(f"{ds.name}: {len(rankings)} queries, top-{cfg.top_k} candidates{order[cfg.first_stage_order]} "
              f"(loaded in {time.time() - t:.1f}s)")
        if ds.note:
            print(f"note: {ds.name} is {ds.note}")
        first_stage_scores = score_rankings(rankings, ds.qrels)
        check_judged(first_stage_scores, f"{cfg.candidates} against {cfg.qrels}" if cfg.candidates else cfg.dataset)
        extra = {}
        if cfg.model != "bm25":
            if cfg.batch_size is None:
                import torch

                cfg.batch_size = default_batch_size(len(rankings), torch.cuda.is_available())
            print("config: " + json.dumps(asdict(cfg)))
            print_metrics(first_stage_scores, "first stage ")
            rankings, extra = rerank_with_model(cfg, rankings, out)
            if not dist.is_main():
                return
            print_metrics(ev := score_rankings(rankings, ds.qrels), "reranked ")
        else:
            print_metrics(ev := first_stage_scores)
        write_run(out / "run.trec", rankings, tag=slug(cfg.model))
        save_metrics(out / "metrics.json", cfg, ev, seconds=round(time.time() - t, 1),
                     first_stage=first_stage_scores.mean, **extra)
        print(f"wrote {out / 'run.trec'} and {out / 'metrics.json'}" + (f" ({time.time() - t:.0f}s)" if extra else ""))
        if extra:  # a model ran: draw what it thought
            from support import report

            print(f"wrote {report.write_report(out)}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
