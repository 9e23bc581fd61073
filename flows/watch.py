"""Arrival detection: start one lifelong stage per `_SUCCESS` marker version, in arrival order.

Two sources of arrivals (see `flows.landing` for the layout):

- SQS (`queue_url`): S3 sends an `s3:ObjectCreated:*` notification, filtered to the suffix `_SUCCESS`,
  to a queue; `poll_sqs` long-polls it. A message is deleted only after the stage run for each of its
  arrivals exists, so a crash in between redelivers it (at-least-once) and the idempotency key below
  turns the redelivery into a no-op.
- Listing (no `queue_url`): `list_arrivals` every `poll_seconds`. The fallback for stores without
  notifications and for the local landing zone; it lists the whole prefix each poll.

Starting a stage is `run_deployment(..., idempotency_key=arrival.idempotency_key, timeout=0,
as_subflow=False)`. The Prefect server keeps (flow, idempotency key) unique in its database and
returns the existing run for a repeated key, so any number of duplicate notifications, redeliveries,
re-listings or watcher restarts create exactly one run per (marker key, ETag). This was chosen over
`emit_event` + a deployment trigger because (1) the run is created by a synchronous API call whose
failure we see, while `emit_event` is fire-and-forget (errors are logged and swallowed); (2) the
deduplication is durable, while the triggers service only remembers event ids for 30 minutes; and
(3) the call returns the run, so the SQS message can be deleted after, and only after, the run exists.
Within one watcher run the keys already started are also remembered, to skip the API call.

Arrivals are started in (arrived_at, key) order within each poll. A start that fails with an I/O
error (after the task's own retries) stops the poll: its message and the later ones are made visible
again at once, so the next poll retries them in order. Other errors (unknown deployment, bugs) fail
the flow.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.tasks import exponential_backoff

from flows.landing import (
    AWS_RETRIES,
    Arrival,
    LandingError,
    arrival_from_event,
    arrival_order,
    list_arrivals,
    parse_landing,
    run_logger,
    s3_client,
    show,
)
from flows.retry import is_transient, retry_condition

DEFAULT_DEPLOYMENT = "lifelong-stage/lifelong-stage"
StartFn = Callable[[Arrival, str], str]


def sqs_client(endpoint_url: str | None = None, **kw: Any) -> BaseClient:
    """An SQS client with bounded standard retries; endpoint from the argument or `AWS_ENDPOINT_URL`."""
    config = Config(retries={"max_attempts": AWS_RETRIES, "mode": "standard"}, connect_timeout=10)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.session.Session().client("sqs", endpoint_url=endpoint, config=config, **kw)


# Injectable for tests: the flow builds its clients through these.
make_s3_client: Callable[[str | None], BaseClient] = s3_client
make_sqs_client: Callable[[str | None], BaseClient] = sqs_client


# The one definition of "transient" (flows/retry.py), under the names the watcher's callers know.
is_io_error = is_transient
retry_on_io_error = retry_condition


# --- SQS ---------------------------------------------------------------------------------------------


def poll_sqs(
    sqs: BaseClient,
    queue_url: str,
    landing: str,
    *,
    wait_seconds: int = 20,
    max_messages: int = 10,
    visibility_timeout: int = 300,
    s3: BaseClient | None = None,
) -> list[tuple[Arrival, str]]:
    """One long poll: (arrival, receipt handle) per marker record received.

    Test events (`s3:TestEvent`) and messages without a marker record under `landing` are deleted.
    Malformed bodies (not JSON, no `Records`, records without the S3 fields) are poison: retrying
    cannot fix them, so they are logged with their content and deleted rather than redelivered
    forever. A message may carry several records; its handle then appears once per arrival.
    """
    response = sqs.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=max_messages,
        WaitTimeSeconds=wait_seconds,
        VisibilityTimeout=visibility_timeout,
    )
    found: list[tuple[Arrival, str]] = []
    for message in response.get("Messages", []):
        arrivals = _arrivals_of(message, landing, s3)
        if arrivals:
            found.extend((arrival, message["ReceiptHandle"]) for arrival in arrivals)
        else:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return found


def _arrivals_of(message: dict[str, Any], landing: str, s3: BaseClient | None) -> list[Arrival]:
    """The arrivals of one message; [] for test events, other keys and poison (logged)."""
    log = run_logger()
    body = _event_body(message.get("Body", ""))
    if body is None:
        log.error("deleting malformed SQS message %s: %s", message.get("MessageId"), show(message.get("Body", "")))
        return []
    if body.get("Event") == "s3:TestEvent":
        log.info("deleting S3 test event for bucket %s", body.get("Bucket"))
        return []
    arrivals = []
    for record in body["Records"]:
        try:
            arrival = arrival_from_event(record, landing, s3=s3)
        except LandingError as exc:
            log.error("skipping malformed record of SQS message %s: %s", message.get("MessageId"), exc)
            continue
        if arrival is not None:
            arrivals.append(arrival)
    if not arrivals:
        log.info("deleting SQS message %s: no marker record under %s", message.get("MessageId"), landing)
    return arrivals


def _event_body(raw: str) -> dict[str, Any] | None:
    """The S3 event of a message body (unwrapping S3 → SNS → SQS), or None if it is not one."""
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and body.get("Type") == "Notification" and isinstance(body.get("Message"), str):
            body = json.loads(body["Message"])
    except (TypeError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    if body.get("Event") == "s3:TestEvent" or isinstance(body.get("Records"), list):
        return body
    return None


# --- starting stages --------------------------------------------------------------------------------


@task(
    name="start-stage",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=retry_on_io_error,
    cache_policy=NO_CACHE,  # a start must reach the server every time; the server dedups by key
)
def start_stage(arrival: Arrival, deployment: str) -> str:
    """Create (or find) the stage run for `arrival`; returns its flow-run id."""
    run = run_deployment(
        name=deployment,
        parameters={"arrival": arrival.to_params()},
        idempotency_key=arrival.idempotency_key,
        timeout=0,
        as_subflow=False,
    )
    if _just_created(run):
        run_logger().info("new arrival %s: stage run %s (%s)", arrival.idempotency_key, run.name, run.id)
    else:  # a listing pass sees every earlier marker again; the server returned the run it already has
        run_logger().debug("arrival %s was handled before (stage run %s)", arrival.idempotency_key, run.name)
    return str(run.id)


def _just_created(run: Any, window_s: float = 10.0) -> bool:
    """Whether `run_deployment` created this run now, rather than returning the run an idempotency key already has."""
    created = getattr(run, "created", None)
    if created is None:
        return True
    from datetime import UTC, datetime

    return (datetime.now(UTC) - created).total_seconds() < window_s


class Watcher:
    """The watch loop, with its clients and start function injected (the flow wires in the real ones)."""

    def __init__(
        self,
        landing: str,
        *,
        start: StartFn,
        deployment: str = DEFAULT_DEPLOYMENT,
        queue_url: str | None = None,
        s3: BaseClient | None = None,
        sqs: BaseClient | None = None,
        wait_seconds: int = 20,
        visibility_timeout: int = 300,
    ) -> None:
        if queue_url and (sqs is None or parse_landing(landing).bucket is None):
            raise ValueError("queue_url needs an SQS client and an s3:// landing URI")
        self.landing = parse_landing(landing).uri
        self.start, self.deployment = start, deployment
        self.queue_url, self.s3, self.sqs = queue_url, s3, sqs
        self.wait_seconds, self.visibility_timeout = wait_seconds, visibility_timeout
        self.started: dict[str, str] = {}  # idempotency key -> flow-run id, for this watcher's lifetime

    def run(
        self, *, poll_seconds: float = 5.0, max_polls: int | None = None, idle_polls_to_stop: int | None = None
    ) -> list[str]:
        """Poll until `max_polls` polls, or `idle_polls_to_stop` polls in a row with nothing to do."""
        polls = idle = 0
        while max_polls is None or polls < max_polls:
            polls += 1
            try:
                busy, failed = self.poll_once(), False
            except Exception as exc:
                if not is_io_error(exc):
                    raise
                run_logger().warning("poll of %s failed (%s); retrying", self.landing, exc)
                busy = failed = True
            idle = 0 if busy else idle + 1
            if idle_polls_to_stop is not None and idle >= idle_polls_to_stop:
                break
            # SQS mode waits inside the long poll; after a failure it must not spin.
            if (failed or not self.queue_url) and (max_polls is None or polls < max_polls):
                time.sleep(poll_seconds)
        return list(dict.fromkeys(self.started.values()))

    def poll_once(self) -> bool:
        """One poll; whether there was any work (arrivals to start or messages to settle)."""
        if self.queue_url:
            return self._poll_queue()
        pending = [a for a in list_arrivals(self.landing, s3=self.s3) if a.idempotency_key not in self.started]
        for arrival in pending:
            if not self._start(arrival):
                break
        return bool(pending)

    def _poll_queue(self) -> bool:
        assert self.sqs is not None and self.queue_url is not None
        found = poll_sqs(
            self.sqs,
            self.queue_url,
            self.landing,
            wait_seconds=self.wait_seconds,
            visibility_timeout=self.visibility_timeout,
            s3=self.s3,
        )
        ordered = sorted(found, key=lambda pair: arrival_order(pair[0]))
        left = Counter(handle for _, handle in ordered)  # a handle is deleted once all its arrivals started
        for i, (arrival, handle) in enumerate(ordered):
            if not self._start(arrival):
                self._release({h for _, h in ordered[i:]})
                break
            left[handle] -= 1
            if left[handle] == 0:
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=handle)
        return bool(found)

    def _start(self, arrival: Arrival) -> bool:
        """Start the stage unless this watcher already did; False on an I/O error (retried next poll)."""
        if arrival.idempotency_key in self.started:
            run_logger().info("already started %s; skipping duplicate", arrival.idempotency_key)
            return True
        try:
            self.started[arrival.idempotency_key] = self.start(arrival, self.deployment)
        except Exception as exc:
            if not is_io_error(exc):
                raise
            run_logger().warning("could not start a stage for %s (%s); retrying next poll", arrival.key, exc)
            return False
        return True

    def _release(self, handles: set[str]) -> None:
        """Make messages visible again now, so the next poll retries them (instead of after the timeout)."""
        assert self.sqs is not None
        for handle in handles:
            try:
                self.sqs.change_message_visibility(QueueUrl=self.queue_url, ReceiptHandle=handle, VisibilityTimeout=0)
            except (BotoCoreError, ClientError) as exc:  # the visibility timeout releases it anyway
                run_logger().warning("could not release an SQS message early: %s", exc)


@flow(name="watch-corpora")
def watch_corpora(
    landing: str,
    queue_url: str | None = None,
    deployment: str = DEFAULT_DEPLOYMENT,
    poll_seconds: float = 5.0,
    max_polls: int | None = None,
    endpoint_url: str | None = None,
    wait_seconds: int = 20,
    idle_polls_to_stop: int | None = None,
) -> list[str]:
    """Watch `landing` (via SQS `queue_url`, else by listing) and start `deployment` once per arrival.

    Runs until stopped, or for `max_polls` polls, or until `idle_polls_to_stop` polls in a row found
    nothing. Returns the ids of the stage runs started (or found, for repeated arrivals) by this run.
    """
    s3 = make_s3_client(endpoint_url) if parse_landing(landing).bucket else None
    sqs = make_sqs_client(endpoint_url) if queue_url else None
    watcher = Watcher(
        landing,
        start=start_stage,
        deployment=deployment,
        queue_url=queue_url,
        s3=s3,
        sqs=sqs,
        wait_seconds=wait_seconds,
    )
    run_ids = watcher.run(poll_seconds=poll_seconds, max_polls=max_polls, idle_polls_to_stop=idle_polls_to_stop)
    run_logger().info("watcher stopped after starting %d stage run(s)", len(run_ids))
    return run_ids
