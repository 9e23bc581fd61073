"""Fixtures: a real `mlflow server` subprocess on loopback (SQLite backend, proxied local artifacts).

The server can be stopped and started again on the same port and database (`MlflowServer.stop` /
`start`), which the outage tests use. MLflow's own per-request retries are turned off for the test
session, so an unreachable server fails a request at once and only the code under test retries.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.processes import stop_process_group

__all__ = ["MLFLOW_TEST_ENV", "MlflowServer", "mlflow_server"]

logger = logging.getLogger(__name__)

# Client settings of the test session: fail fast on an unreachable server, no progress bars.
MLFLOW_TEST_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
START_TIMEOUT_S = 90.0  # the first start migrates a fresh database; on 2 busy cores this takes ~35 s


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<port>, its store and artifacts under `root`."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.log = root / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server and wait for `/health`; fails the test with the server's log if it does not come up."""
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runner: fewer processes, faster start
        with self.log.open("ab") as log:
            # A session of its own, so that stop() ends the CLI, its uvicorn worker and nothing else.
            self._proc = subprocess.Popen(
                self.command(), cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        started = time.monotonic()
        while not self._healthy():
            if self._proc.poll() is not None or time.monotonic() - started > timeout_s:
                self.stop()
                pytest.fail(f"mlflow server did not come up on {self.uri} in {timeout_s:.0f} s; log:\n{self._tail()}")
            time.sleep(0.25)
        logger.info("mlflow server up on %s after %.1f s", self.uri, time.monotonic() - started)

    def stop(self) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after 10 s)."""
        proc, self._proc = self._proc, None
        stop_process_group(proc, term_timeout_s=10)

    def _healthy(self) -> bool:
        try:
            # No proxy: the server is on loopback whatever the environment says.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), _free_port())
    with pytest.MonkeyPatch.context() as mp:
        for name, value in MLFLOW_TEST_ENV.items():
            mp.setenv(name, value)
        server.start()
        try:
            yield server
        finally:
            server.stop()
