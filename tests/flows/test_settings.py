"""Pipeline settings: defaults, LOIRE_* variables, YAML, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.settings import PipelineSettings, from_env, load_settings
from loire.promotion import Gates


def test_defaults_env_yaml_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PipelineSettings.model_fields:
        monkeypatch.delenv(f"LOIRE_{name.upper()}", raising=False)
    monkeypatch.delenv("LOIRE_SETTINGS", raising=False)
    assert load_settings().strategy == "loire" and load_settings().train_mode == "in-process"
    assert load_settings().max_ap_plus == Gates().max_ap_plus  # one default for the pipeline and the library
    file = tmp_path / "pipeline.yaml"
    file.write_text("schedule: gpt-micro\nmax_ap_plus: 10\n")
    monkeypatch.setenv("LOIRE_SETTINGS", str(file))
    monkeypatch.setenv("LOIRE_MAX_AP_PLUS", "none")
    monkeypatch.setenv("LOIRE_DOWNSTREAM_BUDGET", "64")
    settings = load_settings({"device": "cpu"})
    assert settings.schedule == "gpt-micro" and settings.max_ap_plus is None
    assert settings.downstream_budget == 64 and settings.device == "cpu"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"strategy": "magic"}, "strategy"),
        ({"train_mode": "cluster"}, "train_mode"),
        ({"downstream_budget": -1}, "downstream_budget"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_settings_name_the_field(raw: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOIRE_SETTINGS", raising=False)
    with pytest.raises(ValueError, match=message):
        load_settings(raw)


def test_unreadable_settings_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: pipeline settings must be a mapping"):
        load_settings(path=bad)


def test_none_in_env_unsets_only_nullable_fields() -> None:
    raw = from_env({"LOIRE_DOWNSTREAM_TASKS": "none", "LOIRE_MAX_AP_PLUS": "None", "LOIRE_TRACKING_URI": ""})
    assert raw == {"downstream_tasks": "none", "max_ap_plus": None, "tracking_uri": None}
    settings = load_settings(raw)
    assert settings.downstream_tasks == "none" and settings.max_ap_plus is None


def test_an_invalid_variable_is_named_with_the_allowed_values_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOIRE_SETTINGS", raising=False)
    monkeypatch.setenv("LOIRE_TRAIN_MODE", "cluster")
    with pytest.raises(ValueError, match=r"train_mode \(LOIRE_TRAIN_MODE\): .*'in-process' or 'deployment'") as err:
        load_settings()
    assert len(str(err.value).splitlines()) == 1


def test_variables_override_the_file_and_values_override_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "pipeline.yaml"
    file.write_text("strategy: replay\nsteps: 3\n")
    monkeypatch.setenv("LOIRE_STEPS", "5")
    monkeypatch.setenv("LOIRE_BASE_MODEL", "s3://models/gpt2/")
    settings = load_settings({"device": "cpu"}, path=file)
    assert (settings.strategy, settings.steps, settings.device) == ("replay", 5, "cpu")
    assert settings.base_model == "s3://models/gpt2/" and PipelineSettings().steps == 5  # read by the class itself
    assert load_settings({"steps": 7}, path=file).steps == 7


def test_the_rejected_policy_lists_its_allowed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOIRE_SETTINGS", raising=False)
    assert load_settings({"rejected_policy": "retry"}).rejected_policy == "retry"
    monkeypatch.setenv("LOIRE_REJECTED_POLICY", "again")
    with pytest.raises(ValueError, match=r"rejected_policy \(LOIRE_REJECTED_POLICY\): .*'carry', 'retry' or 'skip'"):
        load_settings()
