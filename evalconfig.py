"""An evaluation's settings (`EvalConfig`), and the --out folder they name and guard.

    cfg = EvalConfig(dataset="dl19", model="smollm2", top_k=20)
    default_out(cfg)       # runs/dl19-smollm2-top20: the settings that differ from their defaults name the folder
    prepare_out(out, cfg)  # refuses a folder that holds a finished run made with other settings (unless --overwrite)

eval.py parses its command line into an EvalConfig and saves it in metrics.json; runview.py reads it back from there
into the same record, for report.py. `output_keys` are the settings that change what an evaluation writes: the default
folder name shows those that differ from their defaults, and `prepare_out` refuses a folder whose finished run differs
in any of them.

Reading order: after data.py and files.py; traces.py (the resumable model calls under --out), runview.py (the folder
read back) and eval.py build on it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from data import DataError
from files import check_out_dir, read_json


@dataclass
class EvalConfig:
    """One evaluation's settings: eval.py's command line, saved as the "config" of metrics.json."""

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
