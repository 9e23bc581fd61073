"""Serve the pipeline's deployments from one process (the embedded default; no work pool needed).

`python -m flows.serve` registers `lifelong-stage` (concurrency 1, ENQUEUE: stages never overlap and
no arrival is dropped), `train-stage` and `downstream-eval` with the Prefect server at
`PREFECT_API_URL` and executes their runs. Settings come from `LOIRE_*` variables
(`flows.settings`). Production uses `prefect.yaml` and workers instead (see infra/README.md).

Order. The deployment's ENQUEUE limit alone does not keep arrival order: the runner submits every run
that is due in one poll concurrently, so two stage runs created within a poll race for the slot, and a
run that lost is rescheduled at "now + a few seconds" each time it retries, so several waiting runs are
taken in no particular order. In the embedded mode (training in-process) the runner therefore executes
one flow run at a time (`limit=1`): it takes the due runs strictly by scheduled time, which is the
order the watcher created them in (arrival order), and a waiting run keeps its original time. With
`train_mode: deployment` the stage waits on a train-stage run of the same runner, so no limit is set.

Recovery (`resume_crashed`, the `loire resume-crashed` command). The runner executes each flow run in a
child process; when that process dies (OOM kill, SIGKILL, a lost machine under a worker), the runner
reports the run Crashed and nothing retries it: Prefect's flow retries only cover exceptions raised
inside the flow. `resume_crashed` reschedules the stage deployment's Crashed runs (and, on request,
Failed ones) in place, oldest arrival first. The same flow-run id means the same MLflow run and the
same arrival-keyed stage folder, so training continues from its last complete checkpoint. It is an
explicit operator command rather than a Prefect automation on the Crashed state because a crash is
often deterministic (out of memory, a bad node, a corpus that kills the process): an automation would
reschedule such a run forever, while the command says what it does, stops after `max_resumes` crashes
of one run and needs no event/automation services on the server. Orphaned subflow runs of a crashed
run (its `train-stage` subflow, still Running in the API because its process died with it) are
marked Crashed first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment

from flows.downstream import downstream_eval
from flows.stage import lifelong_stage
from flows.train import train_stage
from flows.watch import DEFAULT_DEPLOYMENT

STAGE_CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
STAGE_DEPLOYMENT = DEFAULT_DEPLOYMENT  # "lifelong-stage/lifelong-stage"
RESUME_MESSAGE = "rescheduled by loire resume-crashed"


def deployments() -> list[RunnerDeployment]:
    return [
        lifelong_stage.to_deployment(name="lifelong-stage", concurrency_limit=STAGE_CONCURRENCY),
        train_stage.to_deployment(name="train-stage"),
        downstream_eval.to_deployment(name="downstream-eval"),
    ]


@dataclass(frozen=True)
class Resumed:
    """What `resume_crashed` did with one run."""

    run_id: str
    name: str
    arrival: str  # the marker key of the run's arrival ("" when the run has no arrival parameter)
    state: str  # the state it was found in
    action: str  # "rescheduled", "would reschedule" (dry run) or "skipped: <why>"
    orphans: int = 0  # subflow runs marked Crashed


def _arrival_order(run: Any) -> tuple[float, str, str]:
    arrival = (run.parameters or {}).get("arrival") or {}
    try:
        arrived = float(arrival.get("arrived_at"))
    except (TypeError, ValueError):
        arrived = run.expected_start_time.timestamp() if run.expected_start_time else 0.0
    return arrived, str(arrival.get("key", "")), str(run.id)


def resume_crashed(
    deployment: str = STAGE_DEPLOYMENT,
    *,
    include_failed: bool = False,
    run_ids: list[str] | None = None,
    max_resumes: int = 3,
    dry_run: bool = False,
) -> list[Resumed]:
    """Reschedule the Crashed (and with `include_failed`, Failed) runs of `deployment` in place.

    Runs are taken in arrival order (the `arrival` parameter's time, then key), so the stage deployment's
    ENQUEUE limit replays them in that order. A run that already ended Crashed/Failed more than
    `max_resumes` times is skipped. `run_ids` restricts the command to those runs. Returns one entry per
    run considered.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed, Scheduled

    if max_resumes < 0:
        raise ValueError(f"max_resumes={max_resumes}: must be >= 0")
    ended = [StateType.CRASHED, *([StateType.FAILED] if include_failed else [])]
    ended_types = (StateType.CRASHED, StateType.FAILED)
    alive = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
    done: list[Resumed] = []
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        wanted = FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[found.id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ended)),
        )
        if run_ids:
            wanted.id = FlowRunFilterId(any_=[UUID(str(r)) for r in run_ids])
        runs = sorted(client.read_flow_runs(flow_run_filter=wanted), key=_arrival_order)
        for run in runs:
            arrival = str(((run.parameters or {}).get("arrival") or {}).get("key", ""))
            state = run.state.name if run.state else "?"
            endings = sum(1 for s in client.read_flow_run_states(run.id) if s.type in ended_types)
            if endings > max_resumes:
                action = f"skipped: ended {endings} times (more than --max-resumes {max_resumes}); investigate it"
                done.append(Resumed(str(run.id), run.name, arrival, state, action))
                continue
            if dry_run:
                done.append(Resumed(str(run.id), run.name, arrival, state, "would reschedule"))
                continue
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=alive)),
                )
            )
            for child in children:
                message = f"its parent flow run {run.id} ended {state}; the parent is being rescheduled"
                client.set_flow_run_state(child.id, Crashed(message=message), force=True)
            result = client.set_flow_run_state(run.id, Scheduled(message=f"{RESUME_MESSAGE} (was {state})"), force=True)
            accepted = result.status.value == "ACCEPT"
            reason = getattr(result.details, "reason", None) or result.status.value
            action = "rescheduled" if accepted else f"skipped: the server refused ({reason})"
            done.append(Resumed(str(run.id), run.name, arrival, state, action, len(children)))
    return done


def recover_on_start() -> None:
    """Install (or, with crash_resumes 0, remove) the crash-recovery automation and mark the runs a killed serve
    process left Running Crashed, so the automation reschedules them (flows.automation)."""
    import sys

    from flows.automation import crash_orphans, ensure_crash_automation
    from flows.settings import load_settings

    try:
        resumes = load_settings().crash_resumes
    except ValueError:
        resumes = 0
    try:
        ensure_crash_automation(resumes)
        if resumes:
            for run_id in crash_orphans():
                print(f"flow run {run_id} was left running by a process that is gone: marked Crashed", file=sys.stderr)
    except Exception as exc:  # recovery is an extra; serving must not depend on it
        print(f"crash recovery not installed: {exc}", file=sys.stderr)


def runner_limit() -> int | None:
    """Flow runs this process executes at once: 1 in the embedded mode (see Order above), else no limit."""
    from flows.settings import load_settings

    try:
        mode = load_settings().train_mode
    except ValueError:  # invalid settings: every stage will fail and say why; keep the safe order
        return 1
    return 1 if mode == "in-process" else None


def main() -> None:  # pragma: no cover - a long-running process, exercised by the demo and pipeline tests
    recover_on_start()
    serve(*deployments(), limit=runner_limit(), pause_on_shutdown=False, print_starting_message=False)


if __name__ == "__main__":  # pragma: no cover
    main()
