"""The landing zone: marker keys, listing arrivals (S3 via moto, local), S3 events, fetching batches."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from flows.landing import (
    DATA_SUFFIXES,
    FETCH_MANIFEST,
    Arrival,
    LandingError,
    arrival_from_event,
    fetch_batch,
    list_arrivals,
    parse_landing,
    parse_marker_key,
    s3_client,
)
from tests.flows.servers_aws import LandingBucket, MotoServer

pytestmark = pytest.mark.integration


def put(s3: BaseClient, bucket: str, key: str, body: bytes = b"") -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def put_batch(lb: LandingBucket, folder: str, files: dict[str, bytes], marker: bytes = b"") -> str:
    """Upload a batch under `landing/<folder>/`, marker last; returns the marker key."""
    for name, body in files.items():
        put(lb.s3, lb.bucket, f"landing/{folder}/{name}", body)
    put(lb.s3, lb.bucket, f"landing/{folder}/_SUCCESS", marker)
    return f"landing/{folder}/_SUCCESS"


def jsonl(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


# --- marker keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "prefix", "expected"),
    [
        ("landing/news/2026-01-05/_SUCCESS", "landing", ("NEWS", "2026-01-05")),
        ("a/b/c/BIO/dt=2026-01-05/_SUCCESS", "a/b/c/", ("BIO", "dt=2026-01-05")),
        ("WB/batch_1.v2/_SUCCESS", "", ("WB", "batch_1.v2")),
        (f"landing/{'D' * 64}/{'b' * 64}/_SUCCESS", "landing", ("D" * 64, "b" * 64)),
    ],
)
def test_parse_marker_key_accepts_good_keys(key: str, prefix: str, expected: tuple[str, str]) -> None:
    assert parse_marker_key(key, prefix) == expected


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("landing/../NEWS/b1/_SUCCESS", "'..'"),
        ("landing/NEWS/../_SUCCESS", "'..'"),
        ("landing/NEWS/./_SUCCESS", "'..'"),
        ("/landing/NEWS/b1/_SUCCESS", "absolute"),
        ("landing//NEWS/b1/_SUCCESS", "empty path segment"),
        ("landing/NEWS/b1\x00/_SUCCESS", "non-printable"),
        ("landing/NEWS/b1\n/_SUCCESS", "non-printable"),
        ("landing/NEWS/b\u202e1/_SUCCESS", "non-printable"),  # right-to-left override
        (f"landing/NEWS/{'x' * 2048}/_SUCCESS", "longer than 1024 bytes"),
        ("landing/NEWS/_SUCCESS", "expected <prefix>/<domain>/<batch>/_SUCCESS"),
        ("landing/NEWS/b1/extra/_SUCCESS", "expected <prefix>/<domain>/<batch>/_SUCCESS"),
        ("landing/NEWS/b1/_SUCCESS.tmp", "expected <prefix>/<domain>/<batch>/_SUCCESS"),
        ("other/NEWS/b1/_SUCCESS", "not under prefix"),
        ("landing/-NEWS/b1/_SUCCESS", "domain '-NEWS' must match"),
        ("landing/NEWS/b 1/_SUCCESS", "batch 'b 1' must match"),
        (f"landing/NEWS/{'b' * 65}/_SUCCESS", "must match"),
        ("", "empty"),
    ],
)
def test_parse_marker_key_rejects_bad_keys(key: str, reason: str) -> None:
    with pytest.raises(LandingError, match="marker key") as info:
        parse_marker_key(key, "landing")
    message = str(info.value)
    assert reason in message
    assert repr(key[:40])[:-1] in message  # the key is named (repr, truncated)
    assert len(message) < 400


def test_parse_landing() -> None:
    assert parse_landing("s3://bkt/a/b/").uri == "s3://bkt/a/b"
    assert parse_landing("s3://bkt").key_prefix == ""
    assert parse_landing("file:///tmp/x").root == "/tmp/x"
    for bad in ("s3://B/x", "s3://bkt/a//b", "gs://bkt/x", "s3://bkt/../x", ""):
        with pytest.raises(LandingError):
            parse_landing(bad)


def test_data_suffixes_match_loire_data() -> None:
    from loire.data import ACCEPTED_SUFFIXES

    assert set(DATA_SUFFIXES) == set(ACCEPTED_SUFFIXES)


# --- listing ----------------------------------------------------------------------------------------


def test_list_arrivals_s3_etag_size_order(landing_bucket: LandingBucket, caplog: pytest.LogCaptureFixture) -> None:
    lb = landing_bucket
    late_key = put_batch(lb, "wb/b2", {"part-0.jsonl": jsonl("a"), "sub/part-1.txt": b"hello\n", "README.md": b"x"})
    put(lb.s3, lb.bucket, "landing/NEWS/_SUCCESS")  # wrong depth: logged, skipped
    put(lb.s3, lb.bucket, "landing/NEWS/b1/notes/_SUCCESS")  # too deep
    time.sleep(1.1)  # S3 listings have one-second LastModified; make the order unambiguous
    early_key = put_batch(lb, "NEWS/b1", {"p.jsonl.gz": b"\x1f\x8b" + b"0" * 10}, marker=b"done")
    # `late_key` sorts before `early_key` by name but was written first: time wins.
    with caplog.at_level(logging.WARNING):
        arrivals = list_arrivals(lb.landing, s3=lb.s3)
    assert [a.key for a in arrivals] == [late_key, early_key]
    assert "landing/NEWS/_SUCCESS" in caplog.text and "landing/NEWS/b1/notes/_SUCCESS" in caplog.text
    wb, news = arrivals
    assert (wb.domain, wb.batch, news.domain, news.batch) == ("WB", "b2", "NEWS", "b1")
    assert wb.etag == lb.s3.head_object(Bucket=lb.bucket, Key=late_key)["ETag"].strip('"')
    assert '"' not in news.etag and news.etag != wb.etag
    assert wb.size == len(jsonl("a")) + len(b"hello\n")  # data files only, nested included
    assert news.size == 12
    assert wb.batch_uri == f"s3://{lb.bucket}/landing/wb/b2/"
    assert wb.idempotency_key == f"{lb.bucket}/{late_key}@{wb.etag}"
    assert wb.arrived_at < news.arrived_at
    assert wb.landing == lb.landing and wb.bucket == lb.bucket


def test_list_arrivals_empty_prefix(landing_bucket: LandingBucket) -> None:
    lb = landing_bucket
    put(lb.s3, lb.bucket, "BIO/b1/x.txt", b"doc\n")
    put(lb.s3, lb.bucket, "BIO/b1/_SUCCESS")
    [arrival] = list_arrivals(f"s3://{lb.bucket}", s3=lb.s3)
    assert (arrival.key, arrival.batch_uri) == ("BIO/b1/_SUCCESS", f"s3://{lb.bucket}/BIO/b1/")


def make_local_batch(root: Path, folder: str, files: dict[str, bytes], mtime: float | None = None) -> Path:
    batch = root / folder
    batch.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (batch / name).parent.mkdir(parents=True, exist_ok=True)
        (batch / name).write_bytes(body)
    (batch / "_SUCCESS").write_text("")
    if mtime is not None:
        os.utime(batch / "_SUCCESS", (mtime, mtime))
    return batch


def test_list_arrivals_local(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_local_batch(tmp_path, "rev/b2", {"a.txt": b"one\n\ntwo\n"}, mtime=1_000)
    make_local_batch(tmp_path, "BIO/b1", {"a.jsonl": jsonl("x"), ".hidden.jsonl": b"junk"}, mtime=2_000)
    make_local_batch(tmp_path, "CS/b 1", {"a.txt": b"x"})  # invalid batch name
    with caplog.at_level(logging.WARNING):
        arrivals = list_arrivals(str(tmp_path))
    assert "CS/b 1/_SUCCESS" in caplog.text
    assert [(a.domain, a.batch, a.key, a.arrived_at) for a in arrivals] == [
        ("REV", "b2", "rev/b2/_SUCCESS", 1_000),
        ("BIO", "b1", "BIO/b1/_SUCCESS", 2_000),
    ]
    rev, bio = arrivals
    assert rev.bucket is None and rev.landing == str(tmp_path)
    assert rev.batch_uri == str(tmp_path / "rev" / "b2")
    assert rev.idempotency_key == f"local:{tmp_path}/rev/b2/_SUCCESS@{rev.etag}"
    assert bio.size == len(jsonl("x"))  # hidden files are not data
    # The ETag is deterministic, and changes with the batch's content.
    assert [a.etag for a in list_arrivals(str(tmp_path))] == [rev.etag, bio.etag]
    (tmp_path / "rev/b2/a.txt").write_bytes(b"one\n\ntwo\nthree\n")
    assert list_arrivals(str(tmp_path))[0].etag != rev.etag


def test_arrival_params_round_trip(tmp_path: Path) -> None:
    arrival = Arrival("s3://bkt/landing", "bkt", "landing/NEWS/b1/_SUCCESS", "abc", "NEWS", "b1", 12.5, 7)
    params = json.loads(json.dumps(arrival.to_params()))
    assert Arrival.from_params(params) == arrival
    for bad in (
        {**params, "key": "landing/NEWS/../_SUCCESS"},
        {**params, "domain": "BIO"},
        {**params, "extra": 1},
        {k: v for k, v in params.items() if k != "etag"},
    ):
        with pytest.raises(LandingError):
            Arrival.from_params(bad)


# --- S3 events --------------------------------------------------------------------------------------


def record(key: str, bucket: str = "bkt", **obj: Any) -> dict[str, Any]:
    return {
        "eventName": "ObjectCreated:Put",
        "eventTime": "2026-01-05T10:00:00.250Z",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, **obj}},
    }


def test_arrival_from_event_decodes_keys() -> None:
    arrival = arrival_from_event(record("landing%2FNEWS%2Fdt%3D2026-01-05%2F_SUCCESS", eTag='"e1"'), "s3://bkt/landing")
    assert arrival is not None
    assert (arrival.key, arrival.domain, arrival.batch, arrival.etag) == (
        "landing/NEWS/dt=2026-01-05/_SUCCESS",
        "NEWS",
        "dt=2026-01-05",
        "e1",
    )
    assert arrival.arrived_at == pytest.approx(1767607200.25)
    assert arrival.size is None
    # `+` is an encoded space (quote_plus), here inside the prefix.
    spaced = arrival_from_event(record("my+landing%2FWB%2Fb1%2F_SUCCESS", eTag="e2"), "s3://bkt/my landing")
    assert spaced is not None and spaced.key == "my landing/WB/b1/_SUCCESS"


@pytest.mark.parametrize(
    "rec",
    [
        record("landing%2FNEWS%2Fb1%2Fpart-0.jsonl", eTag="e"),  # data file, not a marker
        record("other%2FNEWS%2Fb1%2F_SUCCESS", eTag="e"),  # outside the prefix
        record("landing%2FNEWS%2F..%2F_SUCCESS", eTag="e"),  # invalid marker
        record("landing%2FNEWS%2Fb1%2F_SUCCESS", bucket="elsewhere", eTag="e"),
        {**record("landing%2FNEWS%2Fb1%2F_SUCCESS", eTag="e"), "eventName": "ObjectRemoved:Delete"},
    ],
)
def test_arrival_from_event_ignores_other_records(rec: dict[str, Any]) -> None:
    assert arrival_from_event(rec, "s3://bkt/landing") is None


@pytest.mark.parametrize("rec", [{}, {"s3": {"bucket": {"name": "bkt"}}}, "nonsense", {"s3": None}])
def test_arrival_from_event_rejects_malformed_records(rec: Any) -> None:
    with pytest.raises(LandingError, match="malformed S3 event record"):
        arrival_from_event(rec, "s3://bkt/landing")


def test_arrival_from_real_notification(landing_bucket: LandingBucket) -> None:
    """moto's notification: a TestEvent first, then the marker with a quote_plus-encoded key."""
    lb = landing_bucket
    key = put_batch(lb, "NEWS/dt=2026-01-05", {"a.jsonl": jsonl("x")}, marker=b"ok")
    messages = lb.sqs.receive_message(QueueUrl=lb.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
    bodies = [json.loads(m["Body"]) for m in messages]
    assert bodies[0]["Event"] == "s3:TestEvent" and len(bodies) == 2  # data files are filtered out by suffix
    [rec] = bodies[1]["Records"]
    assert "%2F" in rec["s3"]["object"]["key"] and "%3D" in rec["s3"]["object"]["key"]
    arrival = arrival_from_event(rec, lb.landing, s3=lb.s3)
    [listed] = list_arrivals(lb.landing, s3=lb.s3)
    assert arrival is not None and arrival.key == key
    assert arrival.idempotency_key == listed.idempotency_key
    # Without an eTag in the record, a HEAD supplies it.
    del rec["s3"]["object"]["eTag"]
    assert arrival_from_event(rec, lb.landing, s3=lb.s3).etag == listed.etag  # type: ignore[union-attr]


# --- fetching ---------------------------------------------------------------------------------------


def only_arrival(lb: LandingBucket) -> Arrival:
    [arrival] = list_arrivals(lb.landing, s3=lb.s3)
    return arrival


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_batch_s3_downloads_data_files(landing_bucket: LandingBucket, tmp_path: Path) -> None:
    from loire.data import load_corpus

    lb = landing_bucket
    files = {
        "part-0.jsonl": jsonl("first document", "second document"),
        "deep/part-1.txt": b"third document\n\nfourth document\n",
        ".hidden.jsonl": b"not json",
        "_meta.jsonl": b"not json",
        "README.md": b"# not data",
    }
    put_batch(lb, "NEWS/b1", files)
    dest = tmp_path / "cache" / "NEWS-b1"
    assert fetch_batch(only_arrival(lb), dest, s3=lb.s3) == dest
    assert leftovers(dest) == sorted([FETCH_MANIFEST, "deep", "part-0.jsonl"])
    assert (dest / "deep/part-1.txt").read_bytes() == files["deep/part-1.txt"]
    assert leftovers(dest.parent) == ["NEWS-b1"]  # no temporary folder left behind
    corpus = load_corpus(str(dest), valid_fraction=0.0)
    assert sorted(corpus.train) == ["first document", "fourth document", "second document", "third document"]
    # A complete earlier download of the same arrival is reused (no S3 access needed).
    lb.s3.delete_object(Bucket=lb.bucket, Key="landing/NEWS/b1/part-0.jsonl")
    assert fetch_batch(only_arrival(lb), dest, s3=lb.s3) == dest


def test_a_truncated_gzip_landed_is_rejected_as_corrupt(landing_bucket: LandingBucket, tmp_path: Path) -> None:
    """The stage's validation names the landed object and says it is truncated: not read as a short corpus."""
    import gzip

    from flows.stage import validate_corpus
    from loire.data import CorpusError

    lb = landing_bucket
    data = gzip.compress(b"a document of the stream\n\n" * 2000)
    put_batch(lb, "NEWS/b1", {"part-0.jsonl": jsonl("a good file"), "part-1.txt.gz": data[: len(data) // 2]})
    arrival = only_arrival(lb)
    dest = fetch_batch(arrival, tmp_path / "cache", s3=lb.s3)
    with pytest.raises(CorpusError) as info:
        validate_corpus.fn(str(dest), arrival.batch_uri)
    assert str(info.value).startswith(f"s3://{lb.bucket}/landing/NEWS/b1/part-1.txt.gz, line ")
    assert "corrupt gzip data: truncated" in str(info.value)


def test_fetch_batch_refuses_objects_over_the_cap_atomically(landing_bucket: LandingBucket, tmp_path: Path) -> None:
    lb = landing_bucket
    put_batch(lb, "NEWS/b1", {"a.jsonl": jsonl("small"), "b.jsonl": jsonl("x" * 500)})
    dest = tmp_path / "NEWS-b1"
    with pytest.raises(LandingError, match=r"landing/NEWS/b1/b\.jsonl: \d+ bytes, over max_object_bytes=100"):
        fetch_batch(only_arrival(lb), dest, s3=lb.s3, max_object_bytes=100)
    assert leftovers(tmp_path) == []  # `a.jsonl` was downloaded, but into a removed temporary folder
    with pytest.raises(LandingError, match="more than max_files=1"):
        fetch_batch(only_arrival(lb), dest, s3=lb.s3, max_files=1)


def test_fetch_batch_marker_without_data(landing_bucket: LandingBucket, tmp_path: Path) -> None:
    lb = landing_bucket
    put_batch(lb, "NEWS/b1", {"_meta.json": b"{}", "notes.md": b"x"})
    with pytest.raises(LandingError, match="landing/NEWS/b1/_SUCCESS: _SUCCESS without data files"):
        fetch_batch(only_arrival(lb), tmp_path / "d", s3=lb.s3)


class DeleteOnHead:
    """An S3 client proxy that deletes `key` just before HEADing it: an object gone after the listing."""

    def __init__(self, s3: BaseClient, key: str) -> None:
        self.s3, self.key = s3, key

    def __getattr__(self, name: str) -> Any:
        return getattr(self.s3, name)

    def head_object(self, **kw: Any) -> Any:
        if kw["Key"] == self.key:
            self.s3.delete_object(Bucket=kw["Bucket"], Key=kw["Key"])
        return self.s3.head_object(**kw)


def test_fetch_batch_object_deleted_after_listing(landing_bucket: LandingBucket, tmp_path: Path) -> None:
    lb = landing_bucket
    put_batch(lb, "NEWS/b1", {"a.jsonl": jsonl("a"), "b.jsonl": jsonl("b")})
    arrival = only_arrival(lb)
    s3 = DeleteOnHead(lb.s3, "landing/NEWS/b1/b.jsonl")
    with pytest.raises(LandingError, match=r"landing/NEWS/b1/b\.jsonl: object disappeared after listing"):
        fetch_batch(arrival, tmp_path / "d", s3=s3)  # type: ignore[arg-type]
    assert leftovers(tmp_path) == []
    lb.s3.delete_object(Bucket=lb.bucket, Key=arrival.key)
    with pytest.raises(LandingError, match="_SUCCESS: marker is gone"):
        fetch_batch(arrival, tmp_path / "d", s3=lb.s3)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../../evil.jsonl", "would escape the destination folder"),
        ("/abs.jsonl", "would escape the destination folder"),
        ("sub/../../x.jsonl", "would escape the destination folder"),
        ("a\x01.jsonl", "has a non-printable name"),
    ],
)
def test_fetch_batch_refuses_unsafe_names(
    landing_bucket: LandingBucket, tmp_path: Path, name: str, reason: str
) -> None:
    lb = landing_bucket
    put_batch(lb, "NEWS/b1", {"ok.jsonl": jsonl("a"), name: jsonl("b")})
    dest = tmp_path / "inner" / "d"
    with pytest.raises(LandingError, match=reason) as info:
        fetch_batch(only_arrival(lb), dest, s3=lb.s3)
    assert repr(f"landing/NEWS/b1/{name}") in str(info.value)
    assert leftovers(tmp_path) == []


def test_fetch_batch_refuses_foreign_destination(landing_bucket: LandingBucket, tmp_path: Path) -> None:
    lb = landing_bucket
    put_batch(lb, "NEWS/b1", {"a.jsonl": jsonl("a")})
    (tmp_path / "d").mkdir()
    with pytest.raises(LandingError, match="exists and is not a complete fetch"):
        fetch_batch(only_arrival(lb), tmp_path / "d", s3=lb.s3)


def test_fetch_batch_local(tmp_path: Path) -> None:
    root = tmp_path / "landing"
    batch = make_local_batch(root, "NEWS/b1", {"a.jsonl": jsonl("a")})
    make_local_batch(root, "NEWS/empty", {"notes.md": b"x"})
    make_local_batch(root, "NEWS/link", {})
    (tmp_path / "outside.jsonl").write_bytes(jsonl("secret"))
    (root / "NEWS/link/a.jsonl").symlink_to(tmp_path / "outside.jsonl")
    good, empty, link = sorted(list_arrivals(str(root)), key=lambda a: a.batch)
    assert fetch_batch(good, tmp_path / "unused") == batch
    assert not (tmp_path / "unused").exists()
    with pytest.raises(LandingError, match="NEWS/empty/_SUCCESS: _SUCCESS without data files"):
        fetch_batch(empty, tmp_path / "unused")
    with pytest.raises(LandingError, match="links outside the batch folder"):
        fetch_batch(link, tmp_path / "unused")
    with pytest.raises(LandingError, match="over max_object_bytes=2"):
        fetch_batch(good, tmp_path / "unused", max_object_bytes=2)


# --- retries ----------------------------------------------------------------------------------------


class _Failing(BaseHTTPRequestHandler):
    """Answers every request with a 500, as an overloaded S3 endpoint would."""

    def _fail(self) -> None:
        body = b"<Error><Code>InternalError</Code><Message>boom</Message></Error>"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = _fail

    def log_message(self, *args: Any) -> None:
        pass


def count_attempts(s3: BaseClient) -> list[str]:
    sent: list[str] = []
    s3.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    return sent


def test_s3_client_retries_5xx_but_not_4xx(moto_server: MotoServer) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s3 = s3_client(f"http://127.0.0.1:{server.server_address[1]}", config=Config(retries={"max_attempts": 3}))
        sent = count_attempts(s3)
        with pytest.raises(ClientError, match="InternalError"):
            s3.get_object(Bucket="bkt", Key="landing/NEWS/b1/_SUCCESS")
        assert len(sent) == 4  # botocore's max_attempts counts retries
    finally:
        server.shutdown()
    s3 = s3_client(moto_server.endpoint_url)
    assert s3.meta.config.retries == {"total_max_attempts": 5, "mode": "standard"}
    assert s3.meta.config.s3 == {"addressing_style": "path"}
    sent = count_attempts(s3)
    with pytest.raises(ClientError, match="NoSuchBucket"):
        s3.get_object(Bucket="no-such-bucket", Key="k")
    assert len(sent) == 1
