"""The GPU part of a stage: grow, distil and train one stage model (`loire.lifelong.run_stage`).

Its own flow so it can be deployed on a `gpu` work pool and started by the stage flow with
`run_deployment` (or called in-process as a subflow in the embedded mode). It passes paths and ids,
never tensors: the stage folder it writes is the result.

Resume: checkpoints live beside `out_dir` (`.<name>.checkpoints/checkpoint-<step>/`, each with a
`COMPLETE` marker written last) and are keyed by the arrival and the parent version (the stage flow
names `out_dir` after domain, ETag and parent), so a retry after a crash continues from the last
complete checkpoint; a retry after training finished finds the complete stage folder and returns it at
once. Retention: `run_stage` deletes the checkpoints once the stage folder is written, and a retry that
finds the folder complete deletes any left behind by a process killed in between.

Several processes: with more than one (`nproc`, LOIRE_NPROC; default the visible CUDA devices, 1 on
CPU) the training runs under `torchrun --nproc_per_node=N` as a subprocess of this flow run
(`loire.launch.launch_stage`): still one Prefect run, its output in the run's logs, rank 0's metrics
replayed into MLflow and the progress artifact as they come, and a rank that raises or dies fails the
run with `DistributedTrainingError` naming the rank and the cause (complete checkpoints stay, so a
retry resumes). `fsdp` shards the model with FSDP instead of replicating it with DDP.

Metrics reach MLflow through a `MetricBuffer` that never blocks training; what it could not send while
the tracking server was away is flushed (with the tracker's retry budget) when training ends.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.automation import crash_guard
from flows.settings import resolve_schedule
from loire.launch import launch_stage, visible_devices
from loire.lifelong import STAGE_FILE, checkpoint_dir, plan_stage, read_stage, run_stage
from loire.train import OnLog, TrainingDiverged


def _crash_resumes() -> int:
    from flows.settings import load_settings

    try:
        return load_settings().crash_resumes
    except ValueError:
        return 3


def stage_summary(record: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """The JSON-small part of a stage record that the stage flow needs (no loss history)."""
    return {
        "out_dir": out_dir,
        "stage": record["stage"],
        "domain": record["domain"],
        "ppl": record["ppl"],
        "ap": record["ap"],
        "ap_plus": record["ap_plus"],
        "flops": record["flops"],
        "wall_time_s": record["wall_time_s"],
        "growth": record["growth"],
        "dims": record["dims"],
        "resumed_from": record["train"]["resumed_from"],
        "carried": record.get("carried") or [],
    }


def _progress_reporter(total_steps: int) -> OnLog:
    """An on_log callback that moves a Prefect progress artifact (at most every 2% of the steps)."""
    artifact_id = create_progress_artifact(progress=0.0, key="train-progress", description="training steps done (%)")
    last = [0.0]

    def report(metrics: dict[str, float], step: int) -> None:
        percent = min(100.0, 100.0 * step / max(1, total_steps))
        if percent - last[0] >= 2.0 or percent >= 100.0:
            update_progress_artifact(artifact_id=artifact_id, progress=percent)
            last[0] = percent

    return report


def _chain(*callbacks: OnLog | None) -> OnLog:
    active = [c for c in callbacks if c is not None]

    def on_log(metrics: dict[str, float], step: int) -> None:
        for callback in active:
            try:
                callback(metrics, step)
            except Exception as exc:  # reporting must never stop training
                logging.getLogger(__name__).warning("on_log callback failed: %s", exc)

    return on_log


def _tracker_callback(mlflow_run_id: str | None, tracking_uri: str | None) -> Any:
    """The run's `MetricBuffer` (an `OnLog`), or None without a run."""
    if mlflow_run_id is None:
        return None
    from flows.registry import Tracker

    return Tracker(tracking_uri=tracking_uri).on_log(mlflow_run_id)


def _flush(buffer: Any) -> None:
    """Send the metrics the buffer kept while the server was unreachable; a failure is only reported."""
    if buffer is None or not buffer.pending:
        return
    try:
        buffer.flush()
    except Exception as exc:
        get_run_logger().warning("could not send %d buffered training metrics: %s", buffer.pending, exc)


@flow(name="train-stage", log_prints=False)
def train_stage(
    domain: str,
    corpus_dir: str,
    source_uri: str,
    etag: str,
    out_dir: str,
    parent_dir: str | None = None,
    teacher_dirs: list[str] | None = None,
    earlier_corpora: dict[str, str] | None = None,
    schedule: str = "gpt-tiny",
    strategy: str = "loire",
    steps: int | None = None,
    device: str = "auto",
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    nproc: int | None = None,
    fsdp: bool = False,
    extra_corpora: dict[str, str] | None = None,
    extra_sources: dict[str, str] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Grow the parent by the schedule, train on the corpus (with distillation), write the stage folder.

    Long because its parameters are the `train-stage` deployment's contract and the in-process and torchrun
    launches stand side by side, sharing their arguments; the work is in `loire.lifelong.run_stage`."""
    logger = get_run_logger()
    crash_guard(_crash_resumes())  # a train-stage deployment run rescheduled after a crash (flows.automation)
    out = Path(out_dir)
    if (out / STAGE_FILE).is_file():
        logger.info("stage folder %s is already complete: training is not repeated", out)
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)  # left by a process killed after publishing
        return stage_summary(read_stage(out), out_dir)
    sched = resolve_schedule(schedule)  # a preset name or a schedule YAML file
    plan = plan_stage(sched, strategy, parent_dir, steps=steps)
    total = plan.steps
    logger.info(
        "training stage %d (%s) from %s, %d steps, strategy %s", plan.stage, domain, parent_dir, total, strategy
    )
    metrics = _tracker_callback(mlflow_run_id, tracking_uri)
    workers = nproc or visible_devices(device)
    stage_args: dict[str, Any] = dict(
        parent=parent_dir,
        strategy=strategy,
        steps=steps,
        resume=True,  # a retried run continues from the last complete checkpoint, if any
        teachers=teacher_dirs,
        corpus_etag=etag,
        source_uri=source_uri,
        earlier_corpora=earlier_corpora,
        device=device,
        fsdp=fsdp,
        extra_corpora=extra_corpora or None,  # pending domains carried into this stage (loire.arrivals)
        extra_sources=extra_sources or None,  # their URIs, recorded in the lineage for later stages to fetch
        seed=seed,  # a retried stage's own schedule seed (policy retry); None: the schedule's
    )
    try:
        if workers > 1:
            logger.info("training under torchrun: %d processes%s", workers, " (FSDP)" if fsdp else " (DDP)")
            launch_stage(
                dict(domain=domain, corpus=corpus_dir, out_dir=str(out), schedule=schedule, **stage_args),
                nproc=workers,
                on_log=_chain(metrics, _progress_reporter(total)),
                on_output=logger.info,
            )
            record = read_stage(out)
        else:
            result = run_stage(
                domain,
                corpus_dir,
                out,
                schedule=sched,
                on_log=_chain(metrics, _progress_reporter(total)),
                progress=False,
                **stage_args,
            )
            record = result.record
    except TrainingDiverged:
        # Diverged checkpoints must not be resumed: a retry with sane settings trains afresh.
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
        raise
    finally:
        _flush(metrics)
    if record["train"]["resumed_from"] is not None:
        logger.info("resumed from checkpoint step %s", record["train"]["resumed_from"])
    logger.info(
        "stage %d done: AP %.2f, AP+ %s, max|Δlogits| %s",
        record["stage"],
        record["ap"],
        record["ap_plus"],
        record["growth"]["max_abs_logit_diff"],
    )
    return stage_summary(record, out_dir)
