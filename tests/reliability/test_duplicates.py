"""Duplicates and ordering of arrivals, through the real watcher, SQS queue and served stage deployment.

Semantics under test (an arrival is one version of a `_SUCCESS` marker: its key and its ETag):
- the same notification delivered twice (in one poll, or again later) starts one stage run, ever;
- a stage started by hand for an arrival that is already registered does nothing;
- the marker re-uploaded with the same bytes (same ETag) is the same arrival: nothing happens; a batch
  re-published with new data and a new marker (new ETag) is a new arrival: a new stage for that domain;
- arrivals while a stage runs wait for it, then run one at a time in arrival order, each growing from
  the one before (the served runner executes one run at a time, in scheduled order; the stage
  deployment's concurrency limit 1, ENQUEUE, backs it up);
- a marker without data files fails its stage at once with a LandingError naming the key; the registry
  is unchanged and the next arrival runs.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import unquote_plus

import pytest

from tests.flows.pipeline_harness import STAGE_DEPLOYMENT, Pipeline, pipeline_fixture

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

pipeline = pipeline_fixture(settings={"downstream_tasks": "none"})


def _take_marker_event(pipeline: Pipeline, key: str) -> str:
    """Receive (and delete) the queue's messages until the S3 notification of `key`; returns its body."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        messages = pipeline.sqs.receive_message(
            QueueUrl=pipeline.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        ).get("Messages", [])
        found = None
        for message in messages:
            pipeline.sqs.delete_message(QueueUrl=pipeline.queue_url, ReceiptHandle=message["ReceiptHandle"])
            records = json.loads(message["Body"]).get("Records", [])
            if any(unquote_plus(r["s3"]["object"]["key"]) == key for r in records):
                found = message["Body"]
        if found is not None:
            return found
    pytest.fail(f"no S3 notification for {key}")


def _stage_runs(pipeline: Pipeline, arrival_key: str) -> list[Any]:
    """Every run of the stage deployment for the marker `arrival_key` of this pipeline's bucket."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[STAGE_DEPLOYMENT.split("/")[1]]))
        )
    arrivals = [(r, r.parameters.get("arrival") or {}) for r in runs]
    return [r for r, a in arrivals if a.get("key") == arrival_key and a.get("bucket") == pipeline.bucket]


def _task_runs(run_id: str, name: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return [r for r in runs if r.name.startswith(name)]


@pytest.mark.slow  # make test covers duplicates in test_pipeline::test_duplicates_… (same bytes, SQS twice)
def test_duplicated_notifications_start_one_stage_and_a_manual_rerun_skips(pipeline: Pipeline) -> None:
    from prefect.deployments import run_deployment

    pipeline.upload("WB", "2026-01")
    body = _take_marker_event(pipeline, "landing/WB/2026-01/_SUCCESS")
    for _ in range(2):  # delivered twice, both in the next poll
        pipeline.sqs.send_message(QueueUrl=pipeline.queue_url, MessageBody=body)
    started = pipeline.watch()
    assert len(started) == 1, started
    (run,) = pipeline.wait(started)
    assert run.state.is_completed(), pipeline.describe(run)

    pipeline.sqs.send_message(QueueUrl=pipeline.queue_url, MessageBody=body)  # redelivered later, new watcher
    assert pipeline.watch() == started
    assert [str(r.id) for r in _stage_runs(pipeline, "landing/WB/2026-01/_SUCCESS")] == started
    assert pipeline.sqs.get_queue_attributes(
        QueueUrl=pipeline.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]["ApproximateNumberOfMessages"] in ("0", 0)

    # A second run for the same arrival that bypasses the watcher (no idempotency key) does nothing.
    manual = run_deployment(STAGE_DEPLOYMENT, parameters={"arrival": run.parameters["arrival"]}, timeout=0)
    (again,) = pipeline.wait([str(manual.id)])
    assert again.state.is_completed(), pipeline.describe(again)
    (version,) = pipeline.versions()
    assert again.state.result() == {"version": str(version.version), "skipped": True}


# slow (~40 s, a second real stage): make test covers the same-ETag no-op in test_pipeline::test_duplicates_…
# and exactly-once per arrival in test_watch; the new-ETag-is-a-new-stage half runs in make test-all.
@pytest.mark.slow
def test_same_etag_is_a_no_op_and_a_new_etag_is_a_new_stage(pipeline: Pipeline) -> None:
    uri = pipeline.batch_uri("WB", "2026-01")
    if not pipeline.versions(uri):  # run alone: the first arrival of the batch
        pipeline.upload("WB", "2026-01")
        assert all(r.state.is_completed() for r in pipeline.wait(pipeline.watch()))
    (first,) = pipeline.versions(uri)
    old = first.tags["loire.corpus_etag"]

    runs_before = _stage_runs(pipeline, "landing/WB/2026-01/_SUCCESS")
    assert pipeline.upload("WB", "2026-01") == old  # the same bytes again: the same arrival
    repeat = pipeline.watch()
    assert repeat == [str(r.id) for r in runs_before if r.idempotency_key]  # the watcher's run of that arrival
    assert len(_stage_runs(pipeline, "landing/WB/2026-01/_SUCCESS")) == len(runs_before)
    assert pipeline.versions(uri) == [first]

    # Re-published with new data; the producer's marker carries a manifest, so its bytes (and ETag) change.
    text = (pipeline.data / "corpora" / "news" / "train.jsonl").read_bytes()
    manifest = json.dumps({"files": {"part-0.jsonl": len(text)}, "published": "2026-01-31T00:00:00Z"}).encode()
    new = pipeline.upload("WB", "2026-01", body=text, marker=manifest)
    assert new != old
    (run,) = pipeline.wait(pipeline.watch())
    assert run.state.is_completed(), pipeline.describe(run)
    assert not run.state.result()["skipped"]
    versions = pipeline.versions(uri)
    assert [v.tags["loire.corpus_etag"] for v in versions] == [old, new]  # one version per ETag
    second = versions[1]
    assert second.tags["loire.domain"] == "WB" and second.tags["loire.parent_version"] == str(first.version)
    assert pipeline.champion() == str(second.version)


@pytest.mark.slow  # ~1.5-2 min: three stages back to back; test_pipeline's serial test covers the order
def test_arrivals_during_a_running_stage_wait_then_run_in_arrival_order(pipeline: Pipeline) -> None:
    pipeline.upload("REV", "2026-03")
    (a,) = pipeline.watch()
    pipeline.wait_while_running(a, lambda: pipeline.run_state(a).is_running(), 120, "stage REV to run", every=0.2)
    pipeline.upload("BIO", "2026-03")
    (b,) = pipeline.watch()
    pipeline.upload("NEWS", "2026-03")
    (c,) = pipeline.watch()
    time.sleep(3)  # long enough for the runner to have tried to start them
    if pipeline.run_state(a).is_running():
        assert not pipeline.run_state(b).is_running() and not pipeline.run_state(c).is_running(), "overlap"
    runs = pipeline.wait([a, b, c])
    for run in runs:
        assert run.state.is_completed(), pipeline.describe(run)
    first, second, third = runs
    assert first.end_time <= second.start_time and second.end_time <= third.start_time  # one at a time, in order
    (rev,) = pipeline.versions(pipeline.batch_uri("REV", "2026-03"))
    (bio,) = pipeline.versions(pipeline.batch_uri("BIO", "2026-03"))
    (news,) = pipeline.versions(pipeline.batch_uri("NEWS", "2026-03"))
    assert bio.tags["loire.parent_version"] == str(rev.version)  # each grew from the stage it waited for
    assert news.tags["loire.parent_version"] == str(bio.version)
    assert pipeline.champion() == str(news.version)


# slow (make test-all): bad input failing only its stage is also checked in the fast set by
# tests/flows/test_pipeline.py::test_malformed_corpus_fails_its_stage_only
@pytest.mark.slow
def test_marker_without_data_fails_its_stage_and_the_next_arrival_runs(pipeline: Pipeline) -> None:
    versions = [str(v.version) for v in pipeline.versions()]
    champion = pipeline.champion()
    pipeline.upload("CS", "empty", data=False)
    (bad,) = pipeline.wait(pipeline.watch())
    assert bad.state.is_failed(), pipeline.describe(bad)
    logs = pipeline.logs(str(bad.id))
    assert "LandingError" in logs and "landing/CS/empty/_SUCCESS: _SUCCESS without data files" in logs, logs[-3000:]
    (fetch,) = _task_runs(str(bad.id), "fetch-corpus")
    assert fetch.run_count == 1, "bad input must not be retried"
    assert [str(v.version) for v in pipeline.versions()] == versions and pipeline.champion() == champion

    pipeline.upload("CS", "2026-04")
    (good,) = pipeline.wait(pipeline.watch())
    assert good.state.is_completed(), pipeline.describe(good)
    (cs,) = pipeline.versions(pipeline.batch_uri("CS", "2026-04"))
    assert pipeline.champion() == str(cs.version)
