"""The task catalogue (`loire/tasks/dsp.yaml`, see its header) as pydantic models, and the `TaskSpec`s built from it.

pydantic checks the shape (unknown fields are refused: `extra="forbid"`, missing ones named, types); the few
rules that span fields (which splits the files and the split rule cover, `label_names` against `labels`, the
`rct` layout) are checked while a `TaskSpec` is built. Every error is one `CatalogueError` naming the file, the
task and the field path (`files.train.format`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)

from loire.domains import DOMAINS
from loire.metrics import CLASSIFICATION_METRICS

DEFAULT_CATALOGUE = Path(__file__).resolve().parents[1] / "tasks" / "dsp.yaml"
SPLITS = ("train", "dev", "test")
FORMATS = ("jsonl", "csv", "tsv", "rct")


class CatalogueError(ValueError):
    """The task catalogue is malformed; the message names the file, the task and the field."""


# ----------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class FileSpec:
    """One data file of a task and how to read it."""

    path: str
    format: str
    text: tuple[str, ...]
    text_pair: str | None
    label: str


@dataclass(frozen=True)
class SplitRule:
    """Divide the rows of file `source` into splits by a hash of their input text (see dsp.yaml)."""

    source: str
    fractions: tuple[tuple[str, float], ...]
    salt: str


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task as the catalogue describes it."""

    name: str
    domain: str
    paper_task: str
    substitute: str | None
    note: str | None
    files: tuple[tuple[str, FileSpec], ...]
    split_rule: SplitRule | None
    labels: tuple[str, ...]
    label_names: tuple[str, ...] | None
    replace: tuple[tuple[str, str], ...]
    metric: str
    max_length: int
    epochs: int
    lr: float
    patience: int
    seeds: tuple[int, ...]
    aliases: tuple[str, ...] = ()

    @property
    def is_stand_in(self) -> bool:
        """The data is a different task standing in for the paper's."""
        return self.substitute is not None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def file(self, name: str) -> FileSpec:
        return dict(self.files)[name]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = {name: asdict(f) for name, f in self.files}
        if self.split_rule is not None:
            d["split_rule"] = {**asdict(self.split_rule), "fractions": dict(self.split_rule.fractions)}
        return d


# ------------------------------------------------------------------------------------ YAML models
def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _one_of(allowed: Sequence[str]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {list(allowed)}")
        return value

    return AfterValidator(check)


def _field_names(value: str | list[str]) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not names or not all(names):
        raise ValueError(f"must be a field name or a non-empty list of field names, got {value!r}")
    return tuple(names)


def _unique_labels(values: list[Any]) -> tuple[str, ...]:
    labels = tuple(label_key(v) for v in values)
    duplicates = sorted(v for v, n in Counter(labels).items() if n > 1)
    if duplicates:
        raise ValueError(f"repeats {duplicates}")
    return labels


Text = Annotated[str, AfterValidator(_non_empty)]
FieldNames = Annotated[str | list[str], AfterValidator(_field_names)]


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {value!r}")
    return value


Number = Annotated[float, BeforeValidator(_number)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FileEntry(_Strict):
    """`files.<split>` written as a mapping (a plain path is `{path: ...}`); unset fields come from the task."""

    path: Text
    format: Annotated[str, _one_of(FORMATS)] | None = None
    text: FieldNames | None = None
    text_pair: Text | None = None
    label: Text | None = None


class SplitRuleEntry(_Strict):
    source: str = Field(alias="from")
    into: dict[Literal["train", "dev", "test"], Annotated[Number, Field(gt=0, le=1)]] = Field(min_length=1)
    salt: str | None = None


class TaskEntry(_Strict):
    """One task of the catalogue, after `defaults` were merged in."""

    domain: Annotated[str, _one_of(DOMAINS)]
    paper_task: Text
    substitute: Text | None = None
    note: Text | None = None
    aliases: list[Text] = []
    files: dict[str, FileEntry] = Field(min_length=1)
    split_rule: SplitRuleEntry | None = None
    format: Annotated[str, _one_of(FORMATS)] = "jsonl"
    text: FieldNames = ("text",)
    text_pair: Text | None = None
    label: Text = "label"
    labels: Annotated[list[Any], Field(min_length=2), AfterValidator(_unique_labels)]
    label_names: list[Any] | None = None
    replace: list[tuple[Annotated[str, Field(min_length=1)], str]] | None = None
    metric: Annotated[str, _one_of(sorted(CLASSIFICATION_METRICS))]
    max_length: Annotated[StrictInt, Field(ge=8)]
    epochs: Annotated[StrictInt, Field(ge=1)]
    lr: Annotated[Number, Field(gt=0, lt=1)]
    patience: Annotated[StrictInt, Field(ge=1)]
    seeds: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]

    @field_validator("files", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        """`split: path` is short for `split: {path: path}`."""
        if not isinstance(value, dict):
            return value
        return {split: {"path": entry} if isinstance(entry, str) else entry for split, entry in value.items()}


# --------------------------------------------------------------------------------------- building
class _Task:
    """Builds one `TaskSpec` from its validated entry; cross-field errors name the catalogue, task and field."""

    def __init__(self, source: str, name: str, entry: TaskEntry) -> None:
        self.source, self.name, self.entry = source, name, entry

    def fail(self, field_path: str, message: str) -> CatalogueError:
        return CatalogueError(f"{self.source}: task {self.name!r}, field {field_path!r}: {message}")

    def file(self, split: str, entry: FileEntry) -> FileSpec:
        """A file entry with the task's format, text, text_pair and label filled in where it sets none."""
        task, own = self.entry, entry.model_fields_set
        pair = entry.text_pair if "text_pair" in own else task.text_pair
        spec = FileSpec(
            path=entry.path,
            format=entry.format or task.format,
            text=entry.text or task.text,  # type: ignore[arg-type]  # validated into a tuple
            text_pair=pair,
            label=entry.label or task.label,
        )
        if spec.format == "rct" and (spec.text != ("text",) or spec.text_pair is not None or spec.label != "label"):
            raise self.fail(f"files.{split}", "format rct has exactly the fields `label` and `text` (no text_pair)")
        return spec

    def split_rule(self, covered: set[str]) -> tuple[SplitRule | None, set[str]]:
        """The split rule and the splits the task's files cover with it."""
        rule = self.entry.split_rule
        if rule is None:
            return None, covered
        if rule.source not in covered:
            raise self.fail("split_rule.from", f"{rule.source!r} is not a key of `files` ({sorted(covered)})")
        for split in rule.into:
            if split in covered and split != rule.source:
                raise self.fail(f"split_rule.into.{split}", f"the {split} split already has a file in `files`")
        total = sum(rule.into.values())
        if abs(total - 1.0) > 1e-9:
            raise self.fail("split_rule.into", f"fractions must sum to 1, got {total}")
        fractions = tuple((s, float(v)) for s, v in rule.into.items())
        return SplitRule(rule.source, fractions, str(rule.salt or self.name)), (covered - {rule.source}) | set(
            rule.into
        )

    def spec(self) -> TaskSpec:
        e = self.entry
        files = tuple((str(split), self.file(str(split), raw)) for split, raw in e.files.items())
        rule, covered = self.split_rule({name for name, _ in files})
        unknown = sorted(covered - set(SPLITS))
        if unknown:
            raise self.fail("files", f"{unknown} are not splits ({list(SPLITS)}); divide such a file with split_rule")
        missing = [s for s in SPLITS if s not in covered]
        if missing:
            raise self.fail("files", f"no {missing} split: give a file or a split_rule that produces it")
        labels: tuple[str, ...] = e.labels  # type: ignore[assignment]  # validated into a tuple
        if e.label_names is not None and len(e.label_names) != len(labels):
            raise self.fail(
                "label_names", f"must be a list of {len(labels)} names (one per label), got {e.label_names!r}"
            )
        same = e.model_dump(include={"domain", "paper_task", "substitute", "note", "metric", "epochs", "patience"})
        return TaskSpec(
            name=self.name,
            **same,
            files=files,
            split_rule=rule,
            labels=labels,
            label_names=None if e.label_names is None else tuple(str(n) for n in e.label_names),
            replace=tuple(e.replace or ()),
            max_length=e.max_length,
            lr=float(e.lr),
            seeds=tuple(e.seeds),
            aliases=tuple(e.aliases),
        )


def label_key(value: Any) -> str:
    """Labels compare as strings: 4 → "4", true → "true" (JSON spelling), "pos" → "pos"."""
    return value if isinstance(value, str) else json.dumps(value)


def _allowed(model: type[BaseModel]) -> list[str]:
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _validation_error(source: str, name: str, exc: ValidationError) -> CatalogueError:
    """pydantic's first error as one line: the field path (`files.train.format`) and what is wrong with it."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"] if part != "[key]"]
    path = ".".join(loc) or "?"
    if error["type"] == "extra_forbidden":
        allowed = _allowed(FileEntry if loc[0] == "files" else SplitRuleEntry if loc[0] == "split_rule" else TaskEntry)
        message = f"unknown field; allowed: {allowed}"
    elif error["type"] == "missing":
        message = "missing"
    elif error["type"] == "value_error":  # ours: the message names the value
        message = error["msg"].removeprefix("Value error, ")
    else:
        message = f"{error['msg']}, got {error.get('input')!r}"
    return CatalogueError(f"{source}: task {name!r}, field {path!r}: {message}")


def task_spec(source: str, name: str, raw: Mapping[str, Any]) -> TaskSpec:
    """Validate one task's fields (defaults merged in) and build its `TaskSpec`."""
    try:
        entry = TaskEntry.model_validate(dict(raw))
    except ValidationError as exc:
        raise _validation_error(source, name, exc) from None
    return _Task(source, name, entry).spec()


def load_catalogue(path: str | os.PathLike[str] | None = None) -> dict[str, TaskSpec]:
    """Read and validate a task catalogue (default: the packaged `loire/tasks/dsp.yaml`)."""
    file = Path(path) if path is not None else DEFAULT_CATALOGUE
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogueError(f"{file}: no such catalogue file") from None
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{file}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or raw.get("version") != 1:
        raise CatalogueError(f"{file}: expected a mapping with `version: 1`, `defaults` and `tasks`")
    defaults = raw.get("defaults") or {}
    tasks = raw.get("tasks")
    if not isinstance(defaults, dict):
        raise CatalogueError(f"{file}: `defaults` must be a mapping")
    if not isinstance(tasks, dict) or not tasks:
        raise CatalogueError(f"{file}: `tasks` must map task names to their fields")
    specs = {}
    for name, fields in tasks.items():
        if not isinstance(fields, dict):
            raise CatalogueError(f"{file}: task {name!r}: must be a mapping of fields")
        specs[str(name)] = task_spec(str(file), str(name), {**defaults, **fields})
    return specs


def select_tasks(catalogue: Mapping[str, TaskSpec], tasks: str | Sequence[str]) -> list[TaskSpec]:
    """Tasks by name ("all", "a,b" or a list), in catalogue order for "all"; unknown names are an error."""
    if isinstance(tasks, str):
        names = list(catalogue) if tasks.strip() == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    else:
        names = list(tasks)
    if not names:
        raise ValueError("tasks: no task named")
    by_alias = {alias: spec.name for spec in catalogue.values() for alias in spec.aliases}
    names = [by_alias.get(n, n) for n in names]
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        raise ValueError(f"tasks: unknown {unknown}; the catalogue has {list(catalogue)} (aliases: {sorted(by_alias)})")
    return [catalogue[n] for n in dict.fromkeys(names)]


__all__ = [
    "DEFAULT_CATALOGUE",
    "FORMATS",
    "SPLITS",
    "CatalogueError",
    "FileEntry",
    "FileSpec",
    "SplitRule",
    "SplitRuleEntry",
    "TaskEntry",
    "TaskSpec",
    "label_key",
    "load_catalogue",
    "select_tasks",
    "task_spec",
]
