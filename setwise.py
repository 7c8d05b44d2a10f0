"""Rank-R1 setwise reranking with reasoning (Zhuang et al., arXiv 2503.06034; ielab/llm-rankers, Rank-R1/).

One LLM call shows the query and up to 20 documents and asks for the single most relevant one, reasoning first; a
c-ary heap sort over the first-stage list turns those picks into a top k (docs/method.md §6).

    python eval.py --dataset dl19 --model smollm2 --method setwise --limit 1 --top-k 20
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Generator, Iterable, Sequence

from data import DataError, Ranking
from rearank import Generate, answer_text

SETWISE_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)
SETWISE_USER = (
    'Given the query: "{query}", which of the following documents is most relevant?\n{docs}\nAfter completing the '
    "reasoning process, please provide only the label of the most relevant document to the query, enclosed in square "
    "brackets, within the answer tags. For example, if the third document is the most relevant, the answer should be: "
    "<think> reasoning process here </think> <answer>[3]</answer>."
)


def build_setwise_prompt(query: str, passages: Sequence[str]) -> list[dict]:
    """Rank-R1's prompt: the query and up to 20 documents labelled [1]..[n]; the model names the most relevant.

    Passages are used as given: Rank-R1 truncates them to 512 *tokens* on TREC DL, which needs the model's
    tokenizer, so the caller truncates (see `setwise_rerank(truncate=...)`).

    >>> build_setwise_prompt("q", ["a", "b"])[1]["content"].splitlines()[1:3]
    ['[1] a', '[2] b']
    """
    docs = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return [
        {"role": "system", "content": SETWISE_SYSTEM},
        {"role": "user", "content": SETWISE_USER.format(query=query, docs=docs)},
    ]


_LABEL = re.compile(r"\[(\d+)\]")


def parse_setwise(text: str, n: int) -> int | None:
    """The 0-based index of the document a setwise completion picks, or None when there is no usable label.

    Reads the first `[k]` (1 <= k <= n) inside `<answer>...</answer>`, else after the last `</think>`, else anywhere.
    None tells the heap sort to keep the current parent, as Rank-R1 does.

    >>> parse_setwise("<think>[2] is close, but</think> <answer>[3]</answer>", 5)
    2
    >>> parse_setwise("<answer>[9]</answer>", 5) is None
    True
    """
    for match in _LABEL.finditer(answer_text(text)):
        if len(match.group(1)) > 9:  # cannot be a label; int() refuses runs over 4,300 digits (Python >= 3.11)
            continue
        k = int(match.group(1))
        if 1 <= k <= n:
            return k - 1
    return None


# A heap sort is a sequence of LLM calls, each depending on the last. Written as a generator, one query's sort yields
# the candidates to show and receives the pick, so a driver can batch the pending calls of many queries at once.
SortSteps = Generator[list[int], "int | None", list[int]]


def heapsort_steps(n: int, k: int, num_child: int, rng: random.Random) -> SortSteps:
    """Top-k of n items by a c-ary max-heap whose comparison is 'which of parent + children is best?'.

    Yields the item indices of one call (shuffled, so the model cannot learn a position bias), receives the position
    it picked (None: unparseable, keep the parent). Returns all n indices: the top k in order, then the rest in their
    first-stage order (our choice; Rank-R1 leaves them in heap order, nDCG@10 is unaffected when k >= 10).
    """
    heap = list(range(n))

    def sift_down(i: int, size: int):
        while True:
            children = list(range(num_child * i + 1, min(num_child * i + num_child + 1, size)))
            if not children:
                return
            shown = [heap[i]] + [heap[j] for j in children]
            rng.shuffle(shown)
            pick = yield shown
            best = shown[pick] if pick is not None else heap[i]
            if best == heap[i]:
                return
            j = next(j for j in children if heap[j] == best)
            heap[i], heap[j] = heap[j], heap[i]
            i = j

    for i in reversed(range((n - 2) // num_child + 1 if n > 1 else 0)):  # heapify: every node with children
        yield from sift_down(i, n)
    top = []
    for size in range(n, max(n - k, 0), -1):
        top.append(heap[0])
        heap[0] = heap[size - 1]
        if len(top) < k:  # the next root is only needed if we still want more
            yield from sift_down(0, size - 1)
    chosen = set(top)
    return top + [i for i in range(n) if i not in chosen]


@dataclass
class SetwiseTrace:
    qid: str
    shown: list[str]  # docids in the order shown
    completion: str
    pick: int | None


def setwise_rerank(
    rankings: list[Ranking],
    generate: Generate,
    *,
    k: int = 10,
    num_child: int = 19,
    seed: int = 0,
    batch_size: int = 8,
    truncate: Callable[[str], str] = lambda text: text,
    traces: Iterable[SetwiseTrace] = (),
    on_calls: Callable[[list[SetwiseTrace]], None] | None = None,
) -> tuple[list[Ranking], list[int], list[SetwiseTrace]]:
    """Rank-R1 inference: a heap sort per query for its top k, with the calls of all queries batched.

    Returns the reranked lists, the number of LLM calls per query, and one trace per call.
    Resume: `traces` are calls finished earlier (traces.jsonl). The sorts are deterministic given the seed and the
    picks, so each query first replays its recorded picks, in order, instead of asking the model again; a recorded
    call that showed other documents means other settings, and we refuse. `on_calls` receives each batch's new traces.
    """
    sorts = {}
    for qi, r in enumerate(rankings):
        sorts[qi] = heapsort_steps(len(r.candidates), k, num_child, random.Random(f"{seed}:{r.query.qid}"))
    pending: dict[int, list[int]] = {}  # query -> the candidates its next call shows
    orders: dict[int, list[int]] = {}

    def advance(qi: int, pick: int | None, start: bool = False) -> None:
        try:  # a sort's first call comes from starting it; each later one from sending it the last pick
            pending[qi] = next(sorts[qi]) if start else sorts[qi].send(pick)
        except StopIteration as done:
            pending.pop(qi, None)
            orders[qi] = done.value

    for qi in sorts:
        advance(qi, None, start=True)
    replay: dict[str, list[SetwiseTrace]] = {}
    for t in traces:
        replay.setdefault(t.qid, []).append(t)
    calls = [0] * len(rankings)
    all_traces: list[SetwiseTrace] = []

    def record(qi: int, trace: SetwiseTrace) -> None:
        calls[qi] += 1
        all_traces.append(trace)
        advance(qi, trace.pick)

    while pending:
        for qi in list(pending):  # replay finished calls first: no model needed
            while qi in pending and replay.get(rankings[qi].query.qid):
                old = replay[rankings[qi].query.qid].pop(0)
                shown = [rankings[qi].candidates[i].docid for i in pending[qi]]
                if old.shown != shown:
                    raise DataError(
                        f"trace for query {old.qid} showed {old.shown[:3]}..., this run shows {shown[:3]}...: "
                        "resume only with the same settings and seed (or use a new --out, or --overwrite)"
                    )
                record(qi, old)
        if not pending:
            break
        batch = list(pending.items())[:batch_size]
        prompts = [
            build_setwise_prompt(rankings[qi].query.text, [truncate(rankings[qi].candidates[i].text) for i in shown])
            for qi, shown in batch
        ]
        completions = generate(prompts)
        if len(completions) != len(prompts):
            raise ValueError(f"generate returned {len(completions)} completions for {len(prompts)} prompts")
        new = []
        for (qi, shown), text in zip(batch, completions):
            docids = [rankings[qi].candidates[i].docid for i in shown]
            new.append(SetwiseTrace(rankings[qi].query.qid, docids, text, parse_setwise(text, len(shown))))
            record(qi, new[-1])
        if on_calls:
            on_calls(new)
    reranked = [Ranking(r.query, [r.candidates[i] for i in orders[qi]]) for qi, r in enumerate(rankings)]
    return reranked, calls, all_traces
