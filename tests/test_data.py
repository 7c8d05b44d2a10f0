"""Loaders, the dataset registry, BM25, and the errors users see on bad input."""

import gzip
import json

import pytest

from support import bm25
import data
from support import download
from support import formats
from data import Candidate, DataError, Query, Ranking


def test_registry_loads_real_sets(data_root):
    dl19 = data.load_dataset("dl19", data_root)
    assert len(dl19.rankings) == 43 and all(len(r.candidates) == 100 for r in dl19.rankings)
    assert isinstance(dl19.rankings[0].query.qid, str) and dl19.rankings[0].query.qid in dl19.qrels
    assert sum(len(j) for j in dl19.qrels.values()) == 9260
    dl21 = data.load_dataset("dl21", data_root)
    assert len(dl21.qrels) == 53 and "never a test set" in dl21.note


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_dataset("msmarco", tmp_path)
    for name in data.DATASETS:
        assert name in str(e.value)


def test_missing_files_offline_say_what_and_where(tmp_path, monkeypatch):
    def offline(root, rel):
        raise OSError("no network")

    monkeypatch.setattr(download, "_fetch", offline)
    monkeypatch.delenv("REARANK_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # the default ./data: the one directory files are fetched into
    with pytest.raises(DataError) as e:
        data.load_dataset("dl19")
    msg = str(e.value)
    assert "fetching them failed" in msg
    assert "data/trec_dl/bm25_top100_dl19.rankgpt.json" in msg and "data/trec_dl/qrels.dl19-passage.txt" in msg
    assert "--data-dir" in msg


@pytest.mark.parametrize("named_by", ["--data-dir", "$REARANK_DATA"])
def test_a_named_data_dir_is_never_fetched_into(named_by, tmp_path, monkeypatch):
    def network(root, rel):
        raise AssertionError(f"fetched {rel} into a data directory the user named")

    monkeypatch.setattr(download, "_fetch", network)
    monkeypatch.setenv("REARANK_DATA", str(tmp_path))
    with pytest.raises(DataError) as e:
        data.load_dataset("dl21", tmp_path if named_by == "--data-dir" else None)
    msg = str(e.value)
    assert f"missing data files in {tmp_path}" in msg and "never fetched into" in msg
    assert f"{tmp_path / 'trec_dl21_msmarco_v2/bm25_top100_dl21.rankgpt.json'}   (from https://huggingface.co/" \
           "datasets/castorini/rank_llm_data: retrieve_results/BM25/retrieve_results_dl21_top100.json)" in msg
    assert "qrels.dl21-passage.txt   (from https://raw.githubusercontent.com/castorini/anserini-tools/" in msg


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("REARANK_DATA", str(tmp_path))
    assert data.data_dir("explicit") == data.data_dir("explicit") and str(data.data_dir("explicit")) == "explicit"
    assert data.data_dir() == tmp_path
    monkeypatch.delenv("REARANK_DATA")
    assert str(data.data_dir()) == "data"


@pytest.mark.parametrize(
    "loader,text,needle",
    [
        (data.load_qrels, "q1 0 d1 1\nq1 d2\n", ":2: expected"),
        (data.load_qrels, "q1 0 d1 high\n", ":1: grade 'high'"),
        (formats.load_run, "q1 Q0 d1 1 1.0 t\nq1 Q0 d2 2 x t\n", ":2: score 'x'"),
        (formats.load_run, "q1 Q0 d1 1 1.0\n", ":1: expected"),
        (formats.load_run, "q1 Q0 d1 1 1.0 t\n\nq1 Q0 d1 2 0.5 t\n", ":3: docid d1 appears twice"),
        (data.load_topics, "1\tok\n2 no tab\n", ":2: expected"),
        (data.load_beir_queries, '{"_id": "1", "text": "a"}\n{"_id": "2", "text": \n', ":2: invalid JSON"),
        (data.load_beir_corpus, '{"_id": "1", "title": "t"}\n', ":1: a corpus line"),
        (data.load_rankgpt, '[\n{"query": "q",\n "hits": [}\n]', ":3: invalid JSON"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, loader, text, needle):
    path = tmp_path / "input.txt"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        loader(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_rankgpt_round_trip_gzip_and_bad_entries(tmp_path):
    rankings = [Ranking(Query("7", "q"), [Candidate("a", "A", 2.0), Candidate("b", "B", 1.0)])]
    plain = tmp_path / "c.json"
    formats.write_rankgpt(plain, rankings)
    gz = tmp_path / "c.json.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert data.load_rankgpt(gz) == rankings == data.load_rankgpt(plain)

    plain.write_text(json.dumps([{"query": "q", "hits": []}]))
    with pytest.raises(DataError, match="entry 0.*empty candidate list"):
        data.load_rankgpt(plain)
    plain.write_text(json.dumps([{"query": "q", "hits": [{"qid": 1, "docid": "a", "content": "x"}] * 2}]))
    with pytest.raises(DataError, match="docid a appears twice"):
        data.load_rankgpt(plain)
    plain.write_text(json.dumps([{"query": "q", "hits": [{"qid": 1, "content": "x"}]}]))
    with pytest.raises(DataError, match="entry 0"):
        data.load_rankgpt(plain)


def test_beir_qrels_header_and_corpus_title(tmp_path):
    (tmp_path / "q.tsv").write_text("query-id\tcorpus-id\tscore\n1\t10\t1\n")
    assert data.load_qrels(tmp_path / "q.tsv") == {"1": {"10": 1}}
    (tmp_path / "c.jsonl").write_text('{"_id": "10", "title": "T", "text": "body"}\n{"_id": "11", "title": "", "text": "x"}\n')
    assert data.load_beir_corpus(tmp_path / "c.jsonl") == {"10": "Title: T Content: body", "11": "x"}


def test_write_run_scores_fall_with_rank_and_refuses_duplicates(tmp_path):
    r = Ranking(Query("q", "t"), [Candidate("b", "", 0.0), Candidate("a", "", 0.0)])  # tied first-stage scores
    formats.write_run(tmp_path / "r.trec", [r])
    assert formats.load_run(tmp_path / "r.trec") == {"q": {"b": 2.0, "a": 1.0}}
    with pytest.raises(DataError, match="twice"):
        formats.write_run(tmp_path / "d.trec", [Ranking(Query("q", "t"), [Candidate("a", ""), Candidate("a", "")])])


def test_analyzer_is_lucene_like():
    assert bm25.analyze("The Cats' owner's dogs are running") == ["cat", "owner", "dog", "run"]
    assert bm25.analyze("to be or not to be") == []


def test_bm25_ranks_and_caches(tmp_path):
    corpus = {"d1": "cats chase mice", "d2": "dogs chase cats and cats", "d3": "the weather today"}
    logs = []
    first = bm25.bm25_retrieve(corpus, {"q": "cat"}, "toy", tmp_path, k=3, log=logs.append)
    assert [d for d, _ in first["q"]][:2] == ["d2", "d1"]  # tf 2 beats tf 1
    assert first["q"][2][1] == 0.0
    assert any("indexed 3 docs" in m for m in logs)
    logs.clear()
    again = bm25.bm25_retrieve(corpus, {"q": "cat"}, "toy", tmp_path, k=3, log=logs.append)
    assert again == first and any("loaded cached index" in m for m in logs)
