"""Arrival detection: SQS polling against moto, the watch loop, and exactly-once starts on a real Prefect server."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.asyncutils import run_coro_as_sync

from flows import watch
from flows.landing import Arrival, list_arrivals
from flows.watch import Watcher, is_io_error, poll_sqs, watch_corpora
from tests.flows.servers_aws import LandingBucket, MotoServer

pytestmark = pytest.mark.integration


def put_batch(lb: LandingBucket, folder: str, marker: bytes = b"") -> str:
    """A one-file batch under `landing/<folder>/`, marker last; returns the marker key."""
    lb.s3.put_object(Bucket=lb.bucket, Key=f"landing/{folder}/part-0.jsonl", Body=b'{"text": "x"}\n')
    lb.s3.put_object(Bucket=lb.bucket, Key=f"landing/{folder}/_SUCCESS", Body=marker)
    return f"landing/{folder}/_SUCCESS"


def queue_counts(lb: LandingBucket) -> tuple[int, int]:
    """(visible, in flight) messages of the queue."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attrs = lb.sqs.get_queue_attributes(QueueUrl=lb.queue_url, AttributeNames=names)["Attributes"]
    return int(attrs[names[0]]), int(attrs[names[1]])


class FakeStart:
    """Records starts; raises `errors` (in order) on the first calls; can check the queue while starting."""

    def __init__(self, *errors: Exception, check: Any = None) -> None:
        self.errors, self.check = list(errors), check
        self.calls: list[str] = []

    def __call__(self, arrival: Arrival, deployment: str) -> str:
        if self.check:
            self.check()
        if self.errors:
            raise self.errors.pop(0)
        self.calls.append(arrival.key)
        return f"run-{len(self.calls)}"


def sqs_watcher(lb: LandingBucket, start: FakeStart) -> Watcher:
    return Watcher(lb.landing, start=start, queue_url=lb.queue_url, s3=lb.s3, sqs=lb.sqs, wait_seconds=0)


# --- SQS ----------------------------------------------------------------------------------------------


def test_poll_sqs_one_arrival_per_marker(landing_bucket: LandingBucket) -> None:
    lb = landing_bucket
    keys = [put_batch(lb, "NEWS/b1"), put_batch(lb, "BIO/b1")]
    found = poll_sqs(lb.sqs, lb.queue_url, lb.landing, wait_seconds=1, s3=lb.s3)
    assert sorted(a.key for a, _ in found) == sorted(keys)  # the TestEvent and data files yield nothing
    assert {a.idempotency_key for a, _ in found} == {a.idempotency_key for a in list_arrivals(lb.landing, s3=lb.s3)}
    assert queue_counts(lb) == (0, 2)  # the TestEvent is deleted, the markers are in flight


def test_poll_sqs_deletes_poison_messages(landing_bucket: LandingBucket, caplog: pytest.LogCaptureFixture) -> None:
    lb = landing_bucket
    for body in ("not json", "[1]", json.dumps({"Records": [{"s3": {}}]}), json.dumps({"Records": []})):
        lb.sqs.send_message(QueueUrl=lb.queue_url, MessageBody=body)
    other = {
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": lb.bucket}, "object": {"key": "x", "eTag": "e"}},
    }
    lb.sqs.send_message(QueueUrl=lb.queue_url, MessageBody=json.dumps({"Records": [other]}))
    assert poll_sqs(lb.sqs, lb.queue_url, lb.landing, wait_seconds=1, s3=lb.s3) == []
    assert queue_counts(lb) == (0, 0)
    assert "deleting malformed SQS message" in caplog.text and "'not json'" in caplog.text
    assert "malformed S3 event record" in caplog.text


def test_message_deleted_only_after_start(landing_bucket: LandingBucket) -> None:
    lb = landing_bucket
    key = put_batch(lb, "NEWS/b1")
    seen: list[tuple[int, int]] = []  # queue counts while each start runs: the message must be in flight
    start = FakeStart(ConnectionError("API unreachable"), check=lambda: seen.append(queue_counts(lb)))
    watcher = sqs_watcher(lb, start)
    assert watcher.poll_once()  # the start fails: nothing recorded, the message is released at once
    assert (start.calls, watcher.started) == ([], {})
    assert queue_counts(lb) == (1, 0)
    assert watcher.poll_once()  # redelivered, started, then deleted
    assert start.calls == [key] and seen == [(0, 1), (0, 1)]
    assert queue_counts(lb) == (0, 0)
    assert not watcher.poll_once()


def test_non_io_error_fails_and_keeps_the_message(landing_bucket: LandingBucket) -> None:
    lb = landing_bucket
    put_batch(lb, "NEWS/b1")
    with pytest.raises(KeyError):
        sqs_watcher(lb, FakeStart(KeyError("bug"))).poll_once()
    assert sum(queue_counts(lb)) == 1


def test_duplicate_messages_start_once(landing_bucket: LandingBucket) -> None:
    lb = landing_bucket
    first = put_batch(lb, "WB/b1")
    time.sleep(0.05)
    second = put_batch(lb, "NEWS/b1")
    put_batch(lb, "WB/b1")  # same bytes again: same ETag, a duplicate notification
    start = FakeStart()
    watcher = sqs_watcher(lb, start)
    assert watcher.run(max_polls=5, idle_polls_to_stop=1) == ["run-1", "run-2"]
    assert start.calls == [first, second]  # arrival order, not key order
    assert queue_counts(lb) == (0, 0)
    put_batch(lb, "WB/b1", marker=b"again")  # new content: a new arrival
    watcher.run(max_polls=1)
    assert start.calls == [first, second, first]


class FlakySqs:
    """An SQS client proxy whose first receive fails like an unreachable endpoint."""

    def __init__(self, sqs: Any) -> None:
        self.sqs, self.failures = sqs, 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sqs, name)

    def receive_message(self, **kw: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise EndpointConnectionError(endpoint_url="http://sqs.invalid")
        return self.sqs.receive_message(**kw)


def test_watcher_survives_io_errors_while_polling(landing_bucket: LandingBucket) -> None:
    lb = landing_bucket
    key = put_batch(lb, "NEWS/b1")
    start = FakeStart()
    watcher = Watcher(lb.landing, start=start, queue_url=lb.queue_url, s3=lb.s3, sqs=FlakySqs(lb.sqs), wait_seconds=0)
    assert watcher.run(max_polls=2, poll_seconds=0) == ["run-1"]
    assert start.calls == [key]


def http_error(status: int) -> PrefectHTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/api/deployments/x/create_flow_run")
    return PrefectHTTPStatusError("error", request=request, response=httpx.Response(status, request=request))


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionError("refused"), True),
        (TimeoutError(), True),
        (httpx.ConnectTimeout("slow"), True),
        (http_error(503), True),
        (http_error(429), True),
        (http_error(404), False),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"), True),
        (
            ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject"),
            False,
        ),
        (ObjectNotFound(None), False),
        (ValueError("bad parameters"), False),
    ],
)
def test_is_io_error(exc: BaseException, expected: bool) -> None:
    assert is_io_error(exc) is expected


def test_listing_mode_local(tmp_path: Path) -> None:
    def batch(folder: str, mtime: float) -> None:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "a.txt").write_text("doc\n")
        (tmp_path / folder / "_SUCCESS").write_text("")
        os.utime(tmp_path / folder / "_SUCCESS", (mtime, mtime))

    batch("WB/b1", 2_000)
    batch("NEWS/b1", 1_000)
    start = FakeStart(OSError("flaky"))
    watcher = Watcher(str(tmp_path), start=start)
    assert watcher.run(max_polls=3, poll_seconds=0) == ["run-1", "run-2"]
    assert start.calls == ["NEWS/b1/_SUCCESS", "WB/b1/_SUCCESS"]
    batch("BIO/b1", 3_000)
    assert watcher.run(max_polls=1) == ["run-1", "run-2", "run-3"]
    assert start.calls[-1] == "BIO/b1/_SUCCESS"


# --- a real Prefect server ---------------------------------------------------------------------------


@flow(name="fake-stage")
def fake_stage(arrival: dict[str, Any]) -> str:
    return Arrival.from_params(arrival).idempotency_key


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=90):
        yield


def test_watch_corpora_exactly_once_per_arrival(
    prefect_harness: None, landing_bucket: LandingBucket, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lb = landing_bucket
    deployment_id = fake_stage.to_deployment(name="fake").apply()
    made: list[str | None] = []

    def make_s3_client(url: str | None) -> Any:  # the injection point the flow builds its clients through
        made.append(url)
        return watch.s3_client(url)

    monkeypatch.setattr(watch, "make_s3_client", make_s3_client)
    keys = [put_batch(lb, "WB/b2")]
    time.sleep(0.05)
    keys.append(put_batch(lb, "NEWS/b1"))
    put_batch(lb, "WB/b2")  # duplicate notification of the first marker

    def run(**kw: Any) -> list[str]:
        params = dict(landing=lb.landing, deployment="fake-stage/fake", endpoint_url=moto_server.endpoint_url)
        return watch_corpora(**params, wait_seconds=0, poll_seconds=0, **kw)

    first = run(queue_url=lb.queue_url, max_polls=3, idle_polls_to_stop=1)
    put_batch(lb, "NEWS/b1")  # another duplicate, for a fresh watcher with no memory
    again = run(queue_url=lb.queue_url, max_polls=3, idle_polls_to_stop=1)
    listed = run(max_polls=1)  # listing mode re-submits every arrival
    assert made and set(made) == {moto_server.endpoint_url}
    assert len(first) == 2 and again == first[1:] and sorted(listed) == sorted(first)
    assert queue_counts(lb) == (0, 0)

    async def stage_runs() -> list[Any]:
        async with get_client() as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            )

    runs = sorted(run_coro_as_sync(stage_runs()), key=lambda r: r.created)
    idempotency_keys = {a.key: a.idempotency_key for a in list_arrivals(lb.landing, s3=lb.s3)}
    assert [str(r.id) for r in runs] == first  # one run per (key, ETag), created in arrival order
    assert [r.parameters["arrival"]["key"] for r in runs] == keys  # WB/b2 arrived first
    assert [r.idempotency_key for r in runs] == [idempotency_keys[k] for k in keys]
