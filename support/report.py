"""The HTML report of an evaluation: one self-contained page (report.html) to read what the reranker thought, query
by query, and two runs side by side (compare-<B>.html). eval.py draws report.html after every model evaluation.

    python eval.py --report runs/dl19-smollm2                    # (re)draw runs/dl19-smollm2/report.html
    python eval.py --report runs/A --against runs/B              # runs/A/compare-B.html: two runs side by side
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Sequence, Union

from data import DataError, first_stage, load_dataset, load_rankgpt, trec_order
from rearank import MAX_CHARS, WindowTrace, answer_format, answer_text, clean_passage
from setwise import SetwiseTrace
from support.evalconfig import EvalConfig
from support.formats import load_qrels, load_run, read_records
from support.scoring import score_run
from support.traces import trace_record

# ----------------------------------------------------------------------------------------------------------------------
# the run read back: metrics.json (the config, the command, per-query nDCG), run.trec (the reranked order) and
# traces.jsonl (never repaired: a half-written last line of a run still writing is left out), with the queries, the
# first-stage order, the passages and the judgments reloaded from the dataset the saved config names

Trace = Union[WindowTrace, SetwiseTrace]


@dataclass
class QueryView:
    """Everything the page shows about one judged query."""

    qid: str
    text: str
    first_stage: list[str]  # first-stage docids, best first: the list the reranker saw
    reranked: list[str]  # run.trec's docids, best first
    passages: dict[str, str]  # docid -> text
    grades: dict[str, int]  # judged docids -> grade (absent: unjudged)
    before: dict[str, float]  # first-stage nDCG@k
    after: dict[str, float]  # reranked nDCG@k, as metrics.json holds it
    traces: list[Trace]  # this query's windows or setwise calls, in the order they ran

    @cached_property
    def was(self) -> dict[str, int]:  # docid -> 0-based first-stage rank
        return {d: r for r, d in enumerate(self.first_stage)}

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


def read_metrics(out: Path) -> dict:
    """OUT/metrics.json, the one file every evaluation's --out folder holds; its absence says OUT is not one."""
    path = out / "metrics.json"
    if not path.exists():
        raise DataError(f"{path}: not found; is {path.parent} the --out folder of an evaluation?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None


def read_run(out: str | Path) -> Run:
    """An evaluation's --out folder, with its dataset reloaded from the config saved in metrics.json."""
    out = Path(out)
    metrics = read_metrics(out)
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
        seen = first_stage(r, cfg.top_k, cfg.first_stage_order, cfg.seed).docids()  # the list the reranker saw
        if qid not in ranked:
            raise DataError(f"{out}/run.trec: query {qid} of metrics.json is missing")
        queries.append(QueryView(
            qid, r.query.text, seen, ranked[qid], {c.docid: c.text for c in r.candidates[: cfg.top_k]},
            qrels.get(qid, {}), score_run({qid: seen}, qrels, ks).per_query[qid], per_query[qid],
            by_query.get(qid, []),
        ))
    missing = set(per_query) - {q.qid for q in queries}
    if missing:
        raise DataError(f"{out}/metrics.json: queries {sorted(missing)[:5]} are not in the dataset its config names")
    return Run(out, metrics, cfg, queries)


# ----------------------------------------------------------------------------------------------------------------------
# the page's frame: inline CSS and a few lines of JS, nothing fetched. Every text from data or a model goes through
# `escape`, so a passage holding `<script>` is shown, never run

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1360px;padding:16px 24px;
color:#1f2328;background:#fff}
h1{font-size:20px;margin:4px 0 8px}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:14px;margin:14px 0 6px}
code,pre,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;padding:6px 8px;border-radius:4px;max-height:22em;
overflow:auto}
pre.cmd{background:#f6f8fa;border:1px solid #d0d7de}
pre.think{background:#f6f8fa;color:#444;border-left:3px solid #8c959f}
pre.answer{background:#fff8c5;border-left:3px solid #bf8700;font-weight:600}
table{border-collapse:collapse;margin:4px 0}
th,td{border-bottom:1px solid #eaeef2;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;position:sticky;top:0}
th[data-k]{cursor:pointer}th[data-k]:hover{background:#eaeef2}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#1a7f37}.down{color:#cf222e}.muted{color:#656d76}
.kv td:first-child{color:#656d76}
.g{display:inline-block;min-width:17px;height:17px;line-height:17px;margin:1px;border-radius:3px;text-align:center;
font-size:11px;text-decoration:none;color:#1f2328;border:1px solid transparent}
.g0{background:#e6e8eb}.g1{background:#c6f0cf}.g2{background:#6fd38a}.g3{background:#1a7f37;color:#fff}
.gu{background:#fff;border:1px dashed #8c959f;color:#8c959f}
.pick{outline:2px solid #bf8700;outline-offset:1px}
.legend .g{width:auto;padding:0 5px}
details.q{border:1px solid #d0d7de;border-radius:6px;margin:8px 0;padding:0 10px}
details.q>summary{padding:7px 0;cursor:pointer;font-weight:600}
details.q[open]>summary{border-bottom:1px solid #eaeef2;margin-bottom:6px}
details.w{margin:6px 0 10px;padding-left:8px;border-left:2px solid #d0d7de}
details.w>summary{cursor:pointer;color:#424a53}
.row{margin:2px 0}.row>b{display:inline-block;width:110px;font-weight:500;color:#656d76}
.passages td:nth-child(-n+2){text-align:right;font-variant-numeric:tabular-nums}.passages td:nth-child(2){color:#656d76}
.passages td.d{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}.passages td.t{max-width:820px}
td.strip{white-space:nowrap}
.two{display:grid;grid-template-columns:1fr 1fr;gap:16px}.two>div{min-width:0}
.badge{font-size:11px;padding:0 5px;border-radius:8px;background:#eaeef2;color:#424a53;font-weight:500}
.ok{background:#dafbe1;color:#1a7f37}.bad{background:#ffebe9;color:#cf222e}
"""

# click a heading to sort by it (twice: the other way); following a link to a query opens it; resting the pointer on a
# passage's square shows its docid and text
JS = """
document.querySelectorAll("th[data-k]").forEach(th => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], i = th.cellIndex, asc = th.dataset.dir !== "asc";
  const key = r => th.dataset.k === "n" ? parseFloat(r.cells[i].dataset.v) : r.cells[i].textContent;
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1))
    .forEach(r => body.appendChild(r));
  th.dataset.dir = asc ? "asc" : "desc";
  th.closest("tr").querySelectorAll("th").forEach(h => h.textContent = h.textContent.replace(/ [▲▼]$/, ""));
  th.textContent += asc ? " ▲" : " ▼";
}));
function openTarget() {
  const el = location.hash && document.getElementById(location.hash.slice(1));
  for (let d = el; d; d = d.parentElement) if (d.tagName === "DETAILS") d.open = true;
}
addEventListener("hashchange", openTarget); openTarget();
document.addEventListener("mouseover", ev => {
  const a = ev.target.closest && ev.target.closest("a.g");
  const row = a && !a.title && document.getElementById(a.hash.slice(1));
  if (row) a.title = row.querySelector(".d").textContent + ": " + row.querySelector(".t").textContent.slice(0, 240);
});
"""


def escape(x: object) -> str:
    """Text (or an attribute value) made safe to put in the page: what data or a model wrote is shown, never run."""
    return html.escape(str(x), quote=True)


def page(title: str, body: str) -> str:
    """A whole HTML document: `body` between the inline CSS and the inline JS."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n<script>{JS}</script></body></html>\n")


# ----------------------------------------------------------------------------------------------------------------------
# the summary's labels for the statistics metrics.json holds

RATES = {  # metrics.json statistics that are fractions, shown as percentages
    "think_and_answer": "answers with <think> and <answer>",
    "answer_is_ranking_list": "answers that are a ranking list",
    "unparseable_answers": "unparseable setwise answers",
}
COUNTS = {
    "windows": "windows", "resumed_windows": "windows replayed from traces.jsonl", "llm_calls": "setwise LLM calls",
    "calls_per_query": "LLM calls per query", "resumed_calls": "calls replayed from traces.jsonl",
    "prompt_tokens": "prompt tokens", "generated_tokens": "generated tokens",
    "generated_tokens_per_query": "generated tokens per query", "generate_seconds": "generation time (s)",
    "seconds": "whole run (s)",
}

# ----------------------------------------------------------------------------------------------------------------------
# small pure pieces

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)


def split_completion(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a completion, to show apart. The answer is what the parser reads (rearank.answer_text);
    the reasoning is what comes before it, think tags dropped.

    >>> split_completion("<think>[2] names fleas</think>\\n<answer>[2] > [1]</answer>")
    ('[2] names fleas', '[2] > [1]')
    >>> split_completion("[2] > [1]")  # no tags: all of it is the answer
    ('', '[2] > [1]')
    """
    blocks = list(_ANSWER_BLOCK.finditer(text))
    if blocks:
        head = text[: blocks[-1].start()]
    elif "</think>" in text:
        head = text.rsplit("</think>", 1)[0]
    else:
        head = ""
    return re.sub(r"</?think>", "", head).strip(), answer_text(text).strip()


def rank_move(old: int | None, new: int) -> str:
    """How far a passage moved, from its 0-based first-stage rank to its new one.

    >>> rank_move(7, 0), rank_move(0, 3), rank_move(2, 2), rank_move(None, 4)
    ('↑7', '↓3', '=', 'new')
    """
    if old is None:
        return "new"
    return "=" if old == new else (f"↑{old - new}" if old > new else f"↓{new - old}")


def fmt(x: float) -> str:
    return f"{x:.4f}"


def signed(x: float) -> str:
    return f"{x:+.4f}"


def num_cell(x: float, text: str | None = None, cls: str = "") -> str:
    """A number cell: the exact value in data-v (for sorting, and for tests to compare with metrics.json)."""
    return f'<td class="n {cls}" data-v="{x!r}">{text or fmt(x)}</td>'


def delta_class(d: float) -> str:
    return "up" if d > 1e-12 else ("down" if d < -1e-12 else "")


def delta_cell(d: float) -> str:
    return num_cell(d, signed(d), delta_class(d))


# ----------------------------------------------------------------------------------------------------------------------
# html pieces


def grade_box(g: int | None) -> str:
    return f'<span class="g {grade_class(g)}">{"?" if g is None else g}</span>'


def grade_class(g: int | None) -> str:
    return "gu" if g is None else f"g{max(min(g, 3), 0)}"


def passage_square(qi: int, q: QueryView, docid: str, label: object = None, cls: str = "") -> str:
    """A passage as a small square coloured by its judged grade (dashed: unjudged), labelled by default with the grade,
    linking to its row of the passage table (p<query>-<first-stage rank>). Hovering shows the docid and the text:
    the JS reads them from that row, so the thousands of squares carry no copy of either."""
    g = q.grades.get(docid)
    text = label if label is not None else ("?" if g is None else g)
    more = f" {cls}" if cls else ""
    return f'<a class="g {grade_class(g)}{more}" href="#p{qi}-{q.was.get(docid, "")}">{escape(text)}</a>'


def strip(qi: int, q: QueryView, docids: Sequence[str], n: int = 10) -> str:
    return "".join(passage_square(qi, q, d) for d in docids[:n])


def strip_cell(qi: int, q: QueryView, docids: Sequence[str]) -> str:
    return f'<td class="strip">{strip(qi, q, docids)}</td>'


LEGEND = ('<p class="legend muted">judged grade: ' + "".join(
    f'<span class="g g{g}">{g} {w}</span>' for g, w in enumerate(["not relevant", "related", "relevant", "perfect"]))
    + '<span class="g gu">? unjudged</span> &nbsp; squares are passages, best first: hover for the passage, '
    "click to go to it</p>")


def relevant_in(docids: Sequence[str], grades: dict[str, int], n: int = 10) -> int:
    return sum(grades.get(d, 0) > 0 for d in docids[:n])


def summary(run: Run) -> str:
    m, cfg = run.metrics, run.cfg
    rows = []
    for label, get in [("first stage", run.first_mean), ("reranked", lambda k: m["mean"][f"nDCG@{k}"])]:
        rows.append(f"<tr><td>{label}</td>" + "".join(num_cell(get(k)) for k in run.ks) + "</tr>")
    deltas = [m["mean"][f"nDCG@{k}"] - run.first_mean(k) for k in run.ks]
    rows.append("<tr><td>Δ</td>" + "".join(delta_cell(d) for d in deltas) + "</tr>")
    d10 = [q.after["nDCG@10"] - q.before["nDCG@10"] for q in run.queries]
    counts = f"{sum(d > 1e-12 for d in d10)} better, {sum(d < -1e-12 for d in d10)} worse, " \
             f"{sum(abs(d) <= 1e-12 for d in d10)} unchanged at nDCG@10"
    head = "".join(f'<th class="n">nDCG@{k}</th>' for k in run.ks)
    means = f'<table id="means"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    stats = []
    for key, value in m.items():
        if key in RATES:
            stats.append(f"<tr><td>{escape(RATES[key])}</td>{num_cell(value, f'{value:.0%}')}</tr>")
        elif key in COUNTS:
            stats.append(f"<tr><td>{escape(COUNTS[key])}</td>{num_cell(value, f'{value:g}')}</tr>")
    config = " &nbsp; ".join(f"<code>{escape(k)}={escape(v)}</code>" for k, v in m.get("config", {}).items()
                      if v is not None and k not in ("command", "out"))
    skipped = m.get("skipped", [])
    return (
        f"<h1>{escape(run.name)} on {escape(cfg.dataset or cfg.candidates)} — {escape(run.out.name)}</h1>"
        f'<pre class="cmd">{escape(m.get("command", ""))}</pre><p class="muted">{config}</p>'
        f'<div class="two"><div><h3>nDCG, mean of {len(run.queries)} judged queries'
        f'{f" ({len(skipped)} unjudged skipped)" if skipped else ""}</h3>{means}<p>{counts}</p></div>'
        f'<div><h3>the run</h3><table class="kv" id="stats"><tbody>{"".join(stats)}</tbody></table></div></div>'
    )


def format_ok(t: Trace) -> bool:
    if isinstance(t, SetwiseTrace):
        return t.pick is not None
    return all(answer_format(t.completion))


def query_table(run: Run) -> str:
    """One row per query, worst ΔnDCG@10 first; the squares are the top 10 before and after."""
    ordered = sorted(enumerate(run.queries), key=lambda iq: iq[1].after["nDCG@10"] - iq[1].before["nDCG@10"])
    rows = []
    for i, q in ordered:
        d = q.after["nDCG@10"] - q.before["nDCG@10"]
        ok = sum(format_ok(t) for t in q.traces)
        rows.append(
            f'<tr data-qid="{escape(q.qid)}"><td><a href="#q{i}">{escape(q.qid)}</a></td><td>{escape(q.text)}</td>'
            + num_cell(q.before["nDCG@10"]) + num_cell(q.after["nDCG@10"]) + delta_cell(d)
            + strip_cell(i, q, q.first_stage) + strip_cell(i, q, q.reranked)
            + num_cell(relevant_in(q.reranked, q.grades) - relevant_in(q.first_stage, q.grades),
                       f"{relevant_in(q.first_stage, q.grades)} → {relevant_in(q.reranked, q.grades)}")
            + num_cell(ok / max(len(q.traces), 1), f"{ok}/{len(q.traces)}") + "</tr>"
        )
    well = "picks read" if run.setwise else "well-formed"
    head = (
        '<tr><th data-k="t">qid</th><th data-k="t">query</th><th class="n" data-k="n">first stage @10</th>'
        '<th class="n" data-k="n">reranked @10</th><th class="n" data-k="n" data-dir="asc">Δ @10 ▲</th>'
        '<th>top 10 before</th><th>top 10 after</th><th class="n" data-k="n">relevant in top 10</th>'
        f'<th class="n" data-k="n">{well}</th></tr>'
    )
    return f'<table id="queries"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def completion_html(text: str) -> str:
    reasoning, answer = split_completion(text)
    think = f'<pre class="think">{escape(reasoning)}</pre>' if reasoning else '<p class="muted">(no reasoning)</p>'
    return think + f'<pre class="answer">{escape(answer) if answer else "(empty answer)"}</pre>'


def window_html(qi: int, q: QueryView, t: WindowTrace) -> str:
    """A listwise window: the passages as shown ([1] first), the model's output, the order read from it."""
    docids = t.docids or q.first_stage[t.start: t.end]  # traces from before docids were recorded: the first-stage slice
    f1, f2 = answer_format(t.completion)
    badges = "".join(f'<span class="badge {"ok" if ok else "bad"}">{"✓" if ok else "✗"} {name}</span> ' for name, ok
                     in [("&lt;think&gt; then &lt;answer&gt;", f1), ("answer is a ranking list", f2)])
    shown = "".join(passage_square(qi, q, d, i) for i, d in enumerate(docids, 1))
    read = "".join(passage_square(qi, q, docids[j], j + 1) for j in t.order if j < len(docids))
    if t.order == sorted(t.order):
        read += ' <span class="muted">the order shown, unchanged</span>'
    return (
        f'<details class="w" open><summary>window ranks {t.start + 1}–{t.end} {badges}</summary>'
        f'<div class="row"><b>shown</b>{shown}</div>{completion_html(t.completion)}'
        f'<div class="row"><b>order read</b>{read}</div></details>'
    )


def setwise_html(qi: int, q: QueryView, n: int, t: SetwiseTrace) -> str:
    """A heap-sort call: the documents shown, the one picked, and whether it was relevant."""
    shown = "".join(passage_square(qi, q, d, i, "pick" if t.pick == i - 1 else "") for i, d in enumerate(t.shown, 1))
    best = max((q.grades.get(d, 0) for d in t.shown), default=0)
    if t.pick is None:
        verdict = '<span class="badge bad">no pick read: the parent stays</span>'
    else:
        g = q.grades.get(t.shown[t.pick])
        kind = "unjudged" if g is None else ("relevant" if g > 0 else "not relevant")
        good = "" if g is None else ("ok" if g > 0 else "bad")
        verdict = (f'picked [{t.pick + 1}] {passage_square(qi, q, t.shown[t.pick])} '
                   f'<span class="badge {good}">{kind}</span> <span class="muted">best grade shown: {best}</span>')
    return (
        f'<details class="w"><summary>call {n}: {verdict}</summary>'
        f'<div class="row"><b>shown</b>{shown}</div>{completion_html(t.completion)}</details>'
    )


def outputs_html(qi: int, q: QueryView, setwise: bool) -> str:
    if not q.traces:
        return '<p class="muted">no traces for this query</p>'
    if setwise:
        return "".join(setwise_html(qi, q, n, t) for n, t in enumerate(q.traces, 1))
    return "".join(window_html(qi, q, t) for t in q.traces)


def move_cell(old: int | None, new: int) -> str:
    move = rank_move(old, new)
    return f'<td class="{"up" if move[0] == "↑" else ("down" if move[0] == "↓" else "muted")}">{move}</td>'


def passage_cells(q: QueryView, docid: str) -> str:
    text = clean_passage(q.passages.get(docid, ""), MAX_CHARS["rearank"])
    return (f'<td>{grade_box(q.grades.get(docid))}</td><td class="d">{escape(docid)}</td>'
            f'<td class="t">{escape(text)}</td>')


def passages_html(qi: int, q: QueryView) -> str:
    """The candidates in their new order: new rank, first-stage rank, the move, the grade, the text. Rows are named by
    first-stage rank, the one name a passage has in every run of the same data."""
    rows = "".join(
        f'<tr id="p{qi}-{q.was[d]}"><td>{r + 1}</td><td>{q.was[d] + 1}</td>{move_cell(q.was[d], r)}'
        f"{passage_cells(q, d)}</tr>"
        for r, d in enumerate(q.reranked)
    )
    return ('<table class="passages"><thead><tr><th>now</th><th>was</th><th>moved</th><th>grade</th><th>docid</th>'
            f"<th>passage (as the prompt shows it)</th></tr></thead><tbody>{rows}</tbody></table>")


def ndcg_line(q: QueryView) -> str:
    parts = []
    for name, a in q.after.items():
        b = q.before[name]
        parts.append(f'{name} {fmt(b)} → {fmt(a)} <span class="{delta_class(a - b)}">({signed(a - b)})</span>')
    return " &nbsp; ".join(parts)


def query_section(qi: int, q: QueryView, run: Run, open_: bool = False) -> str:
    n = len(q.traces)
    calls = (f"{n} setwise call{'s' * (n != 1)}"
             if run.setwise else f"{n} window{'s' * (n != 1)}, bottom of the list first")
    return (
        f'<details class="q" id="q{qi}" data-qid="{escape(q.qid)}"{" open" if open_ else ""}><summary>{escape(q.qid)}: '
        f'{escape(q.text)} <span class="muted">— {ndcg_line(q)}</span></summary>'
        f'<div class="row"><b>top 10 before</b>{strip(qi, q, q.first_stage)}</div>'
        f'<div class="row"><b>top 10 after</b>{strip(qi, q, q.reranked)}</div>'
        f"<h3>model outputs: {calls}</h3>{outputs_html(qi, q, run.setwise)}"
        f"<h3>passages, new order</h3>{passages_html(qi, q)}</details>"
    )


def render_report(run: Run) -> str:
    worst = min(range(len(run.queries)), key=lambda i: run.queries[i].after["nDCG@10"] - run.queries[i].before[
        "nDCG@10"], default=None)
    sections = "".join(query_section(i, q, run, open_=i == worst) for i, q in enumerate(run.queries))
    body = (summary(run) + f"<h2>queries, worst ΔnDCG@10 first</h2>{LEGEND}{query_table(run)}"
            f"<h2>per query (the worst one open)</h2>{sections}")
    return page(f"{run.name}: {run.out.name}", body)


def write_report(out: str | Path) -> Path:
    """Draw OUT/report.html from the files an evaluation left in OUT; returns its path."""
    run = read_run(out)
    path = run.out / "report.html"
    path.write_text(render_report(run))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# two runs side by side


def passages_ab(qi: int, qa: QueryView, qb: QueryView) -> str:
    """The candidates in first-stage order with their rank in A and in B (click a heading to sort by it)."""
    rows = "".join(
        f'<tr id="p{qi}-{r}"><td data-v="{r}">{r + 1}</td><td data-v="{qa.now[d]}">{qa.now[d] + 1}</td>'
        f'{move_cell(r, qa.now[d])}<td data-v="{qb.now[d]}">{qb.now[d] + 1}</td>{move_cell(r, qb.now[d])}'
        f"{passage_cells(qa, d)}</tr>"
        for r, d in enumerate(qa.first_stage)
    )
    head = '<th data-k="n">was</th><th data-k="n">A now</th><th></th><th data-k="n">B now</th><th></th>'
    return (f'<table class="passages ab"><thead><tr>{head}<th>grade</th><th>docid</th>'
            f"<th>passage (as the prompt shows it)</th></tr></thead><tbody>{rows}</tbody></table>")


def render_comparison(a: Run, b: Run) -> str:
    """Per-query nDCG@10 of A and B (B − A, worst first), and for every query both runs' outputs side by side."""
    bq = {q.qid: q for q in b.queries}
    pairs = [(q, bq[q.qid]) for q in a.queries if q.qid in bq]
    if not pairs:
        raise DataError(f"{a.out} and {b.out} share no judged query")
    for qa, qb in pairs:
        if qa.first_stage != qb.first_stage:
            raise DataError(f"{a.out} and {b.out} rerank different first-stage lists (query {qa.qid}): compare runs of "
                            "the same dataset and --top-k")
    mean = {k: [sum(q.after[f"nDCG@{k}"] for q in side) / len(pairs) for side in zip(*pairs)] for k in a.ks}
    means = "".join(f"<tr><td>nDCG@{k}</td>{num_cell(ma)}{num_cell(mb)}{delta_cell(mb - ma)}</tr>"
                    for k, (ma, mb) in mean.items())
    rows, sections = [], []
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][1].after["nDCG@10"] - pairs[i][0].after["nDCG@10"])
    for i in order:
        qa, qb = pairs[i]
        d = qb.after["nDCG@10"] - qa.after["nDCG@10"]
        rows.append(
            f'<tr data-qid="{escape(qa.qid)}"><td><a href="#q{i}">{escape(qa.qid)}</a></td><td>{escape(qa.text)}</td>'
            + num_cell(qa.before["nDCG@10"]) + num_cell(qa.after["nDCG@10"]) + num_cell(qb.after["nDCG@10"])
            + delta_cell(d) + strip_cell(i, qa, qa.reranked) + strip_cell(i, qb, qb.reranked) + "</tr>"
        )
    for i, (qa, qb) in enumerate(pairs):
        sides = "".join(
            f'<div><h3>{escape(label)}: {escape(run.name)} — nDCG@10 {fmt(q.after["nDCG@10"])}</h3>'
            f'<div class="row"><b>top 10</b>{strip(i, q, q.reranked)}</div>{outputs_html(i, q, run.setwise)}</div>'
            for label, run, q in [("A", a, qa), ("B", b, qb)]
        )
        sections.append(
            f'<details class="q" id="q{i}" data-qid="{escape(qa.qid)}"{" open" if i == order[0] else ""}><summary>'
            f'{escape(qa.qid)}: {escape(qa.text)} <span class="muted">— nDCG@10 first stage '
            f'{fmt(qa.before["nDCG@10"])}, '
            f'A {fmt(qa.after["nDCG@10"])}, B {fmt(qb.after["nDCG@10"])}</span></summary>'
            f'<div class="two">{sides}</div><h3>passages, first-stage order</h3>{passages_ab(i, qa, qb)}</details>'
        )
    head = ('<tr><th data-k="t">qid</th><th data-k="t">query</th><th class="n" data-k="n">first stage @10</th>'
            '<th class="n" data-k="n">A @10</th><th class="n" data-k="n">B @10</th>'
            '<th class="n" data-k="n" data-dir="asc">B − A ▲</th><th>A top 10</th><th>B top 10</th></tr>')
    body = (
        f"<h1>A: {escape(a.name)} ({escape(a.out.name)}) &nbsp;vs&nbsp; B: {escape(b.name)} ({escape(b.out.name)})</h1>"
        f'<pre class="cmd">A: {escape(a.metrics.get("command", ""))}\nB: {escape(b.metrics.get("command", ""))}</pre>'
        f'<h3>nDCG, mean of the {len(pairs)} judged queries both runs hold</h3><table id="means"><thead><tr><th></th>'
        f'<th class="n">A</th><th class="n">B</th><th class="n">B − A</th></tr></thead><tbody>{means}</tbody></table>'
        f'<h2>queries, worst B − A first</h2>{LEGEND}<table id="queries"><thead>{head}</thead>'
        f'<tbody>{"".join(rows)}</tbody></table><h2>per query: A left, B right (the worst one open)</h2>'
        + "".join(sections)
    )
    return page(f"{a.out.name} vs {b.out.name}", body)


def write_comparison(out_a: str | Path, out_b: str | Path) -> Path:
    """Draw OUT_A/compare-<B>.html comparing the runs in OUT_A and OUT_B; returns its path."""
    a, b = read_run(out_a), read_run(out_b)
    path = a.out / f"compare-{re.sub(r'[^A-Za-z0-9._-]+', '_', b.out.resolve().name)}.html"
    path.write_text(render_comparison(a, b))
    return path
