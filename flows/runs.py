"""MLflow runs of lifelong stages: one run per stage (`stage-<t>-<DOMAIN>`), its params, its corpus as a
dataset input, its metrics (`MetricBuffer` for the training loop, `stage_metrics` of a stage.json record) and its
tables (the PPL matrix, the downstream scores).

Every request goes through the tracker's `RetryPolicy` (flows/retry.py), so an outage of the server
(connection refused, 5xx) delays a stage instead of failing it; client errors (4xx) are not retried.
All calls name their run explicitly (`MlflowClient`), never the thread-local active run.
The registry side (versions, aliases, promotion, download, lineage) is `flows.registry.Tracker`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from flows.redact import credentials_to_env, redact
from flows.retry import RetryPolicy, call_with_retries, is_transient, short
from loire.downstream.finetune import average_score, scores_frame
from loire.lifelong import learnt_domains
from loire.metrics import ppl_frame
from loire.planner import probes_frame

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

T = TypeVar("T")

# MLflow metric/param keys: alphanumerics, underscores, dashes, periods, spaces, colons and slashes.
_KEY_UNSAFE = re.compile(r"[^\w\-. :/]")


# ------------------------------------------------------------------------------- small helpers
def metric_key(key: str) -> str:
    """A valid MLflow metric/param key: unsupported characters become `_`, length capped."""
    return _KEY_UNSAFE.sub("_", key)[:MAX_ENTITY_KEY_LENGTH]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings become `a/b/c` keys; other values are stringified (JSON for lists) and truncated."""
    flat: dict[str, str] = {}
    for name, value in params.items():
        key = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, key))
            continue
        text = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
        flat[metric_key(key)] = text[:MAX_PARAM_VAL_LENGTH]
    return flat


def arrival_key(corpus_uri: str, etag: str) -> str:
    """A filter-safe identity of one corpus arrival (URIs and ETags may hold quotes)."""
    return hashlib.sha256(f"{corpus_uri}\n{etag}".encode()).hexdigest()[:32]


def dataset_digest(etag: str) -> str:
    """The ETag as an MLflow dataset digest: quotes stripped; hashed when over MLflow's 36 characters."""
    bare = etag.strip().strip('"')
    return bare if len(bare) <= MAX_DATASET_DIGEST_SIZE else hashlib.sha256(bare.encode()).hexdigest()[:32]


def _tag(value: str) -> str:
    return value[:MAX_TAG_VAL_LENGTH]


def _literal(value: str) -> str:
    """A single-quoted literal for an MLflow filter string; values with quotes are refused."""
    if "'" in value:
        raise ValueError(f"{value!r}: a single quote cannot appear in an MLflow filter value")
    return f"'{value}'"


def _error_code(exc: MlflowException) -> str:
    return str(exc.error_code)


def _corpus_source(corpus_uri: str) -> Any:
    """The MLflow DatasetSource of a corpus URI (S3, HTTP(S), GCS, local path ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # local paths match two equivalent registered sources
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(corpus_uri)


# --------------------------------------------------------------------------------- metric buffer
class MetricBuffer:
    """The `on_log(metrics, step)` hook of the training loop: batches metrics into `log_batch` and never
    raises. A failed send keeps its metrics (up to `max_pending`, oldest dropped first) for the next call."""

    def __init__(self, tracker: RunLog, run_id: str, max_pending: int = 100_000) -> None:
        self._tracker = tracker
        self._run_id = run_id
        self._max_pending = max_pending
        self._pending: list[Metric] = []
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            self._pending.extend(_metrics(metrics, step, now))
            self._trim()
            try:
                self._send(RetryPolicy(attempts=1))  # one try: training must not wait on the server
            except Exception as exc:
                logger.warning(
                    "could not log %d metrics of run %s (kept for the next call): %s",
                    len(self._pending),
                    self._run_id,
                    short(exc),
                )

    def flush(self) -> None:
        """Send what is pending with the tracker's full retry policy; raises when that fails."""
        with self._lock:
            self._send(self._tracker.retry)

    def _send(self, policy: RetryPolicy) -> None:
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            self._tracker._call(
                f"log_batch({self._run_id})", self._tracker.client.log_batch, self._run_id, metrics=chunk, policy=policy
            )
            del self._pending[: len(chunk)]

    def _trim(self) -> None:
        excess = len(self._pending) - self._max_pending
        if excess > 0:
            logger.warning("dropping the %d oldest unsent metrics of run %s", excess, self._run_id)
            del self._pending[:excess]


def _metrics(values: Mapping[str, Any], step: int, timestamp: int) -> list[Metric]:
    """Metric entities of the numeric entries of `values` (booleans and None skipped)."""
    out = []
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out.append(Metric(key=metric_key(key), value=float(value), timestamp=timestamp, step=int(step)))
    return out


# ---------------------------------------------------------------------------- refused requests
class TrackingAuthError(MlflowException):
    """The tracking server refused the pipeline's login (401) or a permission (403). One line naming the server,
    the user and what was refused, never the password; not transient, so it fails the stage at once."""


_REFUSALS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}


def refusal(exc: MlflowException, *, what: str, tracking_uri: str, experiment: str, model_name: str) -> str | None:
    """The one-line message of an MLflow auth app refusal (error code UNAUTHENTICATED / PERMISSION_DENIED); None for
    any other error. MLflow reads the login from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    status = _REFUSALS.get(str(exc.error_code))
    if status is None:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401:
        who = f"user {user!r}: wrong username or password" if user else "an anonymous request: a login is required"
        fix = "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
    else:
        who = f"user {user or 'anonymous'!r}: no permission"
        fix = f"an MLflow admin grants it on experiment {experiment!r} and model {model_name!r} (docs/security.md)"
    return redact(f"MLflow at {tracking_uri} refused {what} for {who} ({status}); {fix}")


# ------------------------------------------------------------------------------------ runs
# MLflow's client retries every request itself (7 times with backoff by default: ~4 min against a closed
# port) before the tracker's policy sees an error, so the two layers would multiply (~40 min). The policy
# owns the budget: MLflow's own retries are off and one request waits at most this long for an answer.
MLFLOW_REQUEST_TIMEOUT_S = 30


def own_mlflow_retries() -> None:
    """Turn MLflow's per-request retries off (the tracker's `RetryPolicy` retries) and cap its timeout."""
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    if retries not in (None, "", "0"):
        logger.warning(
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES=%s ignored: the tracker's retry policy owns the budget", retries
        )
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(MLFLOW_REQUEST_TIMEOUT_S))


# On the version (and run) of a stage's retry (policy `retry`): "2". Absent: the first attempt. Each attempt of an
# arrival is registered at most once; the first attempt's version stands for the arrival (exactly once).
ATTEMPT_TAG = "loire.attempt"


def attempt_of(tags: Mapping[str, str]) -> int:
    """Which attempt of its arrival a version or run is (`ATTEMPT_TAG`; 1 without it)."""
    value = tags.get(ATTEMPT_TAG, "1")
    return int(value) if value.isdigit() else 1


class RunLog:
    """Runs and metrics of lifelong stages on one MLflow tracking server (`flows.registry.Tracker` adds the
    registry)."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        model_name: str = "loire-lm",
        experiment: str = "loire",
        retry: RetryPolicy | None = None,
        ready_timeout_s: float = 300.0,
    ) -> None:
        _literal(model_name)  # used inside filter strings
        # Credentials in the URI move to MLFLOW_TRACKING_USERNAME/PASSWORD: nothing logged or recorded holds them.
        self.tracking_uri = credentials_to_env(tracking_uri or mlflow.get_tracking_uri())
        self.model_name = model_name
        self.experiment = experiment
        self.retry = retry or RetryPolicy.from_env()
        own_mlflow_retries()
        self.ready_timeout_s = ready_timeout_s
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._experiment_id: str | None = None  # resolved lazily: constructing a Tracker needs no server

    def _call(self, what: str, fn: Callable[..., T], *args: Any, policy: RetryPolicy | None = None, **kw: Any) -> T:
        try:
            return call_with_retries(lambda: fn(*args, **kw), what=what, policy=policy or self.retry)
        except TrackingAuthError:
            raise
        except MlflowException as exc:
            message = refusal(
                exc, what=what, tracking_uri=self.tracking_uri, experiment=self.experiment, model_name=self.model_name
            )
            if message is None:
                raise
            code = ErrorCode.Value(str(exc.error_code))
            raise TrackingAuthError(message, error_code=code) from None  # the server's page adds nothing

    # ------------------------------------------------------------------------------- runs
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        found = self._call("get_experiment_by_name", self.client.get_experiment_by_name, self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self._call("create_experiment", self.client.create_experiment, self.experiment)
        except MlflowException as exc:  # created concurrently by another stage
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._call(
                "get_experiment_by_name", self.client.get_experiment_by_name, self.experiment
            ).experiment_id

    def start_stage_run(
        self,
        *,
        stage: int,
        domain: str,
        flow_run_id: str | None,
        params: dict[str, Any],
        corpus_uri: str,
        corpus_etag: str,
        attempt: int = 1,
    ) -> str:
        """Create (or, for a retried Prefect flow run, reuse) the run of one stage; returns its id. `attempt` 2 is
        the stage's retry (policy `retry`): its own run, tagged `loire.attempt`."""
        tags = {
            "prefect.flow_run_id": flow_run_id or "none",
            "loire.stage": str(stage),
            "loire.domain": domain,
            "loire.corpus_uri": _tag(corpus_uri),
            "loire.corpus_etag": _tag(corpus_etag),
            "loire.arrival": arrival_key(corpus_uri, corpus_etag),
            **({ATTEMPT_TAG: str(attempt)} if attempt > 1 else {}),
        }
        run_id = self._existing_run(tags) if flow_run_id else None
        if run_id is None:
            run = self._call(
                "create_run",
                self.client.create_run,
                self.experiment_id(),
                run_name=f"stage-{stage}-{domain}" + (f"-retry{attempt - 1}" if attempt > 1 else ""),
                tags=tags,
            )
            run_id = run.info.run_id
        self._log_params(run_id, flatten_params(params))
        self._log_corpus(run_id, domain, corpus_uri, corpus_etag)
        logger.info("stage %d (%s): MLflow run %s", stage, domain, run_id)
        return run_id

    def _existing_run(self, tags: Mapping[str, str]) -> str | None:
        keys = ("prefect.flow_run_id", "loire.stage", "loire.arrival")
        if any("'" in tags[k] for k in keys):
            return None
        query = " AND ".join(f"tags.`{k}` = {_literal(tags[k])}" for k in keys)
        runs = self._call("search_runs", self.client.search_runs, [self.experiment_id()], query, max_results=10)
        attempt = attempt_of(tags)  # the first attempt's run has no attempt tag: tell the runs apart here
        return next((r.info.run_id for r in runs if attempt_of(r.data.tags) == attempt), None)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log (nested) params, flattened with dotted names; values truncated to MLflow's limit."""
        self._log_params(run_id, flatten_params(params))

    def _log_params(self, run_id: str, flat: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._call(
                "log_batch(params)", self.client.log_batch, run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            )

    def _log_corpus(self, run_id: str, domain: str, corpus_uri: str, corpus_etag: str) -> None:
        """The corpus as a metadata-only dataset input (source = its URI, digest = its ETag)."""
        from mlflow.data.meta_dataset import MetaDataset

        try:
            source = _corpus_source(corpus_uri)
        except MlflowException as exc:
            logger.warning("%s: no MLflow dataset source for this URI (%s); dataset input not logged", corpus_uri, exc)
            return
        meta = MetaDataset(source, name=f"corpus-{domain}", digest=dataset_digest(corpus_etag)).to_dict()
        entity = DatasetEntity(meta["name"], meta["digest"], meta["source_type"], meta["source"])
        dataset = DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
        self._call("log_inputs", self.client.log_inputs, run_id, datasets=[dataset])

    def end_stage_run(self, run_id: str, *, failed: bool = False) -> None:
        self._call("set_terminated", self.client.set_terminated, run_id, "FAILED" if failed else "FINISHED")

    # ---------------------------------------------------------------------------- metrics
    def on_log(self, run_id: str) -> MetricBuffer:
        """A `(metrics, step) -> None` hook for `loire.train` (`run_stage(on_log=...)`); call `.flush()` at the end."""
        return MetricBuffer(self, run_id)

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        batch = _metrics(metrics, step, int(time.time() * 1000))
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self._call(
                "log_batch(metrics)", self.client.log_batch, run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH]
            )

    def log_stage_metrics(
        self, run_id: str, record: dict[str, Any], *, plot: str | os.PathLike[str] | None = None
    ) -> None:
        """Evaluation, cost and growth metrics of a `stage.json` record, its PPL matrix and an optional plot."""
        self.log_metrics(run_id, stage_metrics(record), step=int(record["stage"]))
        lineage = record.get("lineage", [])
        matrix = {
            "domains": [entry["domain"] for entry in lineage],
            "carried": [learnt[:-1] for learnt in learnt_domains(lineage)],  # learnt at that stage too
            "rows": record.get("ppl_matrix", []),
        }
        self._call("log_dict(ppl_matrix)", self.client.log_dict, run_id, matrix, "eval/ppl_matrix.json")
        if matrix["rows"]:  # the same matrix with AP and AP+ per stage, as a table the MLflow UI compares
            self._log_table(
                run_id,
                ppl_frame(matrix["domains"], matrix["rows"], matrix["carried"]).reset_index(),
                "eval/ppl_table.json",
            )
        if plot is not None:
            self._call("log_artifact(plot)", self.client.log_artifact, run_id, str(plot), "eval")
        decision = (record.get("growth") or {}).get("decision")
        if decision is not None:  # the growth planner's choice and every candidate's probe
            self._call("set_tag(growth)", self.client.set_tag, run_id, "loire.growth.decision", decision["chosen"])
            self._log_table(run_id, probes_frame(decision), "growth/decision_table.json")

    def log_downstream(self, run_id: str, results: Sequence[Mapping[str, Any]]) -> float | None:
        """`downstream/<task>` (mean), `downstream/<task>/std` and `downstream/average` of the tasks that
        succeeded (failed ones, `ok: False`, are skipped); returns the average."""
        scores = scores_frame(results)
        metrics: dict[str, float] = {}
        for task, row in scores.iterrows():
            metrics[f"downstream/{task}"] = float(row["mean"])
            if row["std"] is not None and not math.isnan(row["std"]):
                metrics[f"downstream/{task}/std"] = float(row["std"])
        average = average_score(results)
        if average is not None:
            metrics["downstream/average"] = average
        self.log_metrics(run_id, metrics)
        if not scores.empty:
            self._log_table(run_id, scores.reset_index(), "eval/downstream_scores.json")
        return average

    def _log_table(self, run_id: str, table: pd.DataFrame, artifact_file: str) -> None:
        """`mlflow.log_table` of a view of what is logged as metrics: best effort, never fails the stage."""
        try:
            self._call(f"log_table({artifact_file})", self.client.log_table, run_id, table, artifact_file)
        except Exception as exc:
            if is_transient(exc):
                raise
            logger.warning("%s not logged as a table: %s", artifact_file, short(exc))


def stage_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one stage.json record, by MLflow key (None values left out)."""
    flops = record.get("flops") or {}
    growth = record.get("growth") or {}
    train = record.get("train") or {}
    values: dict[str, Any] = {f"eval/ppl/{domain}": ppl for domain, ppl in (record.get("ppl") or {}).items()}
    values.update(
        {
            "eval/ap": record.get("ap"),
            "eval/ap_plus": record.get("ap_plus"),
            "cost/flops": flops.get("stage"),
            "cost/flops_cumulative": flops.get("cumulative"),
            "cost/wall_time_s": record.get("wall_time_s"),
            "grow/max_abs_logit_diff": growth.get("max_abs_logit_diff"),
            "train/final_loss": train.get("final_loss"),
        }
    )
    return {key: float(value) for key, value in values.items() if value is not None}


__all__ = [
    "MetricBuffer",
    "RunLog",
    "TrackingAuthError",
    "arrival_key",
    "dataset_digest",
    "flatten_params",
    "metric_key",
    "refusal",
    "stage_metrics",
]
