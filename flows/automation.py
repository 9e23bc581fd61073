"""Crashes recover without a person: a Prefect automation reschedules crashed stage runs in place.

Three pieces, all bounded by the `crash_resumes` setting (LOIRE_CRASH_RESUMES, default 3; 0 turns them off):

1. The automation `loire-reschedule-crashed` (`ensure_crash_automation`): a reactive `EventTrigger` on
   `prefect.flow-run.Crashed` of a `lifelong-stage` or `train-stage` flow run that has a deployment,
   with the action `ChangeFlowRunState(SCHEDULED)`. The run is rescheduled *in place*: the same
   flow-run id finds the same MLflow run and the same arrival-keyed stage folder, so training continues
   from its last complete checkpoint (what `loire resume-crashed` does by hand). Installed by
   `infra/bootstrap.py` and by `python -m flows.serve` (the embedded demo); with `crash_resumes: 0`
   the serve process deletes it.
2. The bound (`crash_guard`, first thing in the stage and train flows): an automation cannot count,
   so a run that starts with more than `crash_resumes` Crashed states in its history fails at once
   (Failed, which the automation ignores) with a message saying so: a deterministic crash (out of memory,
   a bad node) stops after a few attempts instead of looping. The guard also marks the run's orphaned
   subflow runs (a `train-stage` subflow that died with its process and still says Running) Crashed,
   and records the flow-run process as the run's `infrastructure_pid` (`host:pid`).
3. Orphans of a dead serve process (`crash_orphans`, when `flows.serve` starts): when the serving
   process itself is killed, no runner is left to report its runs Crashed; they stay Running. At start
   the serve process marks Running runs of its deployments whose recorded `infrastructure_pid` is a
   process of this host that no longer exists Crashed, and the automation takes it from there. On other
   hosts (workers) Prefect's heartbeat-based zombie automation does that job (`ensure_zombie_automation`,
   installed by infra/bootstrap.py; needs PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the workers).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

AUTOMATION_NAME = "loire-reschedule-crashed"
ZOMBIE_AUTOMATION_NAME = "loire-crash-zombie-runs"
RECOVERED_FLOWS = ("lifelong-stage", "train-stage")
SERVED_DEPLOYMENTS = ("lifelong-stage/lifelong-stage", "train-stage/train-stage")
RESCHEDULE_MESSAGE = "rescheduled after a crash by the automation loire-reschedule-crashed"
MANUAL_RESUME = "loire resume-crashed"  # in the message of flows.serve.resume_crashed's Scheduled state
ALIVE_TYPES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


class CrashLoop(RuntimeError):
    """A run crashed more often than `crash_resumes` allows: it fails instead of being rescheduled again."""


def crash_automation(enabled: bool = True) -> Any:
    """The automation that reschedules a crashed `lifelong-stage` / `train-stage` deployment run in place."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=AUTOMATION_NAME,
        description="LOIRE: reschedule a crashed stage run in place (same run id: same MLflow run, training resumes "
        "from its last checkpoint). Bounded: a run that crashed more than LOIRE_CRASH_RESUMES times fails when it "
        "starts (flows.automation.crash_guard).",
        enabled=enabled,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[
                {"prefect.resource.role": "flow", "prefect.resource.name": list(RECOVERED_FLOWS)},
                {"prefect.resource.role": "deployment"},  # only runs of a deployment can be rescheduled
            ],
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="Scheduled", message=RESCHEDULE_MESSAGE)],
    )


def zombie_automation() -> Any:
    """Prefect's documented zombie detector: a running stage run whose heartbeats stop for 3 intervals is
    marked Crashed (then `crash_automation` reschedules it). Needs PREFECT_FLOWS_HEARTBEAT_FREQUENCY (s)."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    frequency = int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60"))
    return Automation(
        name=ZOMBIE_AUTOMATION_NAME,
        description="LOIRE: mark stage runs whose heartbeats stopped (a lost machine) Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(RECOVERED_FLOWS)},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=3 * frequency,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: the process running it is gone")],
    )


def _canonical(value: Any) -> Any:
    """A dump with every set as a sorted list: a trigger's `expect` / `after` / `for_each` are sets, and two equal
    sets can iterate in different orders (hash seed, insertion history), so comparing their JSON lists is flaky."""
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(item) for item in value)
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return value


def _same(a: Any, b: Any) -> bool:
    """Whether two automations do the same thing (ids aside)."""
    fields = {"description", "enabled", "trigger", "actions"}
    dump_a, dump_b = a.model_dump(include=fields), b.model_dump(include=fields)
    for dump in (dump_a, dump_b):
        dump["trigger"].pop("id", None)
    return _canonical(dump_a) == _canonical(dump_b)


def _ensure(wanted: Any, present: bool, dry_run: bool = False) -> str:
    """Create, update or delete the automation named like `wanted`; returns what was (or would be) done:
    created / updated / exists / deleted / absent."""
    from prefect.automations import Automation

    try:
        existing = Automation.read(name=wanted.name)
    except ValueError:
        existing = None
    if not present:
        if existing is None:
            return "absent"
        if not dry_run:
            existing.delete()
        return "deleted"
    if existing is None:
        if not dry_run:
            wanted.create()
        return "created"
    if _same(existing, wanted):
        return "exists"
    if not dry_run:
        wanted.id = existing.id
        wanted.update()
    return "updated"


def ensure_crash_automation(crash_resumes: int, dry_run: bool = False) -> str:
    """Install (crash_resumes > 0) or remove (0) the reschedule automation; idempotent."""
    done = _ensure(crash_automation(), crash_resumes > 0, dry_run)
    logger.info("automation %s: %s (crash_resumes=%d)", AUTOMATION_NAME, done, crash_resumes)
    return done


def ensure_zombie_automation(present: bool = True, dry_run: bool = False) -> str:
    return _ensure(zombie_automation(), present, dry_run)


# ------------------------------------------------------------------------------------ in the flows
def crash_guard(max_resumes: int) -> int:
    """Call first in a recoverable flow: enforce the bound, close orphaned subflow runs, record our pid.

    Returns how many times this flow run crashed before (since an operator's last `loire resume-crashed`);
    raises `CrashLoop` past `max_resumes` (0: no bound here, the automation is off).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    run_id = flow_run.get_id()
    if run_id is None:
        return 0
    with get_client(sync_client=True) as client:
        crashes = 0
        for state in sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp):
            if state.type == StateType.SCHEDULED and MANUAL_RESUME in (state.message or ""):
                crashes = 0  # an operator's `loire resume-crashed` starts a fresh budget
            elif state.type == StateType.CRASHED:
                crashes += 1
        if max_resumes > 0 and crashes > max_resumes:
            raise CrashLoop(
                f"flow run {run_id} crashed {crashes} times (more than LOIRE_CRASH_RESUMES={max_resumes}): not "
                "resuming it again; investigate (out of memory? a bad node?), then `loire resume-crashed --failed`"
            )
        # The runner does not record which process runs the flow; crash_orphans needs it.
        client.update_flow_run(run_id, infrastructure_pid=f"{socket.gethostname()}:{os.getpid()}")
        if crashes:
            orphans = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(t) for t in ALIVE_TYPES])),
                )
            )
            for child in orphans:
                message = f"its parent flow run {run_id} crashed and was rescheduled"
                client.set_flow_run_state(child.id, Crashed(message=message), force=True)
    return crashes


# ------------------------------------------------------------------------------------ serve start
def _process_gone(infrastructure_pid: str | None, run_id: str) -> bool:
    """Whether `host:pid` names a process of this host that is gone (or is no longer that run's)."""
    if not infrastructure_pid or ":" not in infrastructure_pid:
        return False
    host, _, pid = infrastructure_pid.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")  # noqa: SIM115
    except FileNotFoundError:
        return True
    except OSError:  # not ours to read: alive
        return False
    return f"PREFECT__FLOW_RUN_ID={run_id}".encode() not in environ


def crash_orphans(deployments: Sequence[str] = SERVED_DEPLOYMENTS) -> list[str]:
    """Mark Crashed the Running runs of `deployments` whose recorded process on this host is gone; their ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    crashed: list[str] = []
    with get_client(sync_client=True) as client:
        ids = []
        for name in deployments:
            try:
                ids.append(client.read_deployment_by_name(name).id)
            except Exception:  # not registered yet: nothing of it can be running
                continue
        if not ids:
            return []
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=ids),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
            )
        )
        for run in runs:
            if _process_gone(run.infrastructure_pid, str(run.id)):
                message = f"the process running it ({run.infrastructure_pid}) is gone (found when flows.serve started)"
                # Not forced: the server's rules for Running -> Crashed release the deployment's concurrency slot.
                result = client.set_flow_run_state(run.id, Crashed(message=message))
                if result.status.value != "ACCEPT":
                    logger.warning("flow run %s: the server refused Crashed (%s)", run.id, result.details)
                    continue
                logger.warning("flow run %s (%s): %s", run.name, run.id, message)
                crashed.append(str(run.id))
    return crashed
