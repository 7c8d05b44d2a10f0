"""Rank-R1 setwise reranking: byte-exact prompt, the label parser, and the heap sort (oracle top-k, call counts)."""

import random
import re
import statistics

import pytest

from data import Candidate, Query, Ranking
from setwise import build_setwise_prompt, heapsort_steps, parse_setwise, setwise_rerank
from reward import setwise_reward

# docs/method.md §6, transcribed by hand
SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)


def test_prompt_is_byte_exact():
    messages = build_setwise_prompt("what is a flea", ["Fleas are insects.", "Dogs bark."])
    assert messages == [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": 'Given the query: "what is a flea", which of the following documents is most relevant?\n'
            "[1] Fleas are insects.\n[2] Dogs bark.\n"
            "After completing the reasoning process, please provide only the label of the most relevant document to "
            "the query, enclosed in square brackets, within the answer tags. For example, if the third document is "
            "the most relevant, the answer should be: <think> reasoning process here </think> <answer>[3]</answer>.",
        },
    ]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>[1] is weak</think>\n<answer>[3]</answer>", 2),
        ("<think>x</think><answer> [2] </answer>", 1),
        ("<think>[1] and [2]</think> the answer is [2]", 1),  # no answer block: after </think>
        ("<answer>[4]", 3),  # unclosed
        ("<answer>[0]</answer>", None),
        ("<answer>[21]</answer>", None),
        ("<answer>3</answer>", None),  # a bare number is not a label
        ("", None),
        ("I cannot decide.", None),
    ],
)
def test_parse_setwise(text, expected):
    assert parse_setwise(text, 20) == expected


def test_setwise_reward_needs_think_answer_and_the_right_label():
    assert setwise_reward("<think>why</think> <answer>[3]</answer>", 3) == 1.0
    assert setwise_reward("<think>why</think>\n<answer>[3]</answer>", 3) == 1.0
    assert setwise_reward("<think>why</think> <answer>[2]</answer>", 3) == 0.0
    assert setwise_reward("<answer>[3]</answer>", 3) == 0.0  # no reasoning block
    assert setwise_reward("<think>why</think> <answer>3</answer>", 3) == 0.0


def oracle_generate(scores: dict[str, float], log: list[int] | None = None):
    """A perfect model: reads the documents of each prompt and names the best one by a hidden score."""

    def generate(prompts):
        if log is not None:
            log.append(len(prompts))
        out = []
        for messages in prompts:
            docs = re.findall(r"^\[(\d+)\] (\S+)$", messages[1]["content"], re.M)
            label = max(docs, key=lambda d: scores[d[1]])[0]
            out.append(f"<think>compare</think> <answer>[{label}]</answer>")
        return out

    return generate


def make_ranking(qid: str, n: int, rng: random.Random) -> tuple[Ranking, dict[str, float]]:
    cands = [Candidate(f"{qid}-d{i}", f"{qid}-d{i}") for i in range(n)]
    return Ranking(Query(qid, "q"), cands), {c.docid: rng.random() for c in cands}


@pytest.mark.parametrize("n,c", [(100, 19), (20, 19), (37, 4), (5, 2), (1, 19), (11, 3)])
def test_oracle_heapsort_gives_the_exact_top_k(n, c):
    rng = random.Random(n * 100 + c)
    ranking, scores = make_ranking("q", n, rng)
    (out,), calls, traces = setwise_rerank([ranking], oracle_generate(scores), k=10, num_child=c)
    got = out.docids()
    assert sorted(got) == sorted(ranking.docids())  # a permutation
    assert got[:10] == sorted(scores, key=scores.get, reverse=True)[:10]
    # the rest keep their first-stage order
    assert got[10:] == [d for d in ranking.docids() if d in set(got[10:])]
    assert calls == [len(traces)]


def test_about_23_calls_per_query_for_100_candidates_and_19_children():
    counts = []
    for seed in range(20):
        ranking, scores = make_ranking(str(seed), 100, random.Random(seed))
        _, (calls,), _ = setwise_rerank([ranking], oracle_generate(scores), k=10, num_child=19)
        counts.append(calls)
    # heapify: 6 nodes with children (+ a sift at the root); then 9 sifts from the root for the next 9 of the top 10
    assert 20 <= statistics.mean(counts) <= 26 and max(counts) <= 26
    # one window of 20 = a root with 19 children: 1 call to build, then 9 to extract
    ranking, scores = make_ranking("w", 20, random.Random(0))
    assert setwise_rerank([ranking], oracle_generate(scores), k=10)[1] == [10]


def test_calls_of_many_queries_are_batched_and_results_match_one_by_one():
    rng = random.Random(3)
    pairs = [make_ranking(f"q{i}", 40, rng) for i in range(5)]
    scores = {d: s for _, sc in pairs for d, s in sc.items()}
    batches: list[int] = []
    together, calls, _ = setwise_rerank([r for r, _ in pairs], oracle_generate(scores, batches), batch_size=8)
    assert max(batches) == 5  # the first call of every query went in one batch
    for (r, _), out, n in zip(pairs, together, calls):
        (alone,), (n_alone,), _ = setwise_rerank([r], oracle_generate(scores))
        assert out.docids() == alone.docids() and n == n_alone


def test_shuffling_is_seeded_and_an_unparseable_answer_keeps_the_parent():
    ranking, _ = make_ranking("q", 30, random.Random(1))
    shown = []

    def useless(prompts):
        shown.extend(re.findall(r"^\[\d+\] (\S+)$", p[1]["content"], re.M) for p in prompts)
        return ["I am not sure."] * len(prompts)

    (out,), calls, traces = setwise_rerank([ranking], useless, k=10, num_child=5, seed=7)
    # nothing is ever swapped, so the heap is the first-stage list and the top-10 comes out in heap-extraction order,
    # which for an unchanged heap starts with the first-stage top document
    assert out.docids()[0] == ranking.docids()[0] and all(t.pick is None for t in traces)
    first = list(shown)
    shown.clear()
    setwise_rerank([ranking], useless, k=10, num_child=5, seed=7)
    assert shown == first  # same seed, same shuffles
    shown.clear()
    setwise_rerank([ranking], useless, k=10, num_child=5, seed=8)
    assert shown != first
    assert any(s != sorted(s, key=ranking.docids().index) for s in first)  # documents really are shuffled


def test_heapsort_steps_is_a_plain_generator():
    steps = heapsort_steps(3, k=2, num_child=2, rng=random.Random(0))
    shown = next(steps)  # root 0 with children 1, 2, in some order
    assert sorted(shown) == [0, 1, 2]
    try:
        while True:
            shown = steps.send(shown.index(2) if 2 in shown else 0)  # item 2 is the best
    except StopIteration as done:
        assert done.value[0] == 2 and sorted(done.value) == [0, 1, 2]


def test_resume_replays_recorded_calls_without_the_model():
    rng = random.Random(5)
    pairs = [make_ranking(f"q{i}", 30, rng) for i in range(3)]
    scores = {d: s for _, sc in pairs for d, s in sc.items()}
    rankings = [r for r, _ in pairs]
    full, full_calls, traces = setwise_rerank(rankings, oracle_generate(scores), num_child=4, seed=1)
    partial = traces[: len(traces) // 2]  # as if the run was killed half way
    asked = []
    resumed, calls, again = setwise_rerank(rankings, oracle_generate(scores, asked), num_child=4, seed=1, traces=partial)
    assert [r.docids() for r in resumed] == [r.docids() for r in full] and calls == full_calls
    assert sum(asked) == len(traces) - len(partial)  # only the missing calls went to the model
    with pytest.raises(ValueError, match="resume only with the same settings"):
        setwise_rerank(rankings, oracle_generate(scores), num_child=4, seed=2, traces=partial)


class WordTokenizer:
    """Just enough of a tokenizer for the 512-token passage cut: one token a word."""

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": text.split()})()

    def decode(self, ids):
        return " ".join(ids)


class OracleGenerator:
    """Stands in for backend.HFGenerator in eval.py: names the document with the highest qrels grade."""

    def __init__(self, qrels):
        self.qrels, self.tokenizer = qrels, WordTokenizer()
        self.prompt_tokens = self.generated_tokens = 0
        self.seconds, self.calls = 0.0, 0

    def __call__(self, prompts):
        self.calls += len(prompts)
        out = []
        for messages in prompts:
            text = messages[1]["content"]
            query = re.search(r'Given the query: "(.*?)"', text).group(1)
            docs = re.findall(r"^\[(\d+)\] (.*)$", text, re.M)
            grades = self.qrels[self.qid_of[query]]
            best = max(docs, key=lambda d: grades.get(self.docid_of[d[1]], 0))
            out.append(f"<think>...</think> <answer>[{best[0]}]</answer>")
        self.generated_tokens += len(prompts)
        return out


def test_eval_setwise_with_an_oracle_prints_ndcg_and_calls_and_resumes(data_root, tmp_path, capsys, monkeypatch):
    import eval as ev
    from data import load_dataset

    ds = load_dataset("dl19", data_root)
    oracle = OracleGenerator(ds.qrels)
    oracle.qid_of = {r.query.text: r.query.qid for r in ds.rankings}
    oracle.docid_of = {c.text: c.docid for r in ds.rankings for c in r.candidates}
    monkeypatch.setattr(ev, "load_generator", lambda cfg: oracle)
    args = ["--dataset", "dl19", "--model", "oracle", "--method", "setwise", "--limit", "3", "--top-k", "20",
            "--data-dir", str(data_root), "--out", str(tmp_path)]
    ev.main(args)
    out = capsys.readouterr().out
    first = float(re.search(r"first stage nDCG@10 (\S+)", out).group(1))
    reranked = float(re.search(r"reranked nDCG@10 (\S+)", out).group(1))
    assert reranked > first  # a perfect picker sorts the top 10 of each top-20 by grade
    assert "LLM calls per query 10.0" in out  # 20 candidates = a root and 19 children: 1 + 9 calls
    lines = (tmp_path / "traces.jsonl").read_text().splitlines()
    assert len(lines) == 30 and oracle.calls == 30
    # kill the last query's calls and run again: only those are asked of the model
    (tmp_path / "traces.jsonl").write_text("\n".join(lines[:25]) + "\n" + lines[25][:20])
    oracle.calls = 0
    ev.main(args)
    assert oracle.calls == 5 and f"reranked nDCG@10 {reranked:.4f}" in capsys.readouterr().out
