"""An evaluation run as one self-contained page, report.html: read what the reranker thought, query by query.

    python eval.py --report runs/dl19-smollm2                    # (re)draw runs/dl19-smollm2/report.html
    python eval.py --report runs/A --against runs/B              # runs/A/compare-B.html: two runs side by side

eval.py draws report.html at the end of every model evaluation, from the files it leaves under --out (metrics.json,
run.trec, traces.jsonl), read back with the dataset they came from by runview.py.

The page: a summary (command, config, first-stage and reranked nDCG@1/5/10, answer-format rates, tokens and time),
a per-query table sorted by ΔnDCG@10, worst first (click a heading to re-sort), and per query the model's outputs
(reasoning and answer shown apart) and the passages before -> after, coloured by judged grade. One file, nothing
fetched: the frame, its inline CSS and a few lines of vanilla JS are page.py's. Every text that comes from data or a
model goes through `e` (html.escape), so a passage holding `<script>` is shown, never run.

Reading order: after runview.py (the records drawn here) and page.py (the frame); eval.py calls `write_report` and
`write_comparison`. Here: the small pure pieces, the html pieces, the report page, then the two-run page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from data import DataError
from page import e, page
from rearank import MAX_CHARS, WindowTrace, answer_format, answer_text, clean_passage
from runview import QueryView, Run, Trace, read_run
from setwise import SetwiseTrace

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
# html pieces (the page's frame, CSS and JS are page.py's)


def grade_box(g: int | None) -> str:
    return f'<span class="g {grade_class(g)}">{"?" if g is None else g}</span>'


def grade_class(g: int | None) -> str:
    return "gu" if g is None else f"g{max(min(g, 3), 0)}"


def chip(qi: int, q: QueryView, docid: str, label: object = None, cls: str = "") -> str:
    """A passage as a small square coloured by its judged grade (dashed: unjudged), labelled by default with the grade,
    linking to its row of the passage table (p<query>-<first-stage rank>). Hovering shows the docid and the text:
    the JS reads them from that row, so the thousands of squares carry no copy of either."""
    g = q.grades.get(docid)
    text = label if label is not None else ("?" if g is None else g)
    more = f" {cls}" if cls else ""
    return f'<a class="g {grade_class(g)}{more}" href="#p{qi}-{q.was.get(docid, "")}">{e(text)}</a>'


def strip(qi: int, q: QueryView, docids: Sequence[str], n: int = 10) -> str:
    return "".join(chip(qi, q, d) for d in docids[:n])


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
            stats.append(f"<tr><td>{e(RATES[key])}</td>{num_cell(value, f'{value:.0%}')}</tr>")
        elif key in COUNTS:
            stats.append(f"<tr><td>{e(COUNTS[key])}</td>{num_cell(value, f'{value:g}')}</tr>")
    config = " &nbsp; ".join(f"<code>{e(k)}={e(v)}</code>" for k, v in m.get("config", {}).items()
                      if v is not None and k not in ("command", "out"))
    skipped = m.get("skipped", [])
    return (
        f"<h1>{e(run.name)} on {e(cfg.dataset or cfg.candidates)} — {e(run.out.name)}</h1>"
        f'<pre class="cmd">{e(m.get("command", ""))}</pre><p class="muted">{config}</p>'
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
            f'<tr data-qid="{e(q.qid)}"><td><a href="#q{i}">{e(q.qid)}</a></td><td>{e(q.text)}</td>'
            + num_cell(q.before["nDCG@10"]) + num_cell(q.after["nDCG@10"]) + delta_cell(d)
            + strip_cell(i, q, q.first) + strip_cell(i, q, q.reranked)
            + num_cell(relevant_in(q.reranked, q.grades) - relevant_in(q.first, q.grades),
                       f"{relevant_in(q.first, q.grades)} → {relevant_in(q.reranked, q.grades)}")
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
    think = f'<pre class="think">{e(reasoning)}</pre>' if reasoning else '<p class="muted">(no reasoning)</p>'
    return think + f'<pre class="answer">{e(answer) if answer else "(empty answer)"}</pre>'


def window_html(qi: int, q: QueryView, t: WindowTrace) -> str:
    """A listwise window: the passages as shown ([1] first), the model's output, the order read from it."""
    docids = t.docids or q.first[t.start: t.end]  # traces from before docids were recorded: the first-stage slice
    f1, f2 = answer_format(t.completion)
    badges = "".join(f'<span class="badge {"ok" if ok else "bad"}">{"✓" if ok else "✗"} {name}</span> ' for name, ok
                     in [("&lt;think&gt; then &lt;answer&gt;", f1), ("answer is a ranking list", f2)])
    shown = "".join(chip(qi, q, d, i) for i, d in enumerate(docids, 1))
    read = "".join(chip(qi, q, docids[j], j + 1) for j in t.order if j < len(docids))
    if t.order == sorted(t.order):
        read += ' <span class="muted">the order shown, unchanged</span>'
    return (
        f'<details class="w" open><summary>window ranks {t.start + 1}–{t.end} {badges}</summary>'
        f'<div class="row"><b>shown</b>{shown}</div>{completion_html(t.completion)}'
        f'<div class="row"><b>order read</b>{read}</div></details>'
    )


def setwise_html(qi: int, q: QueryView, n: int, t: SetwiseTrace) -> str:
    """A heap-sort call: the documents shown, the one picked, and whether it was relevant."""
    shown = "".join(chip(qi, q, d, i, "pick" if t.pick == i - 1 else "") for i, d in enumerate(t.shown, 1))
    best = max((q.grades.get(d, 0) for d in t.shown), default=0)
    if t.pick is None:
        verdict = '<span class="badge bad">no pick read: the parent stays</span>'
    else:
        g = q.grades.get(t.shown[t.pick])
        kind = "unjudged" if g is None else ("relevant" if g > 0 else "not relevant")
        good = "" if g is None else ("ok" if g > 0 else "bad")
        verdict = (f'picked [{t.pick + 1}] {chip(qi, q, t.shown[t.pick])} <span class="badge {good}">{kind}</span>'
                   f' <span class="muted">best grade shown: {best}</span>')
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
    return f'<td>{grade_box(q.grades.get(docid))}</td><td class="d">{e(docid)}</td><td class="t">{e(text)}</td>'


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
        f'<details class="q" id="q{qi}" data-qid="{e(q.qid)}"{" open" if open_ else ""}><summary>{e(q.qid)}: '
        f'{e(q.text)} <span class="muted">— {ndcg_line(q)}</span></summary>'
        f'<div class="row"><b>top 10 before</b>{strip(qi, q, q.first)}</div>'
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
        for r, d in enumerate(qa.first)
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
        if qa.first != qb.first:
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
            f'<tr data-qid="{e(qa.qid)}"><td><a href="#q{i}">{e(qa.qid)}</a></td><td>{e(qa.text)}</td>'
            + num_cell(qa.before["nDCG@10"]) + num_cell(qa.after["nDCG@10"]) + num_cell(qb.after["nDCG@10"])
            + delta_cell(d) + strip_cell(i, qa, qa.reranked) + strip_cell(i, qb, qb.reranked) + "</tr>"
        )
    for i, (qa, qb) in enumerate(pairs):
        sides = "".join(
            f'<div><h3>{e(label)}: {e(run.name)} — nDCG@10 {fmt(q.after["nDCG@10"])}</h3>'
            f'<div class="row"><b>top 10</b>{strip(i, q, q.reranked)}</div>{outputs_html(i, q, run.setwise)}</div>'
            for label, run, q in [("A", a, qa), ("B", b, qb)]
        )
        sections.append(
            f'<details class="q" id="q{i}" data-qid="{e(qa.qid)}"{" open" if i == order[0] else ""}><summary>'
            f'{e(qa.qid)}: {e(qa.text)} <span class="muted">— nDCG@10 first stage {fmt(qa.before["nDCG@10"])}, '
            f'A {fmt(qa.after["nDCG@10"])}, B {fmt(qb.after["nDCG@10"])}</span></summary>'
            f'<div class="two">{sides}</div><h3>passages, first-stage order</h3>{passages_ab(i, qa, qb)}</details>'
        )
    head = ('<tr><th data-k="t">qid</th><th data-k="t">query</th><th class="n" data-k="n">first stage @10</th>'
            '<th class="n" data-k="n">A @10</th><th class="n" data-k="n">B @10</th>'
            '<th class="n" data-k="n" data-dir="asc">B − A ▲</th><th>A top 10</th><th>B top 10</th></tr>')
    body = (
        f"<h1>A: {e(a.name)} ({e(a.out.name)}) &nbsp;vs&nbsp; B: {e(b.name)} ({e(b.out.name)})</h1>"
        f'<pre class="cmd">A: {e(a.metrics.get("command", ""))}\nB: {e(b.metrics.get("command", ""))}</pre>'
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
