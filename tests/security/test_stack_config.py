"""infra/compose.yaml wires the access model of docs/security.md (fast: reads files only)."""

from __future__ import annotations

from typing import Any

import yaml

from tests.security.infra import INFRA, bootstrap


def _services() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]


def test_mlflow_runs_its_auth_app_and_every_client_signs_in() -> None:
    services = _services()
    mlflow = services["mlflow"]
    assert mlflow["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/opt/loire/infra/mlflow/basic_auth.ini"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert "mlflow-auth:/var/lib/mlflow-auth" in mlflow["volumes"]
    assert "--mlflow-auth" in services["bootstrap"]["command"]
    assert services["bootstrap"]["environment"]["MLFLOW_TRACKING_USERNAME"] == "admin"
    for worker in ("cpu-worker", "gpu-worker", "gpu-worker-cpu"):
        env = services[worker]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] == bootstrap.PIPELINE_USER
        assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_PIPELINE_PASSWORD:?")
        assert "@" not in env["MLFLOW_TRACKING_URI"]  # credentials never ride in the URI


def test_only_bootstrap_holds_the_store_admin_key() -> None:
    for name, service in _services().items():
        key = (service.get("environment") or {}).get("AWS_ACCESS_KEY_ID")
        if key is None or name == "s3":  # SeaweedFS's own admin identity
            continue
        expected = "${S3_ACCESS_KEY_ID:-}" if name == "bootstrap" else "${PIPELINE_S3_ACCESS_KEY_ID:-}"
        assert key == expected, name


def test_policies_name_only_their_prefixes() -> None:
    rendered = bootstrap.policies(
        type("Args", (), {"prefix": "domains/", "bucket": "b", "artifact_prefix": "mlflow/"})(), None
    )
    resources = {
        party: {
            r
            for s in policy["Statement"]
            for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
        }
        for party, policy in rendered.items()
    }
    assert resources["producer"] == {"arn:aws:s3:::b/domains/*"}
    assert resources["pipeline"] == {"arn:aws:s3:::b/domains/*", "arn:aws:s3:::b/mlflow/*", "arn:aws:s3:::b"}
    assert resources["consumer"] == {"arn:aws:s3:::b/mlflow/*", "arn:aws:s3:::b"}
    actions = {s["Sid"]: s["Action"] for s in rendered["pipeline"]["Statement"]}
    assert actions["LoirePipelineReadsLanding"] == "s3:GetObject"  # no write, no delete on landed data
    assert not any("Delete" in str(s["Action"]) for p in rendered.values() for s in p["Statement"])
