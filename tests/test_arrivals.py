"""The pure rules of rejected arrivals (loire.arrivals): what a stage owes, covers and is numbered."""

from __future__ import annotations

import pytest

from loire.arrivals import (
    LINEAGE_COLUMNS,
    Registered,
    covered,
    describe_version,
    lineage_frame,
    owed,
    parse_tag_list,
    plan,
    retry_seed,
    shares,
    should_retry,
    stage_number,
    tag_list,
)


def reg(version: int, domain: str, promoted: bool | None, carried: tuple[str, ...] = ()) -> Registered:
    return Registered(
        version=version, domain=domain, arrival=f"k-{domain}-{version}", promoted=promoted, carried=carried
    )


WB, NEWS = reg(1, "WB", True), reg(2, "NEWS", True)
REV = reg(3, "REV", False)


def test_a_rejected_arrival_is_owed_and_carried_by_the_next_stage() -> None:
    registered = [WB, NEWS, REV]
    assert owed(registered, [WB, NEWS], "k-BIO") == [REV]
    p = plan("carry", registered, [WB, NEWS], "k-BIO", "BIO", parent_stage=2)
    assert p.stage == 3 and p.carry == (REV,) and p.dropped == ()
    assert p.covers == ("WB", "NEWS", "REV", "BIO") and p.pending == ()
    assert "carrying REV (v3, not promoted)" in p.notes[0]


def test_two_rejections_in_a_row_are_both_carried_and_then_covered() -> None:
    bio = reg(4, "BIO", False, carried=(REV.arrival,))
    registered = [WB, NEWS, REV, bio]
    p = plan("carry", registered, [WB, NEWS], "k-CS", "CS", parent_stage=2)
    assert [r.domain for r in p.carry] == ["REV", "BIO"] and p.covers == ("WB", "NEWS", "REV", "BIO", "CS")
    assert p.stage == 3  # follows the champion's chain (v1 -> v2), not the count of versions
    cs = reg(5, "CS", True, carried=(REV.arrival, bio.arrival))
    assert owed([*registered, cs], [WB, NEWS, cs], "k-X") == []
    assert covered([WB, NEWS, cs]) == [WB.arrival, NEWS.arrival, REV.arrival, bio.arrival, cs.arrival]


def test_skip_drops_and_lists_what_is_still_owed() -> None:
    p = plan("skip", [WB, NEWS, REV], [WB, NEWS], "k-BIO", "BIO", parent_stage=2)
    assert p.carry == () and p.dropped == (REV,) and p.covers == ("WB", "NEWS", "BIO") and p.pending == ("REV",)
    assert "NOT trained on" in p.notes[0]


def test_undecided_versions_and_the_own_arrival_are_not_owed() -> None:
    crashed = reg(3, "REV", None)  # registered, promotion never decided: its own run finishes it
    assert owed([WB, NEWS, crashed], [WB, NEWS], "k-BIO") == []
    assert owed([WB, NEWS, REV], [WB, NEWS], REV.arrival) == []


def test_one_batch_per_domain_per_stage() -> None:
    rev2 = reg(4, "REV", False)
    p = plan("carry", [WB, NEWS, REV, rev2], [WB, NEWS], "k-BIO", "BIO", parent_stage=2)
    assert p.carry == (REV,) and p.dropped == (rev2,) and p.pending == ("REV",)
    same = plan("carry", [WB, NEWS, REV], [WB, NEWS], "k-REV-new", "REV", parent_stage=2)
    assert same.carry == () and same.pending == ("REV",)


def test_retry_re_runs_a_rejected_stage_once_with_another_seed_then_carries_it() -> None:
    assert should_retry("retry", promoted=False, attempt=1)
    assert not should_retry("retry", promoted=False, attempt=2)  # once: a rejected retry is carried instead
    assert not should_retry("retry", promoted=True, attempt=1)
    assert not should_retry("carry", promoted=False, attempt=1) and not should_retry("skip", promoted=False, attempt=1)
    assert retry_seed(7, 1) == 7 and retry_seed(7, 2) == 8
    # v3 (REV) rejected, v4 its retry (same arrival) rejected too: REV is owed once and carried like under carry
    retried = Registered(version=4, domain="REV", arrival=REV.arrival, promoted=False)
    p = plan("retry", [WB, NEWS, REV, retried], [WB, NEWS], "k-BIO", "BIO", parent_stage=2)
    assert p.carry == (REV,) and p.covers == ("WB", "NEWS", "REV", "BIO") and p.pending == ()
    # the retry promoted: the champion's chain covers the arrival, nothing is owed
    promoted = Registered(version=4, domain="REV", arrival=REV.arrival, promoted=True)
    assert owed([WB, NEWS, REV, promoted], [WB, NEWS, promoted], "k-BIO") == []


def test_small_helpers() -> None:
    assert stage_number(None) == 1 and stage_number(4) == 5
    assert tag_list([]) == "" and tag_list(["WB", "NEWS"]) == "WB,NEWS" and parse_tag_list("WB,NEWS") == ["WB", "NEWS"]
    assert parse_tag_list("") == [] and parse_tag_list(None) == []
    assert shares({"REV": 1, "BIO": 3}) == {"REV": 0.25, "BIO": 0.75}
    with pytest.raises(ValueError, match="not one of"):
        plan("maybe", [], [], "k", "WB", None)
    text = describe_version(
        stage=3, domain="BIO", ap=12.34, ap_plus=None, covers=["WB", "REV", "BIO"], carried=["REV"], decision="x"
    )
    assert text == "stage 3 BIO (+ carried REV) · AP 12.3 · AP+ - (first stage) · covers WB, REV, BIO · x"
    gated = describe_version(stage=2, domain="NEWS", ap=9.0, ap_plus=453.5, covers=["WB", "NEWS"], max_ap_plus=100)
    assert "AP+ 453.5 (gate <= 100)" in gated


def test_lineage_frame_one_row_per_version_with_dashes_for_the_unknown() -> None:
    base = dict(version=1, stage=0, domain="", corpus_uri="/bases/gpt2", etag="ab12", aliases=[], run_id="r" * 32)
    wb = dict(version=2, stage=1, domain="WB", corpus_uri="s3://b/l/WB/1/", etag="e", aliases=["champion"], run_id="x")
    chain = [{**base, "ap": None, "ap_plus": None}, {**wb, "ap": 12.5, "ap_plus": None, "covers": "WB", "pending": ""}]
    frame = lineage_frame(chain)
    assert tuple(frame.columns) == LINEAGE_COLUMNS
    assert frame["version"].tolist() == ["1", "2"] and frame["stage"].tolist() == ["0", "1"]
    assert frame["domain"].tolist() == ["-", "WB"] and frame["covers"].tolist() == ["-", "WB"]
    assert frame["run"].tolist() == ["r" * 8, "x"] and frame["aliases"].tolist() == ["", "champion"]
    assert frame["AP"].iloc[1] == 12.5 and frame["AP+"].isna().all()
