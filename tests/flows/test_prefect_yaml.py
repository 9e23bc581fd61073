"""prefect.yaml, infra/compose.yaml and the Kubernetes job template agree with the flows and with each other.

Nothing here skips: a deployment whose flow is missing, renamed or re-signed fails.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S_TEMPLATE = INFRA / "k8s" / "gpu-base-job-template.json"
IMAGE_PROJECT_DIR = "/opt/loire"
WORK_DIR = "/var/lib/loire/work"

# deployment name -> (entrypoint, flow name, work pool)
DEPLOYMENTS = {
    "watch-corpora": ("flows/watch.py:watch_corpora", "watch-corpora", "cpu"),
    "lifelong-stage": ("flows/stage.py:lifelong_stage", "lifelong-stage", "cpu"),
    "train-stage": ("flows/train.py:train_stage", "train-stage", "gpu"),
    "downstream-eval": ("flows/downstream.py:downstream_eval", "downstream-eval", "cpu"),
}
# names of values that must never appear literally in compose.yaml
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|TOKEN|API_KEY")
SUBSTITUTION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _load_script(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bootstrap = _load_script("loire_infra_bootstrap", INFRA / "bootstrap.py")


@pytest.fixture(scope="module")
def prefect_file() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


@pytest.fixture(scope="module")
def deployments(prefect_file: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in prefect_file["deployments"]}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def k8s_template() -> dict[str, Any]:
    return json.loads(K8S_TEMPLATE.read_text())


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line]
    return {key.strip(): value.strip() for key, value in pairs if not key.lstrip().startswith("#")}


# -------------------------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_passes_prefects_own_schema(prefect_file: dict[str, Any]) -> None:
    # `prefect deploy` skips the whole file (with a warning only) when this validation fails
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_file)
    assert sorted(d.name for d in model.deployments) == sorted(DEPLOYMENTS)
    assert model.build is None and model.push is None


def test_pull_step_enters_the_image_project_folder(prefect_file: dict[str, Any]) -> None:
    assert prefect_file["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_PROJECT_DIR}}
    ]
    assert f"WORKDIR {IMAGE_PROJECT_DIR}" in (INFRA / "Dockerfile").read_text()


@pytest.mark.parametrize("name", list(DEPLOYMENTS))
def test_entrypoint_is_the_documented_flow_and_parameters_fit_it(
    name: str, deployments: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    entrypoint, flow_name, pool = DEPLOYMENTS[name]
    deployment = deployments[name]
    assert deployment["entrypoint"] == entrypoint
    assert deployment["work_pool"]["name"] == pool
    monkeypatch.chdir(ROOT)  # entrypoints are relative to the project folder, as after the pull step
    flow = load_flow_from_entrypoint(entrypoint)
    assert isinstance(flow, Flow)
    assert flow.name == flow_name
    # the deployment is named after its flow: run_deployment("<flow>/<deployment>") defaults rely on it
    assert name == flow_name
    signature = inspect.signature(flow.fn)
    parameters = deployment.get("parameters") or {}
    unknown = set(parameters) - set(signature.parameters)
    assert not unknown, f"{name}: parameters {sorted(unknown)} are not arguments of {entrypoint}"


def test_watcher_can_start_without_parameters(
    deployments: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # bootstrap --start-watcher creates a run with the deployment's parameters only
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(DEPLOYMENTS["watch-corpora"][0])
    required = {n for n, p in inspect.signature(flow.fn).parameters.items() if p.default is inspect.Parameter.empty}
    assert required <= set(deployments["watch-corpora"]["parameters"])


def test_env_placeholders_are_provided(prefect_file: dict[str, Any]) -> None:
    pattern = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
    used = {name for text in _strings(prefect_file) for name in pattern.findall(text)}
    assert used, "the watcher's landing zone and queue come from the environment"
    derived = set(bootstrap.deploy_environment(bootstrap.parse_args(["--no-queue"]), None))
    missing = used - set(_env_example()) - derived
    assert not missing, f"{sorted(missing)}: neither in infra/.env.example nor set by bootstrap --deploy"


def test_stages_are_serial_and_never_dropped(deployments: dict[str, dict[str, Any]]) -> None:
    assert deployments["lifelong-stage"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    # one watcher at a time; a second run waits as a standby rather than being cancelled
    assert deployments["watch-corpora"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}


def test_deployments_have_no_schedules(deployments: dict[str, dict[str, Any]]) -> None:
    assert all(d.get("schedules") == [] and "schedule" not in d for d in deployments.values())


def test_stage_hands_training_to_the_gpu_deployment(deployments: dict[str, dict[str, Any]]) -> None:
    from flows.settings import PipelineSettings, from_env

    env = deployments["lifelong-stage"]["work_pool"]["job_variables"]["env"]
    settings = PipelineSettings(**from_env(env))  # the stage flow reads its settings from this environment
    assert settings.train_mode == "deployment"
    assert settings.train_deployment == "train-stage/train-stage"
    assert settings.work_dir == WORK_DIR


def test_job_variables_fit_the_pool_templates(
    deployments: dict[str, dict[str, Any]], k8s_template: dict[str, Any]
) -> None:
    # the same validation the server applies when a deployment is created
    from prefect.utilities.schema_tools import validate
    from prefect.workers.process import ProcessWorker

    process = ProcessWorker.get_default_base_job_template()
    for name, deployment in deployments.items():
        job_variables = deployment["work_pool"]["job_variables"]
        assert all(isinstance(v, str) for v in job_variables["env"].values()), name
        templates = [process, k8s_template] if deployment["work_pool"]["name"] == "gpu" else [process]
        for template in templates:
            validate(job_variables, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
    assert deployments["train-stage"]["work_pool"]["job_variables"]["gpu_count"] >= 1


# ----------------------------------------------------------------------------------------- Kubernetes pool


def test_k8s_template_turns_gpu_count_into_a_gpu_limit(
    deployments: dict[str, dict[str, Any]], k8s_template: dict[str, Any]
) -> None:
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    defaults = BaseJobConfiguration._get_base_config_defaults(k8s_template["variables"]["properties"])
    values = {**defaults, **deployments["train-stage"]["work_pool"]["job_variables"], "gpu_count": 2}
    configuration = apply_values(k8s_template["job_configuration"], values)
    manifest = configuration["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # what prefect-kubernetes insists on (KubernetesWorkerJobConfiguration validators)
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    assert container["name"] == "prefect-job"
    # LOIRE's additions
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["envFrom"] == [{"secretRef": {"name": "loire-env"}}]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["loire-work"] == WORK_DIR
    assert {v["name"] for v in pod["volumes"]} >= set(mounts)
    assert configuration["namespace"] == "loire"
    # a variable without a value leaves no key behind (a null memory limit would be rejected)
    assert "memory" not in container["resources"]["limits"]


def test_k8s_template_keeps_the_default_template_variables(k8s_template: dict[str, Any]) -> None:
    # the variables of prefect-kubernetes's default template (0.8): deployments written for it keep working
    default = {
        "name", "env", "labels", "command", "annotations", "namespace", "image", "service_account_name",
        "image_pull_policy", "backoff_limit", "finished_job_ttl", "job_watch_timeout_seconds",
        "pod_watch_timeout_seconds", "stream_output", "cluster_config", "cpu_request", "cpu_limit",
        "memory_request", "memory_limit",
    }  # fmt: skip
    properties = k8s_template["variables"]["properties"]
    assert default | {"gpu_count", "node_selector", "tolerations", "volumes", "volume_mounts"} <= set(properties)
    placeholders = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(k8s_template["job_configuration"])))
    assert placeholders <= set(properties), "every placeholder needs a variable"
    assert set(properties) <= placeholders, "every variable must be used by the job configuration"


# ------------------------------------------------------------------------------------------------ compose


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_compose_defines_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "prefect-server", "s3", "mlflow", "bootstrap", "cpu-worker", "gpu-worker"} <= set(services)
    prefect = _environment(services["prefect-server"])
    assert prefect["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert prefect["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert prefect["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    mlflow = _environment(services["mlflow"])
    assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://mlflow:")
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "MLFLOW_S3_ENDPOINT_URL" in mlflow
    init = [v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init and (INFRA / init[0].split(":")[0]).is_file()
    assert services["bootstrap"]["restart"] == "no"
    assert {"infra/bootstrap.py", "--deploy", "--start-watcher"} <= set(services["bootstrap"]["command"])
    for worker, pool in (("cpu-worker", "cpu"), ("gpu-worker", "gpu"), ("gpu-worker-cpu", "gpu")):
        command = services[worker]["command"]
        assert command[:3] == ["prefect", "worker", "start"] and command[command.index("--pool") + 1] == pool
        assert f"loire-work:{WORK_DIR}" in services[worker]["volumes"]
        assert _environment(services[worker])["LOIRE_WORK_DIR"] == WORK_DIR
    [device] = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for service in services.values():
        build = service.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).resolve() == (INFRA / "Dockerfile").resolve()


def test_compose_has_no_literal_secrets(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if not SECRET_NAME.search(key):
                continue
            match = SUBSTITUTION.fullmatch(value)
            assert match, f"{name}: {key} must come from ${{...}}, not a literal"
            operator, default = match.group(2), match.group(3)
            assert operator in (None, ":?", "?") or not default, f"{name}: {key} has a default value"
    for text in _strings(compose):
        for password in re.findall(r"://[^/:@\s]+:(\$\{[^}]*\}|[^@\s]+)@", text):
            assert SUBSTITUTION.fullmatch(password), f"literal password in {text!r}"


def test_env_example_lists_every_variable_and_no_secret(compose: dict[str, Any]) -> None:
    example = _env_example()
    referenced = {m.group(1) for text in _strings(compose) for m in SUBSTITUTION.finditer(text)}
    assert referenced - set(example) == set(), "document every variable in infra/.env.example"
    secrets = {key: value for key, value in example.items() if SECRET_NAME.search(key)}
    assert secrets and all(value == "" for value in secrets.values()), f"secrets must be empty: {secrets}"
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_image_pins_torch_first_and_runs_unprivileged() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert dockerfile.splitlines()[0] == "# syntax=docker/dockerfile:1"
    assert "FROM ${PYTHON_IMAGE}" in dockerfile and "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile
    assert 'EXTRA_PACKAGES="psycopg[binary]"' in dockerfile  # the driver of MLFLOW_BACKEND_STORE_URI
    assert dockerfile.index('"torch==${TORCH_VERSION}"') < dockerfile.index('pip install ".[pipeline,s3]"')
    assert re.search(r"^USER loire$", dockerfile, re.MULTILINE)
    assert f"LOIRE_WORK_DIR={WORK_DIR}" in dockerfile
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert "**/.env" in ignored and ".venv" in ignored
    assert os.access(INFRA / "entrypoint.sh", os.X_OK) and os.access(INFRA / "postgres" / "init-databases.sh", os.X_OK)


# ------------------------------------------------------------------------------------- deploy, for real


@pytest.mark.integration
@pytest.mark.slow  # ~1 min (a Prefect server and `prefect deploy --all`); the schema tests above stay in make test
def test_prefect_deploy_all_creates_the_four_deployments(tmp_path: Path) -> None:
    """`prefect deploy --all` against a temporary server, as the compose bootstrap service runs it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        assert bootstrap.main(["--no-s3", "--no-mlflow"]) == 0  # the cpu and gpu process pools
        env = {
            **os.environ,
            "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "LOIRE_LANDING": "s3://loire/domains/",
            "LOIRE_QUEUE_URL": "http://sqs.example/123456789012/loire-arrivals",
            "PREFECT_HOME": str(tmp_path),
        }
        result = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        with get_client(sync_client=True) as client:
            found = {name: client.read_deployment_by_name(f"{name}/{name}") for name in DEPLOYMENTS}
    assert found["watch-corpora"].parameters == {
        "landing": "s3://loire/domains/",
        "queue_url": "http://sqs.example/123456789012/loire-arrivals",
    }
    stage = found["lifelong-stage"]
    assert stage.global_concurrency_limit is not None and stage.global_concurrency_limit.limit == 1
    assert stage.concurrency_options is not None and stage.concurrency_options.collision_strategy == "ENQUEUE"
    assert stage.job_variables["env"]["LOIRE_TRAIN_MODE"] == "deployment"
    for name, (entrypoint, _, pool) in DEPLOYMENTS.items():
        assert found[name].work_pool_name == pool and found[name].entrypoint == entrypoint
        assert found[name].pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_PROJECT_DIR}}
        ]
    assert found["train-stage"].job_variables["gpu_count"] == 1
