"""nDCG@k must equal trec_eval's, to 1e-9, on real runs and on shuffled runs with ties: pytrec_eval is the oracle."""

import json
import math
import random

import pytest

pytrec_eval = pytest.importorskip("pytrec_eval")

import data
import eval as ev
from support import scoring
from support.formats import load_qrels, load_run

MEASURES = {"ndcg_cut.1", "ndcg_cut.5", "ndcg_cut.10"}


def oracle(run: dict[str, dict[str, float]], qrels) -> dict[str, dict[str, float]]:
    return pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)


def assert_matches_oracle(run, qrels):
    ours = scoring.score_run({q: data.trec_order(s) for q, s in run.items()}, qrels)
    theirs = oracle(run, qrels)
    assert set(ours.per_query) == set(theirs)  # same judged queries
    for qid, m in theirs.items():
        for k in (1, 5, 10):
            assert abs(ours.per_query[qid][f"nDCG@{k}"] - m[f"ndcg_cut_{k}"]) < 1e-9, (qid, k)
    return ours


@pytest.mark.parametrize("year,expected", [("dl19", 0.5058), ("dl20", 0.4796)])
def test_bm25_runs_match_pytrec_eval_per_query(data_root, year, expected):
    qrels = load_qrels(data_root / f"trec_dl/qrels.{year}-passage.txt")
    run = load_run(data_root / f"trec_dl/run.bm25.{year}.top100.trec")
    ours = assert_matches_oracle(run, qrels)
    assert round(ours.mean["nDCG@10"], 4) == expected


@pytest.mark.parametrize("year", ["dl19", "dl20"])
def test_shuffled_runs_with_ties_match_pytrec_eval(data_root, year):
    qrels = load_qrels(data_root / f"trec_dl/qrels.{year}-passage.txt")
    run = load_run(data_root / f"trec_dl/run.bm25.{year}.top100.trec")
    rng = random.Random(0)
    for trial in range(3):
        shuffled = {}
        for qid, scores in run.items():
            docids = list(scores)
            # judged-but-unretrieved docs too, so the ideal must come from all judgments, not the run
            docids += rng.sample(sorted(qrels.get(qid, {})), min(5, len(qrels.get(qid, {}))))
            docids = list(dict.fromkeys(docids))
            rng.shuffle(docids)
            # few distinct scores -> many ties, which trec_eval breaks by docid (descending)
            shuffled[qid] = {d: float(rng.randint(0, 4)) for d in docids}
        assert_matches_oracle(shuffled, qrels)


def test_tie_break_is_docid_descending():
    assert data.trec_order({"a": 1.0, "b": 1.0, "c": 2.0}) == ["c", "b", "a"]
    qrels = {"q": {"a": 3, "b": 0}}
    # a tie between a relevant "a" and a non-relevant "b": trec_eval puts "b" first
    ours = scoring.score_run({"q": data.trec_order({"a": 1.0, "b": 1.0})}, qrels, ks=(1,))
    assert ours.per_query["q"]["nDCG@1"] == 0.0
    assert oracle({"q": {"a": 1.0, "b": 1.0}}, qrels)["q"]["ndcg_cut_1"] == 0.0


def test_ndcg_hand_computed():
    # DCG = 1/log2(2) + 0 + 3/log2(4) = 2.5; IDCG over all judgments (3, 2, 1) = 3 + 2/log2(3) + 1/2
    idcg = 3 + 2 / 1.584962500721156 + 0.5
    assert data.ndcg_at_k(["a", "b", "c"], {"a": 1, "c": 3, "z": 2}, k=3) == pytest.approx(2.5 / idcg)
    assert data.ndcg_at_k(["c", "z", "a"], {"a": 1, "c": 3, "z": 2}, k=3) == pytest.approx(1.0)
    assert data.ndcg_at_k([], {"a": 1}) == 0.0


def test_duplicate_docids_are_an_error():
    with pytest.raises(ValueError, match="duplicate"):
        data.ndcg_at_k(["a", "b", "a"], {"a": 1})


def test_unjudged_queries_are_skipped_and_counted():
    qrels = {"q1": {"a": 1}}
    out = scoring.score_run({"q1": ["a"], "q2": ["b"]}, qrels)
    assert out.skipped == ["q2"]
    assert list(out.per_query) == ["q1"] and out.mean["nDCG@10"] == 1.0


def test_cli_dataset_bm25_prints_the_published_figure(data_root, tmp_path, capsys):
    ev.main(["--dataset", "dl19", "--model", "bm25", "--data-dir", str(data_root), "--out", str(tmp_path)])
    assert "nDCG@10 0.5058" in capsys.readouterr().out.splitlines()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["judged"] == 43 and len(metrics["per_query"]) == 43 and "eval.py" in metrics["command"]
    # the run file: 100 lines a query, scores strictly falling with rank, and it scores the same
    run = load_run(tmp_path / "run.trec")
    for scores in run.values():
        values = list(scores.values())
        assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    qrels = load_qrels(data_root / "trec_dl/qrels.dl19-passage.txt")
    assert scoring.score_run_file(tmp_path / "run.trec", qrels).mean["nDCG@10"] == pytest.approx(0.5058, abs=5e-5)


def test_cli_run_agrees_with_pytrec_eval_on_any_run(data_root, tmp_path, capsys):
    qrels_path = data_root / "trec_dl/qrels.dl20-passage.txt"
    qrels = load_qrels(qrels_path)
    rng = random.Random(7)
    run = {q: {d: round(rng.uniform(-1, 1), 2) for d in rng.sample(sorted(j), min(30, len(j)))} for q, j in qrels.items()}
    run["unjudged"] = {"x": 1.0}
    path = tmp_path / "my.trec"
    path.write_text("".join(f"{q} Q0 {d} 0 {s} t\n" for q, sc in run.items() for d, s in sc.items()))
    ev.main(["--run", str(path), "--qrels", str(qrels_path), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().out.splitlines()
    theirs = oracle(run, qrels)
    mean = sum(m["ndcg_cut_10"] for m in theirs.values()) / len(theirs)
    assert f"nDCG@10 {mean:.4f}" in lines
    assert any("1 skipped" in line for line in lines)
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    for qid, m in theirs.items():
        assert abs(metrics["per_query"][qid]["nDCG@10"] - m["ndcg_cut_10"]) < 1e-9


def test_cli_candidates_file(data_root, tmp_path, capsys):
    ev.main([
        "--candidates", str(data_root / "trec_dl/bm25_top100_dl20.rankgpt.json"),
        "--qrels", str(data_root / "trec_dl/qrels.dl20-passage.txt"), "--model", "bm25", "--out", str(tmp_path),
    ])
    assert "nDCG@10 0.4796" in capsys.readouterr().out.splitlines()


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--dataset", "nope", "--data-dir", str(tmp_path)])
    assert "unknown dataset 'nope'" in str(e.value) and "dl19" in str(e.value)
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 d1 1 1.0 t\nq1 Q0 d1 2 0.5 t\n")
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 d1 1\n")
    with pytest.raises(SystemExit) as e:
        ev.main(["--run", str(bad), "--qrels", str(qrels), "--out", str(tmp_path / "o")])
    assert f"{bad}:2" in str(e.value) and "twice" in str(e.value)


def test_scifact_bm25_reaches_anserini(data_root, tmp_path, capsys):
    """Our own BM25 over the SciFact corpus (rank_bm25 + a Lucene-like analyzer). Anserini flat: 0.6789."""
    ev.main(["--dataset", "scifact", "--model", "bm25", "--data-dir", str(data_root), "--out", str(tmp_path)])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("nDCG@10 "))
    assert float(line.split()[1]) >= 0.668
    assert json.loads((tmp_path / "metrics.json").read_text())["judged"] == 300


# ----------------------------------------------------------------------------------------------------------------------
# --compare: paired deltas, bootstrap interval, sign-flip test


def exact_sign_flip_oracle(deltas):
    """Every sign assignment, by itertools: the share whose |sum| reaches the observed |sum|."""
    import itertools

    observed = abs(sum(deltas))
    sums = [abs(sum(s * d for s, d in zip(signs, deltas))) for signs in itertools.product((1, -1), repeat=len(deltas))]
    return sum(x >= observed - 1e-12 for x in sums) / len(sums)


def per_query(values):
    return scoring.RunScores({q: {"nDCG@10": v} for q, v in values.items()}, {})


def test_compare_by_hand():
    a = per_query({"q1": 0.5, "q2": 0.4, "q3": 0.7, "q4": 0.1, "q5": 0.9})
    b = per_query({"q1": 0.7, "q2": 0.3, "q3": 0.7, "q4": 0.4, "q6": 0.2})
    c = scoring.compare(a, b)
    # paired on q1..q4: deltas +0.2, -0.1, 0, +0.3; q5 (A only) and q6 (B only) are left out
    assert c.deltas == pytest.approx({"q1": 0.2, "q2": -0.1, "q3": 0.0, "q4": 0.3})
    assert c.mean_delta == pytest.approx(0.1) and (c.mean_a, c.mean_b) == (pytest.approx(0.425), pytest.approx(0.525))
    assert (c.wins, c.ties, c.losses, c.only_a, c.only_b) == (2, 1, 1, ["q5"], ["q6"])
    # sign flips of (0.2, 0.1, 0.3) whose |sum| reaches 0.4: sums .6, .4, -.4, -.6 of 8; the 0 doubles both counts
    assert c.p_value == 0.5
    lo, hi = c.interval
    assert -0.1 <= lo < 0.1 < hi <= 0.3  # inside the range of the deltas, around their mean


def test_sign_flip_exact_and_sampled_match_an_enumeration_oracle():
    import random

    rng = random.Random(3)
    for n in (1, 5, 9, 12):
        deltas = [rng.gauss(0.03, 0.1) for _ in range(n)]
        oracle_p = exact_sign_flip_oracle(deltas)
        assert scoring.sign_flip_p(deltas) == pytest.approx(oracle_p, abs=1e-12)
        sampled = scoring.sign_flip_p(deltas, flips=20000, seed=1, exact_up_to=0)  # Monte Carlo: within its noise
        assert abs(sampled - oracle_p) < 4 * (oracle_p * (1 - oracle_p) / 20000) ** 0.5 + 1e-4


def test_bootstrap_interval_is_seeded_and_near_the_normal_interval():
    import random
    import statistics

    rng = random.Random(0)
    deltas = [rng.gauss(0.02, 0.1) for _ in range(400)]
    lo, hi = scoring.bootstrap_interval(deltas, resamples=4000, seed=5)
    assert (lo, hi) == scoring.bootstrap_interval(deltas, resamples=4000, seed=5)
    mean, half = statistics.fmean(deltas), 1.96 * statistics.stdev(deltas) / len(deltas) ** 0.5
    assert lo == pytest.approx(mean - half, abs=0.15 * half) and hi == pytest.approx(mean + half, abs=0.15 * half)


def test_compare_command_on_run_files_and_out_directories(tmp_path, capsys):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 a 3\nq1 0 b 0\nq2 0 c 1\nq2 0 d 2\n")
    bm25 = tmp_path / "bm25.trec"
    bm25.write_text("q1 Q0 b 1 2 x\nq1 Q0 a 2 1 x\nq2 Q0 c 1 2 x\nq2 Q0 d 2 1 x\n")
    better = tmp_path / "rerank"
    better.mkdir()
    (better / "run.trec").write_text("q1 Q0 a 1 2 x\nq1 Q0 b 2 1 x\nq2 Q0 c 1 2 x\nq2 Q0 d 2 1 x\n")
    ev.main(["--compare", str(bm25), str(better), "--qrels", str(qrels)])
    out = capsys.readouterr().out
    delta = 1 - 1 / math.log2(3)  # q1: a moves from rank 2 to rank 1; q2 unchanged
    assert f"delta (B - A) {delta / 2:+.4f}" in out and "wins / ties / losses: 1 / 1 / 0" in out
    assert "p = 1.0000" in out  # two queries, one of them tied: flipping q1's sign alone always reaches |delta|
    with pytest.raises(SystemExit, match="no such run file"):
        ev.main(["--compare", str(tmp_path / "missing.trec"), str(better), "--qrels", str(qrels)])
    with pytest.raises(SystemExit):
        ev.parse_args(["--compare", str(bm25), str(better)])  # nothing to judge them by
