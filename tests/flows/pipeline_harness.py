"""The real event-driven pipeline as a reusable test harness.

`start_pipeline` builds, around the session's servers (moto S3 + SQS, `mlflow server`, the Prefect test
server), one pipeline of its own: a fresh bucket whose `_SUCCESS` markers notify a fresh SQS queue, a fresh
registered-model name, a work folder, and the deployments served by `python -m flows.serve` in a child
process, exactly as the embedded mode runs them. `pipeline_fixture(**env)` turns it into a module fixture.

Only one pipeline may serve at a time (the deployment names are global to the Prefect server); leaving
the context stops the serve process and cancels every run of the served deployments that is not final,
so a later pipeline never inherits a half-done stage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.client import BaseClient

from flows.demo import drop_corpus, wait_flow_run
from flows.landing import list_arrivals
from flows.settings import PipelineSettings
from flows.tracking import Tracker
from flows.watch import watch_corpora
from loire.synthetic import generate
from tests.flows.processes import stop_process_group
from tests.flows.servers_aws import make_notified_bucket

STAGE_TIMEOUT_S = 300
DEPLOYMENTS = ("lifelong-stage/lifelong-stage", "train-stage/train-stage", "downstream-eval/downstream-eval")
STAGE_DEPLOYMENT = DEPLOYMENTS[0]


def base_env(root: Path, data: Path, *, prefect_api: str, mlflow_uri: str, aws_endpoint: str, model_name: str):
    """The serve process's environment: the servers, a gpt-micro schedule of 8 steps, small downstream tasks."""
    return {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "AWS_ENDPOINT_URL": aws_endpoint,
        "LOIRE_WORK_DIR": str(root / "work"),
        "LOIRE_MODEL_NAME": model_name,
        "LOIRE_SCHEDULE": "gpt-micro",
        "LOIRE_STEPS": "8",
        "LOIRE_DEVICE": "cpu",
        "LOIRE_DOWNSTREAM_CATALOGUE": str(data / "tasks.yaml"),
        "LOIRE_DOWNSTREAM_DATA_ROOT": str(data),
        "LOIRE_DOWNSTREAM_BUDGET": "24",
        "LOIRE_DOWNSTREAM_TOLERANCE": "1.0",  # 24-example fine-tuning is noise; gates: test_tracking
        "LOIRE_MAX_AP_PLUS": "none",  # 8-step stages are untrained: their AP+ is noise (default 100: real runs)
        "TOKENIZERS_PARALLELISM": "false",
    }


@dataclass
class Pipeline:
    """One running pipeline and the helpers the tests drive it with."""

    root: Path
    data: Path
    s3: BaseClient
    sqs: BaseClient
    bucket: str
    queue_url: str
    endpoint: str
    model_name: str
    tracker: Tracker
    env: dict[str, str]
    log: Path
    served: subprocess.Popen[bytes] | None = None
    overrides: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ layout
    @property
    def landing(self) -> str:
        return f"s3://{self.bucket}/landing"

    @property
    def work_dir(self) -> Path:
        return Path(self.env["LOIRE_WORK_DIR"])

    def batch_uri(self, domain: str, batch: str) -> str:
        return f"s3://{self.bucket}/landing/{domain}/{batch}/"

    # ------------------------------------------------------------------ serving
    def serve(self, **overrides: str) -> None:
        """(Re)start `python -m flows.serve` with `overrides` over the base environment; waits for the deployments."""
        self.stop_serving()
        self.overrides = dict(overrides)
        env = {**self.env, **self.overrides}
        with self.log.open("ab") as sink:
            sink.write(f"\n=== serve {overrides or ''} ===\n".encode())
            sink.flush()
            # A session of its own: stop_serving() ends the runner and the flow-run processes it started.
            self.served = subprocess.Popen(
                [sys.executable, "-m", "flows.serve"],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=Path.cwd(),
                start_new_session=True,
            )
        self._wait_for_deployments()

    def stop_serving(self) -> None:
        served, self.served = self.served, None
        stop_process_group(served)

    def _wait_for_deployments(self) -> None:
        """Until this serve process registered (or its runner polled) the stage deployment, not an earlier one."""
        from prefect.client.orchestration import get_client

        started = time.time() - 1.0
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                assert self.served is not None and self.served.poll() is None, f"flows.serve exited:\n{self.tail()}"
                with contextlib.suppress(Exception):
                    deployment = client.read_deployment_by_name(STAGE_DEPLOYMENT)
                    stamps = (deployment.last_polled, deployment.updated)
                    if any(t is not None and t.timestamp() >= started for t in stamps):
                        return
                time.sleep(0.5)
        pytest.fail(f"deployments not served in time:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else "(no serve log)"

    # ------------------------------------------------------------------ arrivals
    def upload(
        self, domain: str, batch: str, body: bytes | None = None, marker: bytes = b"", *, data: bool = True
    ) -> str:
        """Data first (the synthetic corpus of `domain`, or `body`), `_SUCCESS` last; returns the marker's ETag."""
        key = f"landing/{domain}/{batch}"
        if data:
            source = self.data / "corpora" / domain.lower() / "train.jsonl"
            self.s3.put_object(Bucket=self.bucket, Key=f"{key}/part-0.jsonl", Body=body or source.read_bytes())
        return self.s3.put_object(Bucket=self.bucket, Key=f"{key}/_SUCCESS", Body=marker)["ETag"].strip('"')

    def watch(self, **kw: Any) -> list[str]:
        """One watcher run over the queue (one long poll of 2 s); the stage run ids it started or found."""
        options = dict(queue_url=self.queue_url, max_polls=1, endpoint_url=self.endpoint, wait_seconds=2)
        return watch_corpora(self.landing, **{**options, **kw})

    # ------------------------------------------------------------------ observing
    def versions(self, batch_uri: str | None = None) -> list[Any]:
        """Registered versions, oldest first (only those of one batch with `batch_uri`)."""
        found = self.tracker.client.search_model_versions(f"name='{self.model_name}'")
        if batch_uri is not None:
            found = [v for v in found if v.tags.get("loire.corpus_uri") == batch_uri]
        return sorted(found, key=lambda v: int(v.version))

    def champion(self) -> str | None:
        found = self.tracker.champion()
        return None if found is None else str(found.version)

    def wait(self, run_ids: list[str], timeout_s: float = STAGE_TIMEOUT_S) -> list[Any]:
        return [wait_flow_run(run_id, timeout_s) for run_id in run_ids]

    def logs(self, run_id: str) -> str:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(run_id)])))
        return "\n".join(entry.message for entry in logs)

    def describe(self, run: Any) -> str:
        """A failure message: the run's state and the end of its logs."""
        return f"{run.name}: {run.state.name} {run.state.message or ''}\n{self.logs(str(run.id))[-3000:]}"

    def wait_until(self, condition: Callable[[], Any], timeout_s: float, what: str, every: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            assert self.served is None or self.served.poll() is None, f"flows.serve exited:\n{self.tail()}"
            time.sleep(every)
        pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.tail()}")

    def settings(self, **overrides: Any) -> Any:
        """The `PipelineSettings` the served stages use (for running a stage flow in the test process)."""
        from flows.settings import PipelineSettings, from_env

        env = {**self.env, **self.overrides}
        raw = yaml.safe_load(Path(env["LOIRE_SETTINGS"]).read_text()) if env.get("LOIRE_SETTINGS") else {}
        raw.update(from_env(env))
        raw["tracking_uri"] = env["MLFLOW_TRACKING_URI"]
        return PipelineSettings(**{**raw, **overrides})

    def subflows(self, run_id: str) -> list[Any]:
        """The subflow runs (e.g. train-stage) of flow run `run_id`."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
            )

    def states(self, run_id: str) -> list[Any]:
        """The state history of flow run `run_id`."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run_states(run_id)

    def run_state(self, run_id: str) -> Any:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(run_id).state

    def wait_while_running(
        self, run_id: str, condition: Callable[[], Any], timeout_s: float, what: str, every: float = 0.05
    ) -> Any:
        """`wait_until(condition)`, failing at once (with the run's logs) when run `run_id` ends first."""
        checks = [0]

        def check() -> Any:
            value = condition()
            checks[0] += 1
            if not value and checks[0] % 10 == 0:
                state = self.run_state(run_id)
                if state is not None and state.is_final():
                    pytest.fail(f"run {run_id} ended {state.name} before {what}:\n{self.logs(run_id)[-3000:]}")
            return value

        return self.wait_until(check, timeout_s, what, every=every)


def flow_run_pids(run_id: str, ancestor: int) -> list[int]:
    """The processes executing flow run `run_id` (the runner's child, PREFECT__FLOW_RUN_ID in its environment)
    among the descendants of `ancestor` (the serve process)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == ancestor:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        if needle in environ and _descends_from(int(entry.name), ancestor):
            found.append(int(entry.name))
    return sorted(found)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent pid
        except (OSError, ValueError, IndexError):
            return False
    return False


def kill_flow_run(pipeline: Pipeline, run_id: str) -> list[int]:
    """SIGKILL the process(es) running flow run `run_id` under the serve process; returns their pids."""
    assert pipeline.served is not None
    pids = flow_run_pids(run_id, pipeline.served.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _make_bucket(s3: BaseClient, sqs: BaseClient) -> tuple[str, str]:
    bucket = f"corpora-{uuid.uuid4().hex[:8]}"
    return bucket, make_notified_bucket(s3, sqs, bucket)


def cancel_unfinished_runs() -> None:
    """Cancel every run of the pipeline's deployments that is not final (frees the stage concurrency slot)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    alive = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=alive))),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[d.split("/")[1] for d in DEPLOYMENTS])),
        )
        for run in runs:
            client.set_flow_run_state(run.id, Cancelled(message="pipeline test harness stopped"), force=True)


@contextlib.contextmanager
def start_pipeline(
    root: Path,
    moto_server: Any,
    mlflow_server: Any,
    prefect_api: str,
    settings: dict[str, Any] | None = None,
    **env: str,
) -> Iterator[Pipeline]:
    """A served pipeline under `root`; `env` overrides the serve environment (e.g. LOIRE_STEPS="60") and
    `settings` is written to the `LOIRE_SETTINGS` YAML file (structured values, and the path a settings-file
    user takes)."""
    data = generate(root / "data", documents=200, task_examples=24)
    if settings:
        (root / "settings.yaml").write_text(yaml.safe_dump(settings))
        env = {"LOIRE_SETTINGS": str(root / "settings.yaml"), **env}
    s3, sqs = moto_server.client("s3"), moto_server.client("sqs")
    bucket, queue_url = _make_bucket(s3, sqs)
    model_name = f"loire-lm-{uuid.uuid4().hex[:6]}"
    pipeline = Pipeline(
        root=root,
        data=data,
        s3=s3,
        sqs=sqs,
        bucket=bucket,
        queue_url=queue_url,
        endpoint=moto_server.endpoint_url,
        model_name=model_name,
        tracker=Tracker(tracking_uri=mlflow_server.uri, model_name=model_name),
        env={
            **base_env(
                root,
                data,
                prefect_api=prefect_api,
                mlflow_uri=mlflow_server.uri,
                aws_endpoint=moto_server.endpoint_url,
                model_name=model_name,
            ),
            **env,
        },
        log=root / "serve.log",
    )
    try:
        pipeline.serve()
        yield pipeline
    finally:
        pipeline.stop_serving()
        cancel_unfinished_runs()


def pipeline_fixture(
    scope: str = "module", name: str = "pipeline", settings: dict[str, Any] | None = None, **env: str
) -> Any:
    """A pytest fixture yielding a `Pipeline` (fresh bucket, queue, model name, work dir, serve process)."""

    @pytest.fixture(scope=scope, name=name)
    def fixture(
        tmp_path_factory: pytest.TempPathFactory, moto_server: Any, mlflow_server: Any, prefect_api: str
    ) -> Iterator[Pipeline]:
        root = tmp_path_factory.mktemp(name)
        with start_pipeline(root, moto_server, mlflow_server, prefect_api, settings, **env) as p:
            yield p

    return fixture


# ---------------------------------------------------------------------- in-process stages (no served runner)
def local_world(root: Path, *, documents: int, task_examples: int, **settings: Any) -> dict[str, Any]:
    """Synthetic data, a local landing zone and SQLite MLflow under `root`, for calling `lifelong_stage` directly.

    `settings` override the gpt-micro CPU defaults; the data folder is `root / "data"`."""
    data = generate(root / "data", documents=documents, task_examples=task_examples)
    defaults: dict[str, Any] = dict(
        work_dir=str(root / "work"), tracking_uri=f"sqlite:///{root / 'mlflow.db'}", schedule="gpt-micro", device="cpu"
    )
    return {
        "root": root,
        "data": data,
        "landing": root / "landing",
        "settings": PipelineSettings(**(defaults | settings)),
    }


def arrive(world: dict[str, Any], domain: str, source: Path | None = None) -> dict[str, Any]:
    """Drop `domain`'s corpus (or `source`) into the world's landing zone; the arrival's stage parameters."""
    drop_corpus(source or world["data"] / "corpora" / domain.lower(), world["landing"], domain)
    return next(a for a in list_arrivals(str(world["landing"])) if a.domain == domain).to_params()
