"""A worker killed mid-training: the run ends Crashed, `loire resume-crashed` reschedules it in place, and
training resumes from the last complete checkpoint.

The stage runs 60 gpt-micro steps (a checkpoint every 15). As soon as the first complete checkpoint is on
disk the flow-run process (the served runner's child, found by its PREFECT__FLOW_RUN_ID) is SIGKILLed: no
exception handler, no `finally`, no state report from the flow itself. The runner must report the run
Crashed; recovery must reuse the flow run, its MLflow run and its checkpoints, and register exactly one
version for the arrival.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flows.serve import RESUME_MESSAGE
from loire.lifelong import read_stage
from loire.train import complete_checkpoints
from tests.flows.pipeline_harness import Pipeline, kill_flow_run, pipeline_fixture

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

STEPS = 60  # gpt-micro: ~0.1 s a step on a busy CPU, a checkpoint every STEPS // 4
# The crash-recovery automation off (LOIRE_CRASH_RESUMES=0): this test is about the operator's command.
pipeline = pipeline_fixture(settings={"downstream_tasks": "none"}, LOIRE_STEPS=str(STEPS), LOIRE_CRASH_RESUMES="0")


def _checkpoint_steps(stages: Path) -> list[int]:
    """Steps of the complete checkpoints under the work dir's stage folders."""
    if not stages.is_dir():
        return []
    return [int(p.name.split("-")[1]) for d in stages.glob(".*.checkpoints") for p in complete_checkpoints(d)]


def test_killed_stage_is_crashed_then_resumed_from_its_checkpoint(
    pipeline: Pipeline, loire_cli: Callable[..., Any], tmp_path: Path
) -> None:
    stages = pipeline.work_dir / "stages"
    pipeline.upload("WB", "2026-01")
    (run_id,) = pipeline.watch()

    steps = pipeline.wait_while_running(run_id, lambda: _checkpoint_steps(stages), 240, "a complete checkpoint")
    killed = kill_flow_run(pipeline, run_id)
    assert killed, f"no process runs flow run {run_id}"
    (crashed,) = pipeline.wait([run_id], timeout_s=60)
    assert crashed.state.is_crashed(), pipeline.describe(crashed)
    assert not list(stages.glob("WB-*/stage.json")), "killed too late: training had finished"
    assert pipeline.versions() == [] and pipeline.champion() is None
    at_kill = max(steps)
    assert 0 < at_kill < STEPS and max(_checkpoint_steps(stages)) < STEPS
    mlflow_runs = pipeline.tracker.client.search_runs(
        [pipeline.tracker.experiment_id()], f"tags.`prefect.flow_run_id` = '{run_id}'"
    )
    assert len(mlflow_runs) == 1
    (orphan,) = pipeline.subflows(run_id)  # the train-stage subflow died with its process but still says Running
    assert orphan.state.is_running()

    # Recovery: the operator command reschedules the crashed run in place.
    dry = loire_cli("resume-crashed", "--dry-run")
    assert dry.exit_code == 0 and run_id in dry.output and "would reschedule" in dry.output, dry.output
    resumed = loire_cli("resume-crashed")
    assert resumed.exit_code == 0 and run_id in resumed.output and "rescheduled" in resumed.output, resumed.output
    (done,) = pipeline.wait([run_id])
    assert done.state.is_completed(), pipeline.describe(done)
    assert any(RESUME_MESSAGE in (s.message or "") for s in pipeline.states(run_id))
    assert loire_cli("resume-crashed").output.startswith("no crashed runs")

    # Training resumed from a checkpoint (the registered stage record says so), once.
    (version,) = pipeline.versions(pipeline.batch_uri("WB", "2026-01"))
    assert pipeline.versions() == [version] and pipeline.champion() == str(version.version)
    record = read_stage(pipeline.tracker.download_stage(str(version.version), tmp_path / "v1"))
    assert record["train"]["resumed_from"] is not None and record["train"]["resumed_from"] >= at_kill > 0
    assert record["train"]["steps"] == STEPS
    # The same MLflow run carried on, and holds the version.
    again = pipeline.tracker.client.search_runs(
        [pipeline.tracker.experiment_id()], f"tags.`prefect.flow_run_id` = '{run_id}'"
    )
    assert [r.info.run_id for r in again] == [mlflow_runs[0].info.run_id] == [version.run_id]
    assert again[0].info.status == "FINISHED"
    # Retention: the successful stage deleted its checkpoints; the orphaned subflow run was closed.
    assert not list(stages.glob(".*.checkpoints")), list(stages.iterdir())
    states = {str(r.id): r.state.type.value for r in pipeline.subflows(run_id)}
    assert states[str(orphan.id)] == "CRASHED" and sorted(states.values()) == ["COMPLETED", "CRASHED"], states
