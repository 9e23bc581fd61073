"""Least-privilege storage: the policies of infra/iam/*.json, enforced by a moto server that authenticates every
request (INITIAL_NO_AUTH_ACTION_COUNT=0 in its environment) and checks IAM policies.

The server runs as a subprocess of its own (moto's auth settings are process-wide, and the session's moto server
must stay open). An admin is seeded through moto's `reset-auth` hook (three unauthenticated actions: the admin's
user, policy and key, standing in for an account's root credentials); everything after that is signed.
`infra/bootstrap.py --storage-identities` then creates the bucket, the three users, their inline policies and
keys, exactly as for AWS. Each key is checked for what it may do AND what it may not (a policy that denies
everything would pass the second half alone).

moto evaluates no S3 condition keys (`s3:prefix`), so the prefix-limited ListBucket statements are not tested
here; neither are the SQS statements (docs/security.md, "Out of scope").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.flows.processes import stop_process_group
from tests.security.infra import bootstrap

pytestmark = pytest.mark.integration

BUCKET, LANDING, ARTIFACTS = "loire", "domains/", "mlflow/"
LANDED = f"{LANDING}NEWS/b1/part-0.jsonl"
ARTIFACT = f"{ARTIFACTS}1/models/m-1/artifacts/model.safetensors"
ADMIN_POLICY = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(service: str, url: str, key: tuple[str, str] | None) -> BaseClient:
    config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    credentials = {} if key is None else {"aws_access_key_id": key[0], "aws_secret_access_key": key[1]}
    return boto3.session.Session().client(
        service, endpoint_url=url, region_name="us-east-1", config=config, **credentials
    )


@pytest.fixture(scope="module")
def moto_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("moto-auth")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # A clean environment: nothing another test left in os.environ (AWS_*, MOTO_*, proxies) reaches the server.
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
    env = {k: os.environ[k] for k in keep if k in os.environ} | {"INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    with (root / "moto.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/moto-api/", timeout=2)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start: {(root / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield {"url": url, "root": root, "admin": _seed_admin(url)}
    finally:
        stop_process_group(proc, term_timeout_s=5)


def _seed_admin(url: str) -> tuple[str, str]:
    """The admin's key: the only unauthenticated actions the server ever allows (exactly three)."""
    iam = _client("iam", url, ("AKIAUNKNOWN0000000000", "unknown"))
    with pytest.raises(ClientError):  # authentication is on from the first request
        iam.list_users()
    requests.post(f"{url}/moto-api/reset-auth", data=b"3", timeout=10).raise_for_status()
    iam.create_user(UserName="admin")
    iam.put_user_policy(UserName="admin", PolicyName="admin", PolicyDocument=ADMIN_POLICY)
    key = iam.create_access_key(UserName="admin")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _run_bootstrap(url: str, admin: tuple[str, str], keys_file: Path, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith(("AWS_", "BOTO"))]:  # only the admin's key counts
            mp.delenv(name, raising=False)
        # boto3's default session keeps the first credentials it resolved in a process: prime it with a stale key,
        # as an earlier test would, so bootstrap must sign with the environment's key of now.
        mp.setenv("AWS_ACCESS_KEY_ID", "AKIASTALE00000000000")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "stale")
        mp.setattr(boto3, "DEFAULT_SESSION", None)
        boto3.client("s3", region_name="us-east-1")
        mp.setenv("AWS_ACCESS_KEY_ID", admin[0])
        mp.setenv("AWS_SECRET_ACCESS_KEY", admin[1])
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        argv = ["--endpoint-url", url, "--bucket", BUCKET, "--prefix", LANDING, "--no-queue", "--no-prefect"]
        argv += ["--no-mlflow", "--storage-identities", "--keys-file", str(keys_file)]
        assert bootstrap.main(argv) == 0
    return capsys.readouterr().out


def _denied(call: Any) -> None:
    with pytest.raises(ClientError) as refused:
        call()
    assert refused.value.response["Error"]["Code"] == "AccessDenied", refused.value.response["Error"]


def test_bootstrap_creates_three_least_privilege_identities(
    moto_auth: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url, admin = moto_auth["url"], moto_auth["admin"]
    keys_file = moto_auth["root"] / "storage-keys.env"
    first = _run_bootstrap(url, admin, keys_file, capsys)
    again = _run_bootstrap(url, admin, keys_file, capsys)
    assert "created       iam user loire-pipeline" in first and "wrote" in first
    assert all(line.startswith(("exists", "skipped", "next:")) for line in again.splitlines()), again
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    env = dict(line.split("=", 1) for line in keys_file.read_text().splitlines())
    assert len(env) == 6  # one key pair per party, written once
    assert not any(env[f"{p.upper()}_S3_SECRET_ACCESS_KEY"] in first + again for p in bootstrap.PARTIES)
    pairs = {
        p: (env[f"{p.upper()}_S3_ACCESS_KEY_ID"], env[f"{p.upper()}_S3_SECRET_ACCESS_KEY"]) for p in bootstrap.PARTIES
    }
    producer, pipeline, consumer = (_client("s3", url, pairs[p]) for p in bootstrap.PARTIES)
    admin_s3 = _client("s3", url, admin)
    admin_s3.put_object(Bucket=BUCKET, Key=ARTIFACT, Body=b"weights")  # what the MLflow server uploaded earlier

    # the producer writes the landing prefix, nothing else
    producer.put_object(Bucket=BUCKET, Key=LANDED, Body=b'{"text": "news"}\n')
    _denied(lambda: producer.get_object(Bucket=BUCKET, Key=ARTIFACT))
    _denied(lambda: producer.get_object(Bucket=BUCKET, Key=LANDED))
    _denied(lambda: producer.put_object(Bucket=BUCKET, Key=f"{ARTIFACTS}planted", Body=b"x"))
    _denied(lambda: producer.delete_object(Bucket=BUCKET, Key=LANDED))

    # the pipeline reads the landing prefix and writes only the artifact prefix
    assert pipeline.get_object(Bucket=BUCKET, Key=LANDED)["Body"].read() == b'{"text": "news"}\n'
    pipeline.put_object(Bucket=BUCKET, Key=f"{ARTIFACTS}2/models/m-2/artifacts/MLmodel", Body=b"flavors: {}")
    assert pipeline.get_object(Bucket=BUCKET, Key=ARTIFACT)["Body"].read() == b"weights"
    _denied(lambda: pipeline.put_object(Bucket=BUCKET, Key=f"{LANDING}NEWS/b2/_SUCCESS", Body=b""))
    _denied(lambda: pipeline.put_object(Bucket=BUCKET, Key=LANDED, Body=b"overwritten"))
    _denied(lambda: pipeline.delete_object(Bucket=BUCKET, Key=LANDED))

    # consumers read artifacts only
    assert consumer.get_object(Bucket=BUCKET, Key=ARTIFACT)["Body"].read() == b"weights"
    _denied(lambda: consumer.get_object(Bucket=BUCKET, Key=LANDED))
    _denied(lambda: consumer.put_object(Bucket=BUCKET, Key=ARTIFACT, Body=b"tampered"))
    _denied(lambda: consumer.delete_object(Bucket=BUCKET, Key=ARTIFACT))

    assert admin_s3.get_object(Bucket=BUCKET, Key=LANDED)["Body"].read() == b'{"text": "news"}\n'  # untouched
    assert admin_s3.get_object(Bucket=BUCKET, Key=ARTIFACT)["Body"].read() == b"weights"
