"""The data files' public homes: where each file of the data directory comes from, and fetching the missing ones.

data.py's registry asks `require` for a dataset's files. Those not in the data directory yet are fetched from their
homes (the rank_llm_data dataset on the Hugging Face Hub, anserini-tools on GitHub, the BEIR zips, the BRIGHT dataset
on the Hub); offline, one error lists every missing file and where it goes. Three BEIR corpora are not public (TREC's
licences): for those the error says what to obtain and where to put it.
"""

import json
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from support.files import DataError

ANSERINI_URL = "https://raw.githubusercontent.com/castorini/anserini-tools/master/"  # topics/, qrels/ (once one
QRELS_URL = ANSERINI_URL + "qrels/"  # folder, topics-and-qrels/, which no longer exists)
RANK_LLM_DATA = "castorini/rank_llm_data"  # Hugging Face dataset: the BM25 top-100 lists REARANK reranks
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/"  # + <name>.zip
BRIGHT = "xlangai/BRIGHT"  # Hugging Face dataset

BEIR_PUBLIC = ("trec-covid", "nfcorpus", "dbpedia-entity", "scifact")
BRIGHT_DOMAINS = ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
                  "sustainable_living", "leetcode", "pony", "aops", "theoremqa_questions", "theoremqa_theorems")
# the corpora behind BEIR's licensed sets: what to obtain (the qrels' docids are these collections' own ids)
LICENSED = {
    "signal1m": "the tweet collection of Signal-1M related-tweet retrieval (Suarez et al., ECIR 2018), on request "
                "from Signal AI: http://research.signalmedia.co/datasets/signal1m-tweetir.html",
    "trec-news": "the TREC Washington Post Corpus (v2 or later), licensed from NIST: "
                 "https://trec.nist.gov/data/wapost/",
    "robust04": "TREC Disks 4 and 5 minus the Congressional Record, licensed from NIST: "
                "https://trec.nist.gov/data/cd45/index.html",
}

# The homes and their formats, which the readers in formats.py follow:
#
# - BEIR (Thakur et al. 2021), https://github.com/beir-cellar/beir : one zip a dataset,
#   https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/<name>.zip, holding <name>/corpus.jsonl
#   (`{"_id", "title", "text"}` a line), <name>/queries.jsonl (`{"_id", "text"}`) and <name>/qrels/test.tsv (header
#   `query-id corpus-id score`, graded). Public: trec-covid, nfcorpus, dbpedia-entity, scifact.
# - Signal-1M, TREC-News, Robust04: queries and qrels as Anserini ships BEIR's versions of them,
#   https://github.com/castorini/anserini-tools (topics/topics.beir-v1.0.0-<name>.test.tsv.gz: `qid<TAB>text`;
#   qrels/qrels.beir-v1.0.0-<name>.test.txt: TREC qrels); the corpus is the user's, converted to BEIR's corpus.jsonl.
# - BRIGHT (Su et al. 2024), https://huggingface.co/datasets/xlangai/BRIGHT : parquet files per configuration and
#   domain, documents/<domain>-00000-of-00001.parquet (columns `id`, `content`) and
#   examples/<domain>-00000-of-00001.parquet (`query`, `reasoning`, `id`, `excluded_ids`, `gold_ids_long`,
#   `gold_ids`; `excluded_ids` is ["N/A"] when none). Reading parquet takes pyarrow, so each file is converted once,
#   when fetched, to JSON lines of the same columns (documents.jsonl, examples.jsonl), which the standard library reads.
#
# Other homes, not used: prebuilt BM25 runs (Pyserini's run.beir.bm25-flat.<name>.txt; castorini/rank_llm_data's
# retrieve_results/BM25/retrieve_results_{covid,news}_top100.jsonl) carry docids without text, or cover two of the
# seven sets, so the project runs its own BM25 over each corpus (bm25.py). For BRIGHT, REARANK's own code reads a
# tarball of Pyserini-format files (huggingface.co/datasets/le723z/bright_tar: pyserini_corpus/<domain>.jsonl
# `{"id", "contents"}`, pyserini_queries/<domain>.tsv, runs_bm25/bm25.<domain>.filtered.trec), and anserini-tools
# holds BRIGHT's qrels and excluded ids (qrels/qrels.bright-<domain>.txt, exclude.bright-<domain>.txt);
# xlangai/BRIGHT is the benchmark's own release.

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
    "beir_scifact/qrels/train.tsv": ("beir", "scifact/qrels/train.tsv"),
    **{f"beir_{n}/{f}": ("beir", f"{n}/{f}") for n in BEIR_PUBLIC for f in ("corpus.jsonl", "queries.jsonl",
                                                                           "qrels/test.tsv")},
    **{f"beir_{n}/topics.test.tsv.gz": ("url", f"{ANSERINI_URL}topics/topics.beir-v1.0.0-{n}.test.tsv.gz")
       for n in LICENSED},
    **{f"beir_{n}/qrels.test.txt": ("url", f"{ANSERINI_URL}qrels/qrels.beir-v1.0.0-{n}.test.txt") for n in LICENSED},
    **{f"beir_{n}/corpus.jsonl": ("licensed", how + "; converted to BEIR's corpus.jsonl, one "
                                  '{"_id": docid, "title": ..., "text": ...} a line (BEIR\'s conversion: '
                                  "https://github.com/beir-cellar/beir/wiki/Datasets-available)")
       for n, how in LICENSED.items()},
    **{f"bright/{d}/{c}.jsonl": ("bright", f"{c}/{d}-00000-of-00001.parquet")
       for d in BRIGHT_DOMAINS for c in ("documents", "examples")},
}


def _fetch(root: Path, rel: str) -> None:
    """Fetch one file into place; a failed fetch leaves nothing behind under `root`, not even a folder."""
    kind, src = REMOTE[rel]
    dest = root / rel
    if kind == "hf":
        from huggingface_hub import hf_hub_download

        _put(dest, lambda tmp: tmp.write_bytes(Path(hf_hub_download(RANK_LLM_DATA, src, repo_type="dataset"))
                                               .read_bytes()))
    elif kind == "url":
        _put(dest, lambda tmp: urllib.request.urlretrieve(src, tmp))
    elif kind == "bright":
        from huggingface_hub import hf_hub_download

        _put(dest, lambda tmp: parquet_to_jsonl(Path(hf_hub_download(BRIGHT, src, repo_type="dataset")), tmp))
    else:  # a BEIR zip holds every file of its dataset at once: fetched once, kept beside them
        name = src.split("/")[0]
        zpath = root / f"beir_{name}" / f"{name}.zip"
        if not zpath.exists():
            _put(zpath, lambda tmp: urllib.request.urlretrieve(f"{BEIR_URL}{name}.zip", tmp))

        def unzip(tmp: Path) -> None:  # streamed: DBPedia's corpus is 1.5 GB
            with zipfile.ZipFile(zpath) as z, z.open(src) as member, open(tmp, "wb") as f:
                shutil.copyfileobj(member, f)

        _put(dest, unzip)


def _put(dest: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)`, then tmp renamed to dest: an interrupted fetch never leaves half a file under the real name, and
    a failed one removes the folders it made."""
    made = [p for p in dest.parents if not p.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for folder in made:
            folder.rmdir()
        raise
    tmp.replace(dest)


def home(rel: str) -> str:
    """Where a data file comes from, in words a user can follow by hand."""
    kind, src = REMOTE[rel]
    where = {"hf": f"https://huggingface.co/datasets/{RANK_LLM_DATA}: {src}", "url": src,
             "bright": f"https://huggingface.co/datasets/{BRIGHT}: {src}, as JSON lines",
             "beir": f"{BEIR_URL}{src.split('/')[0]}.zip: {src}"}
    return where.get(kind, src)


def parquet_to_jsonl(src: Path, dest: Path) -> None:
    """A parquet file's rows as JSON lines, its columns as keys (pyarrow reads parquet, the standard library not)."""
    import pyarrow.parquet as pq  # only where BRIGHT is fetched: pip install pyarrow

    with open(dest, "w", encoding="utf-8") as f:
        for row in pq.read_table(src).to_pylist():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")



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
        if REMOTE[rel][0] == "licensed":
            failed.append(f"  {root / rel}   (not public: obtain {REMOTE[rel][1]})")
            continue
        try:
            print(f"data: fetching {rel} ...", file=sys.stderr)
            _fetch(root, rel)
        except Exception as e:  # offline, hub down, proxy, no pyarrow: we only need to say what to do next
            failed.append(f"  {root / rel}   (from {home(rel)}; {type(e).__name__}: {str(e)[:80]})")
    if failed:
        raise DataError(
            "missing data files, and fetching them failed (offline?):\n"
            + "\n".join(failed)
            + "\nPut the files there, or point --data-dir / $REARANK_DATA at a directory laid out like this one."
        )
    return [root / r for r in rels]

