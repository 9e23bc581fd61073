"""The train-stage flow under torchrun (LOIRE_NPROC=2 on CPU, gloo): one Prefect run, one registered version,
rank 0's metrics in MLflow; a failing or SIGKILLed rank comes back as a clear error and a retry resumes."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from flows.settings import PipelineSettings, from_env
from flows.stage import lifelong_stage
from flows.tracking import Tracker
from loire.launch import DistributedTrainingError, launch_stage
from loire.lifelong import checkpoint_dir, read_stage
from loire.train import complete_checkpoints
from tests.flows.pipeline_harness import arrive, local_world
from tests.test_distributed import _rank_pid

pytestmark = pytest.mark.integration


def test_loire_nproc_is_read_from_the_environment() -> None:
    raw = from_env({"LOIRE_NPROC": "2", "LOIRE_FSDP": "true"})
    settings = PipelineSettings(**raw)
    assert (settings.nproc, settings.fsdp) == (2, True)
    assert PipelineSettings(**from_env({"LOIRE_NPROC": "none"})).nproc is None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("torchrun-flow")
    return local_world(
        root, documents=200, task_examples=6, steps=8, nproc=2, downstream_tasks="none", max_ap_plus=None
    )


def test_stage_trains_under_torchrun_and_registers_one_version(world: dict[str, Any], prefect_api: str) -> None:
    settings: PipelineSettings = world["settings"]
    result = lifelong_stage(arrive(world, "WB"), settings)
    assert result["version"] == "1" and not result["skipped"]
    tracker = Tracker(tracking_uri=settings.tracking_uri)
    assert len(tracker.client.search_model_versions("name='loire-lm'")) == 1
    (stage,) = [p.parent for p in (Path(settings.work_dir) / "stages").glob("*/stage.json")]
    record = read_stage(stage)
    assert record["train"]["world_size"] == 2 and record["train"]["steps"] == 8
    run = tracker.client.get_run(result["run_id"])
    assert {"train/loss", "train/tokens_per_s", "eval/ppl/WB"} <= set(run.data.metrics)  # replayed from rank 0


@pytest.mark.slow  # ~16 s, run by `make test-all`; keeps `make test` within its 20-minute budget
def test_a_failing_rank_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "part-0.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    args = dict(domain="WB", corpus=str(bad), out_dir=str(tmp_path / "out"), schedule="gpt-micro", device="cpu")
    with pytest.raises(DistributedTrainingError, match=r"exit code 1: rank [01]: CorpusError: .*part-0\.jsonl.*line 2"):
        launch_stage(args, nproc=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~35 s, run by `make test-all` (as is the rank kill in tests/test_distributed.py)
def test_a_sigkilled_rank_fails_the_launch_and_a_retry_resumes(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "stage"
    corpus = world["data"] / "corpora" / "news"
    args = dict(domain="NEWS", corpus=str(corpus), out_dir=str(out), schedule="gpt-micro", steps=400, device="cpu")
    args["resume"] = True
    killed: list[int] = []
    steps: list[int] = []

    def on_log(metrics: dict[str, float], step: int) -> None:
        steps.append(step)
        if not killed and complete_checkpoints(checkpoint_dir(out)):
            pid = _rank_pid(os.getpid(), 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    with pytest.raises(DistributedTrainingError, match=r"rank 1 exited with code -9 \(SIGKILL\)"):
        launch_stage(args, nproc=2, on_log=on_log, poll_s=0.05)
    assert killed and steps and not out.exists()
    kept = complete_checkpoints(checkpoint_dir(out))
    assert kept
    launch_stage(args, nproc=2)
    record = read_stage(out)
    assert record["train"]["resumed_from"] == int(kept[-1].name[11:]) and record["train"]["world_size"] == 2
