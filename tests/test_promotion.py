"""The promotion policy (loire/promotion.py): gates in, decision and reasons out."""

import math

from loire.promotion import DEFAULT_MAX_AP_PLUS, Gates, common_averages, decide


def test_first_stage_with_no_champion_is_promoted() -> None:
    d = decide(Gates(), ap_plus=None, downstream_average=None, champion_average=None, champion=None)
    assert d.promoted and d.previous_champion is None
    assert d.reasons == [
        "pass: no AP+ (first stage)",
        "skip: downstream gate (this version's downstream average is missing)",
    ]


def test_ap_plus_over_the_bound_or_not_finite_is_rejected() -> None:
    for ap_plus in (501.0, math.nan, math.inf):
        d = decide(
            Gates(max_ap_plus=500), ap_plus=ap_plus, downstream_average=None, champion_average=None, champion="1"
        )
        assert not d.promoted and d.failures.startswith("fail: AP+")
    # the default bound means something: the AP+ 453.5 of LOIRE without replay at gpt-tiny is rejected
    default = decide(Gates(), ap_plus=453.5, downstream_average=None, champion_average=None, champion="1")
    assert Gates().max_ap_plus == DEFAULT_MAX_AP_PLUS == 100.0
    assert not default.promoted and default.failures == "fail: AP+ 453.5 > 100"
    off = decide(Gates(max_ap_plus=None), ap_plus=9e9, downstream_average=None, champion_average=None, champion="1")
    assert off.promoted and off.reasons[0].startswith("skip: AP+ gate disabled")


def test_downstream_gate_allows_the_tolerance_only() -> None:
    gates = Gates(downstream_tolerance=0.02)
    ok = decide(gates, ap_plus=10.0, downstream_average=0.69, champion_average=0.70, champion="2")
    bad = decide(gates, ap_plus=10.0, downstream_average=0.67, champion_average=0.70, champion="2")
    assert ok.promoted and ok.previous_champion == "2"
    assert not bad.promoted and bad.failures == "fail: downstream average 0.67 < champion 0.7 - 0.02"


def test_lineage_gate_only_when_the_parent_is_given() -> None:
    moved = decide(
        Gates(), ap_plus=1.0, downstream_average=None, champion_average=None, champion="3", parent_version="2"
    )
    assert not moved.promoted and moved.failures == "fail: the champion moved to v3 while this stage grew from v2"
    same = decide(
        Gates(), ap_plus=1.0, downstream_average=None, champion_average=None, champion="3", parent_version="3"
    )
    assert same.promoted and same.reasons[-1] == "pass: the champion is still v3, which this stage grew from"


def test_common_averages_compare_the_shared_tasks() -> None:
    mine = {"a": 0.5, "b": 0.7, "new": 0.1}
    theirs = {"a": 0.4, "b": 0.6, "average": 0.5, "a/std": 0.01}
    assert common_averages(mine, theirs) == (0.6, 0.5, ["a", "b"])
    assert common_averages({"x": 1.0}, theirs) == (None, None, [])
