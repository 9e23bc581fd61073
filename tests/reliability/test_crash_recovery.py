"""Crashes recover without a person (issue 16): the serving process is SIGKILLed mid-training and started
again; the crash-recovery automation and the serve process's orphan check (flows.automation) reschedule the
stage run in place, and it completes from its checkpoint with no command typed and one version registered."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from flows.automation import AUTOMATION_NAME, RESCHEDULE_MESSAGE
from loire.lifelong import read_stage
from tests.flows.pipeline_harness import Pipeline, kill_flow_run, pipeline_fixture
from tests.reliability.test_crash_resume import STEPS, _checkpoint_steps

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def _wait_completed(pipeline: Pipeline, run_id: str, timeout_s: float = 300) -> None:
    """Until the run completes: Crashed is final but not the end here (the automation reschedules it)."""

    def completed() -> bool:
        state = pipeline.run_state(run_id)
        assert state is None or not (state.is_failed() or state.is_cancelled()), pipeline.logs(run_id)[-3000:]
        return state is not None and state.is_completed()

    pipeline.wait_until(completed, timeout_s, f"flow run {run_id} to complete", every=1.0)


pipeline = pipeline_fixture(settings={"downstream_tasks": "none"}, LOIRE_STEPS=str(STEPS), LOIRE_CRASH_RESUMES="2")


@pytest.mark.slow  # ~1-1.5 min; test_crash_resume.py covers a killed stage in make test
def test_serve_process_killed_mid_training_recovers_by_itself(pipeline: Pipeline, tmp_path: Path) -> None:
    from prefect.automations import Automation

    assert Automation.read(name=AUTOMATION_NAME).enabled  # installed by `python -m flows.serve`
    stages = pipeline.work_dir / "stages"
    pipeline.upload("WB", "2026-01")
    (run_id,) = pipeline.watch()
    steps = pipeline.wait_while_running(run_id, lambda: _checkpoint_steps(stages), 240, "a complete checkpoint")

    # SIGKILL the serving process and the flow-run process: no runner is left to report anything.
    served = pipeline.served
    assert served is not None
    kill_flow_run(pipeline, run_id)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(served.pid, signal.SIGKILL)
    served.wait(timeout=30)
    pipeline.served = None
    assert pipeline.run_state(run_id).is_running()  # a zombie until something notices
    assert not list(stages.glob("WB-*/stage.json")), "killed too late: training had finished"
    at_kill = max(steps)

    pipeline.serve()  # started again; nobody types a command
    _wait_completed(pipeline, run_id)
    messages = [(s.type.value, s.message or "") for s in pipeline.states(run_id)]
    assert any(t == "CRASHED" and "is gone" in m for t, m in messages), messages
    assert any(t == "SCHEDULED" and RESCHEDULE_MESSAGE in m for t, m in messages), messages
    assert not any("loire resume-crashed" in m for _, m in messages)

    (version,) = pipeline.versions()
    assert pipeline.champion() == str(version.version)
    record = read_stage(pipeline.tracker.download_stage(str(version.version), tmp_path / "v1"))
    assert record["train"]["resumed_from"] is not None and record["train"]["resumed_from"] >= at_kill > 0
    assert record["train"]["steps"] == STEPS
    # the orphaned train-stage subflow run of the first attempt was closed when the run resumed
    states = sorted(r.state.type.value for r in pipeline.subflows(run_id))
    assert states == ["COMPLETED", "CRASHED"], states


@pytest.mark.slow  # ~2 min on 2 busy cores; the test above covers the automation too
def test_killed_flow_run_process_is_rescheduled_by_the_automation(pipeline: Pipeline) -> None:
    """The runner survives and reports the run Crashed; the automation reschedules it in place."""
    stages = pipeline.work_dir / "stages"
    pipeline.upload("NEWS", "2026-02")
    (run_id,) = pipeline.watch()
    pipeline.wait_while_running(run_id, lambda: _checkpoint_steps(stages), 240, "a complete checkpoint")
    assert kill_flow_run(pipeline, run_id)
    _wait_completed(pipeline, run_id)
    types = [s.type.value for s in pipeline.states(run_id)]
    assert "CRASHED" in types, types
    assert len(pipeline.versions(pipeline.batch_uri("NEWS", "2026-02"))) == 1
