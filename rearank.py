"""REARANK listwise reranking (Zhang et al., arXiv 2505.20046): the prompts (byte for byte), the answer parser,
sliding windows, and the batched, resumable rerank loop with the model injected (a `Generate`: chat prompts in,
completions out). grpo.py and reward.py use the same prompt builder and parser, so training and evaluation agree on
what the model is asked and how its answer is read.

    python eval.py --dataset dl19 --model smollm2 --top-k 20     # rerank with the embedded model, end to end
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from data import DataError, Ranking

# ----------------------------------------------------------------------------------------------------------------------
# prompts (docs/method.md §2). The released REARANK-7B was trained on this exact text, oddities included: no space
# after "query." and the 12-space indentation of the final instruction. "\n" is a newline, as in RankGPT's Python
# source.

REARANK_SYSTEM = (
    "You are DeepRerank, an intelligent assistant that can rank passages based on their relevancy to the search query. "
    "You first thinks about the reasoning process in the mind and then provides the user with the answer."
)
REARANK_PREFIX = (
    "I will provide you with passages, each indicated by number identifier []. Rank the passages based on their "
    "relevance to the search query.Search Query: {query}. \nRank the {num} passages above based on their relevance to "
    "the search query.The passages should be listed in descending order using identifiers. The most relevant passages "
    "should be listed first. The output format should be <answer> [] > [] </answer>, "
    "e.g., <answer> [1] > [2] </answer>."
)
REARANK_SUFFIX = (
    'Please rank these passages according to their relevance to the search query: "{query}"\n'
    "            Follow these steps exactly:\n"
    "            1. First, within <think> tags, analyze EACH passage individually:\n"
    "            - Evaluate how well it addresses the query\n"
    "            - Note specific relevant information or keywords\n"
    "\n"
    "            2. Then, within <answer> tags, provide ONLY the final ranking in descending order of relevance using "
    "the format: [X] > [Y] > [Z]"
)
RANKGPT_SYSTEM = (
    "You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query."
)
RANKGPT_PREFIX = (
    "I will provide you with {num} passages, each indicated by number identifier []. \n"
    "Rank the passages based on their relevance to query: {query}."
)
RANKGPT_SUFFIX = (
    "Search Query: {query}. \nRank the {num} passages above based on their relevance to the search query. The passages "
    "should be listed in descending order using identifiers. The most relevant passages should be listed first. The "
    "output format should be [] > [], e.g., [1] > [2]. Only response the ranking results, do not say any word or "
    "explain."
)
ACK = "Okay, please provide the passages."
MAX_CHARS = {"rearank": 400, "rankgpt": 300}  # characters, not tokens (docs/method.md §2)
ANSWER_END = "</answer>"  # generation stops here: nothing after the answer is ever used


def clean_passage(text: str, max_chars: int) -> str:
    """Drop the leading `Title: ... Content:` labels, collapse whitespace, keep the first `max_chars` characters.

    Only labels at the very start are removed (that is how data.py writes BEIR documents), so a passage that merely
    mentions "Title:" keeps it.

    >>> clean_passage("Title: Fleas  Content: A flea\\nlives a year.", 16)
    'Fleas A flea liv'
    >>> clean_passage("Title: Content: no title here", 400)
    'no title here'
    """
    m = re.match(r"\s*Title:(.*?)Content:(.*)", text, re.S)
    if m:
        text = m.group(1) + " " + m.group(2)
    return " ".join(text.split())[:max_chars]


def build_prompt(query: str, passages: Sequence[str], style: str = "rearank", answer_start: str = "") -> list[dict]:
    """Chat messages asking the model to rank `passages` (best first) for `query`; passages are numbered from [1].

    style="rearank" is REARANK's reasoning prompt (passages cut to 400 characters); style="rankgpt" is the zero-shot
    RankGPT prompt without reasoning (300 characters), as docs/method.md §2 transcribes it (no acknowledgement turns).

    >>> m = build_prompt("flea life", ["Title: Content: A flea lives a year.", "Cats."])
    >>> [x["role"] for x in m]
    ['system', 'user', 'assistant', 'user', 'assistant', 'user', 'assistant', 'user']
    >>> m[3]["content"], m[4]["content"]
    ('[1] A flea lives a year.', 'Received passage [1].')

    `answer_start` (a departure, empty by default): the assistant's reply is opened with this text and the model
    continues it (backend.generate_tokens), as small-model RL recipes open the reply with "<think>". A model that
    writes prose where a list is asked for then at least names a first passage: `answer_start="["`.

    >>> build_prompt("flea life", ["Cats."], "rankgpt", answer_start="[")[-1]
    {'role': 'assistant', 'content': '['}
    """
    if style not in MAX_CHARS:
        raise ValueError(f"unknown prompt style {style!r}; use 'rearank' or 'rankgpt'")
    num, texts = len(passages), [clean_passage(p, MAX_CHARS[style]) for p in passages]
    opening = [{"role": "assistant", "content": answer_start}] if answer_start else []
    if style == "rankgpt":
        messages = [
            {"role": "system", "content": RANKGPT_SYSTEM},
            {"role": "user", "content": RANKGPT_PREFIX.format(num=num, query=query)},
            {"role": "assistant", "content": ACK},
        ]
        messages += [{"role": "user", "content": f"[{i}] {t}"} for i, t in enumerate(texts, 1)]
        messages.append({"role": "user", "content": RANKGPT_SUFFIX.format(num=num, query=query)})
        return messages + opening
    messages = [
        {"role": "system", "content": REARANK_SYSTEM},
        {"role": "user", "content": REARANK_PREFIX.format(num=num, query=query)},
        {"role": "assistant", "content": ACK},
    ]
    for i, t in enumerate(texts, 1):
        messages.append({"role": "user", "content": f"[{i}] {t}"})
        messages.append({"role": "assistant", "content": f"Received passage [{i}]."})
    messages.append({"role": "user", "content": REARANK_SUFFIX.format(query=query)})
    return messages + opening


# ----------------------------------------------------------------------------------------------------------------------
# reading the model's answer

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_RANKING_LIST = re.compile(r"\s*\[\d+\](\s*>\s*\[\d+\])*\s*")


def answer_text(text: str) -> str:
    """The part of a completion that holds the ranking (docs/method.md §2): inside the last `<answer>...</answer>`
    block, else after the last `</think>`, else everything. Generation stops at the first `</answer>`, so there is at
    most one.

    >>> answer_text("<think>[9] is off-topic</think> <answer>[2] > [1]</answer>")
    '[2] > [1]'
    >>> answer_text("<think>[9] is off-topic</think> <answer>[2] > [1]")  # unclosed: what follows </think>
    ' <answer>[2] > [1]'
    """
    blocks = _ANSWER.findall(text)
    if blocks:
        return blocks[-1]
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return text


def parse_ranking(text: str, n: int) -> list[int]:
    """A 0-based permutation of range(n) from a completion; never raises (docs/method.md §2).

    Read the integers of `answer_text` in order, make them 0-based, drop repeats (the first one counts) and ids outside
    1..n, then append the ids never mentioned in their original order. So a useless answer keeps the input order.

    >>> parse_ranking("<think>...</think><answer>[3] > [1] > [3] > [7]</answer>", 4)
    [2, 0, 1, 3]
    >>> parse_ranking("no idea", 3), parse_ranking("", 2), parse_ranking("[0] > [2]", 3)
    ([0, 1, 2], [0, 1], [1, 0, 2])
    """
    # a run of digits longer than 9 cannot be an id (and int() refuses very long ones in Python >= 3.11)
    ids = [int(s) - 1 for s in re.findall(r"\d+", answer_text(text)) if len(s) <= 9]
    order = list(dict.fromkeys(i for i in ids if 0 <= i < n))
    seen = set(order)
    return order + [i for i in range(n) if i not in seen]


def answer_format(text: str) -> tuple[bool, bool]:
    """(format1, format2) of REARANK's reward (docs/method.md §3), checked on the completion text.

    format1: a `<think>...</think>` block followed, later in the text, by an `<answer>...</answer>` block.
    format2: the text of the last `<answer>...</answer>` block is a ranking list and nothing else: one or more `[k]`
    joined by `>`, spaces allowed around them (`[3] > [1] > [2]`, `[3]>[1]`, `[1]`). It is a syntax check only: ids
    out of range or repeated still pass (the rank reward already prices them in). No answer block: format2 is False.

    >>> answer_format("<think>2 mentions fleas</think>\\n<answer> [2] > [1] </answer>")
    (True, True)
    >>> answer_format("<answer>[2] > [1]</answer>"), answer_format("<think>x</think><answer>2, 1</answer>")
    ((False, True), (True, False))
    >>> answer_format("<think>x</think><answer>[2] > [1]")  # unclosed answer
    (False, False)
    """
    format1 = re.search(r"<think>.*?</think>.*?<answer>.*?</answer>", text, re.S) is not None
    blocks = _ANSWER.findall(text)
    format2 = bool(blocks) and _RANKING_LIST.fullmatch(blocks[-1]) is not None
    return format1, format2


# ----------------------------------------------------------------------------------------------------------------------
# sliding windows


def window_spans(n: int, window: int = 20, step: int = 10) -> list[tuple[int, int]]:
    """(start, end) of each window, from the bottom of the list to the top, one pass (RankGPT, REARANK).

    The last window is clipped at 0, so the top of the list is always covered even when the windows do not divide n
    (RankGPT's loop drops that window; rank_llm fixed it the same way).

    >>> window_spans(100)
    [(80, 100), (70, 90), (60, 80), (50, 70), (40, 60), (30, 50), (20, 40), (10, 30), (0, 20)]
    >>> window_spans(20), window_spans(7), window_spans(25), window_spans(0)
    ([(0, 20)], [(0, 7)], [(5, 25), (0, 15)], [])
    """
    if window < 1 or not 1 <= step <= window:
        raise ValueError(f"need window >= 1 and 1 <= step <= window, got window={window} step={step}")
    spans, end = [], n
    while end > 0:
        start = max(end - window, 0)
        spans.append((start, end))
        if start == 0:
            break
        end -= step
    return spans


# ----------------------------------------------------------------------------------------------------------------------
# the reranking loop, with the model injected

Messages = list[dict]
Generate = Callable[[list[Messages]], list[str]]  # one completion per prompt, in order


@dataclass
class WindowTrace:
    """One window of one query: what the model saw (docids, in the order shown) and said, and the order read from it."""

    qid: str
    start: int
    end: int
    completion: str
    order: list[int]  # 0-based positions within the window, best first
    docids: list[str] = field(default_factory=list)  # the window's docids as shown to the model ([1] first)


def rerank(
    rankings: Sequence[Ranking],
    generate: Generate,
    *,
    window: int = 20,
    step: int = 10,
    style: str = "rearank",
    answer_start: str = "",
    batch_size: int = 8,
    traces: Iterable[WindowTrace] = (),
    on_window: Callable[[list[WindowTrace]], None] | None = None,
) -> tuple[list[Ranking], list[WindowTrace]]:
    """Rerank every ranking with sliding windows; returns the reranked rankings and one trace per window.

    Windows of different queries are independent, so the k-th window of all queries is generated together, in
    batches of `batch_size` prompts. Each window's order is written back before the query's next window (which
    overlaps it by window - step) is built.

    Resume: `traces` are windows finished earlier (e.g. read back from traces.jsonl). A window whose (qid, start, end)
    is among them is replayed from its recorded order instead of generated; its recorded docids must match the window
    being built, else the traces belong to another run and we refuse. `on_window` receives each batch's new traces as
    soon as they exist (replayed ones are not passed again), so a caller can append them to disk.
    """
    finished = {(t.qid, t.start, t.end): t for t in traces}
    current = [list(r.candidates) for r in rankings]  # written back window by window
    spans = [window_spans(len(c), window, step) for c in current]
    all_traces: list[WindowTrace] = []
    for k in range(max((len(s) for s in spans), default=0)):
        todo = []  # (query index, start, end) still to generate at window position k
        for i, (r, s) in enumerate(zip(rankings, spans)):
            if k >= len(s):
                continue
            start, end = s[k]
            old = finished.get((r.query.qid, start, end))
            if old is None:
                todo.append((i, start, end))
                continue
            shown = [c.docid for c in current[i][start:end]]
            if (old.docids and old.docids != shown) or sorted(old.order) != list(range(end - start)):
                raise DataError(  # a DataError: eval.py reports it as a one-line error, not a traceback
                    f"trace for query {r.query.qid} window ({start}, {end}) was made on other candidates "
                    f"({old.docids[:3]}... vs {shown[:3]}...) or is damaged: resume only with the same run settings "
                    "(or use a new --out, or --overwrite to start afresh)"
                )
            current[i][start:end] = [current[i][start + j] for j in old.order]
            all_traces.append(old)
        # each query has one window at position k, so all its prompts can be built now; sorted by length, similar
        # prompts share a batch and less of it is padding (on CPU, prefill dominates and padding costs in full)
        built = {(i, s, e): build_prompt(rankings[i].query.text, [c.text for c in current[i][s:e]], style,
                                         answer_start)
                 for i, s, e in todo}  # fmt: skip
        todo.sort(key=lambda job: sum(len(m["content"]) for m in built[job]))
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            prompts = [built[job] for job in batch]
            completions = generate(prompts)
            if len(completions) != len(prompts):
                raise ValueError(f"generate returned {len(completions)} completions for {len(prompts)} prompts")
            new = []
            for (i, s, e), text in zip(batch, completions):
                order = parse_ranking(text, e - s)
                shown = [c.docid for c in current[i][s:e]]
                current[i][s:e] = [current[i][s + j] for j in order]
                new.append(WindowTrace(rankings[i].query.qid, s, e, text, order, shown))
            all_traces += new
            if on_window:
                on_window(new)
    return [Ranking(r.query, c) for r, c in zip(rankings, current)], all_traces
