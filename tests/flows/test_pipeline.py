"""The event-driven pipeline with real components: moto S3 + SQS, `mlflow server`, a Prefect server, and the
deployments served by `python -m flows.serve` in a child process, exactly as the embedded mode runs them.

Corpora land in S3 with a `_SUCCESS` marker; the watcher reads the bucket notifications from SQS and
starts the stage deployment; the assertions read the MLflow registry and the Prefect API afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.demo import wait_flow_run
from flows.tracking import Tracker
from flows.watch import watch_corpora
from loire.synthetic import generate
from tests.flows.servers_aws import _queue_policy

pytestmark = pytest.mark.integration
STAGE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def pipeline(
    tmp_path_factory: pytest.TempPathFactory, moto_server: Any, mlflow_server: Any, prefect_api: str
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("pipeline")
    data = generate(root / "data", documents=200, task_examples=24)
    s3, sqs = moto_server.client("s3"), moto_server.client("sqs")
    bucket = f"corpora-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    queue_url = sqs.create_queue(QueueName=bucket)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps(_queue_policy(arn, bucket))})
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "suffix", "Value": "_SUCCESS"}]}},
                }
            ]
        },
    )
    model_name = f"loire-lm-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "AWS_ENDPOINT_URL": moto_server.endpoint_url,
        "LOIRE_WORK_DIR": str(root / "work"),
        "LOIRE_MODEL_NAME": model_name,
        "LOIRE_SCHEDULE": "gpt-micro",
        "LOIRE_STEPS": "8",
        "LOIRE_DEVICE": "cpu",
        "LOIRE_DOWNSTREAM_CATALOGUE": str(data / "tasks.yaml"),
        "LOIRE_DOWNSTREAM_DATA_ROOT": str(data),
        "LOIRE_DOWNSTREAM_BUDGET": "24",
        "LOIRE_DOWNSTREAM_TOLERANCE": "1.0",  # 24-example fine-tuning is noise; gates: test_tracking
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = root / "serve.log"
    with log.open("wb") as sink:
        served = subprocess.Popen(
            [sys.executable, "-m", "flows.serve"], env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=Path.cwd()
        )
    try:
        _wait_for_deployment(served, log)
        yield {
            "s3": s3,
            "sqs": sqs,
            "bucket": bucket,
            "queue_url": queue_url,
            "landing": f"s3://{bucket}/landing",
            "endpoint": moto_server.endpoint_url,
            "data": data,
            "tracker": Tracker(tracking_uri=mlflow_server.uri, model_name=model_name),
            "log": log,
        }
    finally:
        served.terminate()
        try:
            served.wait(timeout=20)
        except subprocess.TimeoutExpired:
            served.kill()


def _wait_for_deployment(served: subprocess.Popen[bytes], log: Path) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert served.poll() is None, f"flows.serve exited:\n{log.read_text()[-3000:]}"
            try:
                client.read_deployment_by_name("lifelong-stage/lifelong-stage")
                return
            except Exception:
                time.sleep(1)
    pytest.fail(f"deployments not served in time:\n{log.read_text()[-3000:]}")


def _upload(p: dict[str, Any], domain: str, batch: str, body: bytes | None = None) -> None:
    source = p["data"] / "corpora" / domain.lower() / "train.jsonl"
    key = f"landing/{domain}/{batch}"
    p["s3"].put_object(Bucket=p["bucket"], Key=f"{key}/part-0.jsonl", Body=body or source.read_bytes())
    p["s3"].put_object(Bucket=p["bucket"], Key=f"{key}/_SUCCESS", Body=b"")


def _watch(p: dict[str, Any]) -> list[str]:
    return watch_corpora(
        p["landing"], queue_url=p["queue_url"], max_polls=1, endpoint_url=p["endpoint"], wait_seconds=2
    )


def _versions(p: dict[str, Any]) -> list[Any]:
    tracker: Tracker = p["tracker"]
    found = tracker.client.search_model_versions(f"name='{tracker.model_name}'")
    return sorted(found, key=lambda v: int(v.version))


def _runs(run_ids: list[str]) -> list[Any]:
    return [wait_flow_run(run_id, STAGE_TIMEOUT_S) for run_id in run_ids]


def _logs(run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(run_id)])))
    return "\n".join(entry.message for entry in logs)


def test_wb_then_news_two_stages_lineage_champion_and_artifacts(pipeline: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _upload(pipeline, "WB", "2026-01")
    wb = _runs(_watch(pipeline))
    _upload(pipeline, "NEWS", "2026-02")
    news = _runs(_watch(pipeline))
    assert [r.state.type.value for r in wb + news] == ["COMPLETED", "COMPLETED"], _logs(str(news[0].id))
    versions = _versions(pipeline)
    assert [v.tags["loire.domain"] for v in versions] == ["WB", "NEWS"]
    assert versions[1].tags["loire.parent_version"] == "1" and versions[0].tags["loire.parent_version"] == "none"
    assert versions[1].tags["loire.corpus_uri"] == f"s3://{pipeline['bucket']}/landing/NEWS/2026-02/"
    assert pipeline["tracker"].champion().version in (2, "2")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[news[0].id]))
        )
    keys = {a.key for a in artifacts}
    assert {"lifelong-ppl", "lifelong-lineage"} <= keys, keys
    lineage = next(a for a in artifacts if a.key == "lifelong-lineage")
    assert "NEWS" in str(lineage.data) and "WB" in str(lineage.data)


def test_duplicates_start_no_second_stage(pipeline: dict[str, Any]) -> None:
    before = len(_versions(pipeline))
    # the same _SUCCESS uploaded again (same bytes, same ETag), and an SQS message delivered twice
    pipeline["s3"].put_object(Bucket=pipeline["bucket"], Key="landing/WB/2026-01/_SUCCESS", Body=b"")
    started = _watch(pipeline)
    runs = _runs(started)
    assert all(r.state.is_completed() for r in runs)
    assert len(_versions(pipeline)) == before


def test_two_domains_in_the_same_second_run_one_after_another_in_order(pipeline: dict[str, Any]) -> None:
    before = len(_versions(pipeline))
    _upload(pipeline, "REV", "2026-03")
    _upload(pipeline, "BIO", "2026-03")
    runs = _runs(_watch(pipeline))
    assert len(runs) == 2
    for r in runs:
        assert r.state.is_completed(), f"{r.state.name}: {r.state.message}\n{_logs(str(r.id))[-3000:]}"
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert first.parameters["arrival"]["domain"] == "REV"
    assert first.end_time <= second.start_time  # never overlapping (deployment concurrency limit 1, ENQUEUE)
    versions = _versions(pipeline)[before:]
    assert [v.tags["loire.domain"] for v in versions] == ["REV", "BIO"]


def test_malformed_corpus_fails_its_stage_only(pipeline: dict[str, Any]) -> None:
    versions_before = len(_versions(pipeline))
    champion_before = pipeline["tracker"].champion().version
    _upload(pipeline, "CS", "broken", body=b'{"text": "a fine line"}\n{"text": no quotes}\n')
    (bad,) = _runs(_watch(pipeline))
    assert bad.state.is_failed()
    logs = _logs(str(bad.id))
    assert "CorpusError" in logs and "part-0.jsonl" in logs and "line 2" in logs, logs[-2000:]
    assert len(_versions(pipeline)) == versions_before
    assert pipeline["tracker"].champion().version == champion_before
    _upload(pipeline, "CS", "fixed")
    (good,) = _runs(_watch(pipeline))
    assert good.state.is_completed()
    assert _versions(pipeline)[-1].tags["loire.domain"] == "CS"
