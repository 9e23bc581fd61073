"""Fixtures of the pipeline tests: real servers on loopback, started by the tests that need them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.flows.servers_aws import *  # noqa: F403
from tests.flows.servers_mlflow import *  # noqa: F403


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server (SQLite) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield str(PREFECT_API_URL.value())
