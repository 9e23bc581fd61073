"""Fixtures of the fault-injection suite (the servers come from tests/conftest.py, the pipeline from
`tests.flows.pipeline_harness`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


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

    from loire.cli import app

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, list(args), catch_exceptions=False)

    return run
