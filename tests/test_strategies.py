"""The strategies' data and the explicit rules run_stage applies to them."""

import dataclasses

import pytest
import torch

from loire.lifelong import _grow_exact, teacher_betas
from loire.metrics import max_abs_logit_diff
from loire.model import LoireForCausalLM
from loire.strategies import DISTILL_FRACTION, GROWTH_FREE_STD, REPLAY_RATIO, STRATEGIES
from tests.conftest import tiny_config


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


def test_the_default_loire_replays_without_teachers_and_loire_kd_distils_briefly() -> None:
    loire, kd = STRATEGIES["loire"], STRATEGIES["loire-kd"]
    assert (kd.growth, kd.distill, kd.replay_ratio) == ("exact", "all", REPLAY_RATIO)
    assert kd.distill_fraction == DISTILL_FRACTION  # the λ / mask window both use
    assert kd.growth_free_std == GROWTH_FREE_STD  # exact growth, free values drawn wider than the init range
    # the default is the paper's reading without the teachers (with replay they add nothing measurable)
    assert dataclasses.replace(loire, name="loire-kd", distill="all") == kd
    # without replay memory, distillation over the whole stage (where it earns its cost)
    private = STRATEGIES["loire-kd-noreplay"]
    assert (private.replay_ratio, private.distill, private.distill_fraction) == (0.0, "all", None)
    assert (
        dataclasses.replace(private, name="loire-kd", replay_ratio=REPLAY_RATIO, distill_fraction=DISTILL_FRACTION)
        == kd
    )
    # the operator ablation is the paper's LOIRE with only the growth changed
    for name, growth in (("loire-zero", "zero"), ("loire-random", "random")):
        assert dataclasses.replace(STRATEGIES[name], name="loire-kd", growth="exact") == kd
        assert STRATEGIES[name].growth == growth


def test_exact_growth_with_larger_free_parameters_stays_exact() -> None:
    """`growth_free_std` scales the operators' free values; the function is kept and the config's init range too."""
    torch.manual_seed(0)
    model = LoireForCausalLM(tiny_config("gpt-tiny")).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    wide = dataclasses.replace(STRATEGIES["loire"], growth_free_std=0.5)
    at_init_range = dataclasses.replace(STRATEGIES["loire"], growth_free_std=None)
    base = _grow_exact(model, {"hidden": 26, "ffn": 48}, 3, at_init_range)
    grown = _grow_exact(model, {"hidden": 26, "ffn": 48}, 3, wide)
    assert max_abs_logit_diff(model, grown, ids) < 1e-10
    assert grown.config.initializer_range == model.config.initializer_range
    spread = {n: p.detach().std().item() for n, p in grown.named_parameters()}
    narrow = {n: p.detach().std().item() for n, p in base.named_parameters()}
    assert any(spread[n] > 2 * narrow[n] for n in spread)  # some free values are drawn wider
