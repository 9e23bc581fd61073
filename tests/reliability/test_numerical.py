"""Numerical failure: a stage whose loss goes NaN fails its flow run and changes nothing in the registry.

A good first stage makes version 1 the champion; the second stage runs the same schedule with an
absurd learning rate (1e6) on its stage, so AdamW blows the weights up within a step or two. The
trainer's guard (`loire.train.TrainingDiverged`, raised on a non-finite loss or gradient norm) must
stop the stage before anything is saved: the flow run fails naming TrainingDiverged, no version is
registered or promoted, the champion stays, and the work dir holds no stage folder for the arrival.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import loire.schedule
from flows.settings import PipelineSettings, load_settings, resolve_schedule
from flows.stage import lifelong_stage
from flows.tracking import Tracker
from loire.schedule import Schedule, schedule_preset
from loire.train import TrainingDiverged
from tests.flows.pipeline_harness import arrive, local_world

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

ABSURD_LR = 1e6
DIVERGING = "gpt-micro-diverging"  # the preset name the diverging schedule is registered under


def diverging_schedule() -> Schedule:
    """gpt-micro with the learning rate of every stage after the first at ABSURD_LR."""
    data = schedule_preset("gpt-micro").to_dict()
    for stage in data["stages"][1:]:
        stage["lr"] = ABSURD_LR
        stage["warmup_steps"] = 0
    return Schedule.from_dict(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("numerical")
    return local_world(root, documents=120, task_examples=12, steps=4, downstream_tasks="none", max_ap_plus=None)


def flow_runs(name: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[name])), sort=FlowRunSort.START_TIME_DESC
        )


def test_schedule_setting_accepts_a_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "absurd.yaml"
    path.write_text(diverging_schedule().to_yaml())
    settings = load_settings({"schedule": str(path)})
    assert resolve_schedule(settings.schedule).stages[1].lr == ABSURD_LR
    assert resolve_schedule("gpt-micro") == schedule_preset("gpt-micro")
    with pytest.raises(ValueError, match=r"schedule: .*no-such-preset.* neither a preset .* nor a YAML file"):
        load_settings({"schedule": "no-such-preset"})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"preset": "gpt-tiny", "stages": [{"domain": "WB", "steps": 1, "lr": -1.0}]}))
    with pytest.raises(ValueError, match=r"bad\.yaml.*stages\[0\]"):
        load_settings({"schedule": str(bad)})


def test_diverging_stage_fails_registers_nothing_and_keeps_the_champion(
    world: dict[str, Any], prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings: PipelineSettings = world["settings"]
    first = lifelong_stage(arrive(world, "WB"), settings)
    assert first["version"] == "1" and first["promoted"]
    tracker = Tracker(tracking_uri=settings.tracking_uri)

    monkeypatch.setitem(loire.schedule.SCHEDULES, DIVERGING, diverging_schedule())
    absurd = settings.model_copy(update={"schedule": DIVERGING})
    news = world["news"] = arrive(world, "NEWS")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        lifelong_stage(news, absurd)

    # The flow run (and its train-stage subflow) failed, naming the divergence.
    stage_run = flow_runs("lifelong-stage")[0]
    assert stage_run.state.is_failed() and "TrainingDiverged" in (stage_run.state.message or "")
    assert stage_run.parameters["arrival"]["key"] == news["key"]
    train_run = flow_runs("train-stage")[0]
    assert train_run.state.is_failed() and "TrainingDiverged" in (train_run.state.message or "")

    # Nothing registered, nothing promoted; the MLflow run of the stage is closed as FAILED.
    versions = tracker.client.search_model_versions("name='loire-lm'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(tracker.champion().version) == "1"
    aliases = tracker.client.get_registered_model("loire-lm").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1", "candidate": "1"}
    runs = tracker.client.search_runs([tracker.experiment_id()], "tags.`loire.domain` = 'NEWS'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not {"eval/ap", "train/final_loss"} & set(runs[0].data.metrics)

    # No stage folder (complete or half-written) for the arrival in the work dir.
    stages = Path(settings.work_dir) / "stages"
    names = sorted(p.name for p in stages.iterdir())
    assert not [n for n in names if "NEWS" in n and "checkpoints" not in n], names
    assert all(n.startswith("WB-") for n in names if not n.endswith(".checkpoints")), names


def test_rerun_with_sane_settings_after_divergence_trains_afresh(world: dict[str, Any], prefect_api: str) -> None:
    """The same arrival again, after the operator fixed the schedule: it must train afresh (not resume the
    diverged trajectory from its checkpoints) and become version 2."""
    settings: PipelineSettings = world["settings"]
    if "news" not in world:
        pytest.skip("runs after test_diverging_stage_fails_registers_nothing_and_keeps_the_champion")
    result = lifelong_stage(world["news"], settings)
    assert result["version"] == "2" and result["promoted"]
