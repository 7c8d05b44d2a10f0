"""report.html, read back with Python's own html.parser (no browser in CI): every query present, the numbers equal
metrics.json's, hostile text shown and never run, the setwise and comparison pages' structure.

The run folders are made by eval.py itself with a fake model (monkeypatched `load_generator`), on a small synthetic
candidates file, so the report reads exactly the files a real run leaves and no model loads.
"""

import json
import math
from html.parser import HTMLParser

import pytest

import eval as ev
from support import report
from support import scoring
from data import load_rankgpt, ndcg_at_k, trec_order
from support.formats import load_qrels, load_run
from test_setwise import WordTokenizer

HOSTILE = "<script>alert(1)</script></textarea>\"double\" 'single' &amp; <img src=x onerror=alert(2)>"
LISTWISE_ANSWER = "[2] > [1] > [3]"
VOID = {"meta", "br", "img", "hr", "input", "link", "wbr"}


# ----------------------------------------------------------------------------------------------------------------------
# a tiny DOM from html.parser


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def find_all(self, tag=None, cls=None, **attrs) -> list["Node"]:
        found = []
        for c in self.children:
            if isinstance(c, str):
                continue
            if (tag is None or c.tag == tag) and (cls is None or cls in c.classes()) and all(
                    c.attrs.get(k) == v for k, v in attrs.items()):
                found.append(c)
            found += c.find_all(tag, cls, **attrs)
        return found

    def find(self, tag=None, cls=None, **attrs) -> "Node":
        found = self.find_all(tag, cls, **attrs)
        assert found, (tag, cls, attrs)
        return found[0]


class DOM(HTMLParser):
    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#root", {})
        self.starttags = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.starttags.append(tag)
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_endtag(self, tag):
        node = self.node
        while node is not self.root and node.tag != tag:
            node = node.parent
        assert node is not self.root, f"stray </{tag}>"
        self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def parse(path) -> Node:
    dom = DOM(path.read_text())
    assert dom.node is dom.root, "unclosed elements"
    dom.root.starttags = dom.starttags
    return dom.root


# ----------------------------------------------------------------------------------------------------------------------
# synthetic runs made by eval.py with a fake model


class FakeModel:
    """Stands in for HFGenerator: hostile reasoning, then a fixed answer (listwise) or the second document (setwise)."""

    def __init__(self):
        self.tokenizer = WordTokenizer()
        self.prompt_tokens, self.generated_tokens, self.seconds = 100, 10, 0.5

    def __call__(self, prompts):
        setwise = ["most relevant?" in m[-1]["content"] for m in prompts]
        return [f"<think>{HOSTILE} so [2] wins</think>\n<answer>{'[2]' if s else LISTWISE_ANSWER}</answer>"
                for s in setwise]


def write_candidates(tmp_path):
    """3 queries of 9 passages: one hostile passage, one hostile query and qid, unjudged passages, an unjudged query."""
    queries = [("q1", "fleas"), ('q"<2>', HOSTILE), ("q3", "cats"), ("q4", "no judgments")]
    data, qrels = [], []
    for qi, (qid, text) in enumerate(queries):
        hits = []
        for j in range(9):
            docid = f"{qid[:2]}d{j}"
            content = HOSTILE if (qi, j) == (0, 4) else f"passage {j} of {text}, about {'fleas' if j % 3 else 'dogs'}"
            hits.append({"content": content, "qid": qid, "docid": docid, "rank": j + 1, "score": 10.0 - j})
            if qid != "q4" and j != 7:  # d7 stays unjudged
                qrels.append(f"{qid} 0 {docid} {(j * 7 + qi) % 4}")
        data.append({"query": text, "hits": hits})
    cand, qrel = tmp_path / "cands.json", tmp_path / "qrels.txt"
    cand.write_text(json.dumps(data))
    qrel.write_text("\n".join(qrels) + "\n")
    return cand, qrel


def make_run(tmp_path, monkeypatch, method="listwise", name="run"):
    cand, qrel = write_candidates(tmp_path)
    monkeypatch.setattr(ev, "load_generator", lambda cfg: FakeModel())
    out = tmp_path / name
    ev.main(["--candidates", str(cand), "--qrels", str(qrel), "--model", "fake", "--method", method, "--top-k", "8",
             "--window", "4", "--step", "2", "--num-child", "3", "--k", "4", "--out", str(out)])
    return out


@pytest.fixture
def listwise(tmp_path, monkeypatch):
    return make_run(tmp_path, monkeypatch, "listwise", "A")


@pytest.fixture
def setwise(tmp_path, monkeypatch):
    return make_run(tmp_path, monkeypatch, "setwise", "B")


def metrics_of(out):
    return json.loads((out / "metrics.json").read_text())


def traces_of(out):
    return [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]


def first_stage(cand):
    return {r.query.qid: r for r in load_rankgpt(cand)}


# ----------------------------------------------------------------------------------------------------------------------
# the report


def test_eval_writes_a_report_with_every_query_and_metrics_numbers(listwise):
    m, doc = metrics_of(listwise), parse(listwise / "report.html")
    assert set(m["per_query"]) == {"q1", 'q"<2>', "q3"} and m["skipped"] == ["q4"]
    rows = doc.find(id="queries").find("tbody").find_all("tr")
    sections = doc.find_all("details", cls="q")
    assert sorted(r.attrs["data-qid"] for r in rows) == sorted(m["per_query"])
    assert sorted(s.attrs["data-qid"] for s in sections) == sorted(m["per_query"])
    qrels = {}
    for line in (listwise.parent / "qrels.txt").read_text().splitlines():
        qid, _, docid, grade = line.split()
        qrels.setdefault(qid, {})[docid] = int(grade)
    cands = first_stage(listwise.parent / "cands.json")
    deltas = []
    for row in rows:
        qid = row.attrs["data-qid"]
        first, after, delta = (row.find_all("td")[i] for i in (2, 3, 4))
        assert float(after.attrs["data-v"]) == m["per_query"][qid]["nDCG@10"]  # the exact value, not a re-computation
        assert after.text() == f"{m['per_query'][qid]['nDCG@10']:.4f}"
        assert float(first.attrs["data-v"]) == ndcg_at_k(cands[qid].docids()[:8], qrels[qid], 10)
        assert math.isclose(float(delta.attrs["data-v"]), float(after.attrs["data-v"]) - float(first.attrs["data-v"]))
        deltas.append(float(delta.attrs["data-v"]))
    assert deltas == sorted(deltas)  # worst first
    means = doc.find(id="means").find("tbody").find_all("tr")
    reranked = [float(td.attrs["data-v"]) for td in means[1].find_all("td")[1:]]
    assert reranked == [m["mean"][f"nDCG@{k}"] for k in (1, 5, 10)]
    stats = {tr.find_all("td")[0].text(): float(tr.find_all("td")[1].attrs["data-v"])
             for tr in doc.find(id="stats").find_all("tr")}
    assert stats["answers with <think> and <answer>"] == m["think_and_answer"] == 1.0
    assert stats["generated tokens"] == m["generated_tokens"]
    assert stats["windows"] == m["windows"] == 4 * 3  # q4 (unjudged) is reranked too, just not scored
    assert m["command"] in doc.find("pre", cls="cmd").text()


def test_hostile_passages_queries_and_outputs_are_shown_as_text(listwise):
    html = (listwise / "report.html").read_text()
    doc = parse(listwise / "report.html")
    assert doc.starttags.count("script") == 1 and "textarea" not in doc.starttags and "img" not in doc.starttags
    assert html.count("<script>") == 1  # the page's own
    passages = [td.text() for td in doc.find_all("td", cls="t")]
    assert HOSTILE in passages  # the hostile passage, intact, as text
    assert any(HOSTILE in s.find("summary").text() for s in doc.find_all("details", cls="q"))  # the hostile query
    thinks = [p.text() for p in doc.find_all("pre", cls="think")]
    assert thinks and all(t == f"{HOSTILE} so [2] wins" for t in thinks)
    assert 'q"<2>' in {r.attrs["data-qid"] for r in doc.find(id="queries").find_all("tr") if "data-qid" in r.attrs}


def test_each_window_shows_reasoning_and_answer_apart_and_the_passages_moves(listwise):
    doc, traces = parse(listwise / "report.html"), traces_of(listwise)
    run = load_run(listwise / "run.trec")
    cands = first_stage(listwise.parent / "cands.json")
    for section in doc.find_all("details", cls="q"):
        qid = section.attrs["data-qid"]
        windows = section.find_all("details", cls="w")
        mine = [t for t in traces if t["qid"] == qid]
        spans = [w.find("summary").text().split()[2] for w in windows]
        assert spans == [f"{t['start'] + 1}–{t['end']}" for t in mine]
        for w, t in zip(windows, mine):
            assert w.find("pre", cls="answer").text() == LISTWISE_ANSWER
            shown, read = (row.find_all("a", cls="g") for row in w.find_all("div", cls="row"))
            assert [a.text() for a in shown] == [str(i) for i in range(1, len(t["docids"]) + 1)]
            assert [a.text() for a in read] == [str(j + 1) for j in t["order"]]
        # passages in the new order, each with its first-stage rank and its move
        new = trec_order(run[qid])
        old = cands[qid].docids()[:8]
        rows = section.find("table", cls="passages").find("tbody").find_all("tr")
        assert [r.find("td", cls="d").text() for r in rows] == new
        for r, d in enumerate(new):
            now, was, moved = (td.text() for td in rows[r].find_all("td")[:3])
            assert (int(now), int(was)) == (r + 1, old.index(d) + 1)
            shift = old.index(d) - r
            assert moved == (f"↑{shift}" if shift > 0 else f"↓{-shift}" if shift < 0 else "=")
            box = rows[r].find_all("td")[3].find("span")
            assert ("gu" in box.classes()) == d.endswith("d7") and (box.text() == "?") == d.endswith("d7")
        assert any(r.find_all("td")[2].text() != "=" for r in rows)  # the fake's answer moves passages


def test_setwise_page_shows_each_call_its_documents_and_its_pick(setwise):
    doc, traces = parse(setwise / "report.html"), traces_of(setwise)
    qrels = {}
    for line in (setwise.parent / "qrels.txt").read_text().splitlines():
        qid, _, docid, grade = line.split()
        qrels.setdefault(qid, {})[docid] = int(grade)
    assert len(traces) == metrics_of(setwise)["llm_calls"]
    judged = [t for t in traces if t["qid"] != "q4"]  # the unjudged query is reranked but not reported
    assert len(doc.find_all("details", cls="w")) == len(judged)
    by_qid = {s.attrs["data-qid"]: s.find_all("details", cls="w") for s in doc.find_all("details", cls="q")}
    for qid, sections in by_qid.items():
        mine = [t for t in traces if t["qid"] == qid]
        assert len(sections) == len(mine)
        for call, t in zip(sections, mine):
            chips = call.find("div", cls="row").find_all("a", cls="g")
            assert len(chips) == len(t["shown"])
            assert [i for i, a in enumerate(chips) if "pick" in a.classes()] == [t["pick"]]
            grade = qrels[qid].get(t["shown"][t["pick"]])
            verdict = "unjudged" if grade is None else ("relevant" if grade > 0 else "not relevant")
            assert call.find("summary").find("span", cls="badge").text() == verdict
            assert call.find("pre", cls="answer").text() == "[2]"


def test_comparison_page_puts_both_runs_side_by_side(listwise, setwise, capsys):
    ev.main(["--report", str(listwise), "--against", str(setwise)])
    path = listwise / "compare-B.html"
    assert f"wrote {path}" in capsys.readouterr().out
    doc, ma, mb = parse(path), metrics_of(listwise), metrics_of(setwise)
    rows = doc.find(id="queries").find("tbody").find_all("tr")
    assert sorted(r.attrs["data-qid"] for r in rows) == sorted(ma["per_query"])
    for row in rows:
        qid = row.attrs["data-qid"]
        a, b, d = (float(row.find_all("td")[i].attrs["data-v"]) for i in (3, 4, 5))
        assert (a, b) == (ma["per_query"][qid]["nDCG@10"], mb["per_query"][qid]["nDCG@10"])
        assert math.isclose(d, b - a)
    ta, tb = traces_of(listwise), traces_of(setwise)
    for section in doc.find_all("details", cls="q"):
        qid = section.attrs["data-qid"]
        side_a, side_b = section.find("div", cls="two").children
        assert len(side_a.find_all("details", cls="w")) == sum(t["qid"] == qid for t in ta)
        assert len(side_b.find_all("details", cls="w")) == sum(t["qid"] == qid for t in tb)
        assert len(section.find("table", cls="passages").find("tbody").find_all("tr")) == 8
    assert doc.starttags.count("script") == 1


def test_report_redraws_from_files_and_refuses_a_folder_without_them(listwise, tmp_path, capsys):
    (listwise / "report.html").unlink()
    ev.main(["--report", str(listwise)])
    assert (listwise / "report.html").exists() and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"error: .*metrics.json: not found"):
        ev.main(["--report", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit):
        ev.parse_args(["--dataset", "dl19", "--against", str(listwise)])  # --against needs --report
    traces = (listwise / "traces.jsonl").read_text()
    (listwise / "traces.jsonl").write_text(traces + '{"qid": "q1", "sta')  # a run still writing: a half line
    ev.main(["--report", str(listwise)])
    assert (listwise / "traces.jsonl").read_text() == traces + '{"qid": "q1", "sta'  # read, never repaired
    (listwise / "traces.jsonl").write_text('{"qid": 1}\n{"qid"\n')  # a bad line, then a half-written last one
    with pytest.raises(SystemExit, match=r"traces.jsonl:1: not a WindowTrace"):
        ev.main(["--report", str(listwise)])


@pytest.mark.parametrize("text", [
    "<think>a</think><answer>[2] > [1]</answer>", "<think>a</think> [2] > [1]", "[1]", "",
    "<think>x <answer>[1]</answer> y</think><answer>[3]</answer>", "<answer>[1]", "<think>unclosed",
])
def test_split_completion_answer_is_what_the_parser_reads(text):
    from rearank import answer_text

    reasoning, answer = report.split_completion(text)
    assert answer == answer_text(text).strip()
    assert "<think>" not in reasoning and "</think>" not in reasoning


def test_dl19_report_first_stage_matches_the_bm25_run_file(data_root, tmp_path, monkeypatch):
    """On the real data: the report's first-stage nDCG@10 is the BM25 TREC run's, scored independently."""
    monkeypatch.setattr(ev, "load_generator", lambda cfg: FakeModel())
    out = tmp_path / "dl19"
    ev.main(["--dataset", "dl19", "--data-dir", str(data_root), "--model", "fake", "--limit", "3", "--top-k", "20",
             "--out", str(out)])
    doc, m = parse(out / "report.html"), metrics_of(out)
    bm25 = scoring.score_run_file(data_root / "trec_dl/run.bm25.dl19.top100.trec", load_qrels(
        data_root / "trec_dl/qrels.dl19-passage.txt"))
    rows = doc.find(id="queries").find("tbody").find_all("tr")
    assert len(rows) == 3
    for row in rows:
        qid = row.attrs["data-qid"]
        assert float(row.find_all("td")[2].attrs["data-v"]) == pytest.approx(bm25.per_query[qid]["nDCG@10"], abs=1e-12)
        assert float(row.find_all("td")[3].attrs["data-v"]) == m["per_query"][qid]["nDCG@10"]
    assert len(doc.find_all("details", cls="w")) == 3  # top-20 is one window per query
