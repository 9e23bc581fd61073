"""One retry mechanism for the pipeline: one definition of a transient error and one backoff.

`is_transient` says whether an error is worth another try: a connection failure, a timeout, throttling or a
server error (5xx) of the tracking server (MLflow), the orchestrator (Prefect) or object storage (S3/SQS);
never a refusal (4xx), bad input or a local file error. `RetryPolicy` is a bounded exponential backoff run by
tenacity. Every layer uses these two and none retries under another: the tracker per MLflow request
(`RetryPolicy.call`), the Prefect tasks through `retry_condition` (the landing fetch, the watcher's start),
the watcher's poll loop, the landing zone's interrupted transfers and infra/bootstrap (services not up yet).

The checks look the exception classes up in `sys.modules` instead of importing them: an error of a library
that was never imported cannot occur, and this module stays importable without MLflow, Prefect or boto3.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ATTEMPTS_ENV = "LOIRE_MLFLOW_RETRY_ATTEMPTS"
RETRY_MAX_DELAY_ENV = "LOIRE_MLFLOW_RETRY_MAX_DELAY_S"
# Error codes of the tracking server that describe a transient condition, not a bad request.
RETRYABLE_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED", "ABORTED"}
)
RETRYABLE_STATUS = frozenset({408, 429})  # and every 5xx
# S3/SQS error codes of throttling and server-side timeouts (some come with a 4xx status).
TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout", "InternalError"}
)
# Local file errors are OSErrors too, but no retry brings a missing file back.
_LOCAL_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
# (module, class) of the transport errors of the clients: connections refused or cut, timeouts.
_TRANSPORT_ERRORS = (
    ("httpx", "TransportError"),
    ("botocore.exceptions", "ConnectionError"),  # EndpointConnectionError, ConnectTimeoutError, ...
    ("botocore.exceptions", "HTTPClientError"),  # ConnectionClosedError, ReadTimeoutError, ...
    ("botocore.exceptions", "IncompleteReadError"),  # a response body cut off mid-transfer
)


def _is(exc: BaseException, module: str, name: str) -> bool:
    cls = getattr(sys.modules.get(module), name, None)
    return cls is not None and isinstance(exc, cls)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an error that carries an answer (requests, httpx/Prefect, botocore); else None."""
    if _is(exc, "botocore.exceptions", "ClientError"):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)  # type: ignore[attr-defined]
    if _is(exc, "httpx", "HTTPStatusError") or _is(exc, "requests", "HTTPError"):
        response = getattr(exc, "response", None)
        return None if response is None else int(response.status_code)
    return None


def is_transient(exc: BaseException) -> bool:
    """True for a connection failure, a timeout, throttling or a 5xx/408/429 answer; never for a refusal (4xx),
    a local file error or bad input."""
    if _is(exc, "mlflow.exceptions", "RestException"):  # the tracking server answered with an error code
        return exc.error_code in RETRYABLE_CODES  # type: ignore[attr-defined]
    if _is(exc, "mlflow.exceptions", "MlflowException"):
        # MlflowException defaults to INTERNAL_ERROR even for local mistakes; MLflow's REST layer wraps
        # connection failures and non-JSON 5xx answers as "API request to ... failed ...".
        return exc.error_code in RETRYABLE_CODES and "API request to" in exc.message  # type: ignore[attr-defined]
    if _is(exc, "botocore.exceptions", "ClientError"):  # what botocore still raises after its own retries
        code = str(exc.response.get("Error", {}).get("Code", ""))  # type: ignore[attr-defined]
        status = http_status(exc) or 0
        return status in RETRYABLE_STATUS or status >= 500 or code in TRANSIENT_S3_CODES or "Throttl" in code
    if _is(exc, "httpx", "HTTPStatusError") or _is(exc, "requests", "HTTPError"):
        status = http_status(exc)
        return status is None or status in RETRYABLE_STATUS or status >= 500
    if isinstance(exc, _LOCAL_ERRORS):
        return False
    # requests' ConnectionError and Timeout are OSErrors, as are LandingUnavailable and socket errors.
    return isinstance(exc, OSError) or any(_is(exc, module, name) for module, name in _TRANSPORT_ERRORS)


def short(exc: BaseException, limit: int = 300) -> str:
    """`Type: message`, cut at `limit` characters (server answers can be whole HTML pages)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff. The defaults sleep 1+2+4+8+15·5 ≈ 90 s in all, so a server that
    is down for ~30 s (a restart) is ridden out, including MLflow's own per-request retries.
    `max_elapsed_s` also stops before a sleep that would end past that many seconds since the first try."""

    attempts: int = 10
    initial_delay_s: float = 1.0
    max_delay_s: float = 15.0
    multiplier: float = 2.0
    max_elapsed_s: float | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_delay_s < 0 or self.max_delay_s < 0 or self.multiplier < 1:
            raise ValueError(f"invalid retry policy {self}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        """The default policy, with `LOIRE_MLFLOW_RETRY_ATTEMPTS` / `LOIRE_MLFLOW_RETRY_MAX_DELAY_S` applied."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field_name, kind in (
            (RETRY_ATTEMPTS_ENV, "attempts", int),
            (RETRY_MAX_DELAY_ENV, "max_delay_s", float),
        ):
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[field_name] = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r}: not a number") from None
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{RETRY_ATTEMPTS_ENV} / {RETRY_MAX_DELAY_ENV}: {exc}") from None

    def delays(self) -> Iterator[float]:
        """The sleeps between attempts (one fewer than `attempts`)."""
        delay = self.initial_delay_s
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_delay_s)
            delay *= self.multiplier

    def retrying(
        self,
        what: str,
        *,
        retry_on: Callable[[BaseException], bool] = is_transient,
        sleep: Callable[[float], None] = time.sleep,
    ) -> tenacity.Retrying:
        """A tenacity controller of this policy: retries while `retry_on(error)`, then re-raises the last error."""
        stop: Any = tenacity.stop_after_attempt(self.attempts)
        if self.max_elapsed_s is not None:
            stop = stop | tenacity.stop_before_delay(self.max_elapsed_s)
        return tenacity.Retrying(
            stop=stop,
            wait=tenacity.wait_exponential(
                multiplier=self.initial_delay_s, exp_base=self.multiplier, max=self.max_delay_s
            ),
            retry=tenacity.retry_if_exception(retry_on),
            sleep=sleep,
            before_sleep=lambda state: _log_retry(what, self, state),
            reraise=True,
        )

    def call(self, fn: Callable[[], T], *, what: str, sleep: Callable[[float], None] = time.sleep) -> T:
        """`fn()`, retried on transient errors with this backoff."""
        return self.retrying(what, sleep=sleep)(fn)


def _log_retry(what: str, policy: RetryPolicy, state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    logger.warning(
        "%s failed (attempt %d/%d): %s; retrying in %.1f s",
        what,
        state.attempt_number,
        policy.attempts,
        short(exc) if exc is not None else "?",
        delay,
    )


def call_with_retries(
    fn: Callable[[], T], *, what: str, policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep
) -> T:
    """`fn()`, retried on transient errors (see `is_transient`) with the backoff of `policy`."""
    return policy.call(fn, what=what, sleep=sleep)


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task run only when its error is transient."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


__all__ = [
    "RETRYABLE_CODES",
    "RetryPolicy",
    "call_with_retries",
    "http_status",
    "is_transient",
    "retry_condition",
    "short",
]
