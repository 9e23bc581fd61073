"""The registry behind MLflow's auth app: only the pipeline's user registers and moves `champion`.

One real `mlflow server --app-name basic-auth` for the module, configured by the stack's own
infra/mlflow/basic_auth.ini (only its database path changed) and set up by `infra/bootstrap.py --mlflow-auth`
as the admin, exactly as the compose one-shot does. Then: the stage's register and promote tasks succeed as
`loire-pipeline`; an anonymous request (401) and the read-only `loire-reader` (403) cannot register a version or
move `champion`, and it stays where it was; the reader still reads runs and loads the champion; a wrong password
fails the stage's first registry step with one line that names the user and holds no password.
"""

from __future__ import annotations

import configparser
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from mlflow.exceptions import MlflowException

from flows.redact import MASK, redact
from flows.registry import CHAMPION, Tracker
from flows.retry import RetryPolicy
from flows.runs import TrackingAuthError
from flows.settings import PipelineSettings
from flows.stage import find_existing, promote, register
from loire.io import load_model
from tests.flows.servers_mlflow import MLFLOW_TEST_ENV, MlflowServer, _free_port
from tests.flows.test_tracking import ETAG, _record, _tiny_model, _tokenizer, _write_stage
from tests.security.infra import INFRA, bootstrap

pytestmark = pytest.mark.integration

INI = INFRA / "mlflow" / "basic_auth.ini"
ADMIN = ("admin", "SECRETadminPw0x51c9e2")
PIPELINE = (bootstrap.PIPELINE_USER, "SECRETpipelinePw0x2d7b")
READER = (bootstrap.READER_USER, "SECRETreaderPw0x6a0f")
MODEL, EXPERIMENT = "loire-lm", "loire"
FAST = RetryPolicy(attempts=3, initial_delay_s=0.05, max_delay_s=0.2)
LOGINS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class AuthMlflowServer(MlflowServer):
    """The fixture's `mlflow server` with the auth app."""

    def command(self) -> list[str]:
        return [*super().command(), "--app-name", "basic-auth"]


@contextmanager
def login(user: tuple[str, str] | None) -> Iterator[None]:
    """MLflow's own credential variables for `user` (None: anonymous) for the duration."""
    with pytest.MonkeyPatch.context() as mp:
        for name in LOGINS:
            mp.delenv(name, raising=False)
        if user is not None:
            mp.setenv("MLFLOW_TRACKING_USERNAME", user[0])
            mp.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
        yield


def _auth_config(root: Path) -> Path:
    """The stack's ini with the user store moved under `root`; every other setting as shipped."""
    config = configparser.ConfigParser()
    config.read(INI)
    config["mlflow"]["database_uri"] = f"sqlite:///{root / 'basic_auth.db'}"
    path = root / "basic_auth.ini"
    with path.open("w") as out:
        config.write(out)
    return path


def _bootstrap(uri: str) -> list[str]:
    log_lines: list[str] = []
    with login(ADMIN), pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_PIPELINE_PASSWORD", PIPELINE[1])
        mp.setenv("MLFLOW_READER_PASSWORD", READER[1])
        original = bootstrap.Log.say

        def keep(self: bootstrap.Log, status: str, what: str) -> None:
            original(self, status, what)
            log_lines.append(f"{status} {what}")

        mp.setattr(bootstrap.Log, "say", keep)
        argv = ["--no-s3", "--no-prefect", "--tracking-uri", uri, "--model-name", MODEL, "--experiment", EXPERIMENT]
        assert bootstrap.main([*argv, "--mlflow-auth"]) == 0
    return log_lines


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("mlflow-auth")
    srv = AuthMlflowServer(root, _free_port())
    with pytest.MonkeyPatch.context() as mp:
        for name, value in MLFLOW_TEST_ENV.items():
            mp.setenv(name, value)
        mp.setenv("MLFLOW_AUTH_CONFIG_PATH", str(_auth_config(root)))
        mp.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN[1])
        mp.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-csrf-key-of-the-tests")
        srv.start()
        mp.delenv("MLFLOW_AUTH_ADMIN_PASSWORD")  # the clients below never see the admin's secret this way
        try:
            first = _bootstrap(srv.uri)
            again = _bootstrap(srv.uri)
            yield {"uri": srv.uri, "root": root, "first": first, "again": again}
        finally:
            srv.stop()


def _settings(uri: str, work: Path) -> PipelineSettings:
    return PipelineSettings(
        work_dir=str(work), tracking_uri=uri, model_name=MODEL, experiment=EXPERIMENT, max_ap_plus=None
    )


def _stage(tracker: Tracker, root: Path, stage: int, domain: str) -> tuple[str, Path]:
    """A stage run and its stage folder (a tiny real model), as the stage flow has them before `register`."""
    uri = f"s3://landing/domains/{domain}/b{stage}"
    folder = root / f"stage-{stage}-{domain}"
    tokenizer = _tokenizer()
    _write_stage(_tiny_model(tokenizer), tokenizer, _record(stage, domain, folder, uri, None), folder)
    run_id = tracker.start_stage_run(
        stage=stage, domain=domain, flow_run_id=None, params={"stage": stage}, corpus_uri=uri, corpus_etag=ETAG
    )
    return run_id, folder


def _champion(uri: str) -> str | None:
    with login(ADMIN):
        champion = Tracker(uri, model_name=MODEL, experiment=EXPERIMENT, retry=FAST).champion()
    return None if champion is None else str(champion.version)


@pytest.fixture(scope="module")
def promoted(server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """As the pipeline's user: stage 1 registered and promoted by the stage's tasks; a version 2 (the same model,
    registered without an upload: what an intruder would like to make champion) left unpromoted."""
    root = tmp_path_factory.mktemp("stages")
    settings = _settings(server["uri"], root / "work")
    owed = {"covers": ["WB"], "pending": [], "carry": []}
    with login(PIPELINE):
        tracker = Tracker(server["uri"], model_name=MODEL, experiment=EXPERIMENT, retry=FAST)
        run_id, folder = _stage(tracker, root, 1, "WB")
        v1 = register.fn(settings, run_id, str(folder), None, owed)
        decision = promote.fn(settings, v1, None, None, {}, None)
        source = tracker.client.get_model_version(MODEL, v1).source
        model_id = source.removeprefix("models:/")
        v2 = tracker.client.create_model_version(MODEL, source, run_id, model_id=model_id, await_creation_for=0).version
    return {"v1": v1, "v2": str(v2), "decision": decision, "run_id": run_id, "root": root}


# ----------------------------------------------------------------------------------------------- tests
def test_the_stack_config_denies_by_default_and_bootstrap_is_idempotent(server: dict[str, Any]) -> None:
    config = configparser.ConfigParser()
    config.read(INI)
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert "admin_password" not in config["mlflow"]  # the admin's secret comes from the environment only
    first, again = server["first"], server["again"]
    assert {"created mlflow user loire-pipeline", "created mlflow user loire-reader"} <= set(first)
    assert any(line.startswith("created mlflow grant MANAGE on registered_model loire-lm") for line in first)
    assert any(line.startswith("created mlflow role loire-reader: READ on experiment") for line in first)
    assert again and all(line.startswith("exists") for line in again), again  # a second run changes nothing
    assert not any(secret in line for line in first + again for secret in (ADMIN[1], PIPELINE[1], READER[1]))


def test_the_pipeline_user_registers_and_promotes(server: dict[str, Any], promoted: dict[str, Any]) -> None:
    assert (promoted["v1"], promoted["v2"]) == ("1", "2") and promoted["decision"]["promoted"]
    assert _champion(server["uri"]) == "1"


def test_anonymous_requests_cannot_register_or_move_champion(server: dict[str, Any], promoted: dict[str, Any]) -> None:
    api = f"{server['uri']}/api/2.0/mlflow"
    writes = [
        ("POST", "/model-versions/create", {"name": MODEL, "source": f"runs:/{promoted['run_id']}/model"}),
        ("POST", "/registered-models/alias", {"name": MODEL, "alias": CHAMPION, "version": promoted["v2"]}),
        ("DELETE", "/registered-models/alias", {"name": MODEL, "alias": CHAMPION}),
    ]
    for method, path, body in writes:
        answer = requests.request(method, api + path, json=body, timeout=30)
        assert answer.status_code == 401, (path, answer.status_code)
    reads = requests.get(f"{api}/registered-models/alias", params={"name": MODEL, "alias": CHAMPION}, timeout=30)
    assert reads.status_code == 401  # not even a read without a login
    assert _champion(server["uri"]) == "1"
    with login(None), pytest.raises(TrackingAuthError, match="anonymous request: a login is required"):
        Tracker(server["uri"], model_name=MODEL, experiment=EXPERIMENT, retry=FAST).champion()


def test_the_reader_reads_and_loads_but_cannot_register_or_move_champion(
    server: dict[str, Any], promoted: dict[str, Any], tmp_path: Path
) -> None:
    api = f"{server['uri']}/api/2.0/mlflow"
    body = {"name": MODEL, "alias": CHAMPION, "version": promoted["v2"]}
    answer = requests.post(f"{api}/registered-models/alias", json=body, auth=READER, timeout=30)
    assert answer.status_code == 403
    with login(READER):
        tracker = Tracker(server["uri"], model_name=MODEL, experiment=EXPERIMENT, retry=FAST)
        client = tracker.client
        for attempt in (
            lambda: client.set_registered_model_alias(MODEL, CHAMPION, promoted["v2"]),
            lambda: client.delete_registered_model_alias(MODEL, CHAMPION),
            lambda: client.create_model_version(MODEL, f"runs:/{promoted['run_id']}/model", promoted["run_id"]),
            lambda: client.create_run(tracker.experiment_id()),
            lambda: client.set_model_version_tag(MODEL, promoted["v1"], "loire.promotion", "tampered"),
        ):
            with pytest.raises(MlflowException) as refused:
                attempt()
            assert refused.value.error_code == "PERMISSION_DENIED"
        # ...while reading runs and loading the champion works
        assert client.get_run(promoted["run_id"]).data.tags["loire.stage"] == "1"
        folder = tracker.download_stage(CHAMPION, tmp_path / "champion")
        assert load_model(folder).num_parameters() > 0
    assert _champion(server["uri"]) == "1"


def test_a_wrong_password_fails_the_stage_in_one_line_without_the_password(
    server: dict[str, Any], promoted: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "SECRETwrongPw0x9e41b7"
    settings = _settings(server["uri"], tmp_path)
    started = time.monotonic()
    with login((PIPELINE[0], wrong)), pytest.raises(TrackingAuthError) as failed:
        find_existing.fn(settings, "s3://landing/domains/REV/b3", ETAG)  # the stage's first registry step
        assert redact(f"password {wrong}") == f"password {MASK}"  # the variable MLflow reads is masked
    message = str(failed.value)
    assert time.monotonic() - started < 10  # refused at once: a 401 is not retried like an outage
    assert "\n" not in message and "'loire-pipeline': wrong username or password (401)" in message
    assert server["uri"] in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert wrong not in message + caplog.text and PIPELINE[1] not in message + caplog.text
    assert os.environ.get("MLFLOW_TRACKING_PASSWORD") != wrong  # the login was scoped to the block
