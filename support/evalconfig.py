"""An evaluation's settings (`EvalConfig`, eval.py's flags, saved in metrics.json), and the --out folder they name
and guard.

    cfg = EvalConfig(dataset="dl19", model="smollm2", top_k=20)
    default_out(cfg)       # runs/dl19-smollm2-top20: the settings that differ from their defaults name the folder
    prepare_out(out, cfg)  # refuses a folder that holds a finished run made with other settings (unless --overwrite)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from support.cli import arg, nonneg_int, positive_int
from data import FIRST_STAGE_ORDERS, DataError
from support.files import check_out_dir, read_json
from rearank import MAX_CHARS


@dataclass
class EvalConfig:
    """One evaluation's settings: eval.py's command line (each flag's help beside its default), saved as the "config"
    of metrics.json."""

    dataset: str | None = arg(None, "a registered dataset: dl19, dl20, dl21, scifact, scifact-train, the BEIR sets "
                                    "(trec-covid, nfcorpus, ...) and BRIGHT domains (biology, ...): `python data.py "
                                    "list`", group="source")
    suite: str | None = arg(None, "every dataset of REARANK's table: standard = DL19, DL20 and BEIR's seven; bright = "
                                  "BRIGHT's twelve domains; each into OUT/<dataset>, then OUT/suite.md and suite.json",
                            choices=("standard", "bright"), group="source")
    candidates: str | None = arg(None, "RankGPT-format JSON (.json or .json.gz) of first-stage candidates",
                                 group="source")
    run: str | None = arg(None, "a TREC run file to score as it is", group="source")
    report: str | None = arg(None, "redraw OUT/report.html (report.py) from the files an evaluation left in OUT; "
                                   "nothing is evaluated", group="source", metavar="OUT")
    against: str | None = arg(None, "with --report OUT: OUT/compare-OUT_B.html, runs side by side", metavar="OUT_B")
    qrels: str | None = arg(None, "TREC qrels (required with --candidates and --run; with --dataset, they replace "
                                  "the dataset's own judgments)")
    data_dir: str | None = arg(None, "data directory (default: $REARANK_DATA, else ./data)")
    model: str | None = arg(None, "'bm25' = the first stage, no reranking; 'smollm2' = the embedded "
                                  "SmolLM2-135M-Instruct; or a hub id / local checkpoint directory (default: "
                                  "le723z/Rearank-7B with CUDA, else smollm2: backend.default_model)")
    method: str = arg("listwise", "listwise: REARANK sliding windows; setwise: Rank-R1 heap sort (best of a set, "
                                  "reasons first)", choices=("listwise", "setwise"))
    prompt: str = arg("rearank", "REARANK (reasoning) or RankGPT", choices=sorted(MAX_CHARS))
    answer_start: str = arg("", "a departure, empty by default: open each answer with this text for the model to "
                                "continue (e.g. '[' for a small model that writes prose where a list is asked for); "
                                "it is part of the answer that is parsed")
    top_k: int = arg(100, "candidates per query to consider", positive_int)
    first_stage_order: str = arg("given", "the order the top-k is shown to the reranker in (and scored in as the first "
                                          "stage): given, shuffled (by --seed and the qid) or reversed; keeping a "
                                          "shuffled order then earns only the shuffled list's nDCG",
                                 choices=FIRST_STAGE_ORDERS)
    window: int = arg(20, "passages per window", positive_int)
    step: int = arg(10, "how far the window moves up each time (<= --window)", positive_int)
    batch_size: int | None = arg(None, "windows (of different queries) generated together (default: 8 on CPU; on "
                                       "CUDA the window of every query at one position, at most 64: "
                                       "eval.default_batch_size)", positive_int)
    limit: int | None = arg(None, "only the first N queries", positive_int)
    max_new_tokens: int = arg(2048, "generation budget per window, as the paper's", positive_int)
    num_child: int = arg(19, "setwise: children per heap node (a call shows 1 + this)", positive_int)
    k: int = arg(10, "setwise: how many top documents the heap sort extracts", positive_int)
    seed: int = arg(0, "--first-stage-order shuffled: seed of the shuffle; setwise: seed of the per-call document "
                       "shuffles; --compare: seed of the resampling", nonneg_int)
    out: str | None = arg(None, "output directory (default: runs/<dataset>-<model>, then the settings that differ "
                                "from the defaults, e.g. runs/dl19-smollm2-top20-limit2-tok256)")
    compare: list[str] | None = arg(None, "compare two runs (TREC files or eval.py --out directories) query by "
                                          "query: mean nDCG@10 delta B - A, 95%% paired bootstrap interval, sign-flip "
                                          "p-value, wins/ties/losses; judged by --qrels or --dataset's qrels",
                                    nargs=2, metavar=("RUN_A", "RUN_B"))
    overwrite: bool = arg(False, "replace a finished (or interrupted) run in --out made with other settings")
    command: str = ""  # the command line (not a flag), saved with the metrics so every number says how it was made


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name if Path(text).exists() else text).strip("_")


def path_tag(*paths: str | None) -> str:
    """A short digest of where the input files are, so two files with one basename get different default folders."""
    where = "\n".join(str(Path(p).resolve()) for p in paths if p)
    return hashlib.sha1(where.encode()).hexdigest()[:6]


# how each setting shows in a default --out name when it differs from its default
NAME_PARTS = {"prompt": "{}", "top_k": "top{}", "window": "win{}", "step": "step{}", "limit": "limit{}",
              "max_new_tokens": "tok{}", "num_child": "child{}", "k": "k{}", "first_stage_order": "{}",
              "seed": "seed{}", "answer_start": "start{}"}


def output_keys(cfg: EvalConfig) -> tuple[str, ...]:
    """The settings that change what this evaluation writes: inputs, model, the first stage's order (and the seed
    of its shuffle), and the knobs its method reads."""
    order = ("first_stage_order",) + (("seed",) if cfg.first_stage_order == "shuffled" else ())
    if cfg.run:
        return ("run", "qrels") + order
    keys = ("dataset", "candidates", "qrels", "model", "top_k", "limit") + order
    if cfg.model == "bm25":
        return keys
    keys += ("method", "prompt", "max_new_tokens")
    listwise = ("window", "step", "answer_start")
    return tuple(dict.fromkeys(keys + (listwise if cfg.method == "listwise" else ("num_child", "k", "seed"))))


def name_part(value) -> str:
    """A setting's value as a folder name can hold it; text made only of other characters ('[') by its digest.

    >>> name_part(20), name_part("rankgpt"), name_part("[")
    ('20', 'rankgpt', '1e5c2f')
    """
    if not isinstance(value, str):
        return str(value)
    return slug(value) or hashlib.sha1(value.encode()).hexdigest()[:6]


def default_out(cfg: EvalConfig) -> Path:
    """runs/<input>-<model>[-setwise] (a --run file: runs/<run>-<digest>), then each setting that differs from its
    default (--model resolved first).

    >>> str(default_out(EvalConfig(dataset="dl19", model="smollm2", top_k=20, limit=2, max_new_tokens=256)))
    'runs/dl19-smollm2-top20-limit2-tok256'
    >>> str(default_out(EvalConfig(dataset="dl19", model="bm25", first_stage_order="shuffled", seed=1)))
    'runs/dl19-bm25-shuffled-seed1'
    """
    if cfg.run:
        parts = [f"{slug(cfg.run)}-{path_tag(cfg.run, cfg.qrels)}"]
    elif cfg.dataset:
        parts = [cfg.dataset + (f"-qrels{path_tag(cfg.qrels)}" if cfg.qrels else "")]
    else:
        parts = [f"{slug(cfg.candidates)}-{path_tag(cfg.candidates, cfg.qrels)}"]
    if not cfg.run:
        parts += [slug(cfg.model)] + (["setwise"] if cfg.method == "setwise" else [])
    defaults = EvalConfig()
    parts += [fmt.format(name_part(getattr(cfg, k))) for k, fmt in NAME_PARTS.items()
              if k in output_keys(cfg) and getattr(cfg, k) != getattr(defaults, k)]
    return Path("runs") / "-".join(parts)


def saved(config: dict, key: str):
    """A setting as a saved config holds it; one saved before the setting existed had its default."""
    return config.get(key, getattr(EvalConfig(), key))


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
    changed = {k: (saved(before, k), getattr(cfg, k)) for k in output_keys(cfg) if saved(before, k) != getattr(cfg, k)}
    if changed:
        raise DataError(
            f"{out} holds a finished evaluation made with other settings {changed} (before, now): use a new --out "
            "(or drop --out: the default names the settings), or pass --overwrite to replace it"
        )
