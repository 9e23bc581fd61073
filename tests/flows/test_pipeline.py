"""The event-driven pipeline with real components: moto S3 + SQS, `mlflow server`, a Prefect server, and the
deployments served by `python -m flows.serve` in a child process, exactly as the embedded mode runs them
(`tests.flows.pipeline_harness`).

Corpora land in S3 with a `_SUCCESS` marker; the watcher reads the bucket notifications from SQS and
starts the stage deployment; the assertions read the MLflow registry and the Prefect API afterwards.
"""

from __future__ import annotations

import pytest

from tests.flows.pipeline_harness import Pipeline, pipeline_fixture

pytestmark = pytest.mark.integration

pipeline = pipeline_fixture()


def test_wb_then_news_two_stages_lineage_champion_and_artifacts(pipeline: Pipeline) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    pipeline.upload("WB", "2026-01")
    wb = pipeline.wait(pipeline.watch())
    pipeline.upload("NEWS", "2026-02")
    news = pipeline.wait(pipeline.watch())
    assert [r.state.type.value for r in wb + news] == ["COMPLETED", "COMPLETED"], pipeline.describe(news[0])
    versions = pipeline.versions()
    assert [v.tags["loire.domain"] for v in versions] == ["WB", "NEWS"]
    assert versions[1].tags["loire.parent_version"] == "1" and versions[0].tags["loire.parent_version"] == "none"
    assert versions[1].tags["loire.corpus_uri"] == pipeline.batch_uri("NEWS", "2026-02")
    assert pipeline.champion() == "2"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[news[0].id]))
        )
    keys = {a.key for a in artifacts}
    assert {"lifelong-ppl", "lifelong-lineage"} <= keys, keys
    lineage = next(a for a in artifacts if a.key == "lifelong-lineage")
    assert "NEWS" in str(lineage.data) and "WB" in str(lineage.data)


def test_duplicates_start_no_second_stage(pipeline: Pipeline) -> None:
    before = len(pipeline.versions())
    # the same _SUCCESS uploaded again (same bytes, same ETag), and an SQS message delivered twice
    pipeline.s3.put_object(Bucket=pipeline.bucket, Key="landing/WB/2026-01/_SUCCESS", Body=b"")
    runs = pipeline.wait(pipeline.watch())
    assert all(r.state.is_completed() for r in runs)
    assert len(pipeline.versions()) == before


# slow (make test-all): the arrival-order promise is also checked in the fast set by
# tests/reliability/test_duplicates.py::test_arrivals_during_a_running_stage_wait_then_run_in_arrival_order
@pytest.mark.slow
def test_two_domains_in_the_same_second_run_one_after_another_in_order(pipeline: Pipeline) -> None:
    before = len(pipeline.versions())
    pipeline.upload("REV", "2026-03")
    pipeline.upload("BIO", "2026-03")
    runs = pipeline.wait(pipeline.watch())
    assert len(runs) == 2
    for r in runs:
        assert r.state.is_completed(), pipeline.describe(r)
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert first.parameters["arrival"]["domain"] == "REV"
    assert first.end_time <= second.start_time  # never overlapping (deployment concurrency limit 1, ENQUEUE)
    versions = pipeline.versions()[before:]
    assert [v.tags["loire.domain"] for v in versions] == ["REV", "BIO"]


@pytest.mark.slow  # ~1 min; the library and landing tests cover malformed corpora in make test
def test_malformed_corpus_fails_its_stage_only(pipeline: Pipeline) -> None:
    versions_before = len(pipeline.versions())
    champion_before = pipeline.champion()
    pipeline.upload("CS", "broken", body=b'{"text": "a fine line"}\n{"text": no quotes}\n')
    (bad,) = pipeline.wait(pipeline.watch())
    assert bad.state.is_failed()
    logs = pipeline.logs(str(bad.id))
    assert "CorpusError" in logs and "part-0.jsonl" in logs and "line 2" in logs, logs[-2000:]
    assert len(pipeline.versions()) == versions_before
    assert pipeline.champion() == champion_before
    pipeline.upload("CS", "fixed")
    (good,) = pipeline.wait(pipeline.watch())
    assert good.state.is_completed()
    assert pipeline.versions()[-1].tags["loire.domain"] == "CS"
