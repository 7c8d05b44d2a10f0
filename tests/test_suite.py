"""The paper's datasets by name and `eval.py --suite`: each loader on small files written in exactly its public home's
format (fetched over file:// URLs, so the fetch code runs too), BM25 on a BRIGHT-shaped corpus, the suite's table."""

import gzip
import json
import random
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from support import backend
from support import bm25
import data
from support import download
import eval as ev
from support import suite
from data import DataError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REARANK_CACHE", str(tmp_path / "cache"))  # BM25 indexes of the toy corpora stay here


def offline(monkeypatch):
    """No network: every URL and hub download fails, as on a machine without one."""
    def fail(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(download.urllib.request, "urlretrieve", fail)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)


def default_data(tmp_path, monkeypatch):
    """The default ./data under tmp_path: the one data directory files are fetched into (a named one never is)."""
    monkeypatch.delenv("REARANK_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    return Path("data")


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


CORPUS = [  # BEIR corpus.jsonl lines: _id, title, text
    {"_id": "MED-1", "title": "Vitamin D and bone health", "text": "Vitamin D supplements improve bone density."},
    {"_id": "MED-2", "title": "Statins", "text": "Statins lower cholesterol and heart disease risk."},
    {"_id": "MED-3", "title": "Diet", "text": "A plant based diet lowers cholesterol."},
    {"_id": "MED-4", "title": "", "text": "Exercise and sleep."},
]


def beir_zip(remote, name):
    """<remote>/<name>.zip laid out as BEIR's zips are: <name>/corpus.jsonl, queries.jsonl, qrels/test.tsv (graded)."""
    remote.mkdir(parents=True, exist_ok=True)
    queries = [{"_id": "PLAIN-1", "text": "does vitamin d help bones"}, {"_id": "PLAIN-2", "text": "cholesterol"},
               {"_id": "PLAIN-3", "text": "an unjudged query"}]
    qrels = "query-id\tcorpus-id\tscore\nPLAIN-1\tMED-1\t2\nPLAIN-1\tMED-4\t0\nPLAIN-2\tMED-2\t1\nPLAIN-2\tMED-3\t2\n"
    with zipfile.ZipFile(remote / f"{name}.zip", "w") as z:
        z.writestr(f"{name}/corpus.jsonl", "".join(json.dumps(r) + "\n" for r in CORPUS))
        z.writestr(f"{name}/queries.jsonl", "".join(json.dumps(r) + "\n" for r in queries))
        z.writestr(f"{name}/qrels/test.tsv", qrels)


# ----------------------------------------------------------------------------------------------------------------------
# loaders, each on its home's format


@pytest.mark.parametrize("name", ["trec-covid", "nfcorpus", "dbpedia-entity"])
def test_beir_set_fetched_from_its_zip_and_ranked_by_our_bm25(tmp_path, monkeypatch, name):
    beir_zip(tmp_path / "remote", name)
    monkeypatch.setattr(download, "BEIR_URL", (tmp_path / "remote").as_uri() + "/")
    root = default_data(tmp_path, monkeypatch)
    ds = data.load_dataset(name)
    assert (root / f"beir_{name}" / f"{name}.zip").exists() and (root / f"beir_{name}/qrels/test.tsv").exists()
    assert ds.name == name and ds.qrels == {"PLAIN-1": {"MED-1": 2, "MED-4": 0}, "PLAIN-2": {"MED-2": 1, "MED-3": 2}}
    by_qid = {r.query.qid: r for r in ds.rankings}
    assert sorted(by_qid) == ["PLAIN-1", "PLAIN-2"]  # judged queries only
    assert by_qid["PLAIN-1"].candidates[0].docid == "MED-1"
    assert by_qid["PLAIN-1"].candidates[0].text == "Title: Vitamin D and bone health Content: Vitamin D supplements " \
                                                   "improve bone density."
    assert {c.docid for c in by_qid["PLAIN-2"].candidates[:2]} == {"MED-2", "MED-3"}


def test_licensed_sets_say_what_to_obtain_and_where_and_leave_nothing_behind(tmp_path, monkeypatch):
    offline(monkeypatch)
    root = default_data(tmp_path, monkeypatch)
    root.mkdir()
    for name, licence in [("robust04", "trec.nist.gov/data/cd45"), ("trec-news", "trec.nist.gov/data/wapost"),
                          ("signal1m", "Signal-1M")]:
        with pytest.raises(DataError) as e:
            data.load_dataset(name)
        msg = str(e.value)
        assert f"{root / f'beir_{name}/corpus.jsonl'}   (not public: obtain" in msg and licence in msg
        assert str(root / f"beir_{name}/qrels.test.txt") in msg and f"qrels.beir-v1.0.0-{name}.test.txt" in msg
        assert str(root / f"beir_{name}/topics.test.tsv.gz") in msg
    assert list(root.iterdir()) == []  # a failed fetch makes no folders in the data directory


def test_licensed_set_with_anserini_topics_and_qrels_and_the_users_corpus(tmp_path, monkeypatch):
    remote = tmp_path / "anserini"
    (remote / "topics").mkdir(parents=True)
    (remote / "qrels").mkdir()
    with gzip.open(remote / "topics/topics.beir-v1.0.0-trec-news.test.tsv.gz", "wt") as f:  # qid<TAB>title
        f.write("826\tBaseball minor leaguers below the poverty line\n827\tOpioid crisis distributors\n")
    (remote / "qrels/qrels.beir-v1.0.0-trec-news.test.txt").write_text(  # TREC qrels, grades 0-4
        "826 0 wp-1 4\n826 0 wp-2 0\n827 0 wp-3 2\n")
    for rel in ("beir_trec-news/topics.test.tsv.gz", "beir_trec-news/qrels.test.txt"):
        kind, url = download.REMOTE[rel]
        monkeypatch.setitem(download.REMOTE, rel, (kind, url.replace(download.ANSERINI_URL, remote.as_uri() + "/")))
    root = default_data(tmp_path, monkeypatch)
    write_jsonl(root / "beir_trec-news/corpus.jsonl", [
        {"_id": "wp-1", "title": "Minor league pay", "text": "Baseball minor leaguers earn below the poverty line."},
        {"_id": "wp-2", "title": "Weather", "text": "Rain today."},
        {"_id": "wp-3", "title": "Opioids", "text": "Congress probes opioid distributors."}])
    ds = data.load_dataset("trec-news")
    assert ds.qrels == {"826": {"wp-1": 4, "wp-2": 0}, "827": {"wp-3": 2}}
    assert [r.candidates[0].docid for r in ds.rankings] == ["wp-1", "wp-3"]
    assert ds.rankings[0].query.text == "Baseball minor leaguers below the poverty line"


def bright_files(root, domain="biology"):
    """bright/<domain>/documents.jsonl and examples.jsonl with the columns of xlangai/BRIGHT's parquet files."""
    write_jsonl(root / f"bright/{domain}/documents.jsonl", [
        {"id": "insects_light/Phototaxis_0.txt", "content": "Phototaxis: insects fly toward light sources."},
        {"id": "insects_light/Phototaxis_1.txt", "content": "Moths and light: a navigation error."},
        {"id": "insects_light/post.txt", "content": "Why are insects attracted to light? insects light LED heat"},
        {"id": "nose/Nasal_cycle_0.txt", "content": "The nasal cycle alternates airflow between nostrils."}])
    write_jsonl(root / f"bright/{domain}/examples.jsonl", [
        {"query": "Why are insects attracted to light, even LED light without heat?", "reasoning": "phototaxis",
         "id": "0", "excluded_ids": ["insects_light/post.txt"], "gold_ids_long": ["insects_light/Phototaxis.txt"],
         "gold_ids": ["insects_light/Phototaxis_0.txt", "insects_light/Phototaxis_1.txt"]},
        {"query": "Why do I only breathe out of one nostril?", "reasoning": "nasal cycle", "id": "1",
         "excluded_ids": ["N/A"], "gold_ids_long": ["nose/Nasal_cycle.txt"], "gold_ids": ["nose/Nasal_cycle_0.txt"]}])


def test_bright_domain_uses_gold_ids_and_leaves_out_excluded_ids(tmp_path):
    root = tmp_path / "data"
    bright_files(root)
    ds = data.load_dataset("biology", root)
    assert ds.qrels == {"0": {"insects_light/Phototaxis_0.txt": 1, "insects_light/Phototaxis_1.txt": 1},
                        "1": {"nose/Nasal_cycle_0.txt": 1}}
    first = ds.rankings[0].docids()
    assert "insects_light/post.txt" not in first  # BM25's best match, but the query was written from it
    assert len(first) == 3 and first[0] == "insects_light/Phototaxis_0.txt"
    assert "insects_light/post.txt" in ds.rankings[1].docids()  # "N/A" excludes nothing


def test_bright_examples_that_exclude_a_gold_id_or_lack_fields_are_errors(tmp_path):
    path = tmp_path / "examples.jsonl"
    write_jsonl(path, [{"query": "q", "id": "0", "excluded_ids": ["a"], "gold_ids": ["a", "b"]}])
    with pytest.raises(DataError, match=r"examples.jsonl:1: query 0 both excludes and judges relevant \['a'\]"):
        data.load_bright_examples(path)
    write_jsonl(path, [{"query": "q", "id": "0", "gold_ids": "a"}])
    with pytest.raises(DataError, match="examples.jsonl:1: 'gold_ids' must be a list"):
        data.load_bright_examples(path)


def test_bright_fetch_converts_the_hubs_parquet_to_json_lines(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    import huggingface_hub

    rows = {"documents": [{"id": "d/a.txt", "content": "alpha"}, {"id": "d/b.txt", "content": "beta"}],
            "examples": [{"query": "alpha?", "reasoning": "r", "id": "0", "excluded_ids": ["N/A"],
                          "gold_ids_long": ["d/a.txt"], "gold_ids": ["d/a.txt"]}]}

    def hub(repo, filename, repo_type):
        assert (repo, repo_type) == ("xlangai/BRIGHT", "dataset") and filename.endswith("pony-00000-of-00001.parquet")
        path = tmp_path / filename.replace("/", "_")
        pq.write_table(pa.Table.from_pylist(rows[filename.split("/")[0]]), path)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    default_data(tmp_path, monkeypatch)
    ds = data.load_dataset("pony")
    assert ds.qrels == {"0": {"d/a.txt": 1}} and ds.rankings[0].docids()[0] == "d/a.txt"


# ----------------------------------------------------------------------------------------------------------------------
# BM25 at BRIGHT's scale: the inverted index gives rank_bm25's scores, bit for bit


def test_inverted_bm25_scores_equal_rank_bm25_on_a_bright_shaped_corpus():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    corpus = [[rng.choice(words[: rng.randint(5, 300)]) for _ in range(rng.randint(1, 400))] for _ in range(400)]
    ref, inv = bm25.LuceneBM25(corpus), bm25.InvertedBM25(corpus)
    for _ in range(20):  # long queries with repeated words, as BRIGHT's posts are
        query = [rng.choice(words) for _ in range(rng.randint(50, 500))] + ["unseen"]
        assert np.array_equal(inv.get_scores(query), ref.get_scores(query))
        assert inv.top_k(query, 50) == ref.top_k(query, 50)
        best = inv.top_k(query, 3)
        excluded = inv.top_k(query, 50, exclude={best[0][0], best[2][0]})
        assert [i for i, _ in excluded] == [i for i, _ in ref.top_k(query, 52) if i not in (best[0][0], best[2][0])]


# ----------------------------------------------------------------------------------------------------------------------
# the suite


def test_suite_table_averages_over_the_datasets_that_ran_and_lists_the_missing():
    rows = [suite.Row("dl19", "ok", 43, 0.5, 0.7), suite.Row("dl20", "ok", 54, 0.4, 0.6),
            suite.Row("nfcorpus", "ok", 323, 0.3, 0.35), suite.Row("scifact", "ok", 300, 0.6, 0.75),
            suite.failed("trec-covid", "error: missing data files, and fetching them failed (offline?):\n  x"),
            suite.failed("robust04", "error: something else broke")]
    text = suite.table("standard", rows, "m")
    assert "| **BEIR-7 average** (2 of 7: nfcorpus, scifact) | | 0.4500 | 0.5500 | 0.4331 | 0.5459 |" in text
    assert "| dl19 | 43 | 0.5000 | 0.7000 | 0.5058 | 0.7416 |" in text  # DL19 is not in the BEIR average
    assert "| trec-covid | missing | - | - | - | - |" in text and "| robust04 | failed |" in text
    assert "- trec-covid (missing): missing data files" in text and "- robust04 (failed): something else broke" in text
    a = suite.average(rows, suite.BEIR7)
    assert a["over"] == ["nfcorpus", "scifact"] and a["of"] == 7
    bm25_only = suite.average([suite.Row("x", "ok", 1, 0.2)], ("x",))
    assert bm25_only["first_stage"] == 0.2 and bm25_only["reranked"] is None


def test_suite_standard_bm25_equals_the_single_runs_and_marks_the_rest_missing(data_root, tmp_path, monkeypatch,
                                                                               capsys):
    offline(monkeypatch)
    root = tmp_path / "data"  # the shipped sets, by link: nothing the suite tries to fetch lands in the shared folder
    root.mkdir()
    for folder in ("trec_dl", "beir_scifact"):
        (root / folder).symlink_to(data_root / folder)
    out = tmp_path / "suite"
    ev.main(["--suite", "standard", "--model", "bm25", "--data-dir", str(root), "--out", str(out)])
    printed = capsys.readouterr().out
    table = (out / "suite.md").read_text()
    assert table in printed
    record = json.loads((out / "suite.json").read_text())
    got = {r["dataset"]: r for r in record["rows"]}
    assert [r["dataset"] for r in record["rows"]] == list(suite.SUITES["standard"])
    for name, figure in [("dl19", "0.5058"), ("dl20", "0.4796"), ("scifact", "0.6768")]:
        ev.main(["--dataset", name, "--model", "bm25", "--data-dir", str(root), "--out", str(tmp_path / name)])
        single = json.loads((tmp_path / name / "metrics.json").read_text())["mean"]["nDCG@10"]
        assert got[name]["first_stage"] == single and f"{single:.4f}" == figure
        assert f"| {name} | {got[name]['queries']} | {figure} | - |" in table
    for name in ("trec-covid", "nfcorpus", "dbpedia-entity", "signal1m", "trec-news", "robust04"):
        assert got[name]["status"] == "missing" and f"| {name} | missing |" in table
        assert str(root / f"beir_{name}" / "corpus.jsonl") in got[name]["note"]
    assert "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/nfcorpus.zip" in table
    assert "| **BEIR-7 average** (1 of 7: scifact) | | 0.6768 | - | 0.4331 | 0.5459 |" in table
    assert sorted(p.name for p in root.iterdir()) == ["beir_scifact", "trec_dl"]


def test_suite_runs_each_dataset_with_the_suites_settings_and_resumes(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    for domain in suite.SUITES["bright"][:2]:
        bright_files(root, domain)
    offline(monkeypatch)
    argv = ["--suite", "bright", "--model", "bm25", "--top-k", "2", "--data-dir", str(root),
            "--out", str(tmp_path / "o")]
    ev.main(argv)
    first = json.loads((tmp_path / "o/suite.json").read_text())
    assert [r["status"] for r in first["rows"]][:3] == ["ok", "ok", "missing"]
    assert json.loads((tmp_path / "o/biology/metrics.json").read_text())["config"]["top_k"] == 2
    assert "| **BRIGHT average** (2 of 12: biology, earth_science) |" in (tmp_path / "o/suite.md").read_text()
    ev.main(argv)  # again: the same settings continue in the same folders
    assert json.loads((tmp_path / "o/suite.json").read_text())["rows"] == first["rows"]
    with pytest.raises(SystemExit):
        ev.parse_args(["--suite", "standard", "--dataset", "dl19"])  # one source at a time
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.parse_args(["--suite", "bright", "--qrels", "q.txt"])
    assert "--qrels would replace them all" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"error: --out .*file: is a file, not a directory"):
        ev.main([*argv[:-1], str(tmp_path / "file")])


def test_suite_with_a_model_reports_first_stage_and_reranked_and_replays_on_rerun(tmp_path, monkeypatch):
    import dist_worker

    models = []
    monkeypatch.setattr(ev, "load_generator", lambda cfg: models.append(dist_worker.HashModel()) or models[-1])
    monkeypatch.setattr(backend, "check_loadable", lambda name: None)  # "fake" loads: it is the hash model above
    root = tmp_path / "data"
    bright_files(root, "pony")
    offline(monkeypatch)
    argv = ["--suite", "bright", "--model", "fake", "--window", "2", "--step", "1", "--data-dir", str(root),
            "--out", str(tmp_path / "o")]
    ev.main(argv)
    rows = {r["dataset"]: r for r in json.loads((tmp_path / "o/suite.json").read_text())["rows"]}
    metrics = json.loads((tmp_path / "o/pony/metrics.json").read_text())
    assert metrics["windows"] == 2 + 3 and metrics["config"]["window"] == 2
    assert rows["pony"]["first_stage"] == metrics["first_stage"]["nDCG@10"]
    assert rows["pony"]["reranked"] == metrics["mean"]["nDCG@10"]
    assert rows["pony"]["first_stage"] != rows["pony"]["reranked"]  # the hash model reorders
    avg = json.loads((tmp_path / "o/suite.json").read_text())["averages"]["BRIGHT"]
    assert avg["over"] == ["pony"] and avg["reranked"] == rows["pony"]["reranked"]
    ev.main(argv)
    assert models[-1].asked == 0  # the rerun replayed every window from traces.jsonl


def test_a_model_that_cannot_load_ends_the_suite_before_its_first_dataset(tmp_path, monkeypatch, capsys):
    offline(monkeypatch)
    monkeypatch.setattr(ev, "load_generator", lambda cfg: pytest.fail("a dataset ran with a model that cannot load"))
    with pytest.raises(SystemExit, match="error: cannot load model 'no-such-org/no-such-model'.*--model smollm2"):
        ev.main(["--suite", "standard", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o")])
    assert "== standard" not in capsys.readouterr().out and not (tmp_path / "o").exists()
