"""Downstream fine-tuning evaluation: the ten "Don't Stop Pretraining" tasks that score a stage model.

ELLE and LOIRE report, besides perplexity, how well the model after the last stage fine-tunes on two
tasks per domain (Gururangan et al. 2020, DSP). The tasks are described by a catalogue
(`loire/tasks/dsp.yaml`, see its header): files relative to a data root, formats, fields, the full
label set, DSP's metric, fine-tuning settings, and for tasks whose data lacks a split a deterministic
hash rule that divides a file.

- `load_catalogue` → `TaskSpec`s (validated; errors name the task and the field).
- `load_task_data` → `TaskData` (train / dev / test lists of `Example(text, text_pair, label)`);
  a `TaskDataError` names the file and row (missing file, empty split, missing field, a label outside
  the label set, broken JSON, a short CSV row, undecodable bytes).
- `accuracy`, `micro_f1`, `macro_f1` (scikit-learn's definitions, no dependency on it),
  `majority_baseline`.
- `finetune_task` fine-tunes one task for each seed: the stage model's transformer with a fresh,
  seeded classification head (`load_classifier`), AdamW with linear warmup (6%) and linear decay,
  early stopping on dev after each epoch (best state kept), test score of the best state.
- `evaluate_task` (one task, mappable by an orchestrator) and `evaluate_downstream` (many tasks;
  a task with malformed data becomes a `TaskFailure` while the others still run).

Budget: `budget=N` caps the examples per task so a CPU run stays short: train ≤ N, dev ≤ max(200, N // 4),
test ≤ max(500, N // 2), each a seeded random subset (seed = task and split name) that is the same
for every model and seed, so scores at one budget are comparable. Without a budget all data is used.

Inputs: byte-level BPE ids of the text (and `<|endoftext|>` + the second text for pair tasks),
ending in `<|endoftext|>`, which is the pooled token of a causal model (a masked model pools a
leading `<|endoftext|>`). Truncation keeps the beginning; pairs are truncated longest-first. Models
of the ELLE strategy (`stage.json` strategy "elle") were trained with domain prompts, so the task's
domain token (`<CS>`, ...) is put first. `max_length` is clamped to the model's
`max_position_embeddings`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from loire.config import LoireConfig
from loire.model import LoireForSequenceClassification

logger = logging.getLogger(__name__)

DEFAULT_CATALOGUE = Path(__file__).resolve().parent / "tasks" / "dsp.yaml"
SPLITS = ("train", "dev", "test")
FORMATS = ("jsonl", "csv", "tsv", "rct")
DOMAINS = ("WB", "NEWS", "REV", "BIO", "CS")
# Default cap on training examples per task used by the CLI and the benchmark (the library's default
# is no cap): ten tasks of a gpt-tiny stage model, one seed, take a few minutes on two CPU cores.
DEFAULT_BUDGET = 500
WARMUP_FRACTION = 0.06  # DSP's warmup ratio
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
EVAL_BATCH_SIZE = 64

OnLog = Callable[[dict[str, float], int], None]


class CatalogueError(ValueError):
    """The task catalogue is malformed; the message names the file, the task and the field."""


class TaskDataError(ValueError):
    """A task's data is unusable; the message names the file and the row (or the split)."""


# ----------------------------------------------------------------------------------------- catalogue
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


_TASK_KEYS = {
    "aliases",
    "domain",
    "paper_task",
    "substitute",
    "note",
    "files",
    "split_rule",
    "format",
    "text",
    "text_pair",
    "label",
    "labels",
    "label_names",
    "replace",
    "metric",
    "max_length",
    "epochs",
    "lr",
    "patience",
    "seeds",
}
_FILE_KEYS = {"path", "format", "text", "text_pair", "label"}


class _Fields:
    """Typed access to one task's fields; every error names the catalogue, the task and the field."""

    def __init__(self, source: str, task: str, raw: Mapping[str, Any]) -> None:
        self.source, self.task, self.raw = source, task, raw

    def fail(self, field_path: str, message: str) -> CatalogueError:
        return CatalogueError(f"{self.source}: task {self.task!r}, field {field_path!r}: {message}")

    def get(self, key: str) -> Any:
        if key not in self.raw:
            raise self.fail(key, "missing")
        return self.raw[key]

    def string(self, key: str, value: Any = None, *, optional: bool = False, path: str | None = None) -> str | None:
        value = self.get(key) if value is None and path is None else value
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path or key, f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, key: str, minimum: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def fields(self, value: Any, path: str) -> tuple[str, ...]:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise self.fail(path, f"must be a field name or a non-empty list of field names, got {value!r}")
        return tuple(names)


def _task_spec(source: str, name: str, raw: Mapping[str, Any]) -> TaskSpec:
    f = _Fields(source, name, raw)
    unknown = sorted(set(raw) - _TASK_KEYS)
    if unknown:
        raise f.fail(unknown[0], f"unknown field; allowed: {sorted(_TASK_KEYS)}")
    domain = f.get("domain")
    if domain not in DOMAINS:
        raise f.fail("domain", f"{domain!r} is not one of {list(DOMAINS)}")
    metric = f.get("metric")
    if metric not in METRICS:
        raise f.fail("metric", f"{metric!r} is not one of {sorted(METRICS)}")

    labels_raw = f.get("labels")
    if not isinstance(labels_raw, list) or len(labels_raw) < 2:
        raise f.fail("labels", f"must be a list of at least two labels, got {labels_raw!r}")
    labels = tuple(_label_key(v) for v in labels_raw)
    if len(set(labels)) != len(labels):
        duplicates = sorted(v for v, n in Counter(labels).items() if n > 1)
        raise f.fail("labels", f"repeats {duplicates}")
    label_names = raw.get("label_names")
    if label_names is not None:
        if not isinstance(label_names, list) or len(label_names) != len(labels):
            raise f.fail("label_names", f"must be a list of {len(labels)} names (one per label), got {label_names!r}")
        label_names = tuple(str(n) for n in label_names)

    replace_raw = raw.get("replace") or []
    if not isinstance(replace_raw, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) and p[0] for p in replace_raw
    ):
        raise f.fail("replace", "must be a list of [from, to] string pairs with a non-empty `from`")

    task_format = raw.get("format", "jsonl")
    files_raw = f.get("files")
    if not isinstance(files_raw, dict) or not files_raw:
        raise f.fail("files", "must map split names to paths")
    files: list[tuple[str, FileSpec]] = []
    for split, entry in files_raw.items():
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise f.fail(f"files.{split}", f"must be a path or a mapping with `path`, got {entry!r}")
        bad = sorted(set(entry) - _FILE_KEYS)
        if bad:
            raise f.fail(f"files.{split}.{bad[0]}", f"unknown field; allowed: {sorted(_FILE_KEYS)}")
        path = f.string("path", entry.get("path"), path=f"files.{split}.path")
        fmt = entry.get("format", task_format)
        if fmt not in FORMATS:
            where = f"files.{split}.format" if "format" in entry else "format"
            raise f.fail(where, f"{fmt!r} is not one of {list(FORMATS)}")
        text = f.fields(
            entry.get("text", raw.get("text", "text")), f"files.{split}.text" if "text" in entry else "text"
        )
        pair = entry.get("text_pair", raw.get("text_pair"))
        if pair is not None:
            f.string("text_pair", pair, path=f"files.{split}.text_pair" if "text_pair" in entry else "text_pair")
        label = entry.get("label", raw.get("label", "label"))
        f.string("label", label, path=f"files.{split}.label" if "label" in entry else "label")
        if fmt == "rct" and (text != ("text",) or pair is not None or label != "label"):
            raise f.fail(f"files.{split}", "format rct has exactly the fields `label` and `text` (no text_pair)")
        files.append((str(split), FileSpec(path=path, format=fmt, text=text, text_pair=pair, label=label)))

    rule = None
    rule_raw = raw.get("split_rule")
    covered = {name for name, _ in files}
    if rule_raw is not None:
        if not isinstance(rule_raw, dict):
            raise f.fail("split_rule", "must be a mapping with `from` and `into`")
        bad = sorted(set(rule_raw) - {"from", "into", "salt"})
        if bad:
            raise f.fail(f"split_rule.{bad[0]}", "unknown field; allowed: ['from', 'into', 'salt']")
        source_name = rule_raw.get("from")
        if source_name not in covered:
            raise f.fail("split_rule.from", f"{source_name!r} is not a key of `files` ({sorted(covered)})")
        into = rule_raw.get("into")
        if not isinstance(into, dict) or not into:
            raise f.fail("split_rule.into", "must map split names to fractions")
        for split, fraction in into.items():
            if split not in SPLITS:
                raise f.fail(f"split_rule.into.{split}", f"not one of {list(SPLITS)}")
            if split in covered and split != source_name:
                raise f.fail(f"split_rule.into.{split}", f"the {split} split already has a file in `files`")
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise f.fail(f"split_rule.into.{split}", f"must be a fraction in (0, 1], got {fraction!r}")
        if abs(sum(into.values()) - 1.0) > 1e-9:
            raise f.fail("split_rule.into", f"fractions must sum to 1, got {sum(into.values())}")
        salt = rule_raw.get("salt", name)
        rule = SplitRule(source=source_name, fractions=tuple((s, float(v)) for s, v in into.items()), salt=str(salt))
        covered = (covered - {source_name}) | set(into)
    unknown_splits = sorted(covered - set(SPLITS))
    if unknown_splits:
        raise f.fail("files", f"{unknown_splits} are not splits ({list(SPLITS)}); divide such a file with split_rule")
    missing = [s for s in SPLITS if s not in covered]
    if missing:
        raise f.fail("files", f"no {missing} split: give a file or a split_rule that produces it")

    seeds = f.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise f.fail("seeds", f"must be a non-empty list of integers >= 0, got {seeds!r}")
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise f.fail("aliases", f"must be a list of names, got {aliases!r}")
    lr = f.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise f.fail("lr", f"must be a number in (0, 1), got {lr!r}")
    return TaskSpec(
        name=name,
        domain=domain,
        paper_task=f.string("paper_task"),  # type: ignore[arg-type]
        substitute=f.string("substitute", raw.get("substitute"), optional=True, path="substitute"),
        note=f.string("note", raw.get("note"), optional=True, path="note"),
        files=tuple(files),
        split_rule=rule,
        labels=labels,
        label_names=label_names,
        replace=tuple((a, b) for a, b in replace_raw),
        metric=metric,
        max_length=f.integer("max_length", 8),
        epochs=f.integer("epochs", 1),
        lr=float(lr),
        patience=f.integer("patience", 1),
        seeds=tuple(seeds),
        aliases=tuple(aliases),
    )


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
        specs[str(name)] = _task_spec(str(file), str(name), {**defaults, **fields})
    return specs


# ----------------------------------------------------------------------------------------------- data
class Example(NamedTuple):
    text: str
    text_pair: str | None
    label: int  # index into TaskSpec.labels


@dataclass(frozen=True)
class TaskData:
    """A task's three splits; `sources` says which file (and rule) each split came from."""

    task: str
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    sources: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "dev": self.dev, "test": self.test}[name]

    def counts(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}


def _label_key(value: Any) -> str:
    """Labels compare as strings: 4 → "4", true → "true" (JSON spelling), "pos" → "pos"."""
    return value if isinstance(value, str) else json.dumps(value)


def _join(root: str | os.PathLike[str], rel: str) -> str:
    root = str(root)
    if "://" in rel or os.path.isabs(rel):
        return rel
    return f"{root.rstrip('/')}/{rel}" if "://" in root else str(Path(root) / rel)


def _read_text(location: str, task: str, split: str) -> str:
    """The whole file as text (UTF-8, BOM allowed); local paths or fsspec URLs (s3://...)."""
    try:
        if "://" in location:
            import fsspec

            with fsspec.open(location, "rb") as fh:
                data = fh.read()
        else:
            data = Path(location).read_bytes()
    except FileNotFoundError:
        raise TaskDataError(f"{location}: no such file (task {task!r}, {split} split)") from None
    except IsADirectoryError:
        raise TaskDataError(f"{location}: is a folder, not a data file (task {task!r}, {split} split)") from None
    except OSError as exc:
        raise TaskDataError(f"{location}: cannot read ({exc}) (task {task!r}, {split} split)") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TaskDataError(f"{location}, line {line}: not valid UTF-8 (task {task!r}, {split} split)") from None


def _lines(text: str) -> list[str]:
    """Lines split at \\n only: str.splitlines() would also cut at U+2028, \\x85 and other separators
    that real JSON strings contain (aclImdb holds \\x85)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _records(text: str, fmt: str, location: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every data row of a file."""
    if fmt == "jsonl":
        for number, line in enumerate(_lines(text), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{location}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{location}, line {number}: expected a JSON object, got {type(record).__name__}")
            yield number, record
    elif fmt in ("csv", "tsv"):
        options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        reader = csv.reader(io.StringIO(text, newline=""), **options)
        try:
            header = next(reader, None)
            if header is None:
                return
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise TaskDataError(
                        f"{location}, line {reader.line_num}: {len(row)} fields, the header has {len(header)} "
                        f"({header})"
                    )
                yield reader.line_num, dict(zip(header, row, strict=True))
        except csv.Error as exc:
            raise TaskDataError(f"{location}, line {reader.line_num}: malformed {fmt.upper()} ({exc})") from None
    elif fmt == "rct":
        for number, line in enumerate(_lines(text), start=1):
            if not line.strip() or line.startswith("###"):
                continue
            label, tab, sentence = line.partition("\t")
            if not tab:
                raise TaskDataError(f"{location}, line {number}: expected `label<TAB>sentence`, got {line[:60]!r}")
            yield number, {"label": label, "text": sentence}
    else:  # pragma: no cover - the catalogue validates formats
        raise ValueError(f"unknown format {fmt!r}")


def _field_text(record: dict[str, Any], name: str, where: str, what: str) -> str:
    if name not in record:
        raise TaskDataError(f"{where}: missing {what} field {name!r} (fields: {sorted(record)})")
    value = record[name]
    if not isinstance(value, str):
        raise TaskDataError(f"{where}: {what} field {name!r} is {type(value).__name__}, not text")
    return value


def _read_file(spec: TaskSpec, split: str, location: str, fs: FileSpec) -> list[Example]:
    index = {label: i for i, label in enumerate(spec.labels)}
    examples = []
    for number, record in _records(_read_text(location, spec.name, split), fs.format, location):
        where = f"{location}, line {number} (task {spec.name!r}, {split} split)"
        text = "\n".join(_field_text(record, name, where, "text") for name in fs.text)
        pair = None if fs.text_pair is None else _field_text(record, fs.text_pair, where, "text")
        for old, new in spec.replace:
            text = text.replace(old, new)
            pair = None if pair is None else pair.replace(old, new)
        if fs.label not in record:
            raise TaskDataError(f"{where}: missing label field {fs.label!r} (fields: {sorted(record)})")
        value = record[fs.label]
        key = _label_key(value)
        if key not in index:
            raise TaskDataError(
                f"{where}: label {value!r} (field {fs.label!r}) is not in the label set {list(spec.labels)}"
            )
        examples.append(Example(text, pair, index[key]))
    return examples


def hash_fraction(salt: str, text: str, text_pair: str | None) -> float:
    """A row's position u ∈ [0, 1) for the split rule: blake2b of salt, text and pair."""
    key = f"{salt}\0{text}\0{text_pair or ''}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64


def _divide(examples: list[Example], rule: SplitRule) -> dict[str, list[Example]]:
    parts: dict[str, list[Example]] = {name: [] for name, _ in rule.fractions}
    bounds, total = [], 0.0
    for name, fraction in rule.fractions:
        total += fraction
        bounds.append((total, name))
    for example in examples:
        u = hash_fraction(rule.salt, example.text, example.text_pair)
        parts[next((name for bound, name in bounds if u < bound), bounds[-1][1])].append(example)
    return parts


def load_task_data(spec: TaskSpec, data_root: str | os.PathLike[str]) -> TaskData:
    """Read a task's files under `data_root` and build its train / dev / test splits."""
    splits: dict[str, list[Example]] = {}
    sources: dict[str, str] = {}
    for name, fs in spec.files:
        location = _join(data_root, fs.path)
        examples = _read_file(spec, name, location, fs)
        if not examples:
            raise TaskDataError(f"{location}: no data rows (task {spec.name!r}, {name} split is empty)")
        if spec.split_rule is not None and name == spec.split_rule.source:
            fractions = ", ".join(f"{s} {v:g}" for s, v in spec.split_rule.fractions)
            for part, rows in _divide(examples, spec.split_rule).items():
                if not rows:
                    raise TaskDataError(
                        f"{location}: the hash split rule gives the {part} split no rows "
                        f"(task {spec.name!r}, {len(examples)} rows, fractions {fractions})"
                    )
                splits[part] = rows
                sources[part] = f"{location} (hash split: {fractions})"
        else:
            splits[name] = examples
            sources[name] = location
    return TaskData(task=spec.name, train=splits["train"], dev=splits["dev"], test=splits["test"], sources=sources)


def budget_caps(budget: int) -> dict[str, int]:
    """Examples per split under a budget: train N, dev max(200, N // 4), test max(500, N // 2)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={budget!r} must be an int >= 1 (training examples per task)")
    return {"train": budget, "dev": max(200, budget // 4), "test": max(500, budget // 2)}


def apply_budget(data: TaskData, budget: int | None) -> TaskData:
    """Cap each split (see `budget_caps`) by a seeded random subset that keeps file order."""
    if budget is None:
        return data
    caps = budget_caps(budget)
    parts = {}
    for split in SPLITS:
        rows = data.split(split)
        if len(rows) <= caps[split]:
            parts[split] = rows
        else:
            keep = sorted(random.Random(f"{data.task}/{split}").sample(range(len(rows)), caps[split]))
            parts[split] = [rows[i] for i in keep]
    return TaskData(task=data.task, sources=data.sources, **parts)


# -------------------------------------------------------------------------------------------- metrics
def _check_pair(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no examples to score")


def _per_label(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable]
) -> list[tuple[int, int, int]]:
    """(true positives, false positives, false negatives) for each label."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for t, p in zip(y_true, y_pred, strict=True):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    return [(tp[label], fp[label], fn[label]) for label in labels]


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Share of exact matches."""
    _check_pair(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def micro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None) -> float:
    """F1 of the true / false positives and false negatives summed over `labels`.

    As sklearn's `f1_score(average="micro", labels=...)`. Over all labels (the default: every label in
    y_true or y_pred) this equals accuracy for single-label classification; a subset of labels
    (e.g. without a "no relation" class) makes it differ. 0 when there is nothing to count.
    """
    _check_pair(y_true, y_pred)
    chosen = sorted(set(y_true) | set(y_pred), key=str) if labels is None else list(labels)
    counts = _per_label(y_true, y_pred, chosen)
    return _f1(sum(c[0] for c in counts), sum(c[1] for c in counts), sum(c[2] for c in counts))


def macro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None) -> float:
    """Unweighted mean over `labels` of each label's F1 = 2·TP / (2·TP + FP + FN).

    As sklearn's `f1_score(average="macro", labels=..., zero_division=0)`: a label with no true and
    no predicted example scores 0 and still counts in the mean (so passing the full label set
    penalises a test set that lacks a label); default labels: every label in y_true or y_pred.
    """
    _check_pair(y_true, y_pred)
    chosen = sorted(set(y_true) | set(y_pred), key=str) if labels is None else list(labels)
    if not chosen:
        raise ValueError("labels is empty")
    return sum(_f1(*c) for c in _per_label(y_true, y_pred, chosen)) / len(chosen)


METRICS: dict[str, Callable[..., float]] = {"accuracy": accuracy, "micro_f1": micro_f1, "macro_f1": macro_f1}


def score(spec: TaskSpec, y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """The task's metric over its full label set (label indices)."""
    if spec.metric == "accuracy":
        return accuracy(y_true, y_pred)
    return METRICS[spec.metric](y_true, y_pred, labels=range(spec.num_labels))


def majority_label(data: TaskData) -> int:
    """The most frequent training label (ties: the lower label index)."""
    counts = Counter(e.label for e in data.train)
    return min(counts, key=lambda label: (-counts[label], label))


def majority_baseline(spec: TaskSpec, data: TaskData) -> float:
    """The test score of always predicting the most frequent training label."""
    label = majority_label(data)
    return score(spec, [e.label for e in data.test], [label] * len(data.test))


# ---------------------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class TaskResult:
    """Scores of one task over seeds (mean ± sample std), with the majority-class baseline."""

    task: str
    domain: str
    paper_task: str
    substitute: str | None
    note: str | None
    metric: str
    mean: float
    std: float
    scores: tuple[float, ...]
    seeds: tuple[int, ...]
    dev_scores: tuple[float, ...]
    best_epochs: tuple[int, ...]
    majority: float
    n_train: int
    n_dev: int
    n_test: int
    max_length: int
    budget: int | None
    wall_time_s: float
    ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskFailure:
    """A task that could not be evaluated (malformed data, diverged training) and why."""

    task: str
    domain: str
    error: str
    ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage_strategy(model_dir: str | os.PathLike[str]) -> str | None:
    file = Path(model_dir) / "stage.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text()).get("strategy")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{file}: not a valid stage record (JSON object)") from None


def load_classifier(
    model_dir: str | os.PathLike[str],
    num_labels: int,
    *,
    seed: int,
    pad_token_id: int | None = None,
    labels: Sequence[str] | None = None,
    base_state: Mapping[str, torch.Tensor] | None = None,
    config: LoireConfig | None = None,
) -> LoireForSequenceClassification:
    """The stage model's transformer under a fresh classification head seeded by `seed`.

    Every weight of the transformer (`model.*`) is loaded strictly from `model_dir`, whatever head
    the folder has (causal LM, masked LM, classifier); the head is initialised with the model's
    `_init_weights` after `torch.manual_seed(seed)`. `base_state` / `config` skip reading the folder
    again when fine-tuning many seeds.
    """
    if base_state is None or config is None:
        from loire.io import load_model

        source = load_model(model_dir)
        config, base_state = source.config, source.loire_base.state_dict()
    config = config.replace(num_labels=num_labels, architectures=["LoireForSequenceClassification"])
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    from loire.io import MODEL_INIT_LOCK

    with MODEL_INIT_LOCK:
        torch.manual_seed(seed)
        model = LoireForSequenceClassification(config)
    model.model.load_state_dict(base_state, strict=True)
    return model


def encode(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    *,
    is_causal: bool = True,
    prompt_id: int | None = None,
) -> list[list[int]]:
    """Token ids per example: [<eos> if masked] [prompt] text [<eos> pair] <eos>, at most max_length."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token (needed to end and separate inputs)")
    texts = tokenizer([e.text for e in examples], add_special_tokens=False)["input_ids"]
    pairs_at = [i for i, e in enumerate(examples) if e.text_pair is not None]
    pair_ids = dict(
        zip(
            pairs_at,
            tokenizer([examples[i].text_pair for i in pairs_at], add_special_tokens=False)["input_ids"]
            if pairs_at
            else [],
            strict=True,
        )
    )
    head = ([] if is_causal else [eos]) + ([] if prompt_id is None else [prompt_id])
    out = []
    for i, a in enumerate(texts):
        b = pair_ids.get(i)
        room = max_length - len(head) - 1 - (0 if b is None else 1)
        if room < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the input")
        if b is None:
            ids = head + a[:room] + [eos]
        else:
            la, lb = len(a), len(b)
            if la + lb > room:  # longest first: trim the longer until both fit
                short = min(la, lb, room // 2)
                la, lb = (room - short, short) if la >= lb else (short, room - short)
                la, lb = min(la, len(a)), min(lb, len(b))
            ids = [*head, *a[:la], eos, *b[:lb], eos]
        out.append(ids)
    return out


def _batch(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def predict(
    model: LoireForSequenceClassification,
    rows: Sequence[list[int]],
    pad_id: int,
    device: torch.device,
    batch_size: int = EVAL_BATCH_SIZE,
) -> list[int]:
    """Predicted label indices; batches of similar length (less padding), results in input order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    predictions = [0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        logits = model(**_batch([rows[i] for i in chunk], pad_id, device)).logits
        for i, p in zip(chunk, logits.argmax(-1).tolist(), strict=True):
            predictions[i] = p
    model.train(was_training)
    return predictions


@dataclass(frozen=True)
class SeedRun:
    seed: int
    test_score: float
    dev_score: float
    best_epoch: int
    epochs_run: int
    steps: int


def _finetune_seed(
    spec: TaskSpec,
    seed: int,
    encoded: dict[str, list[list[int]]],
    labels: dict[str, list[int]],
    make_model: Callable[[int], LoireForSequenceClassification],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    on_log: OnLog | None,
) -> SeedRun:
    from loire.train import TrainingDiverged

    model = make_model(seed).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr
    )
    n = len(encoded["train"])
    per_epoch = math.ceil(n / batch_size)
    total = per_epoch * spec.epochs
    warmup = max(1, int(WARMUP_FRACTION * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.tensor(labels["train"], dtype=torch.long)
    best_dev, best_state, best_epoch, stale, step, epoch = -math.inf, None, 0, 0, 0, 0
    for epoch in range(1, spec.epochs + 1):
        losses = []
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            batch = _batch([encoded["train"][i] for i in index], pad_id, device)
            out = model(**batch, labels=targets[index].to(device))
            if not torch.isfinite(out.loss):
                raise TrainingDiverged(f"task {spec.name!r}, seed {seed}: non-finite loss at step {step}")
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            step += 1
        dev = score(spec, labels["dev"], predict(model, encoded["dev"], pad_id, device))
        logger.info("%s seed %d epoch %d: loss %.4f, dev %s %.4f", spec.name, seed, epoch, losses[-1], spec.metric, dev)
        if on_log is not None:
            on_log(
                {
                    f"downstream/{spec.name}/train_loss": statistics.fmean(losses),
                    f"downstream/{spec.name}/dev_{spec.metric}": dev,
                    f"downstream/{spec.name}/epoch": float(epoch),
                    f"downstream/{spec.name}/seed": float(seed),
                },
                step,
            )
        if dev > best_dev:
            best_dev, best_epoch, stale = dev, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= spec.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    test = score(spec, labels["test"], predict(model, encoded["test"], pad_id, device))
    return SeedRun(seed, test, best_dev, best_epoch, epoch, step)


def finetune_task(
    model_dir: str | os.PathLike[str],
    spec: TaskSpec,
    data: TaskData,
    *,
    seeds: Sequence[int] | None = None,
    budget: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_length: int | None = None,
    on_log: OnLog | None = None,
) -> TaskResult:
    """Fine-tune the stage model in `model_dir` on one task for each seed and score the test split.

    `seeds` default to the catalogue's; `budget` caps the data (see `apply_budget`); `max_length`
    overrides the catalogue's (both are clamped to the model's positions).
    """
    from loire.io import load_model
    from loire.tokenizer import DOMAIN_TOKENS, load_tokenizer
    from loire.train import resolve_device

    started = time.perf_counter()
    run_seeds = tuple(spec.seeds if seeds is None else seeds)
    if not run_seeds:
        raise ValueError("seeds: at least one seed is needed")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    data = apply_budget(data, budget)
    for split in SPLITS:
        if not data.split(split):
            raise TaskDataError(f"task {spec.name!r}: the {split} split is empty ({data.sources.get(split, '?')})")
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(f"{model_dir}: the tokenizer has no pad token")
    source = load_model(model_dir)
    config, base_state = source.config, source.loire_base.state_dict()
    del source
    length = min(max_length or spec.max_length, config.max_position_embeddings)
    prompt_id = None
    if _stage_strategy(model_dir) == "elle":
        token = f"<{spec.domain}>"
        if token in DOMAIN_TOKENS:
            prompt_id = tokenizer.convert_tokens_to_ids(token)
    encoded = {
        s: encode(data.split(s), tokenizer, length, is_causal=config.is_causal, prompt_id=prompt_id) for s in SPLITS
    }
    labels = {s: [e.label for e in data.split(s)] for s in SPLITS}
    torch_device = resolve_device(device)

    def make_model(seed: int) -> LoireForSequenceClassification:
        return load_classifier(
            model_dir,
            spec.num_labels,
            seed=seed,
            pad_token_id=pad_id,
            labels=spec.labels,
            base_state=base_state,
            config=config,
        )

    runs = [
        _finetune_seed(spec, seed, encoded, labels, make_model, pad_id, torch_device, batch_size, on_log)
        for seed in run_seeds
    ]
    scores = tuple(r.test_score for r in runs)
    result = TaskResult(
        task=spec.name,
        domain=spec.domain,
        paper_task=spec.paper_task,
        substitute=spec.substitute,
        note=spec.note,
        metric=spec.metric,
        mean=statistics.fmean(scores),
        std=statistics.stdev(scores) if len(scores) > 1 else 0.0,
        scores=scores,
        seeds=run_seeds,
        dev_scores=tuple(r.dev_score for r in runs),
        best_epochs=tuple(r.best_epoch for r in runs),
        majority=majority_baseline(spec, data),
        n_train=len(data.train),
        n_dev=len(data.dev),
        n_test=len(data.test),
        max_length=length,
        budget=budget,
        wall_time_s=time.perf_counter() - started,
    )
    logger.info(
        "%s: %s %.4f ± %.4f (majority %.4f) in %.0f s",
        spec.name,
        spec.metric,
        result.mean,
        result.std,
        result.majority,
        result.wall_time_s,
    )
    return result


# ------------------------------------------------------------------------------------------ many tasks
def default_data_root() -> str:
    """`$LOIRE_DATA`, else `shared/data` beside the repository (../shared/data from its root)."""
    return os.environ.get("LOIRE_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")


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


def evaluate_task(
    model_dir: str | os.PathLike[str],
    spec: TaskSpec,
    data_root: str | os.PathLike[str],
    **options: Any,
) -> TaskResult | TaskFailure:
    """Load one task's data and fine-tune on it; malformed data or divergence → `TaskFailure`."""
    from loire.train import TrainingDiverged

    try:
        data = load_task_data(spec, data_root)
        return finetune_task(model_dir, spec, data, **options)
    except (TaskDataError, TrainingDiverged) as exc:
        logger.warning("task %s failed: %s", spec.name, exc)
        return TaskFailure(task=spec.name, domain=spec.domain, error=str(exc))


def evaluate_downstream(
    model_dir: str | os.PathLike[str],
    tasks: str | Sequence[str] = "all",
    data_root: str | os.PathLike[str] | None = None,
    budget: int | None = None,
    seeds: int | Sequence[int] | None = None,
    *,
    catalogue: Mapping[str, TaskSpec] | str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_length: int | None = None,
    on_log: OnLog | None = None,
    on_result: Callable[[TaskResult | TaskFailure], None] | None = None,
) -> list[TaskResult | TaskFailure]:
    """Fine-tune and score the stage model on each task, one after another.

    `seeds`: a count N (seeds 0..N−1), a list, or None (the catalogue's). The model folder, the task
    names and the budget are checked before any task runs (ValueError); a task whose data is
    malformed becomes a `TaskFailure` carrying the error, and the remaining tasks still run.
    """
    specs = catalogue if isinstance(catalogue, Mapping) else load_catalogue(catalogue)
    chosen = select_tasks(specs, tasks)
    if budget is not None:
        budget_caps(budget)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds={seeds} must be >= 1")
        seeds = tuple(range(seeds))
    from loire.io import load_model
    from loire.tokenizer import load_tokenizer

    load_tokenizer(model_dir)  # fail before the first task on a folder without model or tokenizer
    load_model(model_dir)
    root = default_data_root() if data_root is None else data_root
    results: list[TaskResult | TaskFailure] = []
    for spec in chosen:
        result = evaluate_task(
            model_dir,
            spec,
            root,
            seeds=seeds,
            budget=budget,
            device=device,
            batch_size=batch_size,
            max_length=max_length,
            on_log=on_log,
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def summary(results: Sequence[TaskResult | TaskFailure], **meta: Any) -> dict[str, Any]:
    """A JSON-ready record: `meta`, every result, failures, and the average of the task means."""
    done = [r for r in results if isinstance(r, TaskResult)]
    return {
        **meta,
        "results": [r.to_dict() for r in results],
        "failures": [r.to_dict() for r in results if isinstance(r, TaskFailure)],
        "average": statistics.fmean(r.mean for r in done) if done else None,
        "average_majority": statistics.fmean(r.majority for r in done) if done else None,
    }


__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_CATALOGUE",
    "CatalogueError",
    "Example",
    "TaskData",
    "TaskDataError",
    "TaskFailure",
    "TaskResult",
    "TaskSpec",
    "accuracy",
    "apply_budget",
    "budget_caps",
    "default_data_root",
    "encode",
    "evaluate_downstream",
    "evaluate_task",
    "finetune_task",
    "load_catalogue",
    "load_classifier",
    "load_task_data",
    "macro_f1",
    "majority_baseline",
    "micro_f1",
    "score",
    "select_tasks",
    "summary",
]
