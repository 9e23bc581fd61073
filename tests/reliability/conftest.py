"""Fixtures of the fault-injection suite (the servers come from tests/flows/conftest.py, the pipeline from
`tests.flows.pipeline_harness`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.flows.conftest import use_server_fixtures


def pytest_configure(config: pytest.Config) -> None:
    use_server_fixtures(config)  # the same session servers as tests/flows


@pytest.fixture(autouse=True)
def _mlflow_server_restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that stops the session's MLflow server leaves it running for the next one, even when it fails."""
    yield
    if "mlflow_server" in request.fixturenames:
        server = request.getfixturevalue("mlflow_server")
        if not server.running:
            server.start()


@pytest.fixture
def loire_cli() -> Callable[..., Any]:
    """Run a `loire` command in-process (it talks to the session's Prefect server); returns the click result."""
    from typer.testing import CliRunner

    from flows.cli import app  # the library's app with the pipeline's commands registered

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, list(args), catch_exceptions=False)

    return run
