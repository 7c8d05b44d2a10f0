"""Bad input, tried as a user would: every case ends in a one-line error naming the file (and line), or the flag, with
the right exit code and no traceback; finished work is never replaced. No model loads here: each command fails first.

The CLIs' main() runs in-process (sys.exit's message is the error line; argparse's usage error exits 2); a few cases
run as real processes, to see what a user's terminal shows.
"""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import augment as augment_cli
from support import checkpoint
import data
from support import download
import eval as ev
import grpo
from support import memory
from support import runlog
from data import Candidate, DataError
from support.evalconfig import default_out
from support.files import atomic_write
from support.traces import RESUME_KEYS

ROOT = Path(__file__).resolve().parent.parent
QRELS = "q1 0 a 2\nq1 0 b 0\nq2 0 c 1\n"
RUN = "q1 Q0 a 1 2.0 t\nq1 Q0 b 2 1.0 t\nq2 Q0 c 1 1.0 t\n"


def cli(main, argv, capsys) -> tuple[int, str]:
    """(exit status, what the user reads) of main(argv), which must exit; a traceback fails the test."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    printed = capsys.readouterr()
    code = e.value.code
    text = printed.out + printed.err + (code if isinstance(code, str) else "")
    assert "Traceback" not in text
    return (1 if isinstance(code, str) else code), text


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def hit(qid="q1", docid="a", content="text", **kw) -> dict:
    return {"qid": qid, "docid": docid, "content": content, **kw}


# ----------------------------------------------------------------------------------------------------------------------
# files: eval.py --run / --candidates with a broken qrels, run or candidates file -> exit 1, FILE[:LINE] in the message


BROKEN_FILES = {
    # name: (which file is broken, its bytes (None: a directory; "missing": absent), what the message must say)
    "qrels missing": ("qrels", "missing", "qrels.txt: file not found"),
    "qrels is a directory": ("qrels", None, "qrels.txt: is a directory"),
    "qrels not UTF-8": ("qrels", b"q1 0 a 2\nq1 0 \xff\xfe 1\n", "qrels.txt:2: not UTF-8"),
    "qrels malformed line": ("qrels", "q1 0 a 2\nq1 a\n", "qrels.txt:2: expected 'qid 0 docid grade'"),
    "qrels grade not an integer": ("qrels", "q1 0 a 2\nq1 0 b high\n", "qrels.txt:2: grade 'high' is not an integer"),
    "qrels conflicting grades": ("qrels", "q1 0 a 2\nq2 0 c 1\nq1 0 a 0\n", "qrels.txt:3: query q1 judges a 0, but line 1"),
    "qrels empty": ("qrels", "\n\n", "qrels.txt: no judgments"),
    "run NaN score": ("run", "q1 Q0 a 1 2.0 t\nq1 Q0 b 2 nan t\n", "run.trec:2: score 'nan' is not a finite number"),
    "run inf score": ("run", "q1 Q0 a 1 inf t\n", "run.trec:1: score 'inf' is not a finite number"),
    "run malformed": ("run", "q1 Q0 a 1 2.0 t\nq1 a 1\n", "run.trec:2: expected 'qid Q0 docid rank score tag'"),
    "run score not a number": ("run", "q1 Q0 a 1 two t\n", "run.trec:1: score 'two' is not a number"),
    "run docid twice": ("run", "q1 Q0 a 1 2.0 t\nq1 Q0 a 2 1.0 t\n", "run.trec:2: docid a appears twice"),
    "run empty": ("run", "", "run.trec: no run lines"),
    "run and qrels share no query": ("run", "x9 Q0 a 1 2.0 t\n", "no query of the run is judged"),
    "run .gz that is not gzip": ("run.gz", "q1 Q0 a 1 2.0 t\n", "run.trec.gz: not a valid gzip file"),
}


@pytest.mark.parametrize("case", BROKEN_FILES)
def test_broken_run_or_qrels_file(case, tmp_path, capsys):
    which, content, needle = BROKEN_FILES[case]
    paths = {"qrels": tmp_path / "qrels.txt", "run": tmp_path / "run.trec", "run.gz": tmp_path / "run.trec.gz"}
    write(paths["qrels"], QRELS)
    run = paths["run.gz"] if which == "run.gz" else paths["run"]
    write(run, RUN)
    target = paths[which]
    if content == "missing":
        target.unlink()
    elif content is None:
        target.unlink()
        target.mkdir()
    else:
        write(target, content)
    code, text = cli(ev.main, ["--run", run, "--qrels", paths["qrels"], "--out", tmp_path / "o"], capsys)
    assert code == 1 and needle in text and text.startswith("error: "), text
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_qrels_judgment_listed_twice_with_one_grade_is_fine(tmp_path, capsys):
    write(tmp_path / "q.txt", QRELS + "q1 0 a 2\n")
    write(tmp_path / "r.trec", RUN)
    ev.main(["--run", str(tmp_path / "r.trec"), "--qrels", str(tmp_path / "q.txt"), "--out", str(tmp_path / "o")])
    assert "queries 2 judged" in capsys.readouterr().out


BROKEN_CANDIDATES = {
    "invalid JSON": ('[{"query": "q",\n "hits": [}]', "cands.json:2: invalid JSON"),
    "not a list": ('{"query": "q"}', "expected a non-empty JSON list"),
    "empty list": ("[]", "expected a non-empty JSON list"),
    "query null": ([{"query": None, "hits": [hit()]}], "entry 0: 'query' must be a non-empty string"),
    "hits not a list": ([{"query": "q", "hits": {"a": 1}}], "entry 0 (query 'q'): 'hits' must be a list"),
    "content null": ([{"query": "q", "hits": [hit(), hit(docid="b", content=None)]}],
                     "entry 0, hit 1: 'content' must be str, got None"),
    "docid a list": ([{"query": "q", "hits": [hit(docid=["a"])]}], "entry 0, hit 0: 'docid' must be str or int"),
    "qid missing": ([{"query": "q", "hits": [{"docid": "a", "content": "x"}]}], "entry 0, hit 0: missing 'qid'"),
    "hit not an object": ([{"query": "q", "hits": ["a"]}], "entry 0, hit 0: expected an object"),
    "score NaN": ([{"query": "q", "hits": [hit(score=float("nan"))]}], "entry 0, hit 0: 'score' must be a finite"),
    "score a string": ([{"query": "q", "hits": [hit(score="1.0")]}], "entry 0, hit 0: 'score' must be a finite"),
    "one query listed twice": ([{"query": "q", "hits": [hit()]}, {"query": "q", "hits": [hit(docid="b")]}],
                               "entry 1: query q1 is listed twice (first in entry 0)"),
    "hits of two queries": ([{"query": "q", "hits": [hit(), hit(qid="q2", docid="b")]}],
                            "entry 0: the hits name several query ids"),
    "docid twice": ([{"query": "q", "hits": [hit(), hit()]}], "entry 0: docid a appears twice"),
}


@pytest.mark.parametrize("case", BROKEN_CANDIDATES)
def test_broken_candidates_file(case, tmp_path, capsys):
    content, needle = BROKEN_CANDIDATES[case]
    cands = write(tmp_path / "cands.json", content if isinstance(content, str) else json.dumps(content))
    write(tmp_path / "qrels.txt", QRELS)
    code, text = cli(ev.main, ["--candidates", cands, "--qrels", tmp_path / "qrels.txt", "--model", "bm25",
                               "--out", tmp_path / "o"], capsys)  # fmt: skip
    assert code == 1 and needle in text and str(cands) in text, text


def test_candidates_gz_that_is_not_gzip(tmp_path, capsys):
    cands = write(tmp_path / "cands.json.gz", json.dumps([{"query": "q", "hits": [hit()]}]))
    write(tmp_path / "qrels.txt", QRELS)
    code, text = cli(ev.main, ["--candidates", cands, "--qrels", tmp_path / "qrels.txt", "--model", "bm25",
                               "--out", tmp_path / "o"], capsys)  # fmt: skip
    assert code == 1 and f"{cands}: not a valid gzip file" in text
    cands.write_bytes(gzip.compress(json.dumps([{"query": "q", "hits": [hit()]}]).encode())[:-9])  # cut short
    code, text = cli(ev.main, ["--candidates", cands, "--qrels", tmp_path / "qrels.txt", "--model", "bm25",
                               "--out", tmp_path / "o"], capsys)  # fmt: skip
    assert code == 1 and f"{cands}: not a valid gzip file" in text


BROKEN_BEIR = {
    "corpus line without text": ("corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": "d2"}\n', "corpus.jsonl:2:"),
    "corpus text null": ("corpus.jsonl", '{"_id": "d1", "text": null}\n', "corpus.jsonl:1:"),
    "corpus title a number": ("corpus.jsonl", '{"_id": "d1", "text": "x", "title": 3}\n', "corpus.jsonl:1: 'title'"),
    "corpus invalid JSON": ("corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": \n', "corpus.jsonl:2: invalid JSON"),
    "corpus document twice": ("corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": "d1", "text": "y"}\n',
                              "corpus.jsonl:2: document d1 is listed twice"),
    "queries line a list": ("queries.jsonl", '{"_id": "1", "text": "q"}\n[1]\n', "queries.jsonl:2: expected a JSON object"),
    "query twice": ("queries.jsonl", '{"_id": "1", "text": "q"}\n{"_id": "1", "text": "r"}\n',
                    "queries.jsonl:2: query 1 is listed twice"),
    "qrels grade not an integer": ("qrels/test.tsv", "query-id\tcorpus-id\tscore\n1\td1\t0.5\n", "test.tsv:2: grade"),
}


@pytest.mark.parametrize("case", BROKEN_BEIR)
def test_broken_beir_files(case, tmp_path, capsys):
    name, content, needle = BROKEN_BEIR[case]
    root = tmp_path / "data"
    write(root / "beir_scifact/corpus.jsonl", '{"_id": "d1", "title": "T", "text": "x"}\n')
    write(root / "beir_scifact/queries.jsonl", '{"_id": "1", "text": "q"}\n')
    write(root / "beir_scifact/qrels/test.tsv", "query-id\tcorpus-id\tscore\n1\td1\t1\n")
    write(root / "beir_scifact" / name, content)
    code, text = cli(ev.main, ["--dataset", "scifact", "--data-dir", root, "--model", "bm25", "--out", tmp_path / "o"],
                     capsys)
    assert code == 1 and needle in text, text


def test_topics_listed_twice(tmp_path):
    with pytest.raises(DataError, match=r"t.tsv:2: query 1 is listed twice"):
        data.load_topics(write(tmp_path / "t.tsv", "1\tcats\n1\tdogs\n"))


# ----------------------------------------------------------------------------------------------------------------------
# training instances (grpo.py --train-file): the error comes before any model loads


def good_instance() -> dict:
    inst = data.make_instance(data.Query("q1", "cats"), [Candidate("a", "x"), Candidate("b", "y")], {"a": 1})
    return {**inst.__dict__, "candidates": [c.__dict__ for c in inst.candidates]}


BROKEN_INSTANCES = {
    "invalid JSON": (lambda r: json.dumps(r)[:-3], ":2: invalid JSON line"),
    "a field missing": (lambda r: json.dumps({k: v for k, v in r.items() if k != "grades"}), ":2: not a training "
                        "instance (missing grades)"),
    "text null": (lambda r: json.dumps({**r, "candidates": [{"docid": "a", "text": None}, r["candidates"][1]]}),
                  ":2: not a training instance (candidate 0: 'text' must be a string)"),
    "grades of another length": (lambda r: json.dumps({**r, "grades": [1]}), ":2: not a training instance (1 grades"),
    "r_star NaN": (lambda r: json.dumps({**r, "r_star": float("nan")}), ":2: not a training instance ('r_init'"),
    "candidate score NaN": (lambda r: json.dumps({**r, "candidates": [{**r["candidates"][0], "score": float("nan")},
                                                                    r["candidates"][1]]}),
                            ":2: not a training instance (candidate 0: 'score' must be a finite number)"),
    "candidate score Infinity": (lambda r: json.dumps({**r, "candidates": [r["candidates"][0], {
        **r["candidates"][1], "score": float("inf")}]}), ":2: not a training instance (candidate 1: 'score' must be"),
    "an unknown field": (lambda r: json.dumps({**r, "label": 1}), ":2: not a training instance (unknown field label"),
}


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the bad input was reported")


@pytest.mark.parametrize("case", BROKEN_INSTANCES)
def test_broken_training_instances(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grpo, "load_model", no_model)
    make, needle = BROKEN_INSTANCES[case]
    good = good_instance()
    path = write(tmp_path / "train.jsonl", json.dumps(good) + "\n" + make(good) + "\n")
    code, text = cli(grpo.main, ["--train-file", path, "--eval-every", "0", "--out", tmp_path / "o"], capsys)
    assert code == 1 and f"{path}{needle}" in text, text


def test_empty_training_file(tmp_path, capsys):
    path = write(tmp_path / "train.jsonl", "\n")
    code, text = cli(grpo.main, ["--train-file", path, "--eval-every", "0", "--out", tmp_path / "o"], capsys)
    assert code == 1 and f"{path}: no training instances" in text


# ----------------------------------------------------------------------------------------------------------------------
# flags: rejected when parsed (exit 2, argparse's usage error naming the flag), in milliseconds


EVAL_FLAGS = {
    "--window 0": "argument --window: '0' is not a positive integer",
    "--step 0": "argument --step: '0' is not a positive integer",
    "--step 30": "--step 30 is larger than --window 20",
    "--top-k -5": "argument --top-k: '-5' is not a positive integer",
    "--top-k abc": "argument --top-k: 'abc' is not an integer",
    "--batch-size 0": "argument --batch-size: '0' is not a positive integer",
    "--batch-size 0 --method setwise": "argument --batch-size: '0'",  # hung forever before
    "--num-child 0 --method setwise": "argument --num-child: '0' is not a positive integer",
    "--k 0 --method setwise": "argument --k: '0' is not a positive integer",
    "--limit 0": "argument --limit: '0' is not a positive integer",
    "--max-new-tokens 0": "argument --max-new-tokens: '0' is not a positive integer",
    "--seed -1": "argument --seed: '-1' is not a non-negative integer",
    "--method pointwise": "argument --method: invalid choice",
    "--first-stage-order sideways": "argument --first-stage-order: invalid choice: 'sideways'",
}


@pytest.mark.parametrize("flags", EVAL_FLAGS)
def test_eval_flags(flags, capsys):
    code, text = cli(ev.main, ["--dataset", "dl19", *flags.split()], capsys)
    assert code == 2 and EVAL_FLAGS[flags] in text, text


def test_eval_candidates_without_qrels(tmp_path, capsys):
    code, text = cli(ev.main, ["--candidates", tmp_path / "c.json"], capsys)
    assert code == 2 and "--candidates and --run need --qrels" in text


GRPO_FLAGS = {
    "--steps 0": "argument --steps: '0' is not a positive integer",
    "--batch-size 0": "argument --batch-size: '0' is not a positive integer",
    "--group-size 1": "--group-size 1: GRPO compares completions within a group",
    "--size 1": "--size 1: a candidate set needs at least 2 passages",
    "--lr 0": "argument --lr: '0' is not a positive number",
    "--lr nan": "argument --lr: 'nan' is not a finite number",
    "--temperature 0": "argument --temperature: '0' is not a positive number",
    "--beta -0.1": "argument --beta: '-0.1' is not a non-negative number",
    "--clip-eps 1.5": "--clip-eps 1.5: the clip range",
    "--min-ndcg 2": "--min-ndcg 2.0: nDCG@10 is at most 1",
    "--max-new-tokens 0": "argument --max-new-tokens: '0' is not a positive integer",
    "--micro-batch -1": "argument --micro-batch: '-1' is not a non-negative integer",
    "--seed -1": "argument --seed: '-1' is not a non-negative integer",
    "--dataset dl19": "--dataset dl19 is a test set",
    "--dataset nope": "--dataset 'nope': choose one of",
    "--eval-dataset dl21": "--eval-dataset dl21 is also the training --dataset",
    "--train-file missing.jsonl": "--train-file missing.jsonl: file not found",
    "--resume --overwrite": "--resume continues the run in --out, --overwrite deletes it",
    "--memory on": "argument --memory: invalid choice: 'on'",  # any value but off once meant auto, silently
    "--reference gpu": "argument --reference: invalid choice: 'gpu'",
    "--eval-qids missing.txt": "--eval-qids missing.txt: file not found",  # once read as the query id 'missing.txt'
    "--eval-qids splits/val": "--eval-qids splits/val: file not found",
    "--eval-qids ,": "--eval-qids ,: no query ids in it",
    "--eval-order sideways": "argument --eval-order: invalid choice: 'sideways'",
}


@pytest.mark.parametrize("flags", GRPO_FLAGS)
def test_grpo_flags(flags, capsys):
    code, text = cli(grpo.main, flags.split(), capsys)
    assert code == 2 and GRPO_FLAGS[flags] in text, text


AUGMENT_FLAGS = {
    "--samples 0": "argument --samples: '0' is not a positive integer",
    "--size 1": "--size 1: a candidate set needs at least 2 passages",
    "--min-ndcg -1": "argument --min-ndcg: '-1' is not a non-negative number",
    "--min-ndcg 1.5": "--min-ndcg 1.5: nDCG@10 is at most 1",
    "--min-grade 0": "argument --min-grade: '0' is not a positive integer",
    "--seed -3": "argument --seed: '-3' is not a non-negative integer",
    "--dataset dl19": "--dataset dl19 is a test set",  # refused: a training set from a test set voids its figures
    "--dataset scifact": "--dataset scifact is a test set",
    "--dataset nope": "--dataset 'nope': choose one of",
}


@pytest.mark.parametrize("flags", AUGMENT_FLAGS)
def test_augment_flags(flags, tmp_path, capsys):
    code, text = cli(augment_cli.main, [*flags.split(), "--out", tmp_path / "t.jsonl"], capsys)
    assert code == 2 and AUGMENT_FLAGS[flags] in text, text
    assert not (tmp_path / "t.jsonl").exists()


def test_grpo_eval_qids_file(tmp_path, capsys):
    empty = write(tmp_path / "val.qids", "\n")
    code, text = cli(grpo.main, ["--eval-qids", empty], capsys)
    assert code == 2 and f"--eval-qids {empty}: no query ids in it" in text
    code, text = cli(grpo.main, ["--eval-qids", tmp_path], capsys)
    assert code == 2 and f"--eval-qids {tmp_path}: is a directory" in text
    assert grpo.read_qids(str(write(tmp_path / "v.txt", "q1\n\nq7\n"))) == {"q1", "q7"} == grpo.read_qids("q1, q7")


def test_grpo_resume_without_a_checkpoint_says_so_before_loading(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grpo, "load_model", no_model)
    monkeypatch.setattr(grpo, "plan_memory", no_model)
    write(tmp_path / "run" / "metrics.jsonl", '{"step": 1}\n')
    for out in (tmp_path / "run", tmp_path / "none"):
        code, text = cli(grpo.main, ["--resume", "--model", "smollm2", "--data-dir", data_root, "--out", out], capsys)
        assert code == 1 and f"--resume: {out / 'checkpoint'} not found; start without --resume" in text


def test_a_missing_file_under_a_named_data_dir_fails_at_once(tmp_path, monkeypatch, capsys):
    def network(root, rel):
        raise AssertionError("tried the network for a data directory the user named")

    monkeypatch.setattr(download, "_fetch", network)
    code, text = cli(ev.main, ["--dataset", "dl19", "--model", "bm25", "--data-dir", tmp_path, "--out",
                               tmp_path / "o"], capsys)  # fmt: skip
    assert code == 1 and f"missing data files in {tmp_path}" in text
    assert str(tmp_path / "trec_dl/qrels.dl19-passage.txt") in text


MEMORY_CLI = {
    "--gpu-gb -5": (2, "argument --gpu-gb: '-5' is not a positive number"),  # once planned "of -5.0 GB free"
    "--gpu-gb 0": (2, "argument --gpu-gb: '0' is not a positive number"),
    "--config nonexistent-model": (1, "error: --config 'nonexistent-model': not a shipped config (qwen2.5-7b, "
                                      "smollm2), not a local directory with a config.json, and not a hub id"),
    "--config {tmp}": (1, "error: --config {tmp}: the directory holds no config.json"),
    "--gpu-gb 1": (1, "error: nothing fits: the leanest settings need"),  # a script must see it failed
}


@pytest.mark.parametrize("flags", MEMORY_CLI)
def test_memory_cli(flags, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):  # the Hub unreachable, as on a machine without network (no retries to wait for)
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    expected_code, needle = MEMORY_CLI[flags]
    code, text = cli(memory.main, flags.replace("{tmp}", str(tmp_path)).split(), capsys)
    assert code == expected_code and needle.replace("{tmp}", str(tmp_path)) in text, text


# ----------------------------------------------------------------------------------------------------------------------
# finished work is never replaced


def test_augment_keeps_an_existing_out_file(tmp_path, capsys):
    out = write(tmp_path / "train.jsonl", "finished work\n")
    code, text = cli(augment_cli.main, ["--samples", "0", "--out", out], capsys)
    assert code == 2 and out.read_text() == "finished work\n"
    code, text = cli(augment_cli.main, ["--out", out], capsys)
    assert code == 2 and f"--out {out} exists; give a new file name, or --overwrite" in text
    assert out.read_text() == "finished work\n"
    code, text = cli(augment_cli.main, ["--out", tmp_path], capsys)
    assert code == 2 and "is a directory" in text


def test_augment_that_keeps_nothing_writes_nothing(data_root, tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    code, text = cli(augment_cli.main, ["--data-dir", data_root, "--samples", "1", "--size", "2",
                                 "--min-ndcg", "1", "--out", out], capsys)  # fmt: skip
    assert code == 1 and "no candidate set survived the filters; nothing written" in text and not out.exists()


def bm25_eval(data_root, out, *flags):
    ev.main(["--dataset", "dl19", "--data-dir", str(data_root), "--model", "bm25", "--limit", "3", "--out", str(out),
             *map(str, flags)])  # fmt: skip


def test_eval_refuses_an_out_with_other_settings_or_another_kind(data_root, tmp_path, capsys):
    out = tmp_path / "o"
    bm25_eval(data_root, out, "--top-k", "20")
    before = (out / "metrics.json").read_text(), (out / "run.trec").read_text()
    attempts = {
        "other --top-k": ["--dataset", "dl19", "--model", "bm25", "--limit", "3", "--top-k", "30"],
        "other --limit": ["--dataset", "dl19", "--model", "bm25", "--limit", "1", "--top-k", "20"],
        "a model run": ["--dataset", "dl19", "--model", "smollm2", "--limit", "3", "--top-k", "20"],  # before loading
        "a --run": ["--run", data_root / "trec_dl/run.bm25.dl19.top100.trec",
                    "--qrels", data_root / "trec_dl/qrels.dl19-passage.txt"],
    }
    for name, argv in attempts.items():
        code, text = cli(ev.main, [*argv, "--data-dir", data_root, "--out", out], capsys)
        assert code == 1 and f"{out} holds a finished evaluation made with other settings" in text, name
        assert "--overwrite" in text and "new --out" in text
        assert ((out / "metrics.json").read_text(), (out / "run.trec").read_text()) == before, name
    bm25_eval(data_root, out, "--top-k", "20")  # the same settings: fine (the same result)
    assert (out / "run.trec").read_text() == before[1]
    bm25_eval(data_root, out, "--top-k", "30", "--overwrite")
    assert json.loads((out / "metrics.json").read_text())["config"]["top_k"] == 30


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_atomic_write_interrupted_keeps_the_old_file(mode, tmp_path):
    path = write(tmp_path / "metrics.json", "finished work")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path, mode) as f:
            f.write(b"half" if "b" in mode else "half")
            f.flush()
            assert path.read_text() == "finished work"  # nothing reaches `path` before the block ends
            raise KeyboardInterrupt
    assert path.read_text() == "finished work" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_eval_refuses_an_out_judged_by_other_qrels(data_root, tmp_path, capsys):
    run, out = write(tmp_path / "r.trec", RUN), tmp_path / "o"
    mine, other = write(tmp_path / "q.txt", QRELS), write(tmp_path / "q2.txt", QRELS.replace("b 0", "b 2"))
    dl19 = data_root / "trec_dl/qrels.dl19-passage.txt"
    copy = write(tmp_path / "dl19-copy.txt", dl19.read_bytes())  # another --qrels, whatever it holds
    for first, second in ((["--run", run, "--qrels", mine], ["--run", run, "--qrels", other]),
                          (["--dataset", "dl19", "--model", "bm25", "--limit", "3", "--qrels", dl19],
                           ["--dataset", "dl19", "--model", "bm25", "--limit", "3", "--qrels", copy])):
        ev.main([*map(str, first), "--data-dir", str(data_root), "--out", str(out), "--overwrite"])
        before = (out / "metrics.json").read_text()
        code, text = cli(ev.main, [*second, "--data-dir", data_root, "--out", out], capsys)
        assert code == 1 and f"{out} holds a finished evaluation made with other settings" in text and "qrels" in text
        assert (out / "metrics.json").read_text() == before


def test_eval_out_that_is_a_file(tmp_path, capsys):
    out = write(tmp_path / "o", "x")
    write(tmp_path / "q.txt", QRELS)
    write(tmp_path / "r.trec", RUN)
    code, text = cli(ev.main, ["--run", tmp_path / "r.trec", "--qrels", tmp_path / "q.txt", "--out", out], capsys)
    assert code == 1 and f"--out {out}: is a file, not a directory" in text


def test_eval_corrupt_files_in_out(data_root, tmp_path, capsys):
    argv = ["--dataset", "dl19", "--data-dir", data_root, "--model", "smollm2", "--limit", "1", "--top-k", "20"]
    out = tmp_path / "o"
    write(out / "metrics.json", "{not json")
    code, text = cli(ev.main, [*argv, "--out", out], capsys)
    assert code == 1 and f"{out / 'metrics.json'}:1: invalid JSON" in text
    out = tmp_path / "o2"
    write(out / "rerank_config.json", '{"model": "smollm2",\n')
    write(out / "traces.jsonl", "")
    code, text = cli(ev.main, [*argv, "--out", out], capsys)
    assert code == 1 and f"{out / 'rerank_config.json'}:2: invalid JSON" in text
    # a damaged line in the middle of traces.jsonl (the last one may be half-written: dropped) -> file:line
    out = tmp_path / "o3"
    cfg = ev.parse_args([*map(str, argv), "--out", str(out)])
    write(out / "rerank_config.json", json.dumps({k: getattr(cfg, k) for k in RESUME_KEYS}))
    good = {"qid": "19335", "start": 0, "end": 3, "completion": "", "order": [0, 1, 2], "docids": []}
    write(out / "traces.jsonl", "\n".join([json.dumps(good), json.dumps({**good, "order": [0, 0, 7]}), "{"]) + "\n")
    code, text = cli(ev.main, [*argv, "--out", out], capsys)
    assert code == 1 and f"{out / 'traces.jsonl'}:2: 'order' is not a permutation" in text


def test_eval_scores_no_judged_query_is_an_error(data_root, tmp_path, capsys):
    qrels = write(tmp_path / "other.txt", "zzz 0 a 1\n")  # judges nothing dl19 retrieves
    code, text = cli(ev.main, ["--dataset", "dl19", "--data-dir", data_root, "--qrels", qrels, "--model", "bm25",
                               "--out", tmp_path / "o"], capsys)  # fmt: skip
    assert code == 1 and "no query of the run is judged" in text and "0.0000" not in text


def test_eval_qrels_with_a_dataset_is_honoured_and_said(data_root, tmp_path, capsys):
    one = write(tmp_path / "one.txt", "".join(line for line in (data_root / "trec_dl/qrels.dl19-passage.txt")
                                              .read_text().splitlines(keepends=True) if line.startswith("19335 ")))
    bm25_eval(data_root, tmp_path / "o", "--qrels", one, "--limit", "50")
    out = capsys.readouterr().out
    assert f"qrels: {one} (given with --qrels) instead of dl19's own judgments" in out
    assert "queries 1 judged, 42 skipped" in out


def test_default_out_names_the_settings_and_the_input_file(tmp_path, monkeypatch, capsys):
    quick = ev.parse_args(["--dataset", "dl19", "--model", "smollm2", "--limit", "2", "--top-k", "20",
                           "--max-new-tokens", "256"])  # fmt: skip  # the README's quick start
    headline = ev.parse_args(["--dataset", "dl19", "--model", "smollm2"])
    assert str(default_out(quick)) == "runs/dl19-smollm2-top20-limit2-tok256"
    assert str(default_out(headline)) == "runs/dl19-smollm2"
    setwise = ev.parse_args(["--dataset", "dl19", "--model", "smollm2", "--method", "setwise", "--num-child", "3"])
    assert str(default_out(setwise)) == "runs/dl19-smollm2-setwise-child3"
    # two run files with one basename: two folders
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "q.txt", QRELS)
    for d in ("a", "b"):
        write(tmp_path / d / "run.trec", RUN)
        ev.main(["--run", f"{d}/run.trec", "--qrels", "q.txt"])
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.startswith("run.trec-") for f in folders)


def fake_run(out: Path) -> dict[str, str]:
    files = {"metrics.jsonl": '{"step": 1}\n', "checkpoint.pt": "weights", "config.json": "{}"}
    for name, text in files.items():
        write(out / name, text)
    return files


def test_grpo_refuses_an_out_with_a_run_in_it(tmp_path, capsys):
    out = tmp_path / "run"
    files = fake_run(out)
    train = write(tmp_path / "t.jsonl", json.dumps(good_instance()) + "\n")
    code, text = cli(grpo.main, ["--train-file", train, "--eval-every", "0", "--out", out], capsys)
    assert code == 1 and f"{out} holds a training run (checkpoint.pt, metrics.jsonl)" in text
    assert "--resume" in text and "--overwrite" in text
    assert {p.name: p.read_text() for p in out.iterdir()} == files  # nothing deleted, not even config.json rewritten


def test_grpo_overwrite_deletes_the_old_run_first(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    fake_run(out)
    cfg, _ = grpo.parse_args(["--train-file", str(write(tmp_path / "t.jsonl", "x")), "--out", str(out),
                              "--overwrite"])  # fmt: skip
    checkpoint.check_out(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert "--overwrite: deleted checkpoint.pt, metrics.jsonl" in capsys.readouterr().out


def test_grpo_logs_killed_mid_line(tmp_path):
    # a kill -9 during an append leaves half a line at the end: dropped on resume; damage before it is an error
    log = write(tmp_path / "run" / "metrics.jsonl", '{"step": 1}\n{"step": 2}\n{"st')
    assert runlog.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    write(log, '{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(DataError, match=f"{log}:2: invalid JSON line"):
        runlog.read_jsonl(log)


# ----------------------------------------------------------------------------------------------------------------------
# what a user's terminal shows: real processes, exit status, one line, fast


@pytest.mark.parametrize(
    "argv,code,needle",
    [
        (["eval.py", "--dataset", "dl19", "--window", "0"], 2, "argument --window: '0' is not a positive integer"),
        (["eval.py", "--run", "{tmp}/r.trec", "--qrels", "{tmp}/q.txt"], 1, "{tmp}/r.trec:1: score 'nan'"),
        (["grpo.py", "--group-size", "1"], 2, "--group-size 1"),
        (["-m", "support.augment", "--dataset", "dl19"], 2, "--dataset dl19 is a test set"),
    ],
)
def test_as_a_process(argv, code, needle, tmp_path):
    write(tmp_path / "r.trec", "q1 Q0 a 1 nan t\n")
    write(tmp_path / "q.txt", QRELS)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    script = argv[:2] if argv[0] == "-m" else [str(ROOT / argv[0])]  # a support/ command runs as a module
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, *script, *argv[len(script):]], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=60)
    assert p.returncode == code, p.stderr
    assert needle.replace("{tmp}", str(tmp_path)) in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()[-1]) > 0 and "error:" in p.stderr.strip().splitlines()[-1]
