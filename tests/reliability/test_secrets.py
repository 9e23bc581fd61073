"""Secrets never reach an output: one real stage with recognisable fake secrets, then a grep of everything.

The stage runs in-process against moto S3 (the landing zone, with a fake secret key and session token),
a real `mlflow server` reached through a proxy that demands HTTP basic auth (the tracking URI carries
`user:PASSWORD@`), and the Prefect test server; a `postgresql://user:PASSWORD@host/db` URL sits in the
environment. Afterwards every output is searched for the secret values (raw, URL-encoded and as the
base64 of a basic-auth header): captured log records and stderr, the Prefect flow and task runs with
their parameters, logs and artifacts, everything the client sent to the MLflow server, the run's params,
tags, metric keys and dataset inputs, the model version and logged model, every artifact file of the run
and of the logged model (MLmodel, requirements, stage.json, ...) and every file of the work dir.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
import pytest

from flows.landing import list_arrivals, s3_client
from flows.redact import BOTOCORE_LOGGERS, MASK, credentials_to_env, redact, split_credentials
from flows.settings import PipelineSettings, load_settings
from flows.stage import lifelong_stage
from flows.tracking import Tracker
from loire.synthetic import generate
from tests.flows.servers_aws import LandingBucket, MotoServer
from tests.flows.servers_mlflow import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

AWS_SECRET = "SECRETawsKey0x5e7a9c1b3d"
AWS_TOKEN = "SECRETawsSessionToken0x8f2e4d6c"
DB_PASSWORD = "SECRETdbPassw0rd0x4b1d"
MLFLOW_USER, MLFLOW_PASSWORD = "loire", "SECRETmlflowPw0x7c3a"
DB_URL = f"postgresql://loire:{DB_PASSWORD}@db.internal:5432/loire"


def needles() -> dict[str, bytes]:
    """Every form in which a secret could show up, by name."""
    basic = base64.b64encode(f"{MLFLOW_USER}:{MLFLOW_PASSWORD}".encode()).decode()
    values = {"aws secret key": AWS_SECRET, "aws session token": AWS_TOKEN, "database password": DB_PASSWORD}
    values |= {"mlflow password": MLFLOW_PASSWORD, "mlflow basic auth": basic}
    forms = {}
    for name, value in values.items():
        forms[name] = value.encode()
        forms[f"{name} (base64)"] = base64.b64encode(value.encode()).rstrip(b"=")
        if quote(value, safe="") != value:
            forms[f"{name} (url-encoded)"] = quote(value, safe="").encode()
    return forms


def leaks(outputs: dict[str, bytes | str]) -> list[str]:
    found = []
    for where, content in outputs.items():
        data = content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content
        found += [f"{name} in {where}" for name, needle in needles().items() if needle in data]
    return found


# --- an MLflow server behind HTTP basic auth ----------------------------------------------------------


class AuthProxy:
    """Forwards every request to `upstream` if it carries the expected basic-auth header, else answers 401.
    Records each request's method, path, headers (but the Authorization) and body."""

    def __init__(self, upstream_port: int, user: str, password: str) -> None:
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests: list[bytes] = []
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host")}
                proxy.requests.append(f"{self.command} {self.path} {headers}\n".encode() + body)
                if self.headers.get("Authorization") != proxy.expected:
                    proxy.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[AuthProxy]:
    proxy = AuthProxy(mlflow_server.port, MLFLOW_USER, MLFLOW_PASSWORD)
    yield proxy
    proxy.close()


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch, moto_server: MotoServer) -> Iterator[None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFORTESTS")  # an id, not a secret: may appear in logs
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_TOKEN)
    monkeypatch.setenv("AWS_SECURITY_TOKEN", AWS_TOKEN)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    monkeypatch.setenv("DATABASE_URL", DB_URL)
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", DB_URL)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


# --- reading every output back ------------------------------------------------------------------------


def prefect_outputs(since: float) -> dict[str, str]:
    """Flow runs, task runs, logs and artifacts created by the Prefect API since `since`, as JSON text."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterStartTime,
        LogFilter,
        LogFilterFlowRunId,
    )

    out: dict[str, str] = {}
    after = datetime.fromtimestamp(since - 1, UTC)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=after)))
        ids = [run.id for run in runs]
        assert {run.name for run in runs} and len(ids) >= 2, "the stage flow and its train-stage subflow"
        for run in runs:
            out[f"prefect flow run {run.name} ({run.flow_id})"] = run.model_dump_json()
        only = FlowRunFilter(id=FlowRunFilterId(any_=ids))
        for task_run in client.read_task_runs(flow_run_filter=only):
            out[f"prefect task run {task_run.name}"] = task_run.model_dump_json()
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        assert logs, "the stage's run logs reach the Prefect API"
        out["prefect logs"] = "\n".join(log.model_dump_json() for log in logs)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        assert {a.key for a in artifacts} >= {"lifelong-ppl", "lifelong-lineage"}
        for artifact in artifacts:
            out[f"prefect artifact {artifact.key or artifact.id}"] = artifact.model_dump_json()
    return out


def mlflow_outputs(tracker: Tracker, run_id: str, version: str, dst: Path) -> dict[str, str | bytes]:
    client = tracker.client
    out: dict[str, str | bytes] = {}
    run = client.get_run(run_id)
    out["mlflow run params"] = json.dumps(run.data.params)
    out["mlflow run tags"] = json.dumps(run.data.tags)
    out["mlflow run metric keys"] = json.dumps(sorted(run.data.metrics))
    out["mlflow run info and inputs"] = json.dumps(run.to_dictionary(), default=str)
    mv = client.get_model_version(tracker.model_name, version)
    out["mlflow model version"] = json.dumps(dict(mv), default=str)
    out["mlflow registered model"] = json.dumps(dict(client.get_registered_model(tracker.model_name)), default=str)
    model = client.get_logged_model(mv.model_id or mv.source.removeprefix("models:/"))
    out["mlflow logged model"] = json.dumps(model.to_dictionary(), default=str)
    files: list[Path] = []
    for label, uri in (("run", f"runs:/{run_id}/"), ("logged model", model.artifact_location)):
        target = dst / label.replace(" ", "-")
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target), tracking_uri=tracker.tracking_uri)
        for path in sorted(p for p in target.rglob("*") if p.is_file()):
            out[f"mlflow {label} artifact {path.relative_to(target)}"] = path.read_bytes()
            files.append(path)
    names = {p.name for p in files}
    assert {"MLmodel", "stage.json", "requirements.txt"} <= names, names
    return out


def file_outputs(root: Path, label: str) -> dict[str, bytes]:
    return {f"{label} {p.relative_to(root)}": p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the test -----------------------------------------------------------------------------------------


def test_one_stage_leaks_no_secret_anywhere(
    tmp_path: Path,
    landing_bucket: LandingBucket,
    proxy: AuthProxy,
    secret_env: None,
    prefect_api: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    lb = landing_bucket
    data = generate(tmp_path / "data", documents=120, task_examples=12)
    for path in sorted((data / "corpora" / "wb").iterdir()):
        lb.s3.put_object(Bucket=lb.bucket, Key=f"landing/WB/b1/{path.name}", Body=path.read_bytes())
    lb.s3.put_object(Bucket=lb.bucket, Key="landing/WB/b1/_SUCCESS", Body=b"")
    (arrival,) = list_arrivals(lb.landing, s3=s3_client())  # credentials from the environment
    work = tmp_path / "work"
    settings = PipelineSettings(
        work_dir=str(work),
        tracking_uri=f"http://{MLFLOW_USER}:{MLFLOW_PASSWORD}@127.0.0.1:{proxy.port}",
        experiment="secrets",
        model_name="loire-secrets",
        schedule="gpt-micro",
        steps=2,
        device="cpu",
        downstream_catalogue=str(data / "tasks.yaml"),
        downstream_data_root=str(data),
        downstream_tasks="wb_topic",
        downstream_budget=12,
        max_ap_plus=None,
        downstream_tolerance=1.0,
    )
    started = time.time()

    result = lifelong_stage(arrival.to_params(), settings)

    assert result["version"] == "1" and result["promoted"] and result["downstream_average"] is not None
    # The credentials were used on every request (the proxy refuses any request without them)...
    assert proxy.requests and proxy.refused == 0
    tracker = Tracker(tracking_uri=settings.resolved_tracking_uri(), model_name="loire-secrets")
    captured = capfd.readouterr()
    outputs: dict[str, str | bytes] = {
        "captured log records": "\n".join(
            caplog.handler.format(r) + " " + json.dumps(r.__dict__, default=str) for r in caplog.records
        ),
        "stderr": captured.err,
        "stdout": captured.out,
        "requests sent to the mlflow server": b"\n".join(proxy.requests),
    }
    outputs |= prefect_outputs(started)
    outputs |= mlflow_outputs(tracker, result["run_id"], result["version"], tmp_path / "downloads")
    outputs |= file_outputs(work, "work dir")
    assert any("stages" in name for name in outputs) and len(outputs) > 30

    assert leaks(outputs) == []
    assert redact(json.dumps(settings.model_dump())) == json.dumps(settings.model_dump())


# --- the protections one by one (fast) ----------------------------------------------------------------


def test_redact_masks_url_passwords_secret_env_values_and_credential_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("SOME_SERVICE_TOKEN", AWS_TOKEN)
    monkeypatch.setenv("DATABASE_URL", DB_URL)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFORTESTS")  # ids are not secrets
    cases = {
        f"connect {DB_URL} failed": f"connect postgresql://loire:{MASK}@db.internal:5432/loire failed",
        f"API request to http://u:{MLFLOW_PASSWORD}@127.0.0.1:5000/api failed": (
            f"API request to http://u:{MASK}@127.0.0.1:5000/api failed"
        ),
        "clone https://ghp_tokenvalue123@github.com/x": f"clone https://{MASK}@github.com/x",
        f"key={AWS_SECRET} token={AWS_TOKEN}": f"key={MASK} token={MASK}",
        f"password {DB_PASSWORD} alone": f"password {MASK} alone",  # a URL's password found in the environment
        "headers={'X-Amz-Security-Token': b'FwoGZXIvYXdzEXAMPLE'}": f"headers={{'X-Amz-Security-Token': b'{MASK}'}}",
        "x-amz-security-token:FwoGZXIvYXdzEXAMPLE\nhost:s3": f"x-amz-security-token:{MASK}\nhost:s3",
        "Authorization: Basic bG9pcmU6cHc=": f"Authorization: {MASK}",
        "SignedHeaders=host, Signature=0123abcd": f"SignedHeaders=host, Signature={MASK}",
        "id AKIAFAKEFORTESTS, s3://bucket/landing/NEWS/b1/, git@github.com:o/r": (
            "id AKIAFAKEFORTESTS, s3://bucket/landing/NEWS/b1/, git@github.com:o/r"
        ),
    }
    for text, expected in cases.items():
        assert redact(text) == expected
        assert redact(redact(text)) == expected  # idempotent


def test_tracking_uri_credentials_move_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    uri = f"http://{MLFLOW_USER}:{MLFLOW_PASSWORD}@mlflow.internal:5000/prefix"
    settings = PipelineSettings(tracking_uri=uri)
    assert settings.tracking_uri == settings.resolved_tracking_uri() == "http://mlflow.internal:5000/prefix"
    assert MLFLOW_PASSWORD not in settings.model_dump_json() and MLFLOW_PASSWORD not in repr(settings)
    assert (os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")) == (
        MLFLOW_USER,
        MLFLOW_PASSWORD,
    )
    # The same from MLFLOW_TRACKING_URI (settings without tracking_uri).
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert load_settings({}).resolved_tracking_uri() == "http://mlflow.internal:5000/prefix"
    assert os.environ.get("MLFLOW_TRACKING_PASSWORD") == MLFLOW_PASSWORD
    # Different credentials in the environment: refused, and the message holds no password.
    with pytest.raises(ValueError, match="credentials differ") as info:
        PipelineSettings(tracking_uri=f"http://{MLFLOW_USER}:other-password-123@mlflow.internal:5000")
    assert "other-password-123" not in str(info.value) and MLFLOW_PASSWORD not in str(info.value)
    assert split_credentials("sqlite:///tmp/mlflow.db") == ("sqlite:///tmp/mlflow.db", None, None)
    assert credentials_to_env("http://h:5000", {}) == "http://h:5000"


def test_botocore_debug_output_holds_no_session_token(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_TOKEN)
    monkeypatch.setenv("AWS_SECURITY_TOKEN", AWS_TOKEN)  # botocore reads this older name first
    caplog.set_level(logging.DEBUG)
    s3 = s3_client(moto_server.endpoint_url)
    s3.list_buckets()
    requests = [r for r in caplog.records if r.name in BOTOCORE_LOGGERS]
    assert any(f"x-amz-security-token:{MASK}" in r.getMessage() for r in requests)  # botocore did log it...
    assert not leaks({"botocore debug records": caplog.text})  # ...masked
