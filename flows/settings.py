"""Pipeline settings: one validated object, read from `LOIRE_*` environment variables or a YAML file.

Everything a stage needs besides the arrival itself: where models and checkpoints live, which
schedule and strategy grow the model, the registry name, the promotion gates, which downstream
tasks to run and how the GPU part is started.

A pydantic-settings `BaseSettings`: each field `foo` reads `LOIRE_FOO`. Sources, highest first: values passed
in, `LOIRE_*` variables, the YAML file of `LOIRE_SETTINGS` (or `load_settings(path=...)`), the defaults.
`load_settings` turns a validation error into one ValueError line naming each field, the variable it came
from and what is allowed.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from flows.redact import credentials_to_env, redact
from loire.promotion import DEFAULT_MAX_AP_PLUS

ENV_PREFIX = "LOIRE_"
SETTINGS_FILE_ENV = ENV_PREFIX + "SETTINGS"
# Written in a variable, these words unset a field that may be None ("" too); elsewhere they are values
# (LOIRE_DOWNSTREAM_TASKS=none means "no downstream tasks").
_UNSET_WORDS = ("", "none", "null")
# The file `load_settings(path=...)` names for the settings built inside it (else LOIRE_SETTINGS).
_settings_file: contextvars.ContextVar[str | None] = contextvars.ContextVar("loire_settings_file", default=None)


class PipelineSettings(BaseSettings):
    """Settings of the lifelong pipeline (defaults: the embedded, CPU, tiny configuration)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    work_dir: str = Field(
        default_factory=lambda: str(Path.home() / ".loire" / "work"),
        description="Local folder for corpus caches, stage folders and checkpoints (shared by the stage and "
        "train flows; a shared volume when they run on different machines).",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: MLFLOW_TRACKING_URI). Credentials written into it "
        "(http://user:password@host) are moved to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of this "
        "process, where MLflow reads them, so the URI kept here (logged, passed to subflows and deployments, "
        "recorded by Prefect) holds no secret; a worker in another process needs those variables itself.",
    )
    model_name: str = Field("loire-lm", description="Registered model that receives one version per stage.")
    experiment: str = Field("loire", description="MLflow experiment of the stage runs.")
    schedule: str = Field(
        "gpt-tiny",
        description="Growth schedule: a preset name (loire.schedule.SCHEDULES, or BASE_SCHEDULES with `base_model`) "
        "or the path of a schedule YAML file (loire.schedule.Schedule.from_yaml); see `resolve_schedule`.",
    )
    base_model: str | None = Field(
        None,
        description="A Hugging Face checkpoint to start the chain from (LOIRE_BASE_MODEL): a local folder or an s3:// "
        "prefix holding config.json, safetensors weights and the model's own tokenizer (GPT-2, BERT or Llama; see "
        "loire.base). While the registry holds no stage of `model_name`, the first stage imports it exactly, "
        "registers it as stage 0 (tag loire.base) and makes it the champion; every arrival grows from there. Pair it "
        "with a schedule whose growth is relative to the model (the `from-base` preset).",
    )
    strategy: str = Field("loire", description="Lifelong strategy (see loire.strategies.STRATEGIES).")
    steps: int | None = Field(None, ge=1, description="Override of the schedule's steps per stage.")
    device: str = Field("auto", description="auto, cpu or cuda for training.")
    train_mode: Literal["in-process", "deployment"] = Field(
        "in-process",
        description="in-process: the train flow runs as a subflow of the stage flow (embedded mode); deployment: "
        "run_deployment of `train_deployment` on the GPU work pool.",
    )
    train_deployment: str = Field("train-stage/train-stage", description="flow-name/deployment-name.")
    nproc: int | None = Field(
        None,
        ge=1,
        description="Training processes of one stage (LOIRE_NPROC); above 1 the train flow runs `torchrun "
        "--nproc_per_node=N` as a subprocess. Default: the number of visible CUDA devices, 1 on CPU.",
    )
    fsdp: bool = Field(False, description="Under torchrun: shard the model with FSDP instead of DDP (LOIRE_FSDP).")
    max_ap_plus: float | None = Field(
        DEFAULT_MAX_AP_PLUS,
        description="Promotion gate: AP+ (mean rise of the earlier domains' perplexity since each was learnt) at or "
        "below this (None: no AP+ gate). In perplexity points, so it depends on the model size. At the CPU presets "
        "(bench/results/lifelong.md, gpt-tiny) the default strategy `loire` (growth + replay) keeps AP+ below 0, "
        "LOIRE without replay shows 157-454 and fine-tuning a fixed model 287-1284: 100 (loire.promotion's default "
        "too) rejects real forgetting there. Use a few points for base-sized models.",
    )
    downstream_tolerance: float = Field(
        0.02, ge=0, description="Promotion gate: downstream average may fall this much below the champion's."
    )
    rejected_policy: Literal["carry", "retry", "skip"] = Field(
        "carry",
        description="What happens to the data of an arrival whose stage was not promoted: carry (it stays pending; "
        "the next stage trains on its own arrival and every pending one, so the champion covers every arrived "
        "domain), retry (the stage is re-run once from the same champion with another seed, registered as a second "
        "version tagged loire.attempt=2; if that is rejected too, the arrival is carried as under carry) or skip "
        "(dropped, the old behaviour; logged loudly and listed in loire.pending). See loire.arrivals.",
    )
    mlflow_ui_url: str | None = Field(
        None,
        description="Base URL of the MLflow UI for the links in the Prefect artifacts when the tracking URI is not "
        "an http(s) server (e.g. SQLite: the address `mlflow ui` serves on; default http://127.0.0.1:5000).",
    )
    crash_resumes: int = Field(
        3,
        ge=0,
        description="Automatic reschedules of a crashed stage run (the crash-recovery automation and the serve "
        "process's orphan check, flows.automation); 0 disables them (then `loire resume-crashed` is the way back).",
    )
    downstream_tasks: str = Field(
        "seen", description="'seen' (the catalogue's tasks of every seen domain), 'none', or comma-separated names."
    )
    downstream_data_root: str | None = Field(None, description="Root of the task files (default: loire's).")
    downstream_catalogue: str | None = Field(None, description="Task catalogue YAML (default: loire's dsp.yaml).")
    downstream_budget: int | None = Field(300, ge=0, description="Max train examples per task (0 = all).")
    downstream_seeds: int = Field(1, ge=1, description="Fine-tuning seeds per task.")
    max_object_bytes: int = Field(2 * 1024**3, ge=1, description="Largest corpus object fetched from S3.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets folder: the pipeline's settings come from values, variables and one YAML file.
        return (init_settings, env_settings, _SettingsFile(settings_cls))

    @field_validator("*", mode="before")
    @classmethod
    def _unset_words(cls, value: Any, info: ValidationInfo) -> Any:
        return _unset(cls.model_fields[info.field_name], value) if info.field_name else value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from loire.strategies import STRATEGIES

        if value not in STRATEGIES:
            raise ValueError(f"{value!r} is not one of {sorted(STRATEGIES)}")
        return value

    @field_validator("tracking_uri")
    @classmethod
    def _credentials_out_of_uri(cls, value: str | None) -> str | None:
        return None if value is None else credentials_to_env(value)

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        resolve_schedule(value)  # a preset, or a YAML file that parses and validates; errors name the problem
        return value

    def resolved_tracking_uri(self) -> str | None:
        """`tracking_uri`, else MLFLOW_TRACKING_URI; without credentials either way (see `tracking_uri`)."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return None if uri is None else credentials_to_env(uri)


def resolve_schedule(value: str) -> Any:
    """The `loire.schedule.Schedule` a `schedule` setting names: a preset, else a schedule YAML file.

    Raises ValueError naming the value when it is neither, or naming the file and the field when the
    YAML does not validate. The stage and train flows resolve their `schedule` parameter with this.
    """
    from loire.schedule import BASE_SCHEDULES, SCHEDULES, Schedule

    presets = {**SCHEDULES, **BASE_SCHEDULES}
    if value in presets:
        return presets[value]
    path = Path(value).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        raise ValueError(
            f"{value!r} is neither a preset ({', '.join(presets)}) nor a YAML file (*.yaml, *.yml) that exists"
        )
    try:
        return Schedule.from_yaml(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid schedule ({exc})") from None


def _unset(field: FieldInfo, value: Any) -> Any:
    """None for an unset word (`_UNSET_WORDS`) given to a field that may be None; `value` otherwise."""
    nullable = type(None) in get_args(field.annotation)
    return None if nullable and isinstance(value, str) and value.lower() in _UNSET_WORDS else value


def read_settings_file(file: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a settings YAML file; ValueError naming the file when it is unreadable or not a mapping."""
    try:
        loaded = yaml.safe_load(Path(file).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{file}: cannot read pipeline settings ({exc})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{file}: pipeline settings must be a mapping, got {type(loaded).__name__}")
    return loaded


class _SettingsFile(PydanticBaseSettingsSource):
    """The YAML settings file: below the variables, above the defaults."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        file = _settings_file.get() or os.environ.get(SETTINGS_FILE_ENV)
        return read_settings_file(file) if file else {}


def _error(exc: ValidationError, source: str) -> ValueError:
    """One line: each failing field, the variable that set it (if one did) and pydantic's reason."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        variable = ENV_PREFIX + name.upper()
        where = f" ({variable})" if err["loc"] and variable in os.environ else ""
        parts.append(f"{name}{where}: {err['msg'].removeprefix('Value error, ')}")
    return ValueError(redact(f"{source}: invalid pipeline settings: " + "; ".join(parts)))


def from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`LOIRE_<FIELD>` variables of `environ` (default: this process's) as raw values, unset words as None.

    For settings meant for another process's environment (a served deployment's); `PipelineSettings()`
    reads this process's variables itself.
    """
    env = os.environ if environ is None else environ
    return {
        name: _unset(field, env[ENV_PREFIX + name.upper()])
        for name, field in PipelineSettings.model_fields.items()
        if ENV_PREFIX + name.upper() in env
    }


def load_settings(
    overrides: PipelineSettings | dict[str, Any] | None = None, *, path: str | os.PathLike[str] | None = None
) -> PipelineSettings:
    """Settings from (lowest first) defaults, `LOIRE_SETTINGS` / `path` YAML, `LOIRE_*` variables, `overrides`."""
    if isinstance(overrides, PipelineSettings):
        return overrides
    file = path or os.environ.get(SETTINGS_FILE_ENV)
    token = _settings_file.set(str(path) if path else None)
    try:
        return PipelineSettings(**(overrides or {}))
    except ValidationError as exc:
        raise _error(exc, str(file) if file else "settings") from None
    finally:
        _settings_file.reset(token)
