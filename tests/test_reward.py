"""The REARANK reward on hand-computed cases, the silent cases reward.py chooses, and Rank-R1's binary reward."""

import math
from math import log2

import pytest
import torch

from support import augment as augment_cli
import data
from data import Candidate, DataError, Dataset, Query, Ranking
from reward import RANK_REWARDS, Reward, ndcg_bounds, rank_gain, rank_term, rerank_reward, setwise_reward

# P = a, b, c in this initial order; z is judged relevant but not in P, so the best order of P cannot reach 1
DOCIDS = ["a", "b", "c"]
JUDGED = {"a": 0, "b": 1, "c": 3, "z": 2}
IDCG = 3 + 2 / log2(3) + 1 / log2(4)  # grades 3, 2, 1 of the full judgments
R_INIT = (0 + 1 / log2(3) + 3 / log2(4)) / IDCG  # a, b, c
R_STAR = (3 + 1 / log2(3) + 0) / IDCG  # c, b, a


def answer(ids: str) -> str:
    return f"<think>c mentions the query twice</think>\n<answer>{ids}</answer>"


def test_bounds_by_hand():
    r_init, r_star = ndcg_bounds(DOCIDS, JUDGED)
    assert r_init == pytest.approx(R_INIT) and r_star == pytest.approx(R_STAR)
    assert r_star < 1  # z is missing from P


def test_best_order_scores_one_and_parts_add_up():
    r = rerank_reward(answer("[3] > [2] > [1]"), DOCIDS, JUDGED)
    assert r == Reward(pytest.approx(1.0), 1.0, 1.0, pytest.approx(1.0), pytest.approx(R_STAR))


def test_partial_improvement_by_hand():
    r = rerank_reward(answer("[3] > [1] > [2]"), DOCIDS, JUDGED)  # c, a, b
    r_rerank = (3 + 0 + 1 / log2(4)) / IDCG
    assert r.rank == pytest.approx((r_rerank - R_INIT) / (R_STAR - R_INIT)) and r.ndcg == pytest.approx(r_rerank)
    assert r.total == pytest.approx(0.8 * r.rank + 0.2)


def test_worse_order_is_negative():
    r = rerank_reward(answer("[2] > [3] > [1]"), ["c", "a", "b"], JUDGED)  # a, b, c
    r_init = (3 + 0 + 1 / log2(4)) / IDCG
    assert r.rank == pytest.approx((R_INIT - r_init) / (R_STAR - r_init)) and r.rank < 0


def test_partial_answer_appends_the_rest_in_initial_order():
    # "[3]" alone: c first, then a and b as they were (the parser inference uses)
    alone, spelled_out = (rerank_reward(answer(ids), DOCIDS, JUDGED) for ids in ("[3]", "[3] > [1] > [2]"))
    assert alone.rank == spelled_out.rank


def test_unparseable_answer_keeps_initial_order_no_format_credit():
    r = rerank_reward("I think passage c is good.", DOCIDS, JUDGED)
    assert r == Reward(0.0, 0.0, 0.0, 0.0, pytest.approx(R_INIT))


def test_blocks_without_a_ranking_list_get_format1_only():
    r = rerank_reward("<think>hmm</think> <answer>none of them</answer>", DOCIDS, JUDGED)
    assert (r.rank, r.format1, r.format2) == (0.0, 1.0, 0.0) and r.total == pytest.approx(0.1)


def test_no_room_to_improve_falls_back_to_the_difference():
    # P already in its best order: keeping it scores 0, spoiling it costs the nDCG it loses (no division by zero)
    best = ["c", "b", "a"]
    assert rerank_reward(answer("[1] > [2] > [3]"), best, JUDGED).rank == 0.0
    r = rerank_reward(answer("[3] > [2] > [1]"), best, JUDGED)  # a, b, c
    assert r.rank == pytest.approx(R_INIT - R_STAR) and r.rank < 0


def test_nothing_relevant_in_p_scores_zero_whatever_the_order():
    for ids in ("[1] > [2]", "[2] > [1]"):
        r = rerank_reward(answer(ids), ["x", "y"], JUDGED)
        assert r.rank == 0.0 and r.total == pytest.approx(0.2)


def test_rank_gain_refuses_an_impossible_best():
    with pytest.raises(AssertionError):
        rank_gain(0.5, 0.6, 0.4)


# ----------------------------------------------------------------------------------------------------------------------
# the paper's rank-reward ablation (docs/method.md §3): normalised, difference, raw nDCG


def test_rank_reward_variants_by_hand():
    # c, a, b: r_rerank = (3 + 0 + 1/log2(4)) / IDCG against R_INIT (a, b, c) and R_STAR (c, b, a)
    r_rerank = (3 + 0 + 1 / log2(4)) / IDCG
    expected = {
        "normalised": (r_rerank - R_INIT) / (R_STAR - R_INIT),
        "difference": r_rerank - R_INIT,
        "ndcg": r_rerank,
    }
    for variant, rank in expected.items():
        r = rerank_reward(answer("[3] > [1] > [2]"), DOCIDS, JUDGED, variant=variant)
        assert r.rank == pytest.approx(rank) and r.total == pytest.approx(0.8 * rank + 0.2)
        assert r.ndcg == pytest.approx(r_rerank)  # the variant changes the reward, never the measured nDCG


def test_rank_reward_variants_on_a_worse_order_and_a_kept_one():
    # a, b, c from c, a, b: the normalised term divides the loss by the small room left, the others do not
    worse = {v: rerank_reward(answer("[2] > [3] > [1]"), ["c", "a", "b"], JUDGED, variant=v).rank
             for v in RANK_REWARDS}
    r_init = (3 + 0 + 1 / log2(4)) / IDCG
    assert worse["difference"] == pytest.approx(R_INIT - r_init)
    assert worse["normalised"] == pytest.approx((R_INIT - r_init) / (R_STAR - r_init))
    assert worse["normalised"] < worse["difference"] < 0 < worse["ndcg"] == pytest.approx(R_INIT)
    kept = {v: rerank_reward("no ids", DOCIDS, JUDGED, variant=v).rank for v in RANK_REWARDS}
    assert kept == {"normalised": 0.0, "difference": 0.0, "ndcg": pytest.approx(R_INIT)}


def test_rank_term_refuses_an_unknown_variant():
    assert rank_term(0.5, 0.5, 0.5, "difference") == 0.0
    with pytest.raises(ValueError, match="unknown rank reward 'dcg'"):
        rank_term(0.5, 0.4, 0.9, "dcg")


def test_variants_give_the_same_group_advantages_when_the_format_terms_agree():
    # what the module docstring claims: within one set r_init and r* are constants, so std-normalised advantages
    # coincide across the three variants (to the advantage's eps) unless the format terms differ within the group
    from grpo import group_advantages

    orders = ["[3] > [1] > [2]", "[2] > [3] > [1]", "[1] > [2] > [3]", "[3] > [2] > [1]"]
    adv = {}
    for v in RANK_REWARDS:
        totals = [rerank_reward(answer(o), ["c", "a", "b"], JUDGED, variant=v).total for o in orders]
        adv[v] = group_advantages(torch.tensor(totals, dtype=torch.float64), 4, eps=0.0)
    assert torch.allclose(adv["normalised"], adv["difference"]) and torch.allclose(adv["ndcg"], adv["difference"])
    mixed = [answer(orders[0]), orders[1], answer(orders[2]), orders[3]]  # half the group loses the format terms
    adv = {v: group_advantages(torch.tensor([rerank_reward(t, ["c", "a", "b"], JUDGED, variant=v).total
                                             for t in mixed], dtype=torch.float64), 4, eps=0.0) for v in RANK_REWARDS}
    assert torch.allclose(adv["ndcg"], adv["difference"]) and not torch.allclose(adv["normalised"], adv["difference"])


@pytest.mark.parametrize(
    "text, label, expected",
    [
        ("<think>doc 3 answers it</think> <answer>[3]</answer>", 3, 1.0),
        ("<think>x</think>\n<answer> [3] </answer>", 3, 1.0),
        ("<think>x</think><answer>[2]</answer>", 3, 0.0),  # wrong document
        ("<answer>[3]</answer>", 3, 0.0),  # no reasoning block
        ("<think>x</think> so <answer>[3]</answer>", 3, 0.0),  # text between the blocks
        ("<think>x</think><answer>3</answer>", 3, 0.0),  # no brackets
    ],
)
def test_setwise_reward(text, label, expected):
    assert setwise_reward(text, label) == expected


# ----------------------------------------------------------------------------------------------------------------------
# training instances (data.augment, docs/method.md §4): r_init and r* are the reward's own bounds



def toy_dataset() -> Dataset:
    cands = [Candidate(f"d{i}", f"passage {i}") for i in range(30)]
    qrels = {"q1": {"d0": 3, "d1": 1, "d5": 0}, "q2": {"d0": 2}}  # q3 is unjudged: never sampled
    rankings = [Ranking(Query(q, f"query {q}"), cands) for q in ("q1", "q2", "q3")]
    return Dataset("toy", rankings, qrels)


def test_augment_is_reproducible_from_the_seed():
    a, sa = data.augment(toy_dataset(), samples=20, size=5, seed=7)
    b, sb = data.augment(toy_dataset(), samples=20, size=5, seed=7)
    c, _ = data.augment(toy_dataset(), samples=20, size=5, seed=8)
    assert a == b and sa == sb
    assert [i.candidates for i in a] != [i.candidates for i in c]
    assert sa.kept + sa.no_relevant + sa.below == 40  # two judged queries x 20 samples


def test_augment_filter_and_bounds():
    insts, st = data.augment(toy_dataset(), samples=50, size=5, seed=0, min_ndcg=0.1)
    assert st.no_relevant > 0 and st.kept == len(insts)
    for inst in insts:
        assert len(inst.candidates) == 5 and len({c.docid for c in inst.candidates}) == 5
        assert any(g > 0 for g in inst.grades) and inst.r_star >= 0.1
        assert (inst.r_init, inst.r_star) == ndcg_bounds([c.docid for c in inst.candidates], inst.judged)
        assert inst.judged == {"q1": {"d0": 3, "d1": 1}, "q2": {"d0": 2}}[inst.qid]  # all positive judgments
    # a q1 set holding d1 but not d0 reaches at best 1/IDCG(3, 1) = 0.28: a 0.5 threshold on r* drops those; on
    # r_init it also drops the sets whose relevant passages sit low (d0 third: 1.5/3.63 = 0.41)
    _, best = data.augment(toy_dataset(), samples=50, size=5, seed=0, min_ndcg=0.5, filter_on="best")
    _, init = data.augment(toy_dataset(), samples=50, size=5, seed=0, min_ndcg=0.5, filter_on="init")
    assert 0 < best.below < init.below and best.no_relevant == init.no_relevant == st.no_relevant


def test_instances_jsonl_round_trip_and_errors(tmp_path):
    insts, _ = data.augment(toy_dataset(), samples=3, size=4, seed=1)
    path = tmp_path / "train.jsonl"
    data.write_instances(path, insts)
    assert data.read_instances(path) == insts
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + '{"qid": "q1"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not a training instance"):
        data.read_instances(path)
    path.write_text("{oops\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: invalid JSON"):
        data.read_instances(path)


def test_augment_command_on_dl21(data_root, tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    augment_cli.main(["--dataset", "dl21", "--samples", "2", "--size", "20", "--data-dir", str(data_root),
               "--out", str(out)])
    kept = len(data.read_instances(out))
    printed = capsys.readouterr().out
    assert f"kept {kept}, dropped {2 * 53 - kept}" in printed


# ----------------------------------------------------------------------------------------------------------------------
# Rank-R1 (setwise) training sets and reward


def test_setwise_augment_one_relevant_and_the_rest_non_relevant():
    insts, st = data.augment_setwise(toy_dataset(), samples=10, size=5, seed=3)
    assert st.kept == len(insts) == 20  # q1 (d0 has grade 3) and q2 (d0 has grade 2); q3 unjudged
    for inst in insts:
        assert len(inst.candidates) == 5 and sorted(inst.grades) == [0, 0, 0, 0, inst.judged["d0"]]
        if inst.qid == "q1":  # q1 grades d1 as 1: neither the relevant one nor a negative
            assert "d1" not in [c.docid for c in inst.candidates]
    assert len({tuple(g.index(max(g)) for g in [i.grades]) for i in insts}) > 1  # the relevant one moves around
    again, _ = data.augment_setwise(toy_dataset(), samples=10, size=5, seed=3)
    assert again == insts
    none, st = data.augment_setwise(toy_dataset(), samples=10, size=5, seed=3, min_grade=4)
    assert none == [] and st.no_relevant == 20


def test_setwise_set_reward_scores_the_pick():
    from reward import setwise_set_reward

    docids, judged = ["a", "b", "c"], {"b": 2}
    good = setwise_set_reward("<think>b fits</think> <answer>[2]</answer>", docids, judged)
    assert (good.total, good.format1, good.format2, good.ndcg) == (1.0, 1.0, 1.0, 1.0)
    wrong = setwise_set_reward("<think>a</think> <answer>[1]</answer>", docids, judged)
    assert (wrong.total, wrong.format1, wrong.format2) == (0.0, 1.0, 1.0)
    assert wrong.ndcg == pytest.approx(1 / math.log2(3))  # nothing moved: b stays second
    lazy = setwise_set_reward("<answer>[2]</answer>", docids, judged)  # right label, no reasoning: Rank-R1 gives 0
    assert (lazy.total, lazy.format1, lazy.format2, lazy.ndcg) == (0.0, 0.0, 1.0, 1.0)
    # a held-out window with two top-graded passages: either counts
    assert setwise_set_reward("<think>x</think><answer>[3]</answer>", docids, {"b": 2, "c": 2}).total == 1.0


def test_augment_command_setwise(data_root, tmp_path, capsys):
    out = tmp_path / "sw.jsonl"
    augment_cli.main(["--method", "setwise", "--dataset", "dl21", "--samples", "2", "--data-dir", str(data_root),
               "--out", str(out)])
    insts = data.read_instances(out)
    assert f"kept {len(insts)} setwise sets" in capsys.readouterr().out
    assert insts and all(len(i.candidates) == 20 and sum(g >= 2 for g in i.grades) == 1 for i in insts)
    assert all(sum(g > 0 for g in i.grades) == 1 for i in insts)


# ----------------------------------------------------------------------------------------------------------------------
# --list-format: format2 pays only for a complete permutation of the window's ids

R_CAB = (3 + 0 + 1 / log2(4)) / IDCG  # c, a, b
RANK_CAB = (R_CAB - R_INIT) / (R_STAR - R_INIT)


@pytest.mark.parametrize("text,rank,format2", [
    ("[3] > [1] > [2]", RANK_CAB, 1.0),  # RankGPT's answer: no tags, each id once
    (" [3]>[2]>[1] and then some prose [1]", 1.0, 1.0),  # what follows a complete list is not checked
    ("[1] > [2]", 0.0, 0.0),  # the prompt's example copied: the initial order, and no format credit
    ("[3] > [1]", RANK_CAB, 0.0),  # the parser appends b, but the list is not complete
    ("[3] > [1] > [3]", RANK_CAB, 0.0),  # an id twice
    ("[3] > [1] > [4]", RANK_CAB, 0.0),  # an id out of range
    ("[3] > [1] > [2] > [1]", RANK_CAB, 0.0),  # every id, one of them twice
    ("Passage [3] > [1] > [2]", RANK_CAB, 0.0),  # prose first: not an opening list
])
def test_list_format_pays_only_for_a_complete_permutation(text, rank, format2):
    r = rerank_reward(text, DOCIDS, JUDGED, list_format=True)
    assert (r.rank, r.format1, r.format2) == (pytest.approx(rank), 0.0, format2)
    assert r.total == pytest.approx(0.8 * rank + 0.1 * format2)


def test_the_papers_format2_pays_for_the_example_copy_and_list_format_does_not():
    copy, complete = answer("[1] > [2]"), answer("[3] > [2] > [1]")
    assert rerank_reward(copy, DOCIDS, JUDGED) == Reward(0.0, 1.0, 1.0, pytest.approx(0.2), pytest.approx(R_INIT))
    assert rerank_reward(copy, DOCIDS, JUDGED, list_format=True) == Reward(0.0, 1.0, 0.0, pytest.approx(0.1),
                                                                          pytest.approx(R_INIT))
    # the REARANK answer block is what is read under --list-format too: the best order scores 1 in full
    assert rerank_reward(complete, DOCIDS, JUDGED, list_format=True).total == pytest.approx(1.0)
    assert rerank_reward("<think>x</think> <answer>[3] > [2]", DOCIDS, JUDGED, list_format=True).format2 == 0.0
