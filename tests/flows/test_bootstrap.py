"""infra/bootstrap.py against real servers: moto (S3 + SQS) on loopback, a temporary Prefect server, MLflow on sqlite.

The Prefect server is the session's `prefect_api` harness (tests/flows/conftest.py). Every test uses its own
resource names, so tests neither depend on each other's order nor touch what other tests create.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote_plus

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _load_bootstrap() -> ModuleType:
    # infra/ is not a package: the script is loaded from its path, as the compose service runs it
    spec = importlib.util.spec_from_file_location("loire_infra_bootstrap", ROOT / "infra" / "bootstrap.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


bootstrap = _load_bootstrap()


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # fake credentials, and nothing from the developer's AWS configuration
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "LOIRE_QUEUE_URL"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def run(moto_url: str, prefect_api: str, tracking_uri: str, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run bootstrap in-process (the harness's API URL is a setting of this process): (exit code, output lines)."""

    def _run(*args: str) -> tuple[int, list[str]]:
        code = bootstrap.main(["--endpoint-url", moto_url, "--tracking-uri", tracking_uri, *args])
        out = capsys.readouterr()
        return code, out.out.splitlines() + out.err.splitlines()

    return _run


def _names(prefix: str) -> list[str]:
    return [
        "--bucket", f"{prefix}-bucket", "--prefix", "domains/", "--queue", f"{prefix}-queue",
        "--cpu-pool", f"{prefix}-cpu", "--gpu-pool", f"{prefix}-gpu", "--model-name", f"{prefix}-model",
        "--experiment", f"{prefix}-experiment",
    ]  # fmt: skip


def _clients(moto_url: str) -> tuple[Any, Any]:
    import boto3

    return boto3.client("s3", endpoint_url=moto_url), boto3.client("sqs", endpoint_url=moto_url)


def _pools(*names: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    with get_client(sync_client=True) as client:
        return client.read_work_pools(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=list(names))))


def snapshot(moto_url: str, tracking_uri: str, prefix: str) -> dict[str, Any]:
    """Everything bootstrap may create for names `prefix-*`, as plain data."""
    from mlflow import MlflowClient

    s3, sqs = _clients(moto_url)
    bucket, queue = f"{prefix}-bucket", f"{prefix}-queue"
    buckets = [b["Name"] for b in s3.list_buckets()["Buckets"] if b["Name"] == bucket]
    queues = [u for u in sqs.list_queues(QueueNamePrefix=queue).get("QueueUrls", []) if u.endswith(f"/{queue}")]
    notification = s3.get_bucket_notification_configuration(Bucket=bucket) if buckets else {}
    notification.pop("ResponseMetadata", None)
    attributes = sqs.get_queue_attributes(QueueUrl=queues[0], AttributeNames=["All"])["Attributes"] if queues else {}
    mlflow = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    models = [m.name for m in mlflow.search_registered_models(filter_string=f"name = '{prefix}-model'")]
    experiment = mlflow.get_experiment_by_name(f"{prefix}-experiment")
    return {
        "buckets": buckets,
        "queues": queues,
        "queue_policy": json.loads(attributes["Policy"]) if attributes.get("Policy") else None,
        "notification": notification,
        "pools": sorted((p.name, p.type) for p in _pools(f"{prefix}-cpu", f"{prefix}-gpu")),
        "models": models,
        "experiment": experiment.experiment_id if experiment else None,
    }


def _receive_all(sqs: Any, url: str) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    while messages := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages"):
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return bodies


def test_dry_run_before_anything_exists_changes_nothing(run: Any, moto_url: str, tracking_uri: str) -> None:
    code, lines = run(*_names("bt-dry"), "--dry-run")
    assert code == 0, lines
    text = "\n".join(lines)
    for planned in (
        "bucket s3://bt-dry-bucket",
        "queue bt-dry-queue",
        "work pool bt-dry-cpu (process)",
        "registered model bt-dry-model",
    ):
        assert any(line.startswith("would create") and planned in line for line in lines), text
    assert not any(line.startswith(("created", "updated")) for line in lines), text
    assert snapshot(moto_url, tracking_uri, "bt-dry") == {
        "buckets": [],
        "queues": [],
        "queue_policy": None,
        "notification": {},
        "pools": [],
        "models": [],
        "experiment": None,
    }


def test_bootstrap_twice_creates_everything_exactly_once(run: Any, moto_url: str, tracking_uri: str) -> None:
    code, first = run(*_names("bt-twice"))
    assert code == 0, first
    # the crash-recovery automations are global to the Prefect server (an earlier test may have created them)
    created = [line for line in first if line.startswith("created") and "automation" not in line]
    assert len(created) == 8, first  # bucket, queue, policy, notification, 2 pools, model, experiment
    assert sum("automation loire-" in line for line in first) == 2, first
    code, second = run(*_names("bt-twice"))
    assert code == 0, second
    assert not any(line.startswith(("created", "updated")) for line in second), second
    assert sum(line.startswith("exists") for line in second) == 10, second

    state = snapshot(moto_url, tracking_uri, "bt-twice")
    assert state["buckets"] == ["bt-twice-bucket"]
    assert len(state["queues"]) == 1
    _, sqs = _clients(moto_url)
    queue_url = state["queues"][0]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    assert state["queue_policy"]["Statement"] == [bootstrap.queue_statement(arn, "bt-twice-bucket")]
    [config] = state["notification"]["QueueConfigurations"]
    assert config["Id"] == bootstrap.NOTIFICATION_ID and config["QueueArn"] == arn
    assert config["Events"] == ["s3:ObjectCreated:*"]
    rules = {(r["Name"].lower(), r["Value"]) for r in config["Filter"]["Key"]["FilterRules"]}
    assert rules == {("prefix", "domains/"), ("suffix", "_SUCCESS")}
    assert state["pools"] == [("bt-twice-cpu", "process"), ("bt-twice-gpu", "process")]
    assert state["models"] == ["bt-twice-model"] and state["experiment"] is not None

    # a dry run afterwards reports everything as existing and changes nothing
    code, dry = run(*_names("bt-twice"), "--dry-run")
    assert code == 0 and not any(line.startswith("would") for line in dry), dry
    assert snapshot(moto_url, tracking_uri, "bt-twice") == state

    # the notification was written once (each write makes S3 send a test event) and routes only _SUCCESS markers
    s3, _ = _clients(moto_url)
    assert [b.get("Event") for b in _receive_all(sqs, queue_url)] == ["s3:TestEvent"]
    s3.put_object(Bucket="bt-twice-bucket", Key="domains/NEWS/2026-01-05/part-0000.jsonl", Body=b'{"text": "x"}\n')
    s3.put_object(Bucket="bt-twice-bucket", Key="domains/NEWS/2026-01-05/_SUCCESS", Body=b"")
    s3.put_object(Bucket="bt-twice-bucket", Key="elsewhere/_SUCCESS", Body=b"")
    # keys arrive URL-encoded, as from AWS
    keys = [
        unquote_plus(r["s3"]["object"]["key"]) for body in _receive_all(sqs, queue_url) for r in body.get("Records", [])
    ]
    assert keys == ["domains/NEWS/2026-01-05/_SUCCESS"]


def test_no_queue_creates_only_the_bucket(run: Any, moto_url: str, tracking_uri: str) -> None:
    code, lines = run(*_names("plain"), "--no-queue", "--no-prefect", "--no-mlflow")
    assert code == 0, lines
    state = snapshot(moto_url, tracking_uri, "plain")
    assert state["buckets"] == ["plain-bucket"] and state["queues"] == [] and state["notification"] == {}
    assert any("LOIRE_LANDING=s3://plain-bucket/domains/" in line for line in lines), lines


def test_kubernetes_gpu_pool_gets_the_template(run: Any) -> None:
    args = (
        "--no-s3",
        "--no-mlflow",
        "--cpu-pool",
        "bt-k8s-cpu",
        "--gpu-pool",
        "bt-k8s-gpu",
        "--gpu-pool-type",
        "kubernetes",
    )
    code, lines = run(*args, "--gpu-image", "registry.example/loire-gpu:1")
    assert code == 0, lines
    [pool] = [p for p in _pools("bt-k8s-gpu")]
    assert pool.type == "kubernetes"
    variables = pool.base_job_template["variables"]["properties"]
    assert variables["image"]["default"] == "registry.example/loire-gpu:1"
    assert variables["gpu_count"]["default"] == 1
    container = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"

    code, again = run(*args, "--gpu-image", "registry.example/loire-gpu:1")
    assert code == 0 and any(line.startswith("exists") and "bt-k8s-gpu" in line for line in again), again
    code, changed = run(*args, "--gpu-image", "registry.example/loire-gpu:2")  # the template file wins on change
    assert code == 0 and any(line.startswith("updated") and "bt-k8s-gpu" in line for line in changed), changed
    [pool] = _pools("bt-k8s-gpu")
    assert pool.base_job_template["variables"]["properties"]["image"]["default"] == "registry.example/loire-gpu:2"


def test_pool_of_another_type_is_reported(run: Any) -> None:
    code, _ = run(
        "--no-s3",
        "--no-mlflow",
        "--cpu-pool",
        "bt-typed-cpu",
        "--gpu-pool",
        "bt-typed",
        "--gpu-pool-type",
        "kubernetes",
    )
    assert code == 0
    code, lines = run("--no-s3", "--no-mlflow", "--cpu-pool", "bt-typed", "--gpu-pool", "bt-typed-gpu")
    assert code == 2
    assert any("work pool bt-typed exists with type 'kubernetes'" in line for line in lines), lines


def test_missing_tracking_uri_is_reported(
    moto_url: str, prefect_api: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert bootstrap.main(["--endpoint-url", moto_url, "--no-s3", "--no-prefect"]) == 2
    assert "MLFLOW_TRACKING_URI is not set" in capsys.readouterr().err


def test_start_watcher_starts_one_run(run: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    code, _ = run("--no-s3", "--no-mlflow", "--cpu-pool", "bt-w-cpu", "--gpu-pool", "bt-w-gpu")
    assert code == 0
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("bt-watch")
        deployment_id = client.create_deployment(flow_id, "bt-watch", work_pool_name="bt-w-cpu")
    args = (
        "--no-s3",
        "--no-prefect",
        "--no-mlflow",
        "--start-watcher",
        "--watcher-deployment",
        "bt-watch/bt-watch",
    )
    code, first = run(*args)
    assert code == 0 and any(line.startswith("created") and "watcher run" in line for line in first), first
    code, second = run(*args)
    assert code == 0 and any(line.startswith("exists") and "watcher run" in line for line in second), second
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    assert len(runs) == 1
