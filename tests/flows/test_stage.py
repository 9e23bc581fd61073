"""The stage flow end to end in-process: Prefect server, MLflow registry (SQLite), local landing zone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.settings import PipelineSettings
from flows.stage import lifelong_stage, ppl_rows
from flows.tracking import Tracker
from loire.data import CorpusError
from tests.flows.pipeline_harness import arrive, local_world

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("stage-flow")
    data = root / "data"
    return local_world(
        root,
        documents=200,
        task_examples=24,
        steps=8,
        downstream_catalogue=str(data / "tasks.yaml"),
        downstream_data_root=str(data),
        downstream_budget=24,
        max_ap_plus=None,
        downstream_tolerance=1.0,  # 24-example fine-tuning is noise; the gates are tested in test_tracking
    )


def test_two_stages_register_lineage_promote_and_skip_duplicates(world: dict[str, Any], prefect_api: str) -> None:
    settings: PipelineSettings = world["settings"]
    wb = arrive(world, "WB")
    first = lifelong_stage(wb, settings)
    second = lifelong_stage(arrive(world, "NEWS"), settings)
    assert (first["version"], second["version"]) == ("1", "2") and second["stage"] == 2
    tracker = Tracker(tracking_uri=settings.tracking_uri)
    chain = tracker.lineage("champion")
    assert (
        second["promoted"]
        and [e["version"] for e in chain] == ["1", "2"]
        and [e["domain"] for e in chain] == ["WB", "NEWS"]
    )
    v2 = tracker.client.get_model_version("loire-lm", "2")
    assert v2.tags["loire.parent_version"] == "1" and v2.tags["loire.domain"] == "NEWS"
    assert second["downstream_average"] is not None and second["ap_plus"] is not None
    run = tracker.client.get_run(second["run_id"])
    assert {"eval/ppl/WB", "eval/ppl/NEWS", "eval/ap", "eval/ap_plus", "downstream/average"} <= set(run.data.metrics)
    assert run.data.tags["prefect.flow_run_id"]

    again = lifelong_stage(wb, settings)  # the same marker and ETag delivered again
    assert again == {"version": "1", "skipped": True}
    assert len(tracker.client.search_model_versions("name='loire-lm'")) == 2


def test_malformed_corpus_fails_the_stage_and_keeps_the_champion(
    world: dict[str, Any], prefect_api: str, tmp_path: Path
) -> None:
    settings: PipelineSettings = world["settings"]
    tracker = Tracker(tracking_uri=settings.tracking_uri)
    before = tracker.champion()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "part-0.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match=r"part-0\.jsonl.*line 2"):
        lifelong_stage(arrive(world, "REV", bad), settings)
    after = tracker.champion()
    assert (before and before.version) == (after and after.version)
    versions = tracker.client.search_model_versions("name='loire-lm'")
    assert len(versions) == (0 if before is None else int(before.version))


def test_ppl_rows_carry_ap_and_ap_plus_on_every_row() -> None:
    record = {
        "lineage": [{"domain": "WB"}, {"domain": "NEWS"}, {"domain": "REV"}],
        "ppl_matrix": [{"WB": 10.0}, {"WB": 12.0, "NEWS": 8.0}, {"WB": 9.0, "NEWS": 11.0, "REV": 6.0}],
        "ap_plus": 1.0,  # (9 - 10 + 11 - 8) / 2
    }
    rows = ppl_rows(record)
    assert [list(r) for r in rows] == [["stage", "domain", "WB", "NEWS", "REV", "AP", "AP+"]] * 3
    assert [r["AP+"] for r in rows] == ["—", 2.0, 1.0]
    assert rows[0]["NEWS"] == "" and rows[1]["AP"] == pytest.approx((12.0 * 8.0) ** 0.5, abs=0.01)


def test_ppl_rows_show_carried_domains_from_the_stage_that_carried_them() -> None:
    record = {
        "lineage": [{"domain": "WB"}, {"domain": "BIO", "carried": [{"domain": "REV", "corpus_uri": "s3://b/REV/1/"}]}],
        "ppl_matrix": [{"WB": 10.0}, {"WB": 12.0, "REV": 7.0, "BIO": 8.0}],
        "ap_plus": 2.0,
    }
    rows = ppl_rows(record)
    assert [list(r) for r in rows] == [["stage", "domain", "WB", "REV", "BIO", "AP", "AP+"]] * 2
    assert rows[1]["REV"] == 7.0 and rows[1]["AP"] == pytest.approx((12.0 * 7.0 * 8.0) ** (1 / 3), abs=0.01)
