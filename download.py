"""The data files' public homes: where each file of the data directory comes from, and fetching the missing ones.

data.py's registry asks `require` for a dataset's files. Those not in the data directory yet are fetched from their
homes (the rank_llm_data dataset on the Hugging Face Hub, anserini-tools on GitHub, the BEIR zip); offline, one error
lists every missing file and where it goes.

Reading order: `REMOTE` (a local path -> its home), `_fetch` (one file), `home` (a file's home in words), `require` (a
dataset's files).
"""

import sys
import urllib.request
import zipfile
from pathlib import Path

from files import DataError

RANK_LLM_DATA = "castorini/rank_llm_data"  # Hugging Face dataset with first-stage results (METHOD, data README)
QRELS_URL = "https://raw.githubusercontent.com/castorini/anserini-tools/master/topics-and-qrels/"
SCIFACT_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip"

# local path (relative to the data directory) -> how to fetch it when missing
REMOTE: dict[str, tuple[str, str]] = {
    "trec_dl/bm25_top100_dl19.rankgpt.json": ("hf", "retrieve_results/BM25/retrieve_results_dl19_top100.json"),
    "trec_dl/bm25_top100_dl20.rankgpt.json": ("hf", "retrieve_results/BM25/retrieve_results_dl20_top100.json"),
    "trec_dl21_msmarco_v2/bm25_top100_dl21.rankgpt.json": (
        "hf", "retrieve_results/BM25/retrieve_results_dl21_top100.json"
    ),
    "trec_dl/qrels.dl19-passage.txt": ("url", QRELS_URL + "qrels.dl19-passage.txt"),
    "trec_dl/qrels.dl20-passage.txt": ("url", QRELS_URL + "qrels.dl20-passage.txt"),
    "trec_dl21_msmarco_v2/qrels.dl21-passage.txt": ("url", QRELS_URL + "qrels.dl21-passage.txt"),
    "beir_scifact/corpus.jsonl": ("beir", "scifact/corpus.jsonl"),
    "beir_scifact/queries.jsonl": ("beir", "scifact/queries.jsonl"),
    "beir_scifact/qrels/test.tsv": ("beir", "scifact/qrels/test.tsv"),
    "beir_scifact/qrels/train.tsv": ("beir", "scifact/qrels/train.tsv"),
}


def _fetch(root: Path, rel: str) -> None:
    kind, src = REMOTE[rel]
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if kind == "hf":
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(RANK_LLM_DATA, src, repo_type="dataset")
        dest.write_bytes(Path(local).read_bytes())
    elif kind == "url":
        urllib.request.urlretrieve(src, dest)
    else:  # the BEIR zip holds every SciFact file at once
        zpath = root / "beir_scifact" / "scifact.zip"
        if not zpath.exists():
            urllib.request.urlretrieve(SCIFACT_URL, zpath)
        with zipfile.ZipFile(zpath) as z:
            dest.write_bytes(z.read(src))


def home(rel: str) -> str:
    """Where the data file `rel` comes from, as a user would fetch it by hand."""
    kind, src = REMOTE[rel]
    return {"hf": f"{src} of the Hugging Face dataset {RANK_LLM_DATA}", "url": src,
            "beir": f"{src} of {SCIFACT_URL}"}[kind]


def require(root: Path, rels: list[str], fetch: bool = True) -> list[Path]:
    """The paths of `rels` under `root`, fetching the missing ones; offline, one error that lists them all. With
    fetch False (a data directory the user named) a missing file is an error at once: a local path needs no network."""
    missing = [r for r in rels if not (root / r).exists()]
    if missing and not fetch:
        raise DataError(
            f"missing data files in {root} (the data directory given by --data-dir or $REARANK_DATA, which is never "
            "fetched into):\n" + "\n".join(f"  {root / r}   (from {home(r)})" for r in missing)
            + "\nPut the files there, or unset --data-dir and $REARANK_DATA to fetch them into ./data."
        )
    failed = []
    for rel in missing:
        try:
            print(f"data: fetching {rel} ...", file=sys.stderr)
            _fetch(root, rel)
        except Exception as e:  # offline, hub down, proxy: we only need to say what to do next
            failed.append(f"  {root / rel}   (from {home(rel)}; {type(e).__name__})")
    if failed:
        raise DataError(
            "missing data files, and fetching them failed (offline?):\n"
            + "\n".join(failed)
            + "\nPut the files there, or point --data-dir / $REARANK_DATA at a directory laid out like this one."
        )
    return [root / r for r in rels]

