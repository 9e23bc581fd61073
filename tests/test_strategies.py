"""The strategies' data and the explicit rules run_stage applies to them."""

import dataclasses

import pytest

from loire.lifelong import teacher_betas
from loire.strategies import DISTILL_FRACTION, REPLAY_RATIO, STRATEGIES


def test_token_kd_keeps_the_schedules_total_teacher_weight() -> None:
    """β = (4/3,)*3 at stage 4: token-kd's one teacher (the previous stage) gets Σβ = 4, never a silent 1."""
    assert teacher_betas((4 / 3,) * 3, 3, [2]) == pytest.approx((4.0,))
    assert teacher_betas((1.0, 2.0, 1.0), 3, [0, 1, 2]) == pytest.approx((1.0, 2.0, 1.0))
    assert teacher_betas((1.0, 3.0), 2, [1]) == pytest.approx((4.0,))


def test_uniform_and_past_the_schedule() -> None:
    assert teacher_betas(None, 3, [0, 1, 2]) is None  # uniform 1/n, total 1
    # a stage past the schedule's end reuses the last spec (2 weights) with 3 earlier stages: Σβ split uniformly
    assert teacher_betas((2.0, 2.0), 3, [0, 1, 2]) == pytest.approx((4 / 3,) * 3)
    assert teacher_betas((2.0, 2.0), 2, []) is None


def test_the_default_loire_replays_and_distils_briefly() -> None:
    loire = STRATEGIES["loire"]
    assert (loire.growth, loire.distill, loire.replay_ratio) == ("exact", "all", REPLAY_RATIO)
    assert loire.distill_fraction == DISTILL_FRACTION
    # the operator ablation is the same schedule with only the growth changed
    for name, growth in (("loire-zero", "zero"), ("loire-random", "random")):
        assert dataclasses.replace(STRATEGIES[name], name="loire", growth="exact") == loire
        assert STRATEGIES[name].growth == growth
