"""Fixtures of the pipeline tests: moto, mlflow server and Prefect server (shared with tests/reliability)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

__all__ = ["prefect_api"]


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server (SQLite) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        # An ENQUEUEd stage re-checks its deployment's concurrency slot after 2 s (default 30 s).
        mp.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "2")
        with prefect_test_harness(server_startup_timeout=90):
            yield str(PREFECT_API_URL.value())
