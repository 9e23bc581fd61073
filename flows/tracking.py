"""MLflow 3 tracking, registry, lineage and promotion of lifelong stages.

One MLflow run per stage (`stage-<t>-<DOMAIN>`), one registered version of `model_name` per corpus
arrival. A version carries its arrival (`loire.corpus_uri` + `loire.corpus_etag`), its parent version
and the growth it went through; the alias `candidate` points at the newest registered stage and
`champion` at the promoted one. Setting `champion` is the single commit point of a promotion.

Every request to the tracking server goes through `call_with_retries`, so an outage of the server
(connection refused, 5xx) delays a stage instead of failing it; client errors (4xx) are not retried.
The retry budget is one `RetryPolicy` per tracker (`RetryPolicy.from_env`: `LOIRE_MLFLOW_RETRY_ATTEMPTS`,
`LOIRE_MLFLOW_RETRY_MAX_DELAY_S`); the stage flow adds no retries of its own on top of it.
All calls name their run or version explicitly (`MlflowClient`), never the thread-local active run.

Registration commits in this order: upload the model's artifacts (a logged model), create the version,
check that every artifact is there, tag the version `loire.artifacts=complete`, move `candidate`.
`find_arrival` counts only complete versions, so a version left behind by an interrupted registration
never makes its arrival look done; the next registration of that arrival deletes it. `champion` moves
only in `promote`, after the same completeness check and the gates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, LoggedModel, Metric, Param, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException, RestException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

import loire
from flows.redact import credentials_to_env
from loire.io import MODEL_INIT_LOCK, load_model, publish_dir
from loire.lifelong import STAGE_FILE, read_stage
from loire.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

CANDIDATE = "candidate"
CHAMPION = "champion"
ARTIFACTS_TAG = "loire.artifacts"  # "complete" once register_stage has checked every artifact of the version
PROMOTION_TAG = "loire.promotion"  # "promoted" or "rejected: <reasons>": the stage's decision was made
RETRY_ATTEMPTS_ENV = "LOIRE_MLFLOW_RETRY_ATTEMPTS"
RETRY_MAX_DELAY_ENV = "LOIRE_MLFLOW_RETRY_MAX_DELAY_S"
MODEL_ARTIFACT = "model"
REGISTRY_FILE = "registry.json"  # written into a downloaded stage folder: which version it is
# Top-level artifacts a registered version must hold before it may become champion.
REQUIRED_ARTIFACTS = frozenset({"MLmodel", "model", "components", STAGE_FILE})
FOLDER_ARTIFACTS = frozenset({"config.json", "tokenizer.json", STAGE_FILE})  # a stage folder logged as is
# Error codes of the tracking server that describe a transient condition, not a bad request.
RETRYABLE_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED", "ABORTED"}
)
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# MLflow metric/param keys: alphanumerics, underscores, dashes, periods, spaces, colons and slashes.
_KEY_UNSAFE = re.compile(r"[^\w\-. :/]")
_TASKS = {
    "LoireForCausalLM": "text-generation",
    "LoireForMaskedLM": "fill-mask",
    "LoireForSequenceClassification": "text-classification",
    "LoireModel": "feature-extraction",
}
_GLOBAL_URI_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------- retries
@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff. The defaults sleep 1+2+4+8+15·5 ≈ 90 s in all, so a server that
    is down for ~30 s (a restart) is ridden out, including MLflow's own per-request retries."""

    attempts: int = 10
    initial_delay_s: float = 1.0
    max_delay_s: float = 15.0
    multiplier: float = 2.0

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


def is_retryable(exc: BaseException) -> bool:
    """True for a connection failure, a timeout or a 5xx/408/429 answer; never for a 4xx validation error."""
    if isinstance(exc, RestException):  # the server answered with an error code
        return exc.error_code in RETRYABLE_CODES
    if isinstance(exc, MlflowException):
        # MlflowException defaults to INTERNAL_ERROR even for local mistakes; MLflow's REST layer wraps
        # connection failures and non-JSON 5xx answers as "API request to ... failed ...".
        return exc.error_code in RETRYABLE_CODES and "API request to" in exc.message
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status in RETRYABLE_STATUS
    return isinstance(exc, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError)


def call_with_retries(
    fn: Callable[[], T], *, what: str, policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep
) -> T:
    """`fn()`, retried on transient errors (see `is_retryable`) with the backoff of `policy`."""
    delays = policy.delays()
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            delay = next(delays, None) if is_retryable(exc) else None
            if delay is None:
                raise
            logger.warning(
                "%s failed (attempt %d/%d): %s; retrying in %.1f s", what, attempt, policy.attempts, _short(exc), delay
            )
            sleep(delay)
            attempt += 1


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "…"


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


def _model_id(version: ModelVersion) -> str:
    """The logged model behind a registered version (its source is `models:/<model_id>`)."""
    if version.model_id:
        return version.model_id
    if version.source and version.source.startswith("models:/m-"):
        return version.source.removeprefix("models:/")
    raise ValueError(f"version {version.version}: source {version.source!r} is not a logged model")


def _error_code(exc: MlflowException) -> str:
    return str(exc.error_code)


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for the duration (flavor `log_model` reads only
    the global one); serialised so that two trackers in different threads do not interleave."""
    with _GLOBAL_URI_LOCK:
        before = mlflow.get_tracking_uri()
        if before == uri:
            yield
            return
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)
            if env_before is None:  # set_tracking_uri exports the URI; keep the environment as it was
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env_before


def _corpus_source(corpus_uri: str) -> Any:
    """The MLflow DatasetSource of a corpus URI (S3, HTTP(S), GCS, local path ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # local paths match two equivalent registered sources
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(corpus_uri)


def _pip_requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference of requirements loads the model in a subprocess (slow) and
    cannot import the custom `loire` model type there."""
    import tokenizers
    import torch
    import transformers

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"tokenizers=={tokenizers.__version__}",
        "safetensors",
    ]


# --------------------------------------------------------------------------------- metric buffer
class MetricBuffer:
    """The `on_log(metrics, step)` hook of the training loop: batches metrics into `log_batch` and never
    raises. A failed send keeps its metrics (up to `max_pending`, oldest dropped first) for the next call."""

    def __init__(self, tracker: Tracker, run_id: str, max_pending: int = 100_000) -> None:
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
                    _short(exc),
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


@dataclass(frozen=True)
class _Target:
    """Where a stage's model is logged: its run, the run's experiment, tags of the logged model."""

    run_id: str
    experiment_id: str
    tags: dict[str, str]


# ------------------------------------------------------------------------------------ promotion
@dataclass(frozen=True)
class Gates:
    """Promotion gates.

    `max_ap_plus`: the largest AP+ (mean rise in perplexity points of earlier domains, ELLE) a stage may
    show. The default 500 fits the CPU-sized presets: in bench/results/lifelong.md (gpt-tiny) LOIRE's
    stages show AP+ 157–454 while naive fine-tuning of a fixed model reaches 952–1284 (catastrophic
    forgetting). For base-sized models, where AP+ is a few points, pass a much smaller bound; None
    disables the gate. A stage without AP+ (stage 1) passes.
    `downstream_tolerance`: how far (absolute score) the downstream average may fall below the champion's.
    """

    max_ap_plus: float | None = 500.0
    downstream_tolerance: float = 0.02


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reasons: list[str] = field(default_factory=list)  # one line per gate: "pass: ...", "fail: ...", "skip: ..."
    previous_champion: str | None = None


def _ap_plus_gate(ap_plus: float | None, gates: Gates) -> tuple[bool, str]:
    if ap_plus is None:
        return True, "pass: no AP+ (first stage)"
    if gates.max_ap_plus is None:
        return True, f"skip: AP+ gate disabled (AP+ {ap_plus:.4g})"
    if not math.isfinite(ap_plus) or ap_plus > gates.max_ap_plus:
        return False, f"fail: AP+ {ap_plus:.4g} > {gates.max_ap_plus:.4g}"
    return True, f"pass: AP+ {ap_plus:.4g} <= {gates.max_ap_plus:.4g}"


_UNCHECKED: Any = object()  # promote(parent_version=...) not given: no lineage check


def _lineage_gate(parent: str | None, champion: str | None) -> tuple[bool, str]:
    grown_from = "nothing" if parent is None else f"v{parent}"
    if (None if parent is None else str(parent)) == (None if champion is None else str(champion)):
        return True, f"pass: the champion is still {grown_from}, which this stage grew from"
    return False, f"fail: the champion moved to v{champion} while this stage grew from {grown_from}"


def _downstream_gate(
    mine: float | None, champion: float | None, gates: Gates, scope: str = "downstream average"
) -> tuple[bool, str]:
    if mine is None or champion is None:
        missing = "this version's" if mine is None else "the champion's"
        return True, f"skip: downstream gate ({missing} downstream average is missing)"
    floor = champion - gates.downstream_tolerance
    if not math.isfinite(mine) or mine < floor:
        return False, f"fail: {scope} {mine:.4g} < champion {champion:.4g} - {gates.downstream_tolerance}"
    return True, f"pass: {scope} {mine:.4g} >= champion {champion:.4g} - {gates.downstream_tolerance}"


# -------------------------------------------------------------------------------------- tracker
class Tracker:
    """Runs, metrics, registry and promotion of lifelong stages on one MLflow tracking server."""

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
        self.ready_timeout_s = ready_timeout_s
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._experiment_id: str | None = None  # resolved lazily: constructing a Tracker needs no server

    def _call(self, what: str, fn: Callable[..., T], *args: Any, policy: RetryPolicy | None = None, **kw: Any) -> T:
        return call_with_retries(lambda: fn(*args, **kw), what=what, policy=policy or self.retry)

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
    ) -> str:
        """Create (or, for a retried Prefect flow run, reuse) the run of one stage; returns its id."""
        tags = {
            "prefect.flow_run_id": flow_run_id or "none",
            "loire.stage": str(stage),
            "loire.domain": domain,
            "loire.corpus_uri": _tag(corpus_uri),
            "loire.corpus_etag": _tag(corpus_etag),
            "loire.arrival": arrival_key(corpus_uri, corpus_etag),
        }
        run_id = self._existing_run(tags) if flow_run_id else None
        if run_id is None:
            run = self._call(
                "create_run",
                self.client.create_run,
                self.experiment_id(),
                run_name=f"stage-{stage}-{domain}",
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
        runs = self._call("search_runs", self.client.search_runs, [self.experiment_id()], query, max_results=1)
        return runs[0].info.run_id if runs else None

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
        domains = [entry["domain"] for entry in record.get("lineage", [])]
        matrix = {"domains": domains, "rows": record.get("ppl_matrix", [])}
        self._call("log_dict(ppl_matrix)", self.client.log_dict, run_id, matrix, "eval/ppl_matrix.json")
        if plot is not None:
            self._call("log_artifact(plot)", self.client.log_artifact, run_id, str(plot), "eval")

    def log_downstream(self, run_id: str, results: Sequence[Mapping[str, Any]]) -> float | None:
        """`downstream/<task>` (mean), `downstream/<task>/std` and `downstream/average` of the tasks that
        succeeded (failed ones, `ok: False`, are skipped); returns the average."""
        done = [r for r in results if r.get("ok", True) and r.get("mean") is not None]
        metrics: dict[str, float] = {}
        for r in done:
            metrics[f"downstream/{r['task']}"] = float(r["mean"])
            if r.get("std") is not None:
                metrics[f"downstream/{r['task']}/std"] = float(r["std"])
        average = sum(float(r["mean"]) for r in done) / len(done) if done else None
        if average is not None:
            metrics["downstream/average"] = average
        self.log_metrics(run_id, metrics)
        return average

    # --------------------------------------------------------------------------- registry
    def find_arrival(self, corpus_uri: str, etag: str) -> ModelVersion | None:
        """The complete registered version of this corpus arrival (the oldest when there are several).

        Complete: READY, and tagged `loire.artifacts=complete` by `register_stage` or, for a version
        without the tag (registered by an older release, or interrupted just before tagging), holding
        every artifact. A version left behind by an interrupted registration does not count."""
        for version in self._arrival_versions(corpus_uri, etag):
            if version.status == "READY" and self._is_complete(version):
                return version
        return None

    def is_decided(self, version: ModelVersion) -> bool:
        """Whether the stage of `version` reached its promotion decision (promoted or rejected)."""
        return bool(version.tags.get(PROMOTION_TAG)) or CHAMPION in (version.aliases or [])

    def _arrival_versions(self, corpus_uri: str, etag: str) -> list[ModelVersion]:
        """Every version tagged with this arrival, oldest first, whatever its state."""
        query = (
            f"name = {_literal(self.model_name)} AND tags.`loire.arrival` = {_literal(arrival_key(corpus_uri, etag))}"
        )
        found = self._call("search_model_versions", self.client.search_model_versions, query)
        same = [
            v
            for v in found
            if v.tags.get("loire.corpus_uri") == _tag(corpus_uri) and v.tags.get("loire.corpus_etag") == _tag(etag)
        ]
        return sorted(same, key=lambda v: int(v.version))

    def _is_complete(self, version: ModelVersion) -> bool:
        if version.tags.get(ARTIFACTS_TAG) == "complete":
            return True
        try:
            self._check_artifacts(version)
        except MlflowException as exc:  # e.g. its logged model was deleted
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.info("%s v%s does not count: %s", self.model_name, version.version, _short(exc))
            return False
        except (RuntimeError, ValueError) as exc:
            logger.info("%s v%s does not count: %s", self.model_name, version.version, exc)
            return False
        return True

    def _drop_incomplete(self, corpus_uri: str, etag: str) -> None:
        """Delete the versions of this arrival that are not complete: what interrupted registrations left."""
        for version in self._arrival_versions(corpus_uri, etag):
            if version.status == "READY" and self._is_complete(version):
                continue
            logger.warning(
                "deleting %s v%s (%s): an incomplete registration of arrival %s",
                self.model_name,
                version.version,
                version.status,
                corpus_uri,
            )
            self._delete_version(version.version)

    def _delete_version(self, version: str) -> None:
        try:
            self._call("delete_model_version", self.client.delete_model_version, self.model_name, str(version))
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise

    def register_stage(
        self, run_id: str, stage_dir: str | os.PathLike[str], *, parent_version: str | None
    ) -> ModelVersion:
        """Log the stage folder as a transformers model (+ tokenizer + stage.json) and register it as a new
        version of `model_name` with alias `candidate`; an arrival already registered returns its version."""
        record = read_stage(stage_dir)
        run = self._call("get_run", self.client.get_run, run_id)
        corpus_uri, etag = _arrival_of(run, record)
        existing = self.find_arrival(corpus_uri, etag)
        if existing is not None:
            logger.info(
                "arrival %s (%s) is already version %s: not registering again", corpus_uri, etag, existing.version
            )
            self._point_candidate(existing.version)
            return existing
        if parent_version is not None:
            self._version(parent_version)  # fail before uploading anything when the parent is unknown
        self._drop_incomplete(corpus_uri, etag)
        model_id = self._log_stage_model(run, Path(stage_dir), record)
        tags = self._version_tags(record, corpus_uri, etag, parent_version)
        # A database registry store resolves `models:/<id>` through MLflow's process-wide tracking URI.
        with _global_tracking_uri(self.tracking_uri):
            version = self._call(
                "create_model_version",
                self.client.create_model_version,
                self.model_name,
                source=f"models:/{model_id}",
                run_id=run_id,
                tags=tags,
                model_id=model_id,
                await_creation_for=0,
            )
        ready = self._wait_ready(version.version)
        try:
            self._check_artifacts(ready)
        except RuntimeError:
            logger.error("%s v%s: artifacts incomplete after upload; deleting it", self.model_name, ready.version)
            self._delete_version(ready.version)
            raise
        self._set_tag(ready.version, ARTIFACTS_TAG, "complete")  # from here on the arrival counts as registered
        version = self._keep_first_of_arrival(self._version(ready.version), corpus_uri, etag)
        self._point_candidate(version.version)
        logger.info("stage %s registered as %s version %s", record["stage"], self.model_name, version.version)
        return version

    def _version_tags(
        self, record: Mapping[str, Any], corpus_uri: str, etag: str, parent_version: str | None
    ) -> dict[str, str]:
        growth = record.get("growth") or {}
        return {
            "loire.stage": str(record["stage"]),
            "loire.domain": str(record["domain"]),
            "loire.strategy": str(record.get("strategy")),
            "loire.parent_version": parent_version or "none",
            "loire.corpus_uri": _tag(corpus_uri),
            "loire.corpus_etag": _tag(etag),
            "loire.arrival": arrival_key(corpus_uri, etag),
            "loire.growth": _tag(json.dumps({k: growth.get(k) for k in ("targets", "operator", "max_abs_logit_diff")})),
        }

    def _ensure_registered_model(self) -> None:
        try:
            self._call("create_registered_model", self.client.create_registered_model, self.model_name)
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise

    def _log_stage_model(self, run: Run, stage_dir: Path, record: Mapping[str, Any]) -> str:
        """Upload the model, its tokenizer and stage.json as one MLflow logged model (in the run's experiment);
        returns its id."""
        self._ensure_registered_model()
        run_id = run.info.run_id
        # An absolute name_or_path: MLflow looks a relative one ("runs/stage-1") up on the Hugging Face Hub.
        folder = stage_dir.resolve()
        model = load_model(folder)
        components = {"model": model, "tokenizer": load_tokenizer(folder)}
        target = _Target(
            run_id, run.info.experiment_id, {"loire.stage": str(record["stage"]), "loire.domain": str(record["domain"])}
        )
        task = _TASKS[type(model).__name__]
        model_id = self._call("log_model", self._log_transformers, target, components, folder, task)
        stage_file = str(folder / STAGE_FILE)
        self._call("log_model_artifact(stage.json)", self.client.log_model_artifact, model_id, stage_file)
        self._call("log_artifact(stage.json)", self.client.log_artifact, run_id, stage_file, "stage")
        return model_id

    def _log_transformers(self, target: _Target, components: dict[str, Any], folder: Path, task: str) -> str:
        """`mlflow.transformers.log_model` of the in-memory model + tokenizer (a `task` pipeline). When no
        pipeline can be built, the stage folder itself (weights, tokenizer, stage.json) becomes the logged
        model's artifacts: MLflow's documented alternative, logging a checkpoint path, fails with
        transformers 5 (`build_flavor_config_from_local_checkpoint`: 'str' object has no attribute '__name__')."""
        try:
            return self._log_model_attempt(target, components, task)
        except Exception as exc:
            if is_retryable(exc):
                raise
            logger.warning(
                "no %s pipeline for this model (%s): logging the stage folder as is", task, _short(exc), exc_info=True
            )
            return self._log_folder_attempt(target, folder)

    def _log_folder_attempt(self, target: _Target, folder: Path) -> str:
        logged = self._new_logged_model(target, layout="folder")
        try:
            self.client.log_model_artifacts(logged.model_id, str(folder))
            self.client.finalize_logged_model(logged.model_id, "READY")
        except Exception:
            self._abandon(logged.model_id)
            raise
        return logged.model_id

    def _new_logged_model(self, target: _Target, layout: str) -> LoggedModel:
        tags = {**target.tags, "loire.layout": layout}
        return self.client.create_logged_model(
            target.experiment_id, name=MODEL_ARTIFACT, source_run_id=target.run_id, tags=tags
        )

    def _log_model_attempt(self, target: _Target, transformers_model: Any, task: str) -> str:
        """One upload into a fresh logged model: MLflow links a logged model to its run once only, so a retry
        cannot reuse the model of a failed attempt (which is marked FAILED)."""
        logged = self._new_logged_model(target, layout="transformers")
        try:
            with _global_tracking_uri(self.tracking_uri), MODEL_INIT_LOCK:  # it builds a pipeline (models)
                mlflow.transformers.log_model(
                    transformers_model=transformers_model,
                    name=MODEL_ARTIFACT,
                    task=task,
                    run_id=target.run_id,
                    model_id=logged.model_id,
                    pip_requirements=_pip_requirements(),
                    metadata={"loire_version": loire.__version__, "load_note": "import loire first (model_type loire)"},
                )
        except Exception:
            self._abandon(logged.model_id)
            raise
        return logged.model_id

    def _abandon(self, model_id: str) -> None:
        try:
            self._call(
                "finalize_logged_model",
                self.client.finalize_logged_model,
                model_id,
                "FAILED",
                policy=RetryPolicy(attempts=1),
            )
        except Exception as exc:  # best effort: the attempt's own error is the one to report
            logger.warning("could not mark logged model %s FAILED: %s", model_id, _short(exc))

    def _version(self, version: str) -> ModelVersion:
        return self._call("get_model_version", self.client.get_model_version, self.model_name, str(version))

    def _wait_ready(self, version: str) -> ModelVersion:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            current = self._version(version)
            if current.status == "READY":
                return current
            if current.status == "FAILED_REGISTRATION":
                raise RuntimeError(f"{self.model_name} v{version}: registration failed ({current.status_message})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.model_name} v{version}: not READY after {self.ready_timeout_s} s")
            time.sleep(1.0)

    def _keep_first_of_arrival(self, version: ModelVersion, corpus_uri: str, etag: str) -> ModelVersion:
        """Two concurrent registrations of one arrival: the lowest version wins, the other is deleted."""
        first = self.find_arrival(corpus_uri, etag)
        if first is None or first.version == version.version:
            return version
        logger.warning(
            "arrival %s was registered twice (v%s, v%s): keeping v%s",
            corpus_uri,
            first.version,
            version.version,
            first.version,
        )
        self._delete_version(version.version)
        return first

    def _aliases(self) -> dict[str, str]:
        try:
            model = self._call("get_registered_model", self.client.get_registered_model, self.model_name)
        except MlflowException as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(v) for alias, v in (model.aliases or {}).items()}

    def _point_candidate(self, version: str) -> None:
        """Move `candidate` to `version` unless it already points at a newer one (a late retry of an old
        arrival must not move it back)."""
        current = self._aliases().get(CANDIDATE)
        if current is None or int(current) <= int(version):
            self._set_alias(CANDIDATE, version)

    def _set_alias(self, alias: str, version: str) -> None:
        self._call(f"set alias {alias}", self.client.set_registered_model_alias, self.model_name, alias, str(version))

    def _set_tag(self, version: str, key: str, value: str) -> None:
        self._call(f"tag {key}", self.client.set_model_version_tag, self.model_name, str(version), key, _tag(value))

    def resolve(self, alias_or_version: str) -> ModelVersion:
        """A version by number ("3") or alias ("champion")."""
        ref = str(alias_or_version)
        if ref.isdigit():
            return self._version(ref)
        return self._call("get_model_version_by_alias", self.client.get_model_version_by_alias, self.model_name, ref)

    def champion(self) -> ModelVersion | None:
        """The version under alias `champion`; None when there is none (or no registered model yet)."""
        version = self._aliases().get(CHAMPION)
        return None if version is None else self._version(version)

    # -------------------------------------------------------------------------- promotion
    def promote(
        self,
        version: str,
        gates: Gates,
        *,
        ap_plus: float | None,
        downstream_average: float | None,
        downstream_scores: Mapping[str, float] | None = None,
        parent_version: Any = _UNCHECKED,
    ) -> Decision:
        """Check the gates; when all pass, move `champion` to `version` (the commit point) and tag it
        `loire.promoted=true`, else tag `loire.promotion=rejected: <reasons>` and leave `champion` alone.

        With `downstream_scores` (task → score), the downstream gate compares both versions on the tasks
        the champion was scored on (a later stage adds the tasks of its new domain, which would make the
        plain averages incomparable); without, it compares `downstream_average` with the champion's.

        `parent_version` (a version, or None for a first stage) makes the promotion conditional: it is
        rejected when the champion is no longer the version this stage grew from (another stage was promoted
        meanwhile, e.g. while this one was crashed), so a late stage never moves the champion back to a
        fork of the lineage. A version that already is the champion (a retried promotion) stays promoted."""
        candidate = self._complete(str(version))
        previous = self.champion()
        if previous is not None and previous.version == candidate.version:
            logger.info("%s v%s is already the champion", self.model_name, candidate.version)
            parent = candidate.tags.get("loire.parent_version", "none")
            return Decision(True, ["pass: already the champion"], None if parent == "none" else parent)
        champion_average, scope = None, "downstream average"
        if previous is not None and previous.version != candidate.version and previous.run_id:
            champion_average = self._run_metric(previous.run_id, "downstream/average")
            if downstream_scores:
                downstream_average, champion_average, common = self._common_averages(previous.run_id, downstream_scores)
                scope = f"downstream average over the {len(common)} task(s) both were scored on"
        checks = [
            _ap_plus_gate(ap_plus, gates),
            _downstream_gate(downstream_average, champion_average, gates, scope),
        ]
        if parent_version is not _UNCHECKED:
            checks.append(_lineage_gate(parent_version, previous.version if previous is not None else None))
        reasons = [reason for _, reason in checks]
        promoted = all(ok for ok, _ in checks)
        if promoted:
            self._set_alias(CHAMPION, candidate.version)
            self._set_tag(candidate.version, "loire.promoted", "true")
            self._set_tag(candidate.version, PROMOTION_TAG, "promoted")
        else:
            failed = "; ".join(reason for ok, reason in checks if not ok)
            self._set_tag(candidate.version, PROMOTION_TAG, f"rejected: {failed}")
        logger.info(
            "%s v%s %s: %s",
            self.model_name,
            candidate.version,
            "promoted" if promoted else "rejected",
            "; ".join(reasons),
        )
        return Decision(promoted, reasons, previous.version if previous is not None else None)

    def _common_averages(self, run_id: str, mine: Mapping[str, float]) -> tuple[float | None, float | None, list[str]]:
        """Averages of this version's and the champion's scores over the tasks both were scored on (and those)."""
        metrics = self._call("get_run", self.client.get_run, run_id).data.metrics
        theirs = {k.removeprefix("downstream/"): v for k, v in metrics.items() if k.startswith("downstream/")}
        common = sorted(t for t in mine if t in theirs and "/" not in t and t != "average")
        if not common:
            return None, None, []
        return (sum(mine[t] for t in common) / len(common), sum(theirs[t] for t in common) / len(common), common)

    def _complete(self, version: str) -> ModelVersion:
        """The version once READY with all its artifacts uploaded; raises otherwise."""
        ready = self._wait_ready(version)
        self._check_artifacts(ready)
        return ready

    def _check_artifacts(self, ready: ModelVersion) -> None:
        """Raise RuntimeError unless the logged model behind `ready` holds every required artifact."""
        version = ready.version
        model_id = _model_id(ready)
        top = {
            Path(f.path).name for f in self._call("list artifacts", self.client.list_logged_model_artifacts, model_id)
        }
        if "MLmodel" in top:  # transformers flavor: weights under model/, tokenizer under components/
            required, weights_dir = REQUIRED_ARTIFACTS, MODEL_ARTIFACT
        else:  # the stage folder as is
            required, weights_dir = FOLDER_ARTIFACTS, None
        weights = self._call("list artifacts", self.client.list_logged_model_artifacts, model_id, weights_dir)
        missing = sorted(required - top)
        if missing or not any(f.path.endswith(".safetensors") for f in weights):
            raise RuntimeError(f"{self.model_name} v{version}: incomplete artifacts (missing {missing or 'weights'})")

    def _run_metric(self, run_id: str, key: str) -> float | None:
        return self._call("get_run", self.client.get_run, run_id).data.metrics.get(key)

    # -------------------------------------------------------------------------- download
    def download_stage(self, version: str, dest: str | os.PathLike[str]) -> Path:
        """Rebuild the stage folder of a registered version (number or alias) at `dest`, atomically.

        The folder holds the save_pretrained files, the tokenizer, `stage.json` and `registry.json`; it loads
        with `loire.io.load_model` and serves as `run_stage(parent=...)`. The last lineage entry of stage.json
        (this stage) gets `model_dir = dest`; earlier stages' model_dir still name where they were trained, so
        pass `teachers=` to `run_stage` when those folders are not on this machine. An existing complete
        `dest` of the same version is reused.
        """
        dest = Path(dest)
        mv = self.resolve(version)
        if _is_complete_stage(dest, self.model_name, mv.version):
            logger.info("%s already holds %s v%s", dest, self.model_name, mv.version)
            return dest
        location = self._call("get_logged_model", self.client.get_logged_model, _model_id(mv)).artifact_location
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            raw = tmp / "download"
            self._call("download_artifacts", _download, location, raw, self.tracking_uri)
            folder = _assemble_stage(raw, tmp / "stage", dest)
            (folder / REGISTRY_FILE).write_text(json.dumps(_registry_info(self.model_name, mv), indent=2))
            publish_dir(folder, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("%s v%s rebuilt at %s", self.model_name, mv.version, dest)
        return dest

    # --------------------------------------------------------------------------- lineage
    def lineage(self, alias_or_version: str = CHAMPION) -> list[dict[str, Any]]:
        """The chain from a version back to stage 1 along `loire.parent_version`, oldest first."""
        chain: list[dict[str, Any]] = []
        seen: set[str] = set()
        mv: ModelVersion | None = self.resolve(alias_or_version)
        while mv is not None and mv.version not in seen:
            seen.add(mv.version)
            chain.append(self._lineage_entry(mv))
            parent = mv.tags.get("loire.parent_version", "none")
            mv = None if parent == "none" else self._version(parent)
        return chain[::-1]

    def _lineage_entry(self, mv: ModelVersion) -> dict[str, Any]:
        metrics = self._call("get_run", self.client.get_run, mv.run_id).data.metrics if mv.run_id else {}
        stage = mv.tags.get("loire.stage")
        return {
            "version": str(mv.version),
            "stage": int(stage) if stage and stage.isdigit() else None,
            "domain": mv.tags.get("loire.domain"),
            "corpus_uri": mv.tags.get("loire.corpus_uri"),
            "etag": mv.tags.get("loire.corpus_etag"),
            "aliases": list(mv.aliases or []),
            "run_id": mv.run_id,
            "ap": metrics.get("eval/ap"),
            "ap_plus": metrics.get("eval/ap_plus"),
        }


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


def _download(artifact_uri: str, dst: Path, tracking_uri: str) -> str:
    """A clean download (a retried partial one starts over)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=tracking_uri)


def _assemble_stage(raw: Path, folder: Path, dest: Path) -> Path:
    """A stage folder from a downloaded logged model: an MLflow transformers model (model/ +
    components/tokenizer/ + stage.json) or a stage folder logged as is."""
    root = next((p for p in [raw, *raw.iterdir()] if (p / STAGE_FILE).is_file()), None)
    if root is None:
        raise RuntimeError(f"{raw}: the download holds no {STAGE_FILE}")
    if (root / "MLmodel").is_file():
        shutil.copytree(root / MODEL_ARTIFACT, folder)
        tokenizer = root / "components" / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            raise RuntimeError(f"{root}: the registered model has no tokenizer (components/tokenizer/tokenizer.json)")
        for file in tokenizer.iterdir():
            shutil.copy2(file, folder / file.name)
    else:
        shutil.copytree(root, folder)
    record = json.loads((root / STAGE_FILE).read_text())
    if record.get("lineage"):
        record["lineage"][-1]["model_dir"] = str(dest.resolve())  # this stage now lives at dest
    (folder / STAGE_FILE).write_text(json.dumps(record, indent=2))
    return folder


def _arrival_of(run: Run, record: Mapping[str, Any]) -> tuple[str, str]:
    """Corpus URI and ETag as the run was tagged with (the arrival), else as stage.json recorded them."""
    tags = run.data.tags
    corpus = record.get("corpus") or {}
    uri = tags.get("loire.corpus_uri") or corpus.get("uri")
    etag = tags.get("loire.corpus_etag") or corpus.get("etag") or corpus.get("digest")
    if not uri or not etag:
        raise ValueError(f"run {run.info.run_id}: no corpus URI/ETag in its tags nor in stage.json")
    return uri, etag


def _registry_info(model_name: str, mv: ModelVersion) -> dict[str, Any]:
    return {"model_name": model_name, "version": mv.version, "run_id": mv.run_id, "source": mv.source}


def _is_complete_stage(folder: Path, model_name: str, version: str) -> bool:
    marker = folder / REGISTRY_FILE
    if not marker.is_file() or not all((folder / n).is_file() for n in ("config.json", "tokenizer.json", STAGE_FILE)):
        return False
    if not any(folder.glob("*.safetensors")):
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("model_name") == model_name and str(info.get("version")) == str(version)


__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "Decision",
    "Gates",
    "MetricBuffer",
    "RetryPolicy",
    "Tracker",
    "arrival_key",
    "call_with_retries",
    "dataset_digest",
    "flatten_params",
    "is_retryable",
    "stage_metrics",
]
