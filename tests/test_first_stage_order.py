"""eval.py --first-stage-order: the reranker is shown the top-k shuffled or reversed, and every first-stage figure is
that of the list it saw (BM25 alone, a listwise or setwise model, a --run file; the --out name and its guard)."""

import json
import re

import pytest

import eval as ev
from support import report
from rearank import clean_passage
from data import load_dataset, ndcg_at_k, trec_order
from support.formats import load_qrels, load_run
from support.scoring import score_run_file
from test_setwise import WordTokenizer


def ndcg_line(out: str, label: str = "") -> float:
    return float(re.search(rf"^{label}nDCG@10 (\S+)$", out, re.M).group(1))


def bm25(data_root, tmp_path, capsys, *flags) -> tuple[float, dict[str, list[str]]]:
    """eval.py --model bm25 on DL19 with `flags`: the printed nDCG@10 and run.trec's lists (by score, as trec_eval)."""
    out = tmp_path / "-".join(["bm25", *flags]).replace("--", "")
    ev.main(["--dataset", "dl19", "--model", "bm25", "--data-dir", str(data_root), "--out", str(out), *flags])
    printed = ndcg_line(capsys.readouterr().out)
    return printed, {q: trec_order(s) for q, s in load_run(out / "run.trec").items()}


def test_bm25_prints_the_nDCG_of_the_reordered_list_it_writes(data_root, tmp_path, capsys):
    qrels = load_qrels(data_root / "trec_dl/qrels.dl19-passage.txt")
    given, lists = bm25(data_root, tmp_path, capsys)
    shuffled, shuffled_lists = bm25(data_root, tmp_path, capsys, "--first-stage-order", "shuffled", "--seed", "0")
    again, _ = bm25(data_root, tmp_path / "again", capsys, "--first-stage-order", "shuffled", "--seed", "0")
    other, other_lists = bm25(data_root, tmp_path, capsys, "--first-stage-order", "shuffled", "--seed", "1")
    backwards, reversed_lists = bm25(data_root, tmp_path, capsys, "--first-stage-order", "reversed")
    assert given == 0.5058
    for q, docids in lists.items():  # the same passages, in another order; scores fall with the new rank
        assert sorted(shuffled_lists[q]) == sorted(docids) and reversed_lists[q] == docids[::-1]
    assert sum(shuffled_lists[q] != other_lists[q] for q in lists) == len(lists)  # the seed draws the shuffle
    # what is printed is what trec_eval makes of the written run, and is the reordered list's own nDCG
    runs = {shuffled: "bm25-first-stage-order-shuffled-seed-0", backwards: "bm25-first-stage-order-reversed"}
    for printed, run in runs.items():
        assert printed == round(score_run_file(tmp_path / run / "run.trec", qrels).mean["nDCG@10"], 4)
    mean = sum(ndcg_at_k(d[::-1], qrels[q]) for q, d in lists.items()) / len(lists)
    assert backwards == round(mean, 4)
    assert again == shuffled and shuffled < given - 0.2 and other != shuffled and backwards < shuffled


def test_the_order_names_the_out_folder_and_a_finished_run_is_not_mixed_with_another(data_root, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--dataset", "dl19", "--model", "bm25", "--data-dir", str(data_root), "--top-k", "20"]
    ev.main(base + ["--first-stage-order", "shuffled", "--seed", "3"])
    ev.main(base + ["--first-stage-order", "reversed", "--seed", "3"])  # the seed only names a shuffle
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["dl19-bm25-top20-reversed",
                                                                     "dl19-bm25-top20-shuffled-seed3"]
    with pytest.raises(SystemExit, match="other settings.*first_stage_order"):
        ev.main(base + ["--out", "runs/dl19-bm25-top20-reversed"])
    with pytest.raises(SystemExit, match="other settings.*seed"):
        ev.main(base + ["--first-stage-order", "shuffled", "--out", "runs/dl19-bm25-top20-shuffled-seed3"])
    with pytest.raises(SystemExit):  # --compare reads finished runs: there is no first stage to reorder
        ev.parse_args(["--compare", "a", "b", "--dataset", "dl19", "--first-stage-order", "shuffled"])
    assert "--compare and --report read finished runs" in capsys.readouterr().err


class KeepOrder:
    """Stands in for HFGenerator: answers with no ids, so every window keeps the order it was shown in."""

    def __init__(self):
        self.tokenizer = WordTokenizer()  # setwise cuts passages to 512 of its tokens
        self.prompt_tokens = self.generated_tokens = 0
        self.seconds, self.shown = 0.0, []

    def __call__(self, prompts):
        self.shown += prompts
        return ["<think>no idea</think> <answer>none</answer>"] * len(prompts)


@pytest.mark.parametrize("method", ["listwise", "setwise"])
def test_with_a_model_both_lines_refer_to_the_list_the_model_saw(data_root, tmp_path, capsys, monkeypatch, method):
    model = KeepOrder()
    monkeypatch.setattr(ev, "load_generator", lambda cfg: model)
    flags = ["--first-stage-order", "shuffled", "--seed", "2", "--top-k", "10", "--limit", "3"]
    shuffled, lists = bm25(data_root, tmp_path, capsys, *flags)
    out = tmp_path / method
    ev.main(["--dataset", "dl19", "--model", "fake", "--method", method, "--window", "10", "--data-dir",
             str(data_root), "--out", str(out), *flags])
    printed = capsys.readouterr().out
    assert ndcg_line(printed, "first stage ") == shuffled
    first_query = load_dataset("dl19", data_root).rankings[0]
    assert lists[first_query.query.qid] != [c.docid for c in first_query.candidates[:10]]  # really reordered
    if method == "listwise":  # one window of 10 a query: the model read the passages in the shuffled order
        qid = first_query.query.qid
        text_of = {c.docid: clean_passage(c.text, 60) for c in first_query.candidates}
        prompt = next(p for p in model.shown if first_query.query.text in p[1]["content"])
        shown = [m["content"] for m in prompt if m["content"].startswith("[")]
        expected = [f"[{i}] {text_of[d]}" for i, d in enumerate(lists[qid], 1)]
        assert len(shown) == 10 and all(s.startswith(e) for s, e in zip(shown, expected))
        assert ndcg_line(printed, "reranked ") == shuffled
    view = report.read_run(out)  # the report's first stage is the list the model saw
    assert [q.first_stage for q in view.queries] == [lists[q.qid] for q in view.queries]
    assert round(view.first_mean(10), 4) == shuffled


def test_a_run_file_is_reordered_like_the_same_list_from_the_dataset(data_root, tmp_path, capsys):
    shuffled, lists = bm25(data_root, tmp_path, capsys, "--first-stage-order", "shuffled")
    out = tmp_path / "from-run"
    ev.main(["--run", str(data_root / "trec_dl/run.bm25.dl19.top100.trec"), "--qrels",
             str(data_root / "trec_dl/qrels.dl19-passage.txt"), "--first-stage-order", "shuffled", "--out", str(out)])
    assert ndcg_line(capsys.readouterr().out) == shuffled
    assert {q: trec_order(s) for q, s in load_run(out / "run.trec").items()} == lists
    assert json.loads((out / "metrics.json").read_text())["config"]["first_stage_order"] == "shuffled"
