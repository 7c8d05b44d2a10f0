"""The paper's evaluation table: which datasets a suite holds, the published figures beside ours, and the table itself.

    python eval.py --suite standard --model bm25     # DL19, DL20 and BEIR's seven (REARANK's Table 1)
    python eval.py --suite bright --model smollm2    # BRIGHT's twelve domains (REARANK's BRIGHT table)

eval.py runs each dataset as `--dataset NAME --out OUT/NAME` would and hands the finished folders' metrics here; a
dataset that cannot be had (offline, a licensed corpus) is a row that says what to fetch. Published figures are the
REARANK paper's nDCG@10 x 100 (BM25 top-100 reranked by REARANK-7B); a suite average is comparable with the paper's
only when it is over every dataset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from support.download import BRIGHT_DOMAINS
from support.files import write_text

BEIR7 = ("trec-covid", "nfcorpus", "dbpedia-entity", "scifact", "signal1m", "trec-news", "robust04")
SUITES = {"standard": ("dl19", "dl20", *BEIR7), "bright": BRIGHT_DOMAINS}
# the averages each suite reports, as the paper does: BEIR's seven (DL19 and DL20 stand alone), BRIGHT's twelve
AVERAGES = {"standard": {"BEIR-7": BEIR7}, "bright": {"BRIGHT": BRIGHT_DOMAINS}}
# (BM25, REARANK-7B), nDCG@10 x 100, as the REARANK paper reports them
PUBLISHED = {
    "dl19": (50.58, 74.16),
    "dl20": (47.96, 70.00),
    "scifact": (67.89, 75.02),
    "BEIR-7": (43.31, 54.59),
    "BRIGHT": (13.7, 17.7),
}


@dataclass
class Row:
    """One dataset of a suite: its figures (nDCG@10, reranked None for --model bm25), or why it is missing."""

    dataset: str
    status: str  # "ok", "missing" (its data cannot be had here) or "failed" (any other error)
    queries: int = 0
    first_stage: float | None = None
    reranked: float | None = None
    note: str = ""  # for a missing or failed dataset: the error, which says what to fetch and where


def row(name: str, metrics: dict) -> Row:
    """A finished evaluation's metrics.json as a row: the first stage, and the reranked figure when a model ran."""
    mean = metrics["mean"]["nDCG@10"]
    if metrics["config"]["model"] == "bm25":
        return Row(name, "ok", metrics["judged"], mean)
    return Row(name, "ok", metrics["judged"], metrics["first_stage"]["nDCG@10"], mean)


def failed(name: str, message: str) -> Row:
    """The row of a dataset whose evaluation stopped with `message` (eval.py's `error: ...` line)."""
    message = message.removeprefix("error: ")
    return Row(name, "missing" if message.startswith("missing data files") else "failed", note=message)


def average(rows: list[Row], names: tuple[str, ...]) -> dict:
    """The mean first-stage and reranked nDCG@10 over the datasets of `names` that ran, and which those are.

    >>> a = average([Row("x", "ok", 5, 0.4, 0.6), Row("y", "missing"), Row("z", "ok", 5, 0.2, 0.4)], ("x", "y", "z"))
    >>> round(a["first_stage"], 4), round(a["reranked"], 4), a["over"], a["of"]
    (0.3, 0.5, ['x', 'z'], 3)
    """
    ok = [r for r in rows if r.dataset in names and r.status == "ok"]
    first_stage = sum(r.first_stage for r in ok) / len(ok) if ok else None
    reranked = sum(r.reranked for r in ok) / len(ok) if ok and all(r.reranked is not None for r in ok) else None
    return {"first_stage": first_stage, "reranked": reranked, "over": [r.dataset for r in ok], "of": len(names)}


def _fig(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _paper(key: str) -> list[str]:
    return [f"{x / 100:.4f}" for x in PUBLISHED[key]] if key in PUBLISHED else ["-", "-"]


def table(suite: str, rows: list[Row], model: str) -> str:
    """The suite as a markdown table (ours beside the paper's, x100 shown as fractions like ours), its averages, and
    under it what each missing dataset needs."""
    lines = [f"suite {suite}, model {model}: nDCG@10 (paper: REARANK, arXiv 2505.20046, BM25 top-100)", "",
             "| dataset | queries | first stage | reranked | paper BM25 | paper REARANK-7B |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.status == "ok":
            lines.append(f"| {r.dataset} | {r.queries} | {_fig(r.first_stage)} | {_fig(r.reranked)} | "
                         + " | ".join(_paper(r.dataset)) + " |")
        else:
            lines.append(f"| {r.dataset} | {r.status} | - | - | " + " | ".join(_paper(r.dataset)) + " |")
    for key, names in AVERAGES[suite].items():
        a = average(rows, names)
        lines.append(f"| **{key} average** ({len(a['over'])} of {a['of']}: {', '.join(a['over']) or 'none'}) | | "
                     f"{_fig(a['first_stage'])} | {_fig(a['reranked'])} | " + " | ".join(_paper(key)) + " |")
    notes = [f"- {r.dataset} ({r.status}): {r.note}" for r in rows if r.status != "ok"]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write(out: Path, suite: str, rows: list[Row], model: str, command: str) -> str:
    """OUT/suite.md (the table) and OUT/suite.json (rows, averages, the paper's figures, the command); the table."""
    text = table(suite, rows, model)
    record = {
        "suite": suite,
        "model": model,
        "command": command,
        "rows": [asdict(r) for r in rows],
        "averages": {key: average(rows, names) for key, names in AVERAGES[suite].items()},
        "published": {k: {"bm25": v[0] / 100, "rearank_7b": v[1] / 100} for k, v in PUBLISHED.items()},
    }
    write_text(out / "suite.md", text)
    write_text(out / "suite.json", json.dumps(record, indent=1))
    return text
