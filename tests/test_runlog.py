"""The step record's group figures by hand: the rank term's within-group std and the share of groups that teach
nothing (all rewards equal)."""

import pytest

from support import runlog
from reward import Reward
from grpo import StepOutcomes


def test_step_record_reports_the_rank_terms_spread_within_each_group():
    def r(rank: float, format2: float) -> Reward:
        return Reward(rank, 0.0, format2, 0.8 * rank + 0.1 * format2, 0.0)

    # group 1: two orders 0.2 apart; group 2: the same order twice, one with a complete list (rewards differ by the
    # format alone); group 3: identical completions
    seen = StepOutcomes([r(0.1, 1), r(0.3, 1), r(0.5, 0), r(0.5, 1), r(0.0, 0), r(0.0, 0)], [3] * 6, [False] * 6)
    m = runlog.step_record(1, 2, seen, 2, [0.0], {"kl": 0.0, "ratio": 1.0, "clip_frac": 0.0}, 0.0, 1e-3,
                           {"gen_s": 1.0, "train_s": 1.0, "ref_s": 0.0})
    assert m["rank_group_std"] == pytest.approx((0.2 / 2**0.5) / 3)  # unbiased std of (0.1, 0.3), then 0 and 0
    assert m["frac_zero_std"] == pytest.approx(1 / 3)  # only group 3: group 2's format differs
    assert "in-group std 0.047" in runlog.log_line(m)
