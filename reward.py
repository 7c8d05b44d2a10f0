"""Rewards for training rerankers with GRPO: REARANK's listwise reward (docs/method.md §3) and Rank-R1's setwise one
(docs/method.md §6).

    r = 0.8 * r_rank + 0.1 * format1 + 0.1 * format2,    r_rank = (r_rerank - r_init) / (r* - r_init)

r_rerank, r_init and r* are nDCG@10 of the candidate set P in the model's order, in its initial order, and sorted by
grade, each against the query's *full* judgments (data.ndcg_at_k, the evaluator's metric): r* < 1 when P lacks some
relevant passages, and r_rank = 1 means "as good as P allows".

    >>> r = rerank_reward("<think>b is best</think> <answer>[2] > [1]</answer>", ["a", "b"], {"b": 3})
    >>> (round(r.rank, 4), r.format1, r.format2, round(r.total, 4))
    (1.0, 1.0, 1.0, 1.0)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from data import ndcg_at_k, ndcg_bounds
from rearank import answer_format, answer_text, parse_ranking
from setwise import parse_setwise

CUTOFF = 10  # the reward's nDCG is nDCG@10
W_RANK, W_FORMAT1, W_FORMAT2 = 0.8, 0.1, 0.1  # REARANK's weights (docs/method.md §3)
NO_ROOM = 1e-12  # r* - r_init below this counts as "no room to improve" (float noise from the log2 discounts)


@dataclass(frozen=True)
class Reward:
    """The parts of one completion's reward, kept apart so logs can show which term moved."""

    rank: float  # r_rank, normalised nDCG@10 gain
    format1: float  # 1 if <think> and <answer> blocks are present
    format2: float  # 1 if the answer is a ranking list "[3] > [1] > [2]"
    total: float  # 0.8 rank + 0.1 format1 + 0.1 format2
    ndcg: float  # r_rerank, nDCG@10 of P in the model's order (not part of the reward; evaluation reads it)

    def asdict(self) -> dict[str, float]:
        return asdict(self)


def rank_gain(r_rerank: float, r_init: float, r_star: float) -> float:
    """Normalised improvement (r_rerank - r_init) / (r* - r_init); the plain difference when r* == r_init.

    Where the paper is silent: r* == r_init (P already in its best order, or P holds nothing relevant) leaves the ratio
    undefined, so r_rank falls back to the plain difference (the paper's second ablation): 0 if the model keeps a best
    order, negative by the nDCG it loses otherwise; it never rewards an improvement that cannot exist. The ratio has
    no lower bound: when r* - r_init is small, spoiling the order costs a lot. That is the paper's formula; the
    augmentation filter (data.augment, --min-ndcg) keeps such sets rare.
    """
    room = r_star - r_init
    assert room >= -NO_ROOM, f"r* ({r_star}) below r_init ({r_init}): r* must be the best order of the same set"
    if room <= NO_ROOM:
        return r_rerank - r_init
    return (r_rerank - r_init) / room


RANK_REWARDS = ("normalised", "difference", "ndcg")
_OPENING_LIST = re.compile(r"\s*\[\d+\]\s*>\s*\[\d+\]")


_OPENING_LIST_WHOLE = re.compile(r"\s*\[\d+\](?:\s*>\s*\[\d+\])*")


def complete_ranking(text: str, n: int) -> bool:
    """`text` opens with a ranking list that names each of the ids 1..n exactly once (what follows is not checked, so
    an answer cut after its list still counts). The prompt's example `[1] > [2]` is complete only for a window of 2.

    >>> complete_ranking("[3] > [1] > [2]", 3), complete_ranking("[1] > [2]", 3), complete_ranking("[3] > [1] > [3]", 3)
    (True, False, False)
    """
    opening = _OPENING_LIST_WHOLE.match(text)
    ids = [int(i) for i in re.findall(r"\d+", opening.group(0))] if opening else []
    return sorted(ids) == list(range(1, n + 1))


def opens_with_ranking_list(text: str) -> bool:
    """The completion starts with a ranking list of at least two ids, `[3] > [1] ...` (RankGPT's asked format; what
    follows is not checked, since a cut completion is still read by the parser).

    >>> opens_with_ranking_list(" [3] > [1] > [2]"), opens_with_ranking_list("Passage [3] > [1]")
    (True, False)
    """
    return _OPENING_LIST.match(text) is not None


def rank_term(r_rerank: float, r_init: float, r_star: float, variant: str = "normalised") -> float:
    """The rank part of the reward under one of the paper's three variants (its ablation, docs/method.md §3):
    "normalised" (the default, `rank_gain`), "difference" r_rerank - r_init (bounded in [-1, 1]) and "ndcg" r_rerank.

    Within one GRPO group every completion answers the same set, so r_init is a constant there: "difference" and
    "ndcg" give the same advantages exactly, and "normalised" differs from them only by the group's scale
    1 / (r* - r_init), which the std normalisation of the advantages cancels whenever the format terms agree across
    the group. The variants part only through the weight of the rank term against the format terms, or under
    `--no-std`.

    >>> [round(rank_term(0.6, 0.4, 0.8, v), 4) for v in RANK_REWARDS]
    [0.5, 0.2, 0.6]
    """
    if variant == "normalised":
        return rank_gain(r_rerank, r_init, r_star)
    if variant == "difference":
        return r_rerank - r_init
    if variant == "ndcg":
        return r_rerank
    raise ValueError(f"unknown rank reward {variant!r}; choose one of {', '.join(RANK_REWARDS)}")


def rerank_reward(
    text: str, docids: Sequence[str], judged: Mapping[str, int], k: int = CUTOFF, variant: str = "normalised",
    list_format: bool = False,
) -> Reward:
    """REARANK's reward for one completion `text` that reorders the candidates `docids` (in their initial order).

    `judged` is the query's full judgments {docid: grade} (at least every positive one): the ideal DCG needs them.
    `variant` picks the rank term (`rank_term`); `Reward.rank` holds it.

    Where the paper is silent: the answer is read by rearank.parse_ranking, the parser inference uses, so the reward
    scores exactly the order inference would write back. An answer with no usable ids leaves P in its initial order:
    r_rank = 0, not below "did nothing"; the format terms are what tell it off. format2 is the paper's syntax check
    (rearank.answer_format): an <answer> block that is a ranking list, which a copy of the prompt's own example
    `<answer> [1] > [2] </answer>` also passes on a window of any size; kept as the paper specifies it, since its
    ablations were measured with it. `list_format` (`grpo.py --list-format`, a departure made for the RankGPT prompt,
    which asks for no tags so REARANK's format terms never fire) pays format2 only when the answer
    (`rearank.answer_text`) opens with a complete permutation of the window's ids (`complete_ranking`); format1 is
    unchanged.

    >>> r = rerank_reward("no answer at all", ["a", "b"], {"b": 3})  # initial order kept, no format credit
    >>> (r.rank, r.format1, r.format2, r.total)
    (0.0, 0.0, 0.0, 0.0)
    """
    order = parse_ranking(text, len(docids))
    r_init, r_star = ndcg_bounds(docids, judged, k)
    r_rerank = ndcg_at_k([docids[i] for i in order], judged, k)
    rank = rank_term(r_rerank, r_init, r_star, variant)
    blocks, ranking_list = answer_format(text)
    f1, f2 = float(blocks), float(complete_ranking(answer_text(text), len(docids)) if list_format else ranking_list)
    return Reward(rank, f1, f2, W_RANK * rank + W_FORMAT1 * f1 + W_FORMAT2 * f2, r_rerank)


SETWISE_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>(.*?)</answer>", re.DOTALL)  # Rank-R1 (docs/method.md §6)


def setwise_reward(text: str, label: int) -> float:
    """Rank-R1's binary reward: 1 if `text` has think-then-answer blocks and the answer is `[label]`, else 0.

    `label` is the 1-based identifier of the relevant document in the prompt.

    >>> setwise_reward("<think>the third</think> <answer>[3]</answer>", 3), setwise_reward("<answer>[3]</answer>", 3)
    (1.0, 0.0)
    """
    m = SETWISE_ANSWER.search(text)
    return float(m is not None and m.group(1).strip() == f"[{label}]")


def setwise_set_reward(text: str, docids: Sequence[str], judged: Mapping[str, int], k: int = CUTOFF) -> Reward:
    """Rank-R1's reward as a `Reward` record, so the GRPO loop logs both tasks alike.

    total = rank = `setwise_reward` against the label of the best-graded passage of the set (a training set has
    exactly one relevant passage; on a held-out window with several, any passage of the top grade counts).
    format1: the think-then-answer pattern matched; format2: the answer named a usable label.
    ndcg: nDCG@k of the set with the picked passage moved to the top (the rest in their order), for evaluation.

    >>> r = setwise_set_reward("<think>b</think> <answer>[2]</answer>", ["a", "b"], {"b": 2})
    >>> (r.total, r.format1, r.format2, r.ndcg)
    (1.0, 1.0, 1.0, 1.0)
    """
    grades = [max(judged.get(d, 0), 0) for d in docids]
    top = max(grades, default=0)
    labels = [i + 1 for i, g in enumerate(grades) if g == top and top > 0]
    correct = max((setwise_reward(text, label) for label in labels), default=0.0)
    pick = parse_setwise(text, len(docids))
    order = list(range(len(docids))) if pick is None else [pick] + [i for i in range(len(docids)) if i != pick]
    ndcg = ndcg_at_k([docids[i] for i in order], judged, k)
    return Reward(correct, float(SETWISE_ANSWER.search(text) is not None), float(pick is not None), correct, ndcg)
