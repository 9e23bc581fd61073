"""The pipeline's server fixtures (moto S3/SQS, MLflow, Prefect), for tests/flows and tests/reliability only:
the library tests never load them, so they run without the `pipeline` extra."""

from __future__ import annotations

import pytest

SERVER_FIXTURES = ("tests.flows.servers_aws", "tests.flows.servers_mlflow", "tests.flows.servers_prefect")


def use_server_fixtures(config: pytest.Config) -> None:
    """Register the server modules as plugins, once per session (import_plugin skips a loaded one): the folders
    that need them share one set of session servers (two Prefect test harnesses would fight over the settings)."""
    for name in SERVER_FIXTURES:
        config.pluginmanager.import_plugin(name)


def pytest_configure(config: pytest.Config) -> None:
    use_server_fixtures(config)
