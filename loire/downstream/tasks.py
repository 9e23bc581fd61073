"""A task's data: its files read and divided into train / dev / test, the budget caps, and scoring.

`load_task_data` → `TaskData` (lists of `Example(text, text_pair, label)`); a `TaskDataError` names the file
and row (missing file, empty split, missing field, a label outside the label set, broken JSON, a short CSV
row, undecodable bytes). Files are read through `loire.data.read_bytes` (local or fsspec, gzip guarded).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from loire.data import CorpusError, read_bytes
from loire.downstream.catalogue import SPLITS, FileSpec, SplitRule, TaskSpec, label_key
from loire.metrics import CLASSIFICATION_METRICS, accuracy

# Default cap on training examples per task used by the CLI and the benchmark (the library's default
# is no cap): ten tasks of a gpt-tiny stage model, one seed, take a few minutes on two CPU cores.
DEFAULT_BUDGET = 500


class TaskDataError(ValueError):
    """A task's data is unusable; the message names the file and the row (or the split)."""


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


def _join(root: str | os.PathLike[str], rel: str) -> str:
    root = str(root)
    if "://" in rel or os.path.isabs(rel):
        return rel
    return f"{root.rstrip('/')}/{rel}" if "://" in root else str(Path(root) / rel)


def _read_text(location: str, task: str, split: str) -> str:
    """The whole file as text (UTF-8, BOM allowed); local paths or fsspec URLs (s3://...), `.gz` decompressed
    under `loire.data`'s bomb guard."""
    where = f"(task {task!r}, {split} split)"
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        raise TaskDataError(f"{location}: no such file {where}") from None
    except IsADirectoryError:
        raise TaskDataError(f"{location}: is a folder, not a data file {where}") from None
    except CorpusError as exc:
        raise TaskDataError(f"{exc} {where}") from None
    except OSError as exc:
        raise TaskDataError(f"{location}: cannot read ({exc}) {where}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TaskDataError(f"{location}, line {line}: not valid UTF-8 {where}") from None


def _lines(text: str) -> list[str]:
    """Lines split at \\n only: str.splitlines() would also cut at U+2028, \\x85 and other separators
    that real JSON strings contain (aclImdb holds \\x85)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _records(text: str, fmt: str, location: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every data row of a file."""
    if fmt == "jsonl":
        for number, line in enumerate(_lines(text), start=1):
            if line.strip():
                yield number, _json_object(line, f"{location}, line {number}")
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


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


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
        key = label_key(value)
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


# -------------------------------------------------------------------------------------------- scoring
def score(spec: TaskSpec, y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """The task's metric over its full label set (label indices)."""
    if spec.metric == "accuracy":
        return accuracy(y_true, y_pred)
    return CLASSIFICATION_METRICS[spec.metric](y_true, y_pred, labels=range(spec.num_labels))


def majority_label(data: TaskData) -> int:
    """The most frequent training label (ties: the lower label index)."""
    counts = Counter(e.label for e in data.train)
    return min(counts, key=lambda label: (-counts[label], label))


def majority_baseline(spec: TaskSpec, data: TaskData) -> float:
    """The test score of always predicting the most frequent training label."""
    label = majority_label(data)
    return score(spec, [e.label for e in data.test], [label] * len(data.test))


def default_data_root() -> str:
    """`$LOIRE_DATA`, else `shared/data` beside the repository (../shared/data from its root)."""
    return os.environ.get("LOIRE_DATA") or str(Path(__file__).resolve().parents[3] / "shared" / "data")


__all__ = [
    "DEFAULT_BUDGET",
    "Example",
    "TaskData",
    "TaskDataError",
    "apply_budget",
    "budget_caps",
    "default_data_root",
    "hash_fraction",
    "load_task_data",
    "majority_baseline",
    "majority_label",
    "score",
]
