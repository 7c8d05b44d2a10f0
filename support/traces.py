"""traces.jsonl: an evaluation's record of every model call (rearank.WindowTrace, setwise.SetwiseTrace), which makes
a model run resumable: the same command again replays the finished calls instead of asking the model again, and
`check_resumable` refuses a file made with other settings. Under torchrun each process appends to its own
traces.rank{r}.jsonl; `gather_results` and `finish_traces` merge them in the order one process writes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from support import dist
from data import DataError, Ranking
from support.evalconfig import EvalConfig, saved
from support.files import read_json, write_text
from support.formats import read_records
from rearank import WindowTrace, window_spans

# the settings that change what the model is asked or how it answers: a resumed run must share them
RESUME_KEYS = ("dataset", "candidates", "model", "method", "prompt", "top_k", "first_stage_order", "window", "step",
               "max_new_tokens", "num_child", "k", "seed")


# ----------------------------------------------------------------------------------------------------------------------
# one process: read back, check, append


def trace_record(cfg: EvalConfig) -> type:
    """The record one line of traces.jsonl holds under cfg.method: WindowTrace (listwise) or SetwiseTrace."""
    if cfg.method == "setwise":
        from setwise import SetwiseTrace

        return SetwiseTrace
    return WindowTrace


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
        changed = {k: (saved(before, k), v) for k, v in settings.items() if saved(before, k) != v}
        if changed:
            raise DataError(
                f"{out}/traces.jsonl was made with other settings {changed} (before, now): rerun with those "
                "settings to continue it, use another --out, or pass --overwrite to start afresh"
            )
    write_text(path, json.dumps(settings, indent=1))


def append_traces(f, bar):
    """A callback that appends new trace records to the open traces.jsonl and advances the progress bar."""

    def on_new(new: list) -> None:
        f.writelines(json.dumps(asdict(t)) + "\n" for t in new)
        f.flush()  # a killed run loses at most the batch in flight
        bar.update(len(new))

    return on_new


def write_traces(path: Path, traces: list) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(t)) + "\n" for t in traces))
    tmp.replace(path)  # atomic: a kill leaves the old file or the new one, never half of one


# ----------------------------------------------------------------------------------------------------------------------
# several processes (torchrun / accelerate launch): each reranks a block of the queries, the main process merges


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
