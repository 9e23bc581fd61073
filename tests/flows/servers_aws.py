"""Fixtures: moto's S3 + SQS server on 127.0.0.1, and a landing bucket that notifies a queue of markers.

moto runs in a thread of the test process (`ThreadedMotoServer`), so S3 → SQS notifications, which
moto delivers in-process, reach the queue exactly as AWS would send them (after an `s3:TestEvent`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config

__all__ = ["LandingBucket", "MotoServer", "landing_bucket", "moto_server"]

# Fake credentials: moto accepts anything, and real ones must never be used by the tests.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
# Variables that could point boto3 at real accounts or config files.
CLEARED_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_SQS",
)


@dataclass(frozen=True)
class MotoServer:
    """A running moto server: `endpoint_url` for clients, `client(service)` for path-style test clients."""

    endpoint_url: str

    def client(self, service: str) -> BaseClient:
        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"})
        return boto3.session.Session().client(service, endpoint_url=self.endpoint_url, config=config)


class LandingBucket(NamedTuple):
    """A fresh bucket whose `_SUCCESS` markers are notified to a fresh SQS queue."""

    s3: BaseClient
    sqs: BaseClient
    bucket: str
    queue_url: str
    landing: str


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        for name in CLEARED_AWS_ENV:
            mp.delenv(name, raising=False)
        empty = tmp_path_factory.mktemp("aws") / "none"
        empty.write_text("")
        mp.setenv("AWS_CONFIG_FILE", str(empty))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield MotoServer(f"http://{host}:{port}")
        finally:
            server.stop()


@pytest.fixture
def landing_bucket(moto_server: MotoServer) -> Iterator[LandingBucket]:
    s3, sqs = moto_server.client("s3"), moto_server.client("sqs")
    name = f"landing-{uuid.uuid4().hex[:12]}"
    queue_url = make_notified_bucket(s3, sqs, name)
    yield LandingBucket(s3, sqs, name, queue_url, f"s3://{name}/landing")
    sqs.delete_queue(QueueUrl=queue_url)
    _delete_bucket(s3, name)


def make_notified_bucket(s3: BaseClient, sqs: BaseClient, name: str) -> str:
    """Bucket `name` whose `_SUCCESS` markers are notified to a new SQS queue of the same name; returns its URL."""
    s3.create_bucket(Bucket=name)
    queue_url = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps(_queue_policy(arn, name))})
    s3.put_bucket_notification_configuration(
        Bucket=name,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "suffix", "Value": "_SUCCESS"}]}},
                }
            ]
        },
    )
    return queue_url


def _queue_policy(queue_arn: str, bucket: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "s3.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"}},
            }
        ],
    }


def _delete_bucket(s3: BaseClient, bucket: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)
