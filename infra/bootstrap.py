"""Idempotent bootstrap of a LOIRE stack: work pools, bucket + arrival queue + notification, registered model.

Safe to run any number of times: every step reads what exists first and creates or updates only what is
missing or different, so a second run prints `exists` for everything and changes nothing. `--dry-run` only
reads (and says what it would do).

    python infra/bootstrap.py --endpoint-url http://localhost:8333 --bucket loire --prefix domains/ --no-queue

Defaults come from the variables the services themselves read (AWS_ENDPOINT_URL, LOIRE_BUCKET, LOIRE_PREFIX,
LOIRE_QUEUE, LOIRE_MODEL_NAME, MLFLOW_TRACKING_URI, PREFECT_API_URL), so the compose one-shot service passes
almost nothing. Exit codes: 0 done, 2 a problem to fix (one line on stderr), 1 `prefect deploy` failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
K8S_TEMPLATE = Path(__file__).resolve().parent / "k8s" / "gpu-base-job-template.json"
NOTIFICATION_ID = "loire-arrivals"
MARKER_SUFFIX = "_SUCCESS"  # a domain is complete when its marker lands, never on a single shard
ARRIVAL_EVENTS = ["s3:ObjectCreated:*"]
WATCHER_DEPLOYMENT = "watch-corpora/watch-corpora"
# Long polling by default, a visibility timeout far above one watcher round trip (start a run, delete the
# message), and the 14-day maximum retention so arrivals survive a long outage of the stack.
QUEUE_ATTRIBUTES = {
    "ReceiveMessageWaitTimeSeconds": "20",
    "VisibilityTimeout": "300",
    "MessageRetentionPeriod": "1209600",
}
MODEL_DESCRIPTION = "LOIRE lifelong language model: one version per domain stage; alias `champion` is the promoted one."
T = TypeVar("T")


class BootstrapError(RuntimeError):
    """A problem the user has to fix; printed as one line."""


@dataclass
class Log:
    """Prints one line per resource and keeps them (tests read them); in dry-run mode it never writes."""

    dry_run: bool
    lines: list[str] = field(default_factory=list)

    def say(self, status: str, what: str) -> None:
        line = f"{status:<13} {what}"
        self.lines.append(line)
        print(line, flush=True)

    def apply(self, action: str, what: str, write: Callable[[], T]) -> T | None:
        """Run `write` (action is "create" or "update") unless this is a dry run; None when nothing was written."""
        if self.dry_run:
            self.say(f"would {action}", what)
            return None
        result = write()
        self.say(f"{action}d", what)
        return result


def retrying(step: Callable[[], T], *, wait_s: float, what: str, log: Log) -> T | None:
    """Run an idempotent step, repeating it while `what` is unreachable for up to `wait_s` seconds (compose starts
    everything at once). The pipeline's one retry mechanism and definition of a transient error (flows/retry.py)."""
    from flows.retry import RetryPolicy, is_transient

    policy = RetryPolicy(attempts=1 if log.dry_run else 1_000_000, max_delay_s=10.0, max_elapsed_s=wait_s)
    try:
        return policy.call(step, what=what)
    except Exception as exc:
        if not is_transient(exc):
            raise
        if log.dry_run:  # a dry run reports and goes on: it is often used before anything is up
            log.say("unreachable", f"{what} ({exc})")
            return None
        raise BootstrapError(f"{what} is not reachable ({exc}); is it running? (--wait SECONDS)") from exc


def _service_errors() -> tuple[type[BaseException], ...]:
    """Refusals by a service (credentials, permissions, invalid names): reported as one line, not a traceback."""
    from botocore.exceptions import BotoCoreError, ClientError
    from mlflow.exceptions import MlflowException
    from prefect.exceptions import PrefectHTTPStatusError

    return (BotoCoreError, ClientError, MlflowException, PrefectHTTPStatusError)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    hint = " (check PREFECT_API_AUTH_STRING)" if status in (401, 403) else ""
    code = str(getattr(exc, "error_code", ""))
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):  # MLflow's auth app
        hint = " (bootstrap signs in to MLflow as its admin: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
    return f"{type(exc).__name__}: {text}{hint}"


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


# --------------------------------------------------------------------------------------------- S3 + SQS


def aws_clients(endpoint_url: str | None, sqs_endpoint_url: str | None, region: str) -> tuple[Any, Any]:
    import boto3
    from botocore.config import Config

    # S3-compatible stores (SeaweedFS, MinIO, moto) rarely resolve bucket subdomains: path-style when an endpoint
    # is given; AWS itself keeps its default addressing.
    s3_config = Config(s3={"addressing_style": "path"}) if endpoint_url else None
    # A session of its own: boto3's default session caches the first credentials it resolved in this process,
    # and bootstrap must sign with the ones in the environment now.
    session = boto3.session.Session()
    s3 = session.client("s3", endpoint_url=endpoint_url or None, region_name=region, config=s3_config)
    sqs = session.client("sqs", endpoint_url=sqs_endpoint_url or endpoint_url or None, region_name=region)
    return s3, sqs


def ensure_bucket(s3: Any, bucket: str, region: str, log: Log) -> bool:
    """Whether the bucket exists now (False only in a dry run before its creation)."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
        log.say("exists", f"bucket s3://{bucket}")
        return True
    except ClientError as exc:
        if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise BootstrapError(
                f"bucket {bucket}: {_error_code(exc) or exc} (another account's name, or no permission to read it)"
            ) from exc
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":  # us-east-1 rejects an explicit location constraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}

    def create() -> dict[str, Any]:
        try:
            return s3.create_bucket(**kwargs)
        except ClientError as exc:  # a concurrent bootstrap won the race: same result
            if _error_code(exc) == "BucketAlreadyOwnedByYou":
                return {}
            raise

    return log.apply("create", f"bucket s3://{bucket}", create) is not None


def ensure_queue(sqs: Any, name: str, log: Log) -> tuple[str, str] | None:
    """(url, arn) of the arrival queue; None in a dry run before its creation."""
    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        log.say("exists", f"queue {name}")
    except sqs.exceptions.QueueDoesNotExist:
        created = log.apply(
            "create", f"queue {name}", lambda: sqs.create_queue(QueueName=name, Attributes=QUEUE_ATTRIBUTES)
        )
        if created is None:
            return None
        url = created["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def queue_statement(queue_arn: str, bucket: str) -> dict[str, Any]:
    """Lets S3 send this bucket's notifications (only) to the queue: AWS refuses the notification without it."""
    return {
        "Sid": "LoireArrivalsFromS3",
        "Effect": "Allow",
        "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"}},
    }


def ensure_queue_policy(sqs: Any, url: str, arn: str, bucket: str, log: Log) -> None:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"]).get("Attributes", {})
    current = json.loads(attributes["Policy"]) if attributes.get("Policy") else {}
    ours = queue_statement(arn, bucket)
    statements = current.get("Statement", [])
    if [s for s in statements if s.get("Sid") == ours["Sid"]] == [ours]:
        log.say("exists", f"queue policy {ours['Sid']}")
        return
    # keep statements others added; replace only ours
    policy = {
        "Version": "2012-10-17",
        **current,
        "Statement": [s for s in statements if s.get("Sid") != ours["Sid"]] + [ours],
    }
    log.apply(
        "update" if current else "create",
        f"queue policy {ours['Sid']}",
        lambda: sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)}),
    )


def notification(queue_arn: str, prefix: str) -> dict[str, Any]:
    rules = [{"Name": "prefix", "Value": prefix}] if prefix else []
    rules.append({"Name": "suffix", "Value": MARKER_SUFFIX})
    return {
        "Id": NOTIFICATION_ID,
        "QueueArn": queue_arn,
        "Events": ARRIVAL_EVENTS,
        "Filter": {"Key": {"FilterRules": rules}},
    }


def _comparable(config: dict[str, Any]) -> tuple[Any, ...]:
    # AWS answers with "Prefix"/"Suffix" whatever case was sent
    rules = config.get("Filter", {}).get("Key", {}).get("FilterRules", [])
    return (
        config.get("QueueArn"),
        sorted(config.get("Events", [])),
        sorted((r["Name"].lower(), r["Value"]) for r in rules),
    )


def ensure_notification(s3: Any, bucket: str, queue_arn: str, prefix: str, log: Log) -> None:
    current = s3.get_bucket_notification_configuration(Bucket=bucket)
    queues = current.get("QueueConfigurations", [])
    ours = [q for q in queues if q.get("Id") == NOTIFICATION_ID]
    wanted = notification(queue_arn, prefix)
    what = f"notification {NOTIFICATION_ID}: s3://{bucket}/{prefix}*{MARKER_SUFFIX} -> {queue_arn}"
    if len(ours) == 1 and _comparable(ours[0]) == _comparable(wanted):
        log.say("exists", what)
        return  # putting it again would only send S3's test event to the queue
    keep = ("TopicConfigurations", "LambdaFunctionConfigurations", "EventBridgeConfiguration")
    config = {key: current[key] for key in keep if key in current}
    config["QueueConfigurations"] = [q for q in queues if q.get("Id") != NOTIFICATION_ID] + [wanted]
    log.apply(
        "update" if ours else "create",
        what,
        lambda: s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=config),
    )


def setup_storage(args: argparse.Namespace, log: Log) -> str | None:
    """Bucket, then (unless disabled) queue, its policy and the bucket notification; returns the queue URL."""
    s3, sqs = aws_clients(args.endpoint_url, args.sqs_endpoint_url, args.region)
    bucket_exists = ensure_bucket(s3, args.bucket, args.region, log)
    if args.no_queue or not args.queue:
        log.say("skipped", "arrival queue (the watcher lists the landing zone instead)")
        return None
    queue = ensure_queue(sqs, args.queue, log)
    if queue is None or not bucket_exists:  # dry run: nothing to compare against yet
        log.say("would create", f"queue policy and notification s3://{args.bucket}/{args.prefix}*{MARKER_SUFFIX}")
        return None
    url, arn = queue
    ensure_queue_policy(sqs, url, arn, args.bucket, log)
    ensure_notification(s3, args.bucket, arn, args.prefix, log)
    return url


# ------------------------------------------------------------------------------------------------ Prefect


def process_template() -> dict[str, Any]:
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def kubernetes_template(path: Path, image: str | None) -> dict[str, Any]:
    try:
        template = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BootstrapError(f"{path}: cannot read the Kubernetes base job template ({exc})") from None
    if image:
        template["variables"]["properties"]["image"]["default"] = image
    return template


def _require_api(log: Log, what: str) -> bool:
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return True
    if log.dry_run:
        log.say("unknown", f"{what} (PREFECT_API_URL is not set)")
        return False
    # without it the client would start a throw-away local server and create everything there
    raise BootstrapError("PREFECT_API_URL is not set: point it at the Prefect server (http://HOST:4200/api)")


def ensure_pool(
    client: Any, name: str, pool_type: str, template: dict[str, Any], manage_template: bool, log: Log
) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    what = f"work pool {name} ({pool_type})"
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:

        def create() -> Any:
            try:
                return client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
            except ObjectAlreadyExists:  # a concurrent bootstrap or `prefect worker start` created it
                return client.read_work_pool(name)

        log.apply("create", what, create)
        return
    if pool.type != pool_type:
        raise BootstrapError(
            f"work pool {name} exists with type {pool.type!r}, not {pool_type!r}: "
            f"delete it (prefect work-pool delete {name}) or choose another name"
        )
    # The Kubernetes template is versioned in infra/k8s: the file wins. A process pool's template is Prefect's
    # default, so edits made in the UI (extra env defaults) are left alone.
    if manage_template and pool.base_job_template != template:
        log.apply(
            "update",
            f"{what}: base job template",
            lambda: client.update_work_pool(name, WorkPoolUpdate(base_job_template=template)),
        )
    else:
        log.say("exists", what)


def ensure_work_pools(args: argparse.Namespace, log: Log) -> None:
    if not _require_api(log, "work pools"):
        return
    from prefect.client.orchestration import get_client

    gpu_template = (
        kubernetes_template(args.gpu_template, args.gpu_image)
        if args.gpu_pool_type == "kubernetes"
        else process_template()
    )
    with get_client(sync_client=True) as client:
        ensure_pool(client, args.cpu_pool, "process", process_template(), False, log)
        ensure_pool(client, args.gpu_pool, args.gpu_pool_type, gpu_template, args.gpu_pool_type == "kubernetes", log)


def ensure_automations(log: Log) -> None:
    """The crash-recovery automations (flows/automation.py): reschedule a crashed stage run in place, bounded by
    LOIRE_CRASH_RESUMES (0 removes them), and mark stage runs whose heartbeats stopped Crashed (a lost machine;
    workers need PREFECT_FLOWS_HEARTBEAT_FREQUENCY)."""
    if not _require_api(log, "crash-recovery automations"):
        return
    from flows.automation import (
        AUTOMATION_NAME,
        ZOMBIE_AUTOMATION_NAME,
        ensure_crash_automation,
        ensure_zombie_automation,
    )

    resumes = int(os.environ.get("LOIRE_CRASH_RESUMES", "3"))
    done = ensure_crash_automation(resumes, dry_run=log.dry_run)
    log.say(
        done if not log.dry_run or done in ("exists", "absent") else f"would {done[:-1]}",
        f"automation {AUTOMATION_NAME}",
    )
    done = ensure_zombie_automation(resumes > 0, dry_run=log.dry_run)
    log.say(
        done if not log.dry_run or done in ("exists", "absent") else f"would {done[:-1]}",
        f"automation {ZOMBIE_AUTOMATION_NAME}",
    )


def start_watcher(deployment_name: str, log: Log) -> None:
    """One run of the watcher deployment, unless one is already scheduled, waiting or running."""
    if not _require_api(log, "watcher run"):
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    # AwaitingConcurrencySlot and Late are SCHEDULED-type states, so they count as active too
    active = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            if log.dry_run:
                log.say("unknown", f"watcher run (deployment {deployment_name} is not deployed yet)")
                return
            raise BootstrapError(
                f"deployment {deployment_name} does not exist: run `prefect deploy --all` first"
            ) from None
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active))),
            limit=1,
        )
        if runs:
            log.say("exists", f"watcher run {runs[0].name} ({runs[0].state_name})")
            return
        log.apply(
            "create", f"watcher run of {deployment_name}", lambda: client.create_flow_run_from_deployment(deployment.id)
        )


def deploy(environment: dict[str, str], log: Log) -> None:
    """`prefect deploy --all` from the repository root, with the landing zone and queue URL this run resolved."""
    if log.dry_run:
        log.say("would run", "prefect deploy --all")
        return
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    subprocess.run(command, cwd=ROOT, env={**os.environ, **environment}, check=True)
    log.say("deployed", "prefect deploy --all")


# ------------------------------------------------------------------------------------------------- MLflow


def ensure_registered_model(tracking_uri: str | None, name: str, experiment: str | None, log: Log) -> None:
    if not tracking_uri:
        if log.dry_run:
            log.say("unknown", f"registered model {name} (MLFLOW_TRACKING_URI is not set)")
            return
        # MLflow would otherwise fall back to ./mlflow.db, a registry no flow would ever read
        raise BootstrapError("MLFLOW_TRACKING_URI is not set (or pass --tracking-uri)")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.get_registered_model(name)
        log.say("exists", f"registered model {name}")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise

        def create() -> Any:
            try:
                return client.create_registered_model(
                    name, tags={"loire.pipeline": "lifelong"}, description=MODEL_DESCRIPTION
                )
            except MlflowException as race:  # a concurrent bootstrap created it first
                if race.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                return client.get_registered_model(name)

        log.apply("create", f"registered model {name}", create)
    if not experiment:
        return
    found = client.get_experiment_by_name(experiment)
    if found is None:
        log.apply("create", f"experiment {experiment}", lambda: client.create_experiment(experiment))
    elif found.lifecycle_stage == "deleted":
        raise BootstrapError(f"experiment {experiment} is deleted: `mlflow experiments restore` it or choose another")
    else:
        log.say("exists", f"experiment {experiment}")


# ----------------------------------------------------------------------------------------- MLflow access
# `mlflow server --app-name basic-auth` (infra/mlflow/basic_auth.ini: default_permission NO_PERMISSIONS). The
# pipeline's user writes the experiment and manages the registered model; readers (role READER_ROLE) read both.
PIPELINE_USER = "loire-pipeline"
READER_USER = "loire-reader"
READER_ROLE = "loire-reader"
AUTH_WORKSPACE = "default"  # MLflow keeps roles per workspace; a server without workspaces has only "default"
MIN_MLFLOW_PASSWORD = 12  # MLflow refuses shorter passwords


@dataclass(frozen=True)
class MlflowAccount:
    """An MLflow user bootstrap keeps in step with a secret of the environment."""

    name: str
    password_env: str


MLFLOW_ACCOUNTS = (
    MlflowAccount(PIPELINE_USER, "MLFLOW_PIPELINE_PASSWORD"),
    MlflowAccount(READER_USER, "MLFLOW_READER_PASSWORD"),
)


def _password(account: MlflowAccount) -> str:
    password = os.environ.get(account.password_env, "")
    if len(password) < MIN_MLFLOW_PASSWORD:
        state = "is not set" if not password else f"is shorter than {MIN_MLFLOW_PASSWORD} characters"
        raise BootstrapError(f"{account.password_env} {state}: the password of MLflow user {account.name}")
    return password


def _mlflow_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _signs_in(tracking_uri: str, user: str, password: str, model_name: str) -> bool:
    """Whether the server accepts this user and password (any answer but 401: a 403 or 404 still authenticated)."""
    import requests

    url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/registered-models/get"
    response = requests.get(url, params={"name": model_name}, auth=(user, password), timeout=30)
    return response.status_code != 401


def ensure_mlflow_user(auth: Any, tracking_uri: str, account: MlflowAccount, model_name: str, log: Log) -> bool:
    """Whether the user exists now (False only in a dry run before its creation)."""
    from mlflow.exceptions import MlflowException

    password = _password(account)
    what = f"mlflow user {account.name}"
    try:
        auth.get_user(account.name)
    except MlflowException as exc:
        if _mlflow_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        return log.apply("create", what, lambda: auth.create_user(account.name, password)) is not None
    if _signs_in(tracking_uri, account.name, password, model_name):
        log.say("exists", what)
        return True
    # the secret was rotated in the environment: the environment wins
    log.apply(
        "update",
        f"{what}: password (from {account.password_env})",
        lambda: auth.update_user_password(account.name, password),
    )
    return True


def ensure_user_grant(auth: Any, user: str, resource_type: str, resource_id: str, permission: str, log: Log) -> None:
    what = f"mlflow grant {permission} on {resource_type} {resource_id} to {user}"
    current = auth.get_user_permission(user, resource_type, resource_id).permission
    if current == permission:
        log.say("exists", what)
        return
    log.apply(
        "update" if current != "NO_PERMISSIONS" else "create",
        what,
        lambda: auth.grant_user_permission(user, resource_type, resource_id, permission),
    )


def ensure_reader_role(auth: Any, grants: dict[tuple[str, str], str], log: Log) -> int | None:
    """The role READER_ROLE holding exactly `grants` ((type, id) -> permission); its id (None in a dry run)."""
    found = [role for role in auth.list_roles(AUTH_WORKSPACE) if role.name == READER_ROLE]
    if found:
        role_id = found[0].id
        log.say("exists", f"mlflow role {READER_ROLE}")
    else:
        created = log.apply(
            "create",
            f"mlflow role {READER_ROLE}",
            lambda: auth.create_role(AUTH_WORKSPACE, READER_ROLE, "LOIRE consumers: read runs and load models"),
        )
        if created is None:
            return None
        role_id = created.id
    have = {(p.resource_type, p.resource_pattern): p for p in auth.list_role_permissions(role_id)}
    for (resource_type, resource_id), permission in grants.items():
        what = f"mlflow role {READER_ROLE}: {permission} on {resource_type} {resource_id}"
        current = have.get((resource_type, resource_id))
        if current is None:
            log.apply(
                "create",
                what,
                lambda t=resource_type, r=resource_id, p=permission: auth.add_role_permission(role_id, t, r, p),
            )
        elif current.permission != permission:
            log.apply("update", what, lambda i=current.id, p=permission: auth.update_role_permission(i, p))
        else:
            log.say("exists", what)
    return role_id


def ensure_role_member(auth: Any, user: str, role_id: int | None, log: Log) -> None:
    what = f"mlflow user {user} in role {READER_ROLE}"
    if role_id is not None and any(role.id == role_id for role in auth.list_user_roles(user)):
        log.say("exists", what)
        return
    log.apply("create", what, lambda: auth.assign_role(user, role_id))


def ensure_mlflow_access(tracking_uri: str | None, model_name: str, experiment: str | None, log: Log) -> None:
    """Users, grants and the reader role on an MLflow server run with `--app-name basic-auth`; bootstrap itself
    signs in as the admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
    if not tracking_uri or not experiment:
        raise BootstrapError("--mlflow-auth needs MLFLOW_TRACKING_URI (or --tracking-uri) and an experiment")
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    found = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    if found is None:  # only in a dry run: ensure_registered_model creates it first
        log.say("unknown", f"mlflow grants on experiment {experiment} (it does not exist yet)")
        return
    auth = AuthServiceClient(tracking_uri)
    exist = [ensure_mlflow_user(auth, tracking_uri, account, model_name, log) for account in MLFLOW_ACCOUNTS]
    if not all(exist):  # a dry run before the users exist
        log.say("would create", f"mlflow grants and role {READER_ROLE}")
        return
    ensure_user_grant(auth, PIPELINE_USER, "experiment", found.experiment_id, "EDIT", log)
    ensure_user_grant(auth, PIPELINE_USER, "registered_model", model_name, "MANAGE", log)
    grants = {("experiment", found.experiment_id): "READ", ("registered_model", model_name): "READ"}
    ensure_role_member(auth, READER_USER, ensure_reader_role(auth, grants, log), log)


# ---------------------------------------------------------------------------------------- storage access
# One IAM user per party, each with the inline policy of infra/iam/<party>.json: the producer writes the landing
# prefix, the pipeline reads it and writes the artifact prefix, consumers read artifacts. AWS IAM, SeaweedFS's
# embedded IAM API (on its S3 port) and moto speak the same API.
PARTIES = ("producer", "pipeline", "consumer")
IAM_DIR = Path(__file__).resolve().parent / "iam"


def party_user(party: str) -> str:
    return f"loire-{party}"


def render_policy(party: str, bucket: str, landing_prefix: str, artifact_prefix: str, queue_arn: str | None) -> dict:
    """infra/iam/<party>.json with its placeholders filled; statements about the queue dropped when there is none."""
    from string import Template

    for name, value in (("prefix", landing_prefix), ("artifact prefix", artifact_prefix)):
        if any(c in value for c in '"\\*?$') or value.startswith("/"):
            raise BootstrapError(f"{name} {value!r}: must be a plain key prefix (no quotes, wildcards or leading /)")
    text = (IAM_DIR / f"{party}.json").read_text()
    values = {"BUCKET": bucket, "LANDING_PREFIX": landing_prefix, "ARTIFACT_PREFIX": artifact_prefix}
    policy = json.loads(Template(text).safe_substitute(values, QUEUE_ARN=queue_arn or "${QUEUE_ARN}"))
    if queue_arn is None:
        policy["Statement"] = [s for s in policy["Statement"] if "${QUEUE_ARN}" not in json.dumps(s)]
    return policy


def _policy_dict(document: Any) -> dict:
    # boto3 decodes AWS's URL-encoded policy documents into dicts; other servers may answer with the JSON text
    from urllib.parse import unquote

    return document if isinstance(document, dict) else json.loads(unquote(str(document)))


def ensure_iam_user(iam: Any, user: str, log: Log) -> bool:
    """Whether the user exists now (False only in a dry run before its creation)."""
    try:
        iam.get_user(UserName=user)
        log.say("exists", f"iam user {user}")
        return True
    except iam.exceptions.NoSuchEntityException:
        return log.apply("create", f"iam user {user}", lambda: iam.create_user(UserName=user)) is not None


def ensure_user_policy(iam: Any, user: str, policy: dict, log: Log) -> None:
    what = f"iam policy {user} (infra/iam/{user.removeprefix('loire-')}.json)"
    try:
        current = _policy_dict(iam.get_user_policy(UserName=user, PolicyName=user)["PolicyDocument"])
    except iam.exceptions.NoSuchEntityException:
        current = None
    if current == policy:
        log.say("exists", what)
        return
    log.apply(
        "create" if current is None else "update",
        what,
        lambda: iam.put_user_policy(UserName=user, PolicyName=user, PolicyDocument=json.dumps(policy)),
    )


def ensure_access_key(iam: Any, party: str, keys_file: Path | None, log: Log) -> None:
    """An access key of the party's user; a new one goes to `keys_file` (mode 600) as <PARTY>_S3_ACCESS_KEY_ID /
    <PARTY>_S3_SECRET_ACCESS_KEY lines for infra/.env. Only the key id is printed, never the secret."""
    user = party_user(party)
    keys = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
    if keys:
        log.say("exists", f"access key {keys[0]['AccessKeyId']} of {user}")
        return
    if keys_file is None and not log.dry_run:
        raise BootstrapError(f"{user} has no access key: pass --keys-file FILE to receive a new one (never printed)")
    created = log.apply("create", f"access key of {user} (secret in {keys_file})", lambda: _new_key(iam, user))
    if created is None:
        return
    prefix = party.upper()
    assert keys_file is not None  # checked above; a dry run returned
    descriptor = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a") as out:
        out.write(f"{prefix}_S3_ACCESS_KEY_ID={created['AccessKeyId']}\n")
        out.write(f"{prefix}_S3_SECRET_ACCESS_KEY={created['SecretAccessKey']}\n")
    log.say("wrote", f"{prefix}_S3_ACCESS_KEY_ID={created['AccessKeyId']} and its secret to {keys_file}")


def _new_key(iam: Any, user: str) -> dict[str, str]:
    return iam.create_access_key(UserName=user)["AccessKey"]


def _queue_arn(sqs: Any, queue: str | None) -> str | None:
    if not queue:
        return None
    try:
        url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist:
        return None
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def policies(args: argparse.Namespace, queue_arn: str | None) -> dict[str, dict]:
    landing = args.prefix.lstrip("/")
    return {p: render_policy(p, args.bucket, landing, args.artifact_prefix, queue_arn) for p in PARTIES}


def ensure_storage_identities(args: argparse.Namespace, log: Log) -> None:
    import boto3

    _, sqs = aws_clients(args.endpoint_url, args.sqs_endpoint_url, args.region)
    queue_arn = None if args.no_queue else _queue_arn(sqs, args.queue)
    iam_url = args.iam_endpoint_url or args.endpoint_url or None
    iam = boto3.session.Session().client("iam", endpoint_url=iam_url, region_name=args.region)
    for party, policy in policies(args, queue_arn).items():
        user = party_user(party)
        if not ensure_iam_user(iam, user, log):
            log.say("would create", f"iam policy {user} and an access key")
            continue
        ensure_user_policy(iam, user, policy, log)
        ensure_access_key(iam, party, args.keys_file, log)


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="bootstrap.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Defaults in brackets come from the environment when set.",
    )
    aws = parser.add_argument_group("S3 and SQS")
    aws.add_argument(
        "--endpoint-url", default=env("AWS_ENDPOINT_URL") or None, help="S3 endpoint [AWS_ENDPOINT_URL]; unset: AWS"
    )
    aws.add_argument(
        "--sqs-endpoint-url", default=env("AWS_ENDPOINT_URL_SQS") or None, help="SQS endpoint if not --endpoint-url"
    )
    aws.add_argument("--region", default=env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1")
    aws.add_argument("--bucket", default=env("LOIRE_BUCKET") or "loire", help="landing bucket [LOIRE_BUCKET]")
    aws.add_argument("--prefix", default=env("LOIRE_PREFIX", "domains/"), help="landing prefix [LOIRE_PREFIX]")
    aws.add_argument(
        "--queue",
        default=env("LOIRE_QUEUE", "loire-arrivals"),
        help="SQS queue for _SUCCESS notifications [LOIRE_QUEUE]",
    )
    aws.add_argument("--no-queue", action="store_true", help="no queue or notification (stores without SQS)")
    access = parser.add_argument_group("storage identities (infra/iam/*.json; docs/security.md)")
    access.add_argument(
        "--storage-identities",
        action="store_true",
        help="create IAM users loire-producer, loire-pipeline, loire-consumer with their policies and keys",
    )
    access.add_argument(
        "--keys-file", type=Path, default=None, help="where new access keys are appended (mode 600), never printed"
    )
    access.add_argument(
        "--iam-endpoint-url",
        default=env("AWS_ENDPOINT_URL_IAM") or None,
        help="IAM endpoint [AWS_ENDPOINT_URL_IAM]; default: --endpoint-url (SeaweedFS serves IAM on its S3 port)",
    )
    access.add_argument(
        "--artifact-prefix", default=env("LOIRE_ARTIFACT_PREFIX") or "mlflow/", help="MLflow's artifact prefix"
    )
    access.add_argument(
        "--print-policies", action="store_true", help="print the three policies for this bucket and exit"
    )
    access.add_argument("--queue-arn", default=None, help="with --print-policies: the arrival queue's ARN")
    mlflow = parser.add_argument_group("MLflow")
    mlflow.add_argument("--tracking-uri", default=env("MLFLOW_TRACKING_URI") or None, help="[MLFLOW_TRACKING_URI]")
    mlflow.add_argument("--model-name", default=env("LOIRE_MODEL_NAME") or "loire-lm", help="[LOIRE_MODEL_NAME]")
    mlflow.add_argument(
        "--experiment", default=env("LOIRE_EXPERIMENT") or "loire", help="'' for none [LOIRE_EXPERIMENT]"
    )
    mlflow.add_argument(
        "--mlflow-auth",
        action="store_true",
        help=f"as the admin of a basic-auth server: users {PIPELINE_USER} and {READER_USER} (passwords from "
        f"MLFLOW_PIPELINE_PASSWORD / MLFLOW_READER_PASSWORD), their grants and the role {READER_ROLE}",
    )
    prefect = parser.add_argument_group("Prefect")
    prefect.add_argument("--cpu-pool", default="cpu")
    prefect.add_argument("--gpu-pool", default="gpu")
    prefect.add_argument(
        "--gpu-pool-type", choices=("process", "kubernetes"), default=env("LOIRE_GPU_POOL_TYPE") or "process"
    )
    prefect.add_argument("--gpu-template", type=Path, default=K8S_TEMPLATE, help="Kubernetes base job template")
    prefect.add_argument("--gpu-image", default=env("LOIRE_GPU_JOB_IMAGE") or None, help="image of the Kubernetes jobs")
    prefect.add_argument("--deploy", action="store_true", help="run `prefect deploy --all` afterwards")
    prefect.add_argument("--start-watcher", action="store_true", help="start the watcher unless a run is active")
    prefect.add_argument("--watcher-deployment", default=WATCHER_DEPLOYMENT)
    parser.add_argument("--no-s3", action="store_true", help="skip the bucket and queue")
    parser.add_argument("--no-prefect", action="store_true", help="skip the work pools")
    parser.add_argument("--no-mlflow", action="store_true", help="skip the registered model")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for services that are not up yet")
    parser.add_argument("--dry-run", action="store_true", help="only read; print what would be created")
    return parser.parse_args(argv)


def deploy_environment(args: argparse.Namespace, queue_url: str | None) -> dict[str, str]:
    """What prefect.yaml's `{{ $LOIRE_* }}` placeholders need, derived from this run where not set."""
    prefix = args.prefix.lstrip("/")
    return {
        "LOIRE_LANDING": os.environ.get("LOIRE_LANDING") or f"s3://{args.bucket}/{prefix}",
        "LOIRE_QUEUE_URL": os.environ.get("LOIRE_QUEUE_URL") or queue_url or "",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log = Log(dry_run=args.dry_run)
    try:
        if args.print_policies:
            for party, policy in policies(args, args.queue_arn).items():
                print(f"# {party_user(party)}\n{json.dumps(policy, indent=2)}", flush=True)
            return 0
        queue_url = None
        if not args.no_s3:
            queue_url = retrying(lambda: setup_storage(args, log), wait_s=args.wait, what="S3/SQS endpoint", log=log)
        if args.storage_identities:
            retrying(lambda: ensure_storage_identities(args, log), wait_s=args.wait, what="IAM endpoint", log=log)
        if not args.no_prefect:
            retrying(lambda: ensure_work_pools(args, log), wait_s=args.wait, what="Prefect API", log=log)
            retrying(lambda: ensure_automations(log), wait_s=args.wait, what="Prefect API", log=log)
        if not args.no_mlflow:
            retrying(
                lambda: ensure_registered_model(args.tracking_uri, args.model_name, args.experiment, log),
                wait_s=args.wait,
                what="MLflow tracking server",
                log=log,
            )
            if args.mlflow_auth:
                retrying(
                    lambda: ensure_mlflow_access(args.tracking_uri, args.model_name, args.experiment, log),
                    wait_s=args.wait,
                    what="MLflow tracking server",
                    log=log,
                )
        environment = deploy_environment(args, queue_url)
        if args.deploy:
            deploy(environment, log)
        else:
            settings = " ".join(f"{key}={value}" for key, value in environment.items() if value)
            print(f"next: {settings} prefect deploy --all   (from {ROOT})", flush=True)
        if args.start_watcher:
            retrying(lambda: start_watcher(args.watcher_deployment, log), wait_s=args.wait, what="Prefect API", log=log)
    except BootstrapError as exc:
        print(f"bootstrap: {exc}", file=sys.stderr)
        return 2
    except _service_errors() as exc:
        print(f"bootstrap: {_describe(exc)}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"bootstrap: `prefect deploy --all` failed with exit code {exc.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
