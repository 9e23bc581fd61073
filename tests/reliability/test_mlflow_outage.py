"""The MLflow tracking server goes away while a stage runs.

- Down for ~10 s (plus its restart) from the moment training starts: the stage waits (the tracker retries
  every request with bounded backoff; training metrics are buffered and flushed when it ends) and
  completes with exactly one complete, loadable version for its arrival.
- A version left behind by an interrupted registration (created, artifacts missing) does not make its
  arrival look registered: the stage runs, replaces it, and exactly one complete version remains.
- Down past the retry budget (a 3 s budget here): the stage fails within a bounded time, nothing is
  registered, every version in the registry is complete; once the server is back, `loire resume-crashed
  --failed` retries the same run, which registers exactly one version for the arrival without training again
  (the completed train-stage subflow run is reused).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from flows.tracking import ARTIFACTS_TAG, arrival_key
from loire.io import load_model
from tests.flows.pipeline_harness import Pipeline, pipeline_fixture

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

OUTAGE_S = 10
# Backoff capped at 3 s (a ~24 s budget, still above the outage plus the restart) so the stage notices the
# server is back within seconds; the default policy is checked in tests/flows/test_tracking.py.
pipeline = pipeline_fixture(settings={"downstream_tasks": "none"}, LOIRE_MLFLOW_RETRY_MAX_DELAY_S="3")


def _wait_for_training(pipeline: Pipeline, run_id: str) -> None:
    """Until the stage's train-stage subflow run exists (the stage has its MLflow run and is training)."""
    pipeline.wait_while_running(run_id, lambda: pipeline.subflows(run_id), 240, "the train-stage subflow", every=0.2)


def _assert_loadable(pipeline: Pipeline, version: Any, dest: Path) -> None:
    """The version's artifacts rebuild a stage folder whose model loads and runs."""
    assert version.status == "READY" and version.tags.get(ARTIFACTS_TAG) == "complete", version.tags
    folder = pipeline.tracker.download_stage(str(version.version), dest)
    model = load_model(folder)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(8).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow  # ~1 min; test_tracking.py::test_outage_of_the_server_is_ridden_out covers an outage in make test
def test_stage_rides_out_a_restart_of_the_tracking_server(
    pipeline: Pipeline, mlflow_server: Any, tmp_path: Path
) -> None:
    pipeline.upload("WB", "2026-01")
    (run_id,) = pipeline.watch()
    _wait_for_training(pipeline, run_id)
    mlflow_server.stop()
    time.sleep(OUTAGE_S)
    state = pipeline.run_state(run_id)
    assert state.is_running(), f"the stage did not wait for the server: {state.name} {state.message}"
    mlflow_server.start()

    (run,) = pipeline.wait([run_id])
    assert run.state.is_completed(), pipeline.describe(run)
    assert "retrying in" in pipeline.tail(200_000)  # the tracker did retry (its warnings go to the serve log)
    (version,) = pipeline.versions()  # exactly one version, no duplicate from a retried registration
    assert version.tags["loire.corpus_uri"] == pipeline.batch_uri("WB", "2026-01")
    assert pipeline.champion() == str(version.version)
    _assert_loadable(pipeline, version, tmp_path / "v1")
    # The metrics logged while the server was down were kept and sent when training ended.
    history = pipeline.tracker.client.get_metric_history(version.run_id, "train/loss")
    assert 8 in {m.step for m in history}, history
    assert pipeline.tracker.client.get_run(version.run_id).info.status == "FINISHED"


@pytest.mark.slow  # ~40 s of a stage; part of make test-all
def test_orphan_version_without_artifacts_does_not_count_as_registered(pipeline: Pipeline, tmp_path: Path) -> None:
    """What a registration interrupted after `create_model_version` leaves: a version with the arrival's tags
    but no artifacts behind it. The arrival must still be processed, and end with one complete version."""
    tracker = pipeline.tracker
    tracker._ensure_registered_model()  # run alone, the registry has no model yet
    champion = pipeline.champion()
    etag = pipeline.upload("NEWS", "2026-02")
    uri = pipeline.batch_uri("NEWS", "2026-02")
    empty = tracker.client.create_logged_model(tracker.experiment_id(), name="model")
    orphan = tracker.client.create_model_version(
        pipeline.model_name,
        source=f"models:/{empty.model_id}",
        model_id=empty.model_id,
        tags={"loire.corpus_uri": uri, "loire.corpus_etag": etag, "loire.arrival": arrival_key(uri, etag)},
    )
    assert tracker.find_arrival(uri, etag) is None

    (run,) = pipeline.wait(pipeline.watch())
    assert run.state.is_completed(), pipeline.describe(run)
    result = run.state.result()
    assert not result["skipped"], result
    (version,) = pipeline.versions(uri)  # the orphan was deleted, one complete version remains
    assert version.version != orphan.version and version.tags["loire.parent_version"] == (champion or "none")
    assert pipeline.champion() == str(version.version)
    _assert_loadable(pipeline, version, tmp_path / "news")


@pytest.mark.slow  # ~60-90 s: a failed stage, a restart of the server and the retried stage
def test_outage_past_the_retry_budget_fails_cleanly_and_a_retry_registers_once(
    pipeline: Pipeline, mlflow_server: Any, loire_cli: Any, tmp_path: Path
) -> None:
    pipeline.serve(LOIRE_MLFLOW_RETRY_ATTEMPTS="3", LOIRE_MLFLOW_RETRY_MAX_DELAY_S="2")  # a 1 + 2 s budget
    before = [str(v.version) for v in pipeline.versions()]
    champion = pipeline.champion()
    pipeline.upload("REV", "2026-03")
    (run_id,) = pipeline.watch()
    _wait_for_training(pipeline, run_id)
    mlflow_server.stop()
    try:
        down = time.monotonic()
        (failed,) = pipeline.wait([run_id], timeout_s=180)
        took = time.monotonic() - down
    finally:
        mlflow_server.start()
    assert failed.state.is_failed(), pipeline.describe(failed)
    assert took < 120, f"failing took {took:.0f} s: more than the retry budget warrants"
    logs = pipeline.logs(str(run_id))
    assert "Connection refused" in logs or "API request to" in logs, logs[-3000:]
    # Nothing half-registered: the registry is as before, every version complete.
    assert [str(v.version) for v in pipeline.versions()] == before and pipeline.champion() == champion
    assert all(v.tags.get(ARTIFACTS_TAG) == "complete" for v in pipeline.versions())

    # The server is back: the operator retries the failed run in place.
    retried = loire_cli("resume-crashed", "--failed", "--run", run_id)
    assert retried.exit_code == 0 and "rescheduled" in retried.output, retried.output
    (done,) = pipeline.wait([run_id])
    assert done.state.is_completed(), pipeline.describe(done)
    (trained,) = pipeline.subflows(run_id)  # training ran once: the retry reused its completed train-stage run
    assert trained.state.is_completed()
    (version,) = pipeline.versions(pipeline.batch_uri("REV", "2026-03"))
    assert [str(v.version) for v in pipeline.versions()] == [*before, str(version.version)]
    assert pipeline.champion() == str(version.version) and version.tags["loire.parent_version"] == (champion or "none")
    _assert_loadable(pipeline, version, tmp_path / "rev")
    runs = pipeline.tracker.client.search_runs(
        [pipeline.tracker.experiment_id()], f"tags.`prefect.flow_run_id` = '{run_id}'"
    )
    assert [r.info.run_id for r in runs] == [version.run_id]  # the retry reused the stage's MLflow run


def test_closed_port_fails_within_the_budget_with_mlflows_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's client settings as a user has them (its own 7 retries, 120 s timeout: ~4 min per request against
    a closed port): the tracker's policy owns the budget, so the first request of a stage fails within it + 20%."""
    import socket

    from flows.registry import Tracker
    from flows.retry import RetryPolicy

    for name in ("MAX_RETRIES", "TIMEOUT", "BACKOFF_FACTOR"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = RetryPolicy(attempts=4, initial_delay_s=1.0, max_delay_s=4.0)
    budget = sum(policy.delays())  # 1 + 2 + 4 = 7 s of backoff; each refused connection returns at once
    tracker = Tracker(f"http://127.0.0.1:{port}", retry=policy)
    started = time.monotonic()
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        tracker.experiment_id()
    elapsed = time.monotonic() - started
    assert elapsed <= 1.2 * budget, f"failed after {elapsed:.1f} s, budget {budget:.1f} s"
