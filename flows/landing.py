"""The landing zone: where new domain corpora arrive, and how a batch is made available to a stage.

Layout. A landing URI is `s3://BUCKET/PREFIX` (PREFIX may be empty or hold several segments) or a local
directory (`/path/to/landing`, or `file:///path/to/landing`), with the same layout under both::

    <landing>/<domain>/<batch>/part-0000.jsonl      data files: .jsonl, .txt, .parquet, .csv, optionally .gz
    <landing>/<domain>/<batch>/sub/part-0001.txt.gz (subfolders are allowed)
    <landing>/<domain>/<batch>/_SUCCESS             written last: the trigger

The producer uploads every data file first and the `_SUCCESS` marker last; the marker (its key and its
ETag) is the arrival. Names starting with `.` or `_` are never data (as in `loire.data`), and files
with other extensions are ignored. `<domain>` and `<batch>` match `[A-Za-z0-9][A-Za-z0-9_.=-]{0,63}`
(e.g. `NEWS/2026-01-05`, `bio/dt=2026-01-05`); the domain is canonicalised to upper case.

An `Arrival` identifies one marker version: re-uploading a marker with new content (new ETag) is a
new arrival, a duplicate notification of the same marker is not (`Arrival.idempotency_key`). For the
local landing zone, which has no ETags, the ETag is a digest of the marker and of the batch's data
file names, sizes and mtimes.

`fetch_batch` gives `loire.data.load_corpus` a local folder: the batch folder itself for a local
landing zone, a verified atomic download for S3 (size caps, no names escaping the destination,
objects pinned to the ETag seen by HEAD). Bad input raises `LandingError` naming the key; S3 requests
are retried by botocore (standard mode: throttling, 5xx and connection errors only), and interrupted
response bodies by a small bounded loop here. When S3 still fails after those bounded retries, the fetch
raises `LandingUnavailable` (an OSError, so the stage's fetch task may retry it later) naming the key,
the operation and the number of attempts; an interrupted fetch leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote_plus

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from flows.redact import BOTOCORE_LOGGERS
from flows.redact import install as install_redaction
from flows.retry import RetryPolicy, is_transient

logger = logging.getLogger(__name__)

MARKER = "_SUCCESS"
# Mirrors loire.data.ACCEPTED_SUFFIXES (checked by a test); not imported so the watcher needs no torch.
DATA_SUFFIXES = tuple(s + gz for gz in ("", ".gz") for s in (".txt", ".jsonl", ".csv", ".parquet"))
MAX_KEY_BYTES = 1024  # S3's own limit on key length
MAX_NAME_BYTES = 255  # longest file or folder name of local file systems (NAME_MAX)
DEFAULT_MAX_OBJECT_BYTES = 2 * 1024**3
# botocore "standard" retries (throttling, 5xx, connection errors); its `max_attempts` counts retries, so 5 tries.
AWS_RETRIES = 4
STREAM_ATTEMPTS = 3  # re-reads of a response body cut off mid-transfer (botocore does not retry those)
FETCH_MANIFEST = ".loire-fetch.json"  # hidden, so load_corpus skips it; its presence means "complete"
_CHUNK = 1024**2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]{0,63}")
_STREAM_ERRORS = (HTTPClientError, BotoConnectionError, IncompleteReadError)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_CHANGED_CODES = frozenset({"412", "PreconditionFailed"})


class LandingError(ValueError):
    """A landing-zone problem that retrying cannot fix (bad key, missing object, cap exceeded); names the key."""


class LandingUnavailable(ConnectionError):
    """S3 kept failing (throttling, 5xx, connection errors) through botocore's bounded retries; names the key.

    Transient by nature: an OSError, so callers that retry I/O errors (the stage's fetch task) retry it.
    """


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (so lines reach the UI), else this module's logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def show(name: str, limit: int = 120) -> str:
    """repr of a (possibly hostile) name, truncated so that error messages stay one readable line."""
    return repr(name[:limit]) + ("..." if len(name) > limit else "")


# --- landing URIs and marker keys -------------------------------------------------------------------


@dataclass(frozen=True)
class Landing:
    """A parsed landing URI: `bucket` and `prefix` for S3, `root` (absolute) for a local directory."""

    uri: str
    bucket: str | None
    prefix: str
    root: str | None

    @property
    def key_prefix(self) -> str:
        """The listing prefix of marker keys ("" or "prefix/")."""
        return f"{self.prefix}/" if self.prefix else ""


def parse_landing(uri: str) -> Landing:
    """Parse `s3://bucket/prefix` or a local path into a `Landing` with a canonical `uri`."""
    if not isinstance(uri, str) or not uri.strip():
        raise LandingError(f"landing URI {uri!r}: empty")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        prefix = prefix.strip("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise LandingError(f"landing URI {show(uri)}: invalid bucket name {show(bucket)}")
        if prefix and not _safe_segments(prefix):
            raise LandingError(f"landing URI {show(uri)}: prefix has empty, '.', '..' or non-printable segments")
        return Landing(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}", bucket, prefix, None)
    if "://" in uri and not uri.startswith("file://"):
        raise LandingError(f"landing URI {show(uri)}: only s3:// and local paths are supported")
    root = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return Landing(root, None, "", root)


def _safe_segments(path: str) -> bool:
    """Whether a relative POSIX path is printable with no empty, '.' or '..' segment."""
    return path.isprintable() and all(part not in ("", ".", "..") for part in path.split("/"))


def parse_marker_key(key: str, prefix: str) -> tuple[str, str]:
    """(DOMAIN, batch) of a marker key `<prefix>/<domain>/<batch>/_SUCCESS`; LandingError names a bad key."""
    if not isinstance(key, str) or not key:
        raise LandingError(f"marker key {key!r}: empty")
    shown = show(key)
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise LandingError(f"marker key {shown}: longer than {MAX_KEY_BYTES} bytes")
    if not key.isprintable():
        raise LandingError(f"marker key {shown}: contains control or non-printable characters")
    if key.startswith("/"):
        raise LandingError(f"marker key {shown}: absolute path")
    parts = key.split("/")
    if "" in parts:
        raise LandingError(f"marker key {shown}: empty path segment")
    if any(part in (".", "..") for part in parts):
        raise LandingError(f"marker key {shown}: '.' or '..' segment")
    head = [p for p in prefix.strip("/").split("/") if p]
    if parts[: len(head)] != head:
        raise LandingError(f"marker key {shown}: not under prefix {prefix!r}")
    rest = parts[len(head) :]
    if len(rest) != 3 or rest[2] != MARKER:
        raise LandingError(f"marker key {shown}: expected <prefix>/<domain>/<batch>/{MARKER}")
    for what, name in zip(("domain", "batch"), rest[:2], strict=True):
        if not _NAME.fullmatch(name):
            raise LandingError(f"marker key {shown}: {what} {show(name, 80)} must match {_NAME.pattern}")
    return rest[0].upper(), rest[1]


# --- arrivals ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One `_SUCCESS` marker version: the unit of work of a lifelong stage (see the module docstring)."""

    landing: str
    bucket: str | None
    key: str
    etag: str
    domain: str
    batch: str
    arrived_at: float
    size: int | None = None

    @property
    def batch_uri(self) -> str:
        """`s3://bucket/prefix/<domain>/<batch>/`, or the local batch directory."""
        folder = self.key.rpartition("/")[0]  # the marker's own folder keeps its original spelling
        if self.bucket is not None:
            return f"s3://{self.bucket}/{folder}/"
        return os.path.join(self.landing, *folder.split("/"))

    @property
    def idempotency_key(self) -> str:
        """`bucket/key@etag` (or `local:/root/key@etag`): one stage run per marker version, ever."""
        where = self.bucket if self.bucket is not None else "local:" + os.path.abspath(self.landing)
        return f"{where}/{self.key}@{self.etag}"

    def to_params(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the stage deployment's `arrival` parameter)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Arrival:
        """Rebuild and re-validate an arrival from `to_params()` output (it crosses a process boundary)."""
        if not isinstance(params, Mapping):
            raise LandingError(f"arrival parameters must be a mapping, got {type(params).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = names - {"size"}
        if missing := sorted(required - params.keys()):
            raise LandingError(f"arrival parameters: missing {missing}")
        if unknown := sorted(params.keys() - names):
            raise LandingError(f"arrival parameters: unknown {unknown}")
        spot = parse_landing(str(params["landing"]))
        key = str(params["key"])
        domain, batch = parse_marker_key(key, spot.prefix)
        if params["bucket"] != spot.bucket or (params["domain"], params["batch"]) != (domain, batch):
            raise LandingError(f"arrival parameters for {show(key)}: bucket, domain or batch disagree with the key")
        size = params.get("size")
        etag = str(params["etag"]).strip('"')
        arrived_at = float(params["arrived_at"])
        return cls(spot.uri, spot.bucket, key, etag, domain, batch, arrived_at, None if size is None else int(size))


def arrival_order(arrival: Arrival) -> tuple[float, str]:
    """Sort key: arrival time, then key (ties are common with one-second timestamps)."""
    return arrival.arrived_at, arrival.key


def s3_client(endpoint_url: str | None = None, **kw: Any) -> BaseClient:
    """An S3 client with path-style addressing (moto, MinIO, SeaweedFS) and bounded standard retries.

    The endpoint is `endpoint_url`, else `AWS_ENDPOINT_URL`, else AWS. `kw` goes to `Session.client`
    (`region_name`, credentials; a `config` is merged over the defaults).
    """
    config = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": AWS_RETRIES, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    if "config" in kw:
        config = config.merge(kw.pop("config"))
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    install_redaction(BOTOCORE_LOGGERS)  # botocore's DEBUG records print every request's session token
    # A fresh session: boto3's default session is not safe to share across threads.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config, **kw)


def list_arrivals(landing: str, *, s3: BaseClient | None = None) -> list[Arrival]:
    """Every valid marker under `landing`, sorted by (arrived_at, key); invalid markers are logged and skipped."""
    spot = parse_landing(landing)
    found = _list_s3(spot, s3 or s3_client()) if spot.bucket else _list_local(spot)
    return sorted(found, key=arrival_order)


def _list_s3(spot: Landing, s3: BaseClient) -> list[Arrival]:
    markers: list[dict[str, Any]] = []
    sizes: dict[tuple[str, ...], int] = {}  # batch folder (first two segments) -> bytes of data files
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=spot.bucket, Prefix=spot.key_prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(spot.key_prefix) :].split("/")
            if rel[-1] == MARKER:
                markers.append(obj)
            elif len(rel) > 2 and _is_data_name("/".join(rel[2:])):
                sizes[tuple(rel[:2])] = sizes.get(tuple(rel[:2]), 0) + int(obj.get("Size", 0))
    arrivals = []
    for obj in markers:
        try:
            domain, batch = parse_marker_key(obj["Key"], spot.prefix)
        except LandingError as exc:
            run_logger().warning("skipping invalid marker in %s: %s", spot.uri, exc)
            continue
        rel = tuple(obj["Key"][len(spot.key_prefix) :].split("/")[:2])
        etag = str(obj.get("ETag", "")).strip('"')
        arrived = obj["LastModified"].timestamp()
        arrivals.append(Arrival(spot.uri, spot.bucket, obj["Key"], etag, domain, batch, arrived, sizes.get(rel, 0)))
    return arrivals


def _list_local(spot: Landing) -> list[Arrival]:
    root = Path(spot.root or "")
    if not root.is_dir():
        raise LandingError(f"landing {spot.uri}: not a directory")
    arrivals = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if MARKER not in files:
            continue
        key = (Path(folder) / MARKER).relative_to(root).as_posix()
        try:
            domain, batch = parse_marker_key(key, "")
        except LandingError as exc:
            run_logger().warning("skipping invalid marker in %s: %s", spot.uri, exc)
            continue
        etag, size = _local_digest(Path(folder))
        mtime = (Path(folder) / MARKER).stat().st_mtime
        arrivals.append(Arrival(spot.uri, None, key, etag, domain, batch, mtime, size))
    return arrivals


def _is_data_name(rel: str) -> bool:
    """Whether a path relative to a batch folder names a data file (not hidden, not `_`-prefixed)."""
    parts = rel.split("/")
    return not any(p.startswith((".", "_")) for p in parts if p) and rel.lower().endswith(DATA_SUFFIXES)


def _local_data_files(batch_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX name, path) of the data files of a local batch, sorted, hidden folders pruned."""
    found = []
    for folder, dirs, files in os.walk(batch_dir):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        for name in files:
            rel = (Path(folder) / name).relative_to(batch_dir).as_posix()
            if _is_data_name(rel):
                found.append((rel, Path(folder) / name))
    yield from sorted(found)


def _local_digest(batch_dir: Path) -> tuple[str, int]:
    """(ETag stand-in, bytes of data) of a local batch: marker bytes + mtime, data names, sizes, mtimes."""
    marker = batch_dir / MARKER
    h = hashlib.sha256()
    with open(marker, "rb") as f:
        h.update(f.read(64 * 1024))  # markers are tiny; the cap guards against a huge one
    h.update(f"\0{marker.stat().st_mtime_ns}\n".encode())
    total = 0
    for rel, path in _local_data_files(batch_dir):
        st = path.stat()
        total += st.st_size
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32], total


# --- S3 event notifications ------------------------------------------------------------------------


def arrival_from_event(record: dict[str, Any], landing: str, *, s3: BaseClient | None = None) -> Arrival | None:
    """The arrival described by one S3 notification record (`Records[]` entry), or None if it is not one.

    None for other events (e.g. ObjectRemoved), other buckets, and keys that are not markers under the
    prefix (invalid marker keys are also logged). A record without the fields of an S3 event raises
    LandingError. A missing `eTag` costs a HEAD (`s3`); a marker deleted since the event yields None.
    """
    spot = parse_landing(landing)
    if spot.bucket is None:
        raise LandingError(f"landing {spot.uri}: S3 events need an s3:// landing URI")
    try:
        event, bucket, obj = str(record.get("eventName", "")), record["s3"]["bucket"]["name"], record["s3"]["object"]
        key = unquote_plus(obj["key"])
    except (AttributeError, KeyError, TypeError) as exc:
        shown = show(json.dumps(record, default=str))
        raise LandingError(f"malformed S3 event record (missing {exc}): {shown}") from None
    if not event.startswith("ObjectCreated") or bucket != spot.bucket or key.rpartition("/")[2] != MARKER:
        return None
    try:
        domain, batch = parse_marker_key(key, spot.prefix)
    except LandingError as exc:
        if key.startswith(spot.key_prefix):
            run_logger().warning("ignoring event for invalid marker: %s", exc)
        return None
    etag, arrived = str(obj.get("eTag") or obj.get("ETag") or "").strip('"'), _event_time(record.get("eventTime"))
    if not etag or arrived is None:
        head = _head(s3 or s3_client(), bucket, key)
        if head is None:
            run_logger().warning("marker %s is gone; ignoring its event", show(key))
            return None
        etag = etag or str(head["ETag"]).strip('"')
        arrived = arrived if arrived is not None else head["LastModified"].timestamp()
    return Arrival(spot.uri, bucket, key, etag, domain, batch, arrived)


def _event_time(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _head(s3: BaseClient, bucket: str, key: str) -> dict[str, Any] | None:
    """HEAD an object; None if it does not exist (other errors propagate)."""
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _code(exc) in _MISSING_CODES:
            return None
        raise


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def _s3_call(operation: str, key: str) -> Iterator[None]:
    """Turn an S3 failure that outlived botocore's retries into `LandingUnavailable` naming `key`."""
    try:
        yield
    except ClientError as exc:
        if not is_transient(exc):
            raise
        meta = exc.response.get("ResponseMetadata", {})
        attempts = int(meta.get("RetryAttempts") or 0) + 1
        error = exc.response.get("Error", {})
        reason = f"{error.get('Code') or meta.get('HTTPStatusCode')}: {error.get('Message') or 'no message'}"
        raise LandingUnavailable(
            f"{show(key)}: S3 {operation} still failing after {attempts} attempt(s) ({reason})"
        ) from exc
    except _STREAM_ERRORS as exc:
        raise LandingUnavailable(f"{show(key)}: S3 {operation} failed ({type(exc).__name__}: {exc})") from exc


# --- fetching a batch ------------------------------------------------------------------------------


def fetch_batch(
    arrival: Arrival,
    dest: Path,
    *,
    s3: BaseClient | None = None,
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    max_files: int = 10_000,
) -> Path:
    """A local folder holding the batch's data files, for `loire.data.load_corpus`.

    Local landing: the batch folder itself, after the checks below. S3: the data objects are
    downloaded into a temporary sibling of `dest`, which is renamed to `dest` when complete; an
    existing complete download of the same arrival is reused. Raises LandingError naming the key for a
    missing marker, a batch without data files, more than `max_files` data files, an object over
    `max_object_bytes`, a name that would escape `dest`, and an object deleted or replaced meanwhile.
    """
    for name, value in (("max_object_bytes", max_object_bytes), ("max_files", max_files)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if arrival.bucket is None:
        return _check_local_batch(arrival, max_object_bytes, max_files)
    return _fetch_s3_batch(arrival, Path(dest).absolute(), s3 or s3_client(), max_object_bytes, max_files)


def _check_local_batch(arrival: Arrival, max_object_bytes: int, max_files: int) -> Path:
    batch_dir = Path(arrival.batch_uri)
    if not (batch_dir / MARKER).is_file():
        raise LandingError(f"{arrival.key}: marker is gone")
    files = list(_local_data_files(batch_dir))
    if not files:
        raise LandingError(f"{arrival.key}: {MARKER} without data files")
    if len(files) > max_files:
        raise LandingError(f"{arrival.key}: batch holds more than max_files={max_files} data files")
    real_dir = batch_dir.resolve()
    for rel, path in files:
        if not path.resolve().is_relative_to(real_dir):
            raise LandingError(f"{arrival.key}: {show(rel)} links outside the batch folder")
        if path.stat().st_size > max_object_bytes:
            raise LandingError(f"{arrival.key}: {show(rel)} is over max_object_bytes={max_object_bytes}")
    if _local_digest(batch_dir)[0] != arrival.etag:
        run_logger().warning("%s: batch changed since it arrived; reading it as it is now", arrival.key)
    return batch_dir


def _fetch_s3_batch(arrival: Arrival, dest: Path, s3: BaseClient, max_bytes: int, max_files: int) -> Path:
    log = run_logger()
    if _complete_fetch(dest, arrival):
        log.info("reusing %s for %s", dest, arrival.idempotency_key)
        return dest
    if dest.exists():
        raise LandingError(f"{arrival.key}: destination {dest} exists and is not a complete fetch of this arrival")
    with _s3_call("HeadObject", arrival.key):
        head = _head(s3, arrival.bucket or "", arrival.key)
    if head is None:
        raise LandingError(f"{arrival.key}: marker is gone")
    if str(head["ETag"]).strip('"') != arrival.etag:
        log.warning("%s: marker replaced since it arrived; a newer arrival will follow", arrival.key)
    with _s3_call("ListObjectsV2", arrival.key.rpartition("/")[0] + "/"):
        names = _plan_s3_batch(arrival, s3, max_files)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        folder = arrival.key.rpartition("/")[0] + "/"
        total = sum(_download(s3, arrival.bucket or "", folder + rel, tmp / rel, max_bytes) for rel in names)
        manifest = {"idempotency_key": arrival.idempotency_key, "files": names, "bytes": total}
        (tmp / FETCH_MANIFEST).write_text(json.dumps(manifest, indent=1))
        return _publish(tmp, dest, arrival, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a successful rename `tmp` no longer exists


def _plan_s3_batch(arrival: Arrival, s3: BaseClient, max_files: int) -> list[str]:
    """Names (relative to the batch folder) of the batch's data objects, validated, sorted."""
    folder = arrival.key.rpartition("/")[0] + "/"
    names: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=arrival.bucket, Prefix=folder):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(folder) :]
            if rel == MARKER or rel.endswith("/"):  # the marker; folder placeholders of S3 consoles
                continue
            if not rel.isprintable():
                raise LandingError(f"{arrival.key}: object {show(obj['Key'])} has a non-printable name")
            if rel.startswith("/") or not _safe_segments(rel):
                raise LandingError(f"{arrival.key}: object {show(obj['Key'])} would escape the destination folder")
            if not _is_data_name(rel):
                run_logger().debug("%s: skipping non-data object %s", arrival.key, show(obj["Key"]))
                continue
            if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in rel.split("/")):
                raise LandingError(
                    f"{arrival.key}: object {show(obj['Key'])} has a name segment longer than {MAX_NAME_BYTES} bytes"
                )
            names.append(rel)
            if len(names) > max_files:
                raise LandingError(f"{arrival.key}: batch holds more than max_files={max_files} data files")
    if not names:
        raise LandingError(f"{arrival.key}: {MARKER} without data files")
    parents = {str(p) for rel in names for p in PurePosixPath(rel).parents}
    if clash := sorted(set(names) & parents):
        raise LandingError(f"{arrival.key}: {show(clash[0])} is both a file and a folder")
    return sorted(names)


def _download(s3: BaseClient, bucket: str, key: str, target: Path, max_bytes: int) -> int:
    """Download one object (HEAD first for the cap, then GET pinned to that ETag); returns its size."""
    with _s3_call("HeadObject", key):
        head = _head(s3, bucket, key)
    if head is None:
        raise LandingError(f"{key}: object disappeared after listing")
    if int(head["ContentLength"]) > max_bytes:
        raise LandingError(f"{key}: {head['ContentLength']} bytes, over max_object_bytes={max_bytes}")
    target.parent.mkdir(parents=True, exist_ok=True)

    def get() -> int:
        try:
            response = s3.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])
            return _copy_capped(response["Body"], target, key, max_bytes)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                raise LandingError(f"{key}: object disappeared after listing") from None
            if _code(exc) in _CHANGED_CODES:
                raise LandingError(f"{key}: object replaced during download") from None
            with _s3_call("GetObject", key):
                raise

    # botocore retries requests, not a body cut off mid-transfer: only those are re-read here.
    policy = RetryPolicy(attempts=STREAM_ATTEMPTS, initial_delay_s=0.5)
    try:
        return policy.retrying(f"{show(key)}: transfer", retry_on=_is_stream_error, sleep=_sleep)(get)
    except _STREAM_ERRORS:
        with _s3_call(f"GetObject ({STREAM_ATTEMPTS} transfers interrupted)", key):
            raise


def _is_stream_error(exc: BaseException) -> bool:
    return isinstance(exc, _STREAM_ERRORS)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)  # `time` looked up at each call, so the fault tests can record the backoff


def _copy_capped(body: IO[bytes], target: Path, key: str, max_bytes: int) -> int:
    written = 0
    with open(target, "wb") as f:
        while chunk := body.read(_CHUNK):
            written += len(chunk)
            if written > max_bytes:  # the object may have grown past the cap between HEAD and GET
                raise LandingError(f"{key}: over max_object_bytes={max_bytes}")
            f.write(chunk)
    return written


def _complete_fetch(dest: Path, arrival: Arrival) -> bool:
    try:
        manifest = json.loads((dest / FETCH_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("idempotency_key") == arrival.idempotency_key


def _publish(tmp: Path, dest: Path, arrival: Arrival, log: logging.Logger | logging.LoggerAdapter) -> Path:
    """Rename the finished download into place; a concurrent fetch of the same arrival may have won."""
    try:
        tmp.rename(dest)
    except OSError:
        if not _complete_fetch(dest, arrival):
            raise
        log.info("%s: fetched concurrently into %s; using that copy", arrival.key, dest)
        return dest
    log.info("fetched %s into %s", arrival.batch_uri, dest)
    return dest


def fetch_uri(
    uri: str,
    cache: Path,
    *,
    s3: BaseClient | None = None,
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
) -> Path:
    """A local folder for a corpus URI recorded in a stage's lineage (a batch URI or any local folder).

    Local paths are returned as they are. `s3://bucket/prefix/<domain>/<batch>/` is fetched like its
    arrival (the marker's current ETag names the cache folder under `cache`), so a later stage on a
    fresh machine can replay and evaluate the earlier domains.
    """
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise LandingError(f"{show(uri)}: corpus folder not found")
        return path
    bucket, _, folder = uri[len("s3://") :].partition("/")
    folder = folder.strip("/")
    prefix, _, _ = folder.rpartition("/")
    prefix = prefix.rpartition("/")[0]
    landing = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    client = s3 or s3_client()
    key = f"{folder}/{MARKER}"
    with _s3_call("HeadObject", key):
        head = _head(client, bucket, key)
    if head is None:
        raise LandingError(f"{show(key)}: marker of an earlier corpus is gone")
    domain, batch = parse_marker_key(key, parse_landing(landing).prefix)
    etag = str(head.get("ETag", "")).strip('"')
    arrival = Arrival(parse_landing(landing).uri, bucket, key, etag, domain, batch, 0.0)
    digest = hashlib.blake2b(arrival.idempotency_key.encode(), digest_size=8).hexdigest()
    return fetch_batch(arrival, Path(cache) / f"{domain}-{digest}", s3=client, max_object_bytes=max_object_bytes)


def fetch_model_folder(
    uri: str, cache: Path, *, s3: BaseClient | None = None, max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
) -> Path:
    """A local folder for a model checkpoint URI (`LOIRE_BASE_MODEL`): a local folder as it is, or the objects
    directly under an `s3://bucket/prefix/` downloaded atomically into `cache` (a folder named after the URI and
    the objects' ETags, reused while they are unchanged). The checkpoint itself is checked by `loire.base`.
    """
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise LandingError(f"{show(uri)}: base model folder not found")
        return path
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    client = s3 or s3_client()
    with _s3_call("ListObjectsV2", prefix or "/"):
        objects = _model_objects(client, bucket, prefix)
    if not objects:
        raise LandingError(f"{show(uri)}: no objects under this prefix")
    stamp = json.dumps([bucket, prefix, sorted(objects.items())])
    dest = Path(cache) / hashlib.blake2b(stamp.encode(), digest_size=8).hexdigest()
    if (dest / FETCH_MANIFEST).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        for name in objects:
            _download(client, bucket, prefix + name, tmp / name, max_object_bytes)
        (tmp / FETCH_MANIFEST).write_text(json.dumps({"uri": uri, "files": sorted(objects)}, indent=1))
        with contextlib.suppress(OSError):  # a concurrent fetch of the same objects may have won
            tmp.rename(dest)
        if not (dest / FETCH_MANIFEST).is_file():
            raise LandingError(f"{show(uri)}: {dest} exists and is not a complete download of it")
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_objects(s3: BaseClient, bucket: str, prefix: str) -> dict[str, str]:
    """Name -> ETag of the objects directly under `prefix` (a checkpoint folder is flat); unsafe names refused."""
    objects: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if not name:
                continue
            if not _safe_segments(name) or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                raise LandingError(f"{show(obj['Key'])}: not a usable file name for a model checkpoint")
            objects[name] = str(obj.get("ETag", "")).strip('"')
    return objects
