"""S3 faults at the client edge: vanished objects, throttling, 5xx storms, objects over the size cap.

Faults are injected into the real botocore client that `flows.landing.s3_client` builds (its production
retry configuration), with botocore event hooks: `before-send` answers a request with a canned
`AWSResponse` (503 SlowDown, 500) instead of sending it, `before-parameter-build` / `after-call` act between
the pipeline's calls (deleting an object, shrinking the size HEAD reports). botocore's backoff sleeps
are recorded instead of slept, so the tests check the retry policy without waiting for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import botocore.endpoint
import pytest
from botocore.awsrequest import AWSResponse
from botocore.client import BaseClient

import flows.landing
from flows.landing import (
    AWS_RETRIES,
    FETCH_MANIFEST,
    Arrival,
    LandingError,
    LandingUnavailable,
    arrival_from_event,
    fetch_batch,
    list_arrivals,
    s3_client,
)
from flows.watch import is_io_error
from tests.flows.servers_aws import LandingBucket, MotoServer

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

FOLDER = "landing/NEWS/b1/"
SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
INTERNAL = b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"


def jsonl(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def put_batch(lb: LandingBucket, files: dict[str, bytes], marker: bytes = b"", folder: str = FOLDER) -> str:
    for name, body in files.items():
        lb.s3.put_object(Bucket=lb.bucket, Key=folder + name, Body=body)
    lb.s3.put_object(Bucket=lb.bucket, Key=folder + "_SUCCESS", Body=marker)  # the trigger, last
    return folder + "_SUCCESS"


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


class Fault:
    """A `before-send` hook: the first `times` requests of `operation` (for `key`, if given) get an error
    answer without reaching the server. `sent` lists the keys of every request of that operation."""

    def __init__(
        self, s3: BaseClient, operation: str, status: int, body: bytes = b"", *, times: int, key: str | None = None
    ) -> None:
        self.status, self.body, self.times, self.key = status, body, times, key
        self.sent: list[str] = []
        self.injected = 0
        s3.meta.events.register(f"before-send.s3.{operation}", self)

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        path = unquote(request.url.split("?")[0])
        self.sent.append(path)
        if (self.key is not None and not path.endswith("/" + self.key)) or self.injected >= self.times:
            return None
        self.injected += 1
        return AWSResponse(request.url, self.status, {"Content-Type": "application/xml"}, _Body(self.body))

    def count(self, key: str) -> int:
        return sum(path.endswith("/" + key) for path in self.sent)


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """botocore's retry backoff (and the landing's own re-read loop) recorded instead of slept."""
    sleeps: list[float] = []

    class FakeTime:
        sleep = staticmethod(sleeps.append)

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    monkeypatch.setattr(botocore.endpoint, "time", FakeTime())
    monkeypatch.setattr(flows.landing, "time", FakeTime())
    return sleeps


@pytest.fixture
def s3(moto_server: MotoServer) -> BaseClient:
    """A client as the pipeline builds it (standard retries, AWS_RETRIES retries), its own event hooks."""
    return s3_client(moto_server.endpoint_url)


def notified_arrivals(lb: LandingBucket) -> list[Arrival]:
    """Arrivals of the S3 notifications waiting in the landing queue (as the watcher reads them)."""
    found = []
    for _ in range(10):
        messages = lb.sqs.receive_message(QueueUrl=lb.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in messages.get("Messages", []):
            lb.sqs.delete_message(QueueUrl=lb.queue_url, ReceiptHandle=message["ReceiptHandle"])
            for record in json.loads(message["Body"]).get("Records", []):
                if (arrival := arrival_from_event(record, lb.landing)) is not None:
                    found.append(arrival)
        if found:
            return found
    raise AssertionError("no S3 notification reached the queue")


# --- objects that vanish ------------------------------------------------------------------------------


def test_object_vanishing_between_notification_and_read_fails_that_arrival_only(
    landing_bucket: LandingBucket, s3: BaseClient, tmp_path: Path
) -> None:
    lb = landing_bucket
    put_batch(lb, {"a.jsonl": jsonl("first"), "b.jsonl": jsonl("second")})
    (arrival,) = notified_arrivals(lb)

    def delete_b_first(params: dict[str, Any], **_: Any) -> None:  # the producer deletes b.jsonl mid-fetch
        if params["Key"] == FOLDER + "b.jsonl":
            lb.s3.delete_object(Bucket=lb.bucket, Key=params["Key"])

    s3.meta.events.register("before-parameter-build.s3.GetObject", delete_b_first)
    cache = tmp_path / "cache"
    with pytest.raises(LandingError, match=r"^landing/NEWS/b1/b\.jsonl: object disappeared after listing$"):
        fetch_batch(arrival, cache / "first", s3=s3)
    assert files_under(tmp_path) == []  # a.jsonl was downloaded into a temporary folder, now removed
    s3.meta.events.unregister("before-parameter-build.s3.GetObject", delete_b_first)

    # The producer repairs the batch and writes a new marker: a new arrival, which fetches completely.
    put_batch(lb, {"b.jsonl": jsonl("second, again")}, marker=b"2")
    (again,) = notified_arrivals(lb)
    assert again.key == arrival.key and again.etag != arrival.etag
    dest = fetch_batch(again, cache / "second", s3=s3)
    assert files_under(dest) == [FETCH_MANIFEST, "a.jsonl", "b.jsonl"]
    assert (dest / "b.jsonl").read_bytes() == jsonl("second, again")

    # A marker deleted after its notification: that arrival fails naming the marker, nothing is written.
    gone = put_batch(lb, {"c.jsonl": jsonl("third")}, folder="landing/NEWS/b2/")
    (late,) = notified_arrivals(lb)
    lb.s3.delete_object(Bucket=lb.bucket, Key=gone)
    with pytest.raises(LandingError, match=r"^landing/NEWS/b2/_SUCCESS: marker is gone$"):
        fetch_batch(late, cache / "third", s3=s3)
    assert not (cache / "third").exists() and files_under(cache) == files_under(tmp_path / "cache")


# --- throttling and server errors ---------------------------------------------------------------------


def test_throttling_and_5xx_are_retried_with_backoff_then_succeed(
    landing_bucket: LandingBucket, s3: BaseClient, tmp_path: Path, slept: list[float]
) -> None:
    lb = landing_bucket
    files = {"a.jsonl": jsonl("first"), "b.jsonl": jsonl("second")}
    marker = put_batch(lb, files)
    (arrival,) = list_arrivals(lb.landing, s3=lb.s3)
    gets = Fault(s3, "GetObject", 503, SLOW_DOWN, times=3, key=FOLDER + "a.jsonl")
    heads = Fault(s3, "HeadObject", 500, times=1, key=marker)
    lists = Fault(s3, "ListObjectsV2", 503, SLOW_DOWN, times=2)

    dest = fetch_batch(arrival, tmp_path / "d", s3=s3)

    assert files_under(dest) == [FETCH_MANIFEST, "a.jsonl", "b.jsonl"]
    assert all((dest / name).read_bytes() == body for name, body in files.items())
    assert (gets.count(FOLDER + "a.jsonl"), gets.count(FOLDER + "b.jsonl")) == (4, 1)  # 3 failures, then OK
    assert heads.count(marker) == 2 and len(lists.sent) == 3
    assert len(slept) == 3 + 1 + 2  # one backoff before every retry
    assert all(0 <= s <= 20 for s in slept)


@pytest.mark.parametrize(
    ("operation", "status", "body", "key", "reason"),
    [
        ("GetObject", 503, SLOW_DOWN, FOLDER + "b.jsonl", "SlowDown: Please reduce your request rate."),
        ("GetObject", 500, INTERNAL, FOLDER + "b.jsonl", "InternalError: We encountered an internal error."),
        ("HeadObject", 503, b"", FOLDER + "b.jsonl", "503: Service Unavailable"),
        ("HeadObject", 500, b"", FOLDER + "_SUCCESS", "500: Internal Server Error"),
        ("ListObjectsV2", 503, SLOW_DOWN, None, "SlowDown: Please reduce your request rate."),
    ],
    ids=["get-503", "get-500", "head-object-503", "head-marker-500", "list-503"],
)
def test_persistent_5xx_fails_clearly_after_bounded_retries_leaving_nothing(
    landing_bucket: LandingBucket,
    s3: BaseClient,
    tmp_path: Path,
    slept: list[float],
    operation: str,
    status: int,
    body: bytes,
    key: str | None,
    reason: str,
) -> None:
    lb = landing_bucket
    put_batch(lb, {"a.jsonl": jsonl("first"), "b.jsonl": jsonl("second")})
    (arrival,) = list_arrivals(lb.landing, s3=lb.s3)
    fault = Fault(s3, operation, status, body, times=10**6, key=key)
    dest = tmp_path / "cache" / "d"

    with pytest.raises(LandingUnavailable) as info:
        fetch_batch(arrival, dest, s3=s3)

    named = key or FOLDER
    attempts = AWS_RETRIES + 1
    expected = f"'{named}': S3 {operation} still failing after {attempts} attempt(s) ({reason})"
    assert str(info.value) == expected
    assert (fault.count(key) if key else len(fault.sent)) == attempts and len(slept) == AWS_RETRIES
    assert isinstance(info.value, OSError) and is_io_error(info.value)  # the stage's fetch task retries it
    assert files_under(tmp_path) == [] and not dest.exists()  # no partial folder: a.jsonl's download is gone

    s3.meta.events.unregister(f"before-send.s3.{operation}", fault)  # S3 recovers: the retry fetches all
    assert files_under(fetch_batch(arrival, dest, s3=s3)) == [FETCH_MANIFEST, "a.jsonl", "b.jsonl"]


# --- objects over the size cap ------------------------------------------------------------------------


def test_oversized_object_is_refused_before_any_byte_is_downloaded(
    landing_bucket: LandingBucket, s3: BaseClient, tmp_path: Path
) -> None:
    lb = landing_bucket
    put_batch(lb, {"a-huge.jsonl": b"x" * (3 * 1024**2), "b.jsonl": jsonl("small")})
    (arrival,) = list_arrivals(lb.landing, s3=lb.s3)
    gets = Fault(s3, "GetObject", 500, times=0)  # counts GETs, injects nothing
    with pytest.raises(LandingError, match=r"^landing/NEWS/b1/a-huge\.jsonl: 3145728 bytes, over max_object_bytes"):
        fetch_batch(arrival, tmp_path / "d", s3=s3, max_object_bytes=1024**2)
    assert gets.sent == []  # refused on the size HEAD reported: not one GET
    assert files_under(tmp_path) == []


def test_object_larger_than_its_head_said_is_cut_off_at_the_cap(
    landing_bucket: LandingBucket, s3: BaseClient, tmp_path: Path
) -> None:
    """An object replaced by a bigger one between HEAD and GET (with the same ETag: a lying server)."""
    lb = landing_bucket
    size = 8 * 1024**2
    put_batch(lb, {"a.jsonl": b"x" * size})
    (arrival,) = list_arrivals(lb.landing, s3=lb.s3)

    def shrink(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ContentLength"] = 10

    read: list[int] = []

    def count_body(parsed: dict[str, Any], **_: Any) -> None:
        body = parsed["Body"]
        original = body.read

        def counted(n: int | None = None) -> bytes:
            chunk = original(n)
            read.append(len(chunk))
            return chunk

        body.read = counted

    s3.meta.events.register("after-call.s3.HeadObject", shrink)
    s3.meta.events.register("after-call.s3.GetObject", count_body)
    cap = 1024**2 + 1
    with pytest.raises(LandingError, match=rf"^landing/NEWS/b1/a\.jsonl: over max_object_bytes={cap}$"):
        fetch_batch(arrival, tmp_path / "d", s3=s3, max_object_bytes=cap)
    assert sum(read) <= cap + flows.landing._CHUNK < size  # the transfer stopped at the cap
    assert files_under(tmp_path) == []
