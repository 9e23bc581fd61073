"""`loire demo --quick` end to end, then what it left behind seen through the real web UIs.

The demo runs once for the module (a subprocess, ~3 min on 2 cores): its exit code and its printed
tables are checked. Then a Prefect server is started on the demo's PREFECT_HOME (its SQLite database
persists there) and an MLflow server on the demo's `mlflow.db`, and headless Chromium (Debian's
/usr/bin/chromium, driven by playwright; no browser is downloaded) opens:

- the Prefect flow-run page of the last `lifelong-stage` run, Artifacts tab, and the `lifelong-ppl`
  table artifact: the stage × domain perplexity table with AP must render;
- the MLflow registered model `loire-lm` and its version 2: the versions, the `champion` alias and the
  lineage tags (`loire.parent_version`, `loire.domain`) must render.

Full-page screenshots of every page go to `test-artifacts/ui/` at the repository root (gitignored),
also when a check fails. If Chromium cannot start here the UI tests fail (they do not skip).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loire.domains import DOMAINS
from tests.flows.processes import stop_process_group

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEMO_TIMEOUT_S = 600
SERVER_START_TIMEOUT_S = 120
UI_TIMEOUT_MS = 60_000
# Settings of the calling session that would point the demo (or the servers) elsewhere.
FOREIGN_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_HOME")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------- the demo
@dataclass(frozen=True)
class DemoRun:
    out: Path
    returncode: int
    output: str
    wall_s: float


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`python -m loire.cli demo --quick --out <tmp>`, run once; its own Prefect server and MLflow DB."""
    out = tmp_path_factory.mktemp("loire-demo")
    # COLUMNS: rich lays the tables out for a terminal this wide, so no cell is cut short in a pipe.
    env = _clean_env(COLUMNS="200", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "loire.cli", "demo", "--quick", "--out", str(out)]
    started = time.monotonic()
    # cwd: MLflow's default artifact root (./mlruns of the stage processes) lands in the demo folder.
    proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        stdout, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGINT, not SIGKILL: the demo's context managers then stop its Prefect server and serve process.
        proc.send_signal(signal.SIGINT)
        try:
            stdout, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        tail = stdout.decode(errors="replace")[-4000:]
        pytest.fail(f"`loire demo --quick` did not finish within {DEMO_TIMEOUT_S} s; output tail:\n{tail}")
    output = stdout.decode(errors="replace")
    (out / "demo-output.txt").write_text(output)
    return DemoRun(out=out, returncode=proc.returncode, output=output, wall_s=time.monotonic() - started)


def _demo_ok(demo: DemoRun) -> None:
    if demo.returncode != 0:
        pytest.fail(f"`loire demo --quick` exited with {demo.returncode}; output tail:\n{demo.output[-4000:]}")


def test_demo_completes_and_prints_tables(demo: DemoRun) -> None:
    _demo_ok(demo)
    text = demo.output
    assert "synthetic" in text, "the demo must say that its corpora are synthetic"
    assert "mlflow ui" in text, "the demo must say how to open MLflow"
    # The AP / AP+ summary: one row per domain, with the AP and AP+ columns.
    summary = text[text.index("LOIRE lifelong stages") :]
    header = summary[: summary.index("┡")]
    assert re.search(r"\bAP\b", header) and "AP+" in header, header
    for domain in DOMAINS:
        assert re.search(rf"│\s*\d\s*│\s*{domain}\s*│\s*\d+\s*│\s*\d+\.\d\s*│", summary), f"no AP row for {domain}"
    # The lineage of the champion, oldest first: version 1 (stage 1, WB) at the top, the champion alias last.
    lineage = text[text.index("LOIRE lineage") : text.index("Where to look")]
    entries = re.findall(r"^│\s*(\d+)\s*│\s*(\d+)\s*│\s*([A-Z]+)\s*│", lineage, flags=re.MULTILINE)
    assert entries and entries[0] == ("1", "1", "WB"), f"lineage table:\n{lineage}"
    assert [int(stage) for _, stage, _ in entries] == list(range(1, len(entries) + 1)), lineage
    assert {domain for *_, domain in entries} <= set(DOMAINS), lineage
    assert "champion" in lineage, lineage


# ------------------------------------------------------------------------------------------ the servers
def _wait_health(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before {url} answered:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=3) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{what} did not answer at {url} within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@dataclass(frozen=True)
class Servers:
    prefect: str  # http://127.0.0.1:<port> (UI at /, API at /api)
    mlflow: str  # http://127.0.0.1:<port>
    out: Path


@pytest.fixture(scope="module")
def servers(demo: DemoRun) -> Iterator[Servers]:
    """Prefect (on the demo's PREFECT_HOME) and MLflow (on the demo's mlflow.db), started side by side."""
    _demo_ok(demo)
    out = demo.out
    logs = out / "ui-logs"
    logs.mkdir(exist_ok=True)
    pport, mport = _free_port(), _free_port()
    prefect_url, mlflow_url = f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{mport}"
    prefect_env = _clean_env(
        PREFECT_HOME=str(out / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=f"{prefect_url}/api",
        PREFECT_UI_API_URL=f"{prefect_url}/api",
    )
    prefect_cmd = [
        sys.executable, "-m", "prefect", "server", "start",
        "--host", "127.0.0.1", "--port", str(pport), "--no-services", "--analytics-off",
    ]  # fmt: skip
    # The demo's runs keep their artifacts where the demo's cwd put MLflow's default root (./mlruns).
    mlflow_cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{out / 'mlflow.db'}",
        "--default-artifact-root", str(out / "mlruns"),
        "--host", "127.0.0.1", "--port", str(mport), "--workers", "1",
    ]  # fmt: skip
    mlflow_env = _clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, cmd, env in (("prefect", prefect_cmd, prefect_env), ("mlflow", mlflow_cmd, mlflow_env)):
            with (logs / f"{name}.log").open("ab") as log:
                procs.append(
                    subprocess.Popen(
                        cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        _wait_health(f"{prefect_url}/api/health", procs[0], logs / "prefect.log", "prefect server")
        _wait_health(f"{mlflow_url}/health", procs[1], logs / "mlflow.log", "mlflow server")
        yield Servers(prefect=prefect_url, mlflow=mlflow_url, out=out)
    finally:
        for proc in procs:
            stop_process_group(proc)


def _api(prefect_url: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{prefect_url}/api/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@dataclass(frozen=True)
class StageRun:
    run: dict[str, Any]  # the last `lifelong-stage` flow run (the CS arrival), as the REST API returns it
    artifact: dict[str, Any]  # its `lifelong-ppl` table artifact
    lineage: list[str]  # the artifact's rows: the stage's lineage of domains, oldest first


@pytest.fixture(scope="module")
def stage_run(servers: Servers) -> StageRun:
    """The last `lifelong-stage` run from the Prefect API, after checking that all five stayed Completed."""
    runs = _api(
        servers.prefect,
        "flow_runs/filter",
        {"flows": {"name": {"any_": ["lifelong-stage"]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 20},
    )
    states = [(r["name"], r["state_type"], (r.get("state") or {}).get("message")) for r in reversed(runs)]
    assert len(runs) == len(DOMAINS), f"expected {len(DOMAINS)} lifelong-stage runs, got {states}"
    # The demo stops its serve process at the end: the Prefect history must still say every stage completed.
    assert all(state == "COMPLETED" for _, state, _ in states), f"lifelong-stage runs not all COMPLETED: {states}"
    run = runs[0]
    artifacts = _api(
        servers.prefect,
        "artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [run["id"]]}, "key": {"any_": ["lifelong-ppl"]}}},
    )
    assert len(artifacts) == 1, f"flow run {run['name']}: {len(artifacts)} lifelong-ppl artifacts"
    lineage = [row["domain"] for row in json.loads(artifacts[0]["data"])]
    assert lineage[0] == "WB" and lineage[-1] == "CS" and set(lineage) <= set(DOMAINS), lineage
    return StageRun(run=run, artifact=artifacts[0], lineage=lineage)


# ------------------------------------------------------------------------------------------ the browser
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium; a clear failure (not a skip) when it cannot start."""
    from playwright.sync_api import Error, expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)  # the SPAs render after their API calls: wait, don't sleep
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the UI tests need Chromium at {CHROMIUM} (apt-get install chromium); it is not there")
    with sync_playwright() as p:
        try:
            instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        except Error as exc:
            pytest.fail(f"Chromium at {CHROMIUM} could not start headless with {CHROMIUM_ARGS}: {exc}")
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def _shot(page: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@contextlib.contextmanager
def _screenshot(page: Any, name: str) -> Iterator[None]:
    """Screenshot the page after the block: `<name>.png`, or `<name>-FAILED.png` when a check in it fails."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            _shot(page, f"{name}-FAILED")
        raise
    _shot(page, name)


def _mlflow_get(mlflow_url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{mlflow_url}/api/2.0/mlflow/{path}", timeout=30) as response:
        return json.load(response)


def _close_mlflow_assistant(page: Any) -> None:
    """Fold the MLflow Assistant side panel away (more room for the page in the screenshot), if it is open."""
    close = page.get_by_role("button", name="Close", exact=True)
    with contextlib.suppress(Exception):
        if close.count():
            close.first.click(timeout=5_000)


# ------------------------------------------------------------------------------------------ the UI tests
def _header(table: Any, column: str) -> Any:
    return table.locator("th", has_text=re.compile(rf"^\s*{re.escape(column)}\s*$"))


def test_prefect_ui_shows_stage_ppl_table(servers: Servers, stage_run: StageRun, page: Any) -> None:
    from playwright.sync_api import expect

    run, artifact, lineage = stage_run.run, stage_run.artifact, stage_run.lineage

    with _screenshot(page, "prefect-flow-run-artifacts"):
        page.goto(f"{servers.prefect}/runs/flow-run/{run['id']}", wait_until="domcontentloaded")
        expect(page.get_by_text(run["name"]).first).to_be_visible()
        page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
        expect(page.get_by_text("lifelong-ppl", exact=True)).to_be_visible()
        expect(page.get_by_text("lifelong-lineage", exact=True)).to_be_visible()

    with _screenshot(page, "prefect-artifact-lifelong-ppl"):
        page.get_by_text("lifelong-ppl", exact=True).click()  # the artifact card opens the artifact's page
        expect(page).to_have_url(re.compile(rf"/artifacts/artifact/{artifact['id']}"))
        table = page.locator("table").first
        expect(table).to_be_visible()
        # One column per domain the stage's model was scored on: the lineage's, and any carried-over ones.
        columns = list(json.loads(artifact["data"])[0])
        assert columns[:2] == ["stage", "domain"] and columns[-2:] == ["AP", "AP+"] and set(lineage) <= set(columns)
        for column in columns:
            expect(_header(table, column)).to_have_count(1)
        ap, ap_plus = columns.index("AP"), columns.index("AP+")
        rows = table.locator("tbody tr")
        expect(rows).to_have_count(len(lineage))
        for i, domain in enumerate(lineage):
            cells = rows.nth(i).locator("td")
            expect(cells.nth(0)).to_have_text(str(i + 1))
            expect(cells.nth(1)).to_have_text(domain)
            expect(cells.nth(ap)).to_have_text(re.compile(r"^\s*\d+(\.\d+)?\s*$"))
            # AP+ is a signed number from stage 2 on; stage 1 has no earlier domain to forget.
            expect(cells.nth(ap_plus)).to_have_text(re.compile(r"^\s*—\s*$" if i == 0 else r"^\s*-?\d+(\.\d+)?\s*$"))


def test_mlflow_ui_shows_registered_model_lineage(servers: Servers, page: Any) -> None:
    from playwright.sync_api import expect

    model = _mlflow_get(servers.mlflow, "registered-models/get?name=loire-lm")["registered_model"]
    champion = next(a["version"] for a in model.get("aliases", []) if a["alias"] == "champion")
    v2_tags = {
        t["key"]: t["value"]
        for t in _mlflow_get(servers.mlflow, "model-versions/get?name=loire-lm&version=2")["model_version"]["tags"]
    }
    assert v2_tags["loire.domain"] == "NEWS" and v2_tags["loire.parent_version"] == "1", v2_tags

    with _screenshot(page, "mlflow-model-loire-lm"):
        page.goto(f"{servers.mlflow}/#/models/loire-lm", wait_until="domcontentloaded")
        expect(page.get_by_role("heading", name="loire-lm")).to_be_visible()
        _close_mlflow_assistant(page)
        for version in range(1, len(DOMAINS) + 1):
            row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
            expect(row).to_be_visible()
            expect(row).to_contain_text("loire.parent_version")
            expect(row).to_contain_text(re.compile(rf"loire\.domain\W*{DOMAINS[version - 1]}(?![A-Z])"))
        champion_row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {champion}"))
        expect(champion_row).to_contain_text("champion")

    with _screenshot(page, "mlflow-model-loire-lm-v2"):
        page.goto(f"{servers.mlflow}/#/models/loire-lm/versions/2", wait_until="domcontentloaded")
        expect(page.get_by_role("heading", name="Version 2")).to_be_visible()
        _close_mlflow_assistant(page)
        for key in ("loire.parent_version", "loire.domain", "loire.stage"):
            tag = page.locator("tr").filter(has=page.get_by_role("cell", name=key, exact=True))
            expect(tag.get_by_role("cell").nth(1)).to_have_text(v2_tags[key])
        page.locator("tr", has_text="loire.parent_version").scroll_into_view_if_needed()
