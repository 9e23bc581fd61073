"""Serve the pipeline's deployments from one process (the embedded default; no work pool needed).

`python -m flows.serve` registers `lifelong-stage` (concurrency 1, ENQUEUE: stages never overlap and
no arrival is dropped), `train-stage` and `downstream-eval` with the Prefect server at
`PREFECT_API_URL` and executes their runs. Settings come from `LOIRE_*` variables
(`flows.settings`). Production uses `prefect.yaml` and workers instead (see infra/README.md).
"""

from __future__ import annotations

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment

from flows.downstream import downstream_eval
from flows.stage import lifelong_stage
from flows.train import train_stage

STAGE_CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def deployments() -> list[RunnerDeployment]:
    return [
        lifelong_stage.to_deployment(name="lifelong-stage", concurrency_limit=STAGE_CONCURRENCY),
        train_stage.to_deployment(name="train-stage"),
        downstream_eval.to_deployment(name="downstream-eval"),
    ]


def main() -> None:  # pragma: no cover - a long-running process, exercised by the demo and pipeline tests
    serve(*deployments(), pause_on_shutdown=False, print_starting_message=False)


if __name__ == "__main__":  # pragma: no cover
    main()
