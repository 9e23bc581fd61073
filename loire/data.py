"""Domain corpora: loading, validation, cleaning, a deterministic split, and packing into token blocks.

A corpus URI is a local folder, a single file, or any fsspec URL such as `s3://bucket/prefix` (S3 needs
the optional `s3fs`: `pip install 'loire[s3]'`). A folder is searched recursively; names starting with
`.` or `_` (`.DS_Store`, `_SUCCESS`) are skipped. Accepted formats, each optionally gzipped (`.gz`):

- `.txt`: documents separated by blank lines;
- `.jsonl`: one JSON object per line with a string `text` field;
- `.csv` / `.parquet`: a `text` column, one document per row.

`.txt` and `.jsonl` are read line by line here rather than through `datasets`: validation must name
the file and line of the first bad record, which the `datasets` JSON/text builders cannot do.
`.csv` and `.parquet` go through `datasets.load_dataset` (streaming above `STREAMING_BYTES`), one
file at a time so that errors name the file; CSV bytes are checked line by line first. `datasets`
gets a temporary cache folder that is removed afterwards, so a load, failed or not, writes nothing
under the user's home; gzipped or remote table files are staged in that folder too.

Every problem raises `CorpusError` naming the file (and line or row): a missing path, a folder with
no data files, undecodable bytes or NUL bytes, broken JSON, a missing or non-string `text`, corrupt
gzip data, a document over `max_document_chars`, and a corpus with no documents at all.

Memory stays bounded whatever the input: lines are read with a length cap (a 50 MB line without a
newline is an error naming its line, not a 50 MB string), and gzip data is decompressed as a stream
that is refused as a decompression bomb once it has produced more than `GZIP_RATIO_FLOOR` bytes at
over `MAX_GZIP_RATIO` times the compressed bytes read so far (text compresses 3-10x; 1 GB of zeros
is ~1000x), so a bomb is stopped after a few MB instead of being expanded in full.

Cleaning:

- Project Gutenberg books: a document (or a whole `.txt` file, before it is split into documents)
  that carries Gutenberg markers loses everything up to the `*** START OF THE PROJECT GUTENBERG
  EBOOK ... ***` line (or, in old etexts without it, the end of the "SMALL PRINT!" licence) and from
  the `*** END OF ...` / `End of the Project Gutenberg Etext ...` line on. See `strip_gutenberg`.
- Evaluation text: records of `.jsonl`, `.csv` and `.parquet` files that carry a `split` field whose
  value is in `HELD_OUT_SPLITS` (dev / validation / test) are dropped. This is the SciERC rule from
  shared/data/SOURCES.md: the SciERC abstracts (`cs/scierc_abstracts_tokenized.jsonl`, records
  `{"split", "text"}`) are the text of the SciERC task's dev and test sets, so only the train split
  may enter LM training. The normalised `corpora/cs/` already holds the train abstracts only; the rule
  keeps the raw file, or any landing-zone file labelled the same way, from leaking evaluation text.
  Whole files can be left out with `exclude` (glob patterns).

The train/validation split hashes each document (`blake2b`), so it is the same on every run and
machine, does not depend on file order, and puts duplicate documents on the same side.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import PurePosixPath
from typing import IO, Any

import fsspec
import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
ACCEPTED_SUFFIXES = FORMATS + tuple(f"{s}.gz" for s in FORMATS)
# Values of a record's `split` field that mark evaluation text (see the module docstring: SciERC).
HELD_OUT_SPLITS = frozenset({"dev", "development", "val", "valid", "validation", "test"})
# Table files larger than this (in total) are streamed by `datasets` instead of loaded into memory.
STREAMING_BYTES = 200 * 1024**2
# Decompression-bomb guard of gzipped files (see the module docstring): past GZIP_RATIO_FLOOR bytes of
# output, more than MAX_GZIP_RATIO output bytes per compressed byte read is refused.
MAX_GZIP_RATIO = 100.0
GZIP_RATIO_FLOOR = 8 * 1024**2
TEXT_FIELD = "text"

# Gutenberg markers, whole lines, case-insensitive.
_PG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG E-?(BOOK|TEXT)\b", re.IGNORECASE)
_PG_SMALL_PRINT_END = re.compile(r"^\s*\*END\*?\s*THE SMALL PRINT!", re.IGNORECASE)
_PG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG E-?(BOOK|TEXT)\b"
    r"|END OF (THE )?PROJECT GUTENBERG\b)",
    re.IGNORECASE,
)
# Cheap test first: most documents mention neither.
_PG_HINT = re.compile(r"gutenberg|small print", re.IGNORECASE)


class CorpusError(ValueError):
    """A corpus that cannot be used; names the file and, where there is one, the line (or table row)."""

    def __init__(self, path: str, reason: str, line: int | None = None, *, unit: str = "line") -> None:
        self.path = path
        self.line = line
        self.reason = reason
        self.unit = unit
        where = path if line is None else f"{path}, {unit} {line}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # ValueError pickles as cls(*args); keep the structured fields across processes instead.
        return (_rebuild_corpus_error, (self.path, self.reason, self.line, self.unit))


def _rebuild_corpus_error(path: str, reason: str, line: int | None, unit: str) -> CorpusError:
    return CorpusError(path, reason, line, unit=unit)


@dataclass(frozen=True)
class Corpus:
    """The documents of one corpus, split into train and validation; `files` are the data files read."""

    uri: str
    train: tuple[str, ...] = field(repr=False)
    valid: tuple[str, ...] = field(repr=False)
    files: tuple[str, ...] = field(repr=False)
    num_chars: int

    @cached_property
    def digest(self) -> str:
        """sha256 over the documents (train, then valid, each length-prefixed), for lineage.

        It depends on the text actually used (after cleaning and splitting), not on where the files
        live, so two copies of the same data share it and any change in content or rules changes it.
        """
        h = hashlib.sha256()
        for part, docs in (("train", self.train), ("valid", self.valid)):
            h.update(f"{part}:{len(docs)}\n".encode())
            for doc in docs:
                data = doc.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"Corpus(uri={self.uri!r}, files={len(self.files)}, train={len(self.train)}, "
            f"valid={len(self.valid)}, num_chars={self.num_chars})"
        )


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and footer from `text`; text without markers is returned as is."""
    if not _PG_HINT.search(text):
        return text
    lines = text.splitlines(keepends=True)
    start, end = _gutenberg_bounds([line.rstrip("\r\n") for line in lines])
    if (start, end) == (0, len(lines)):
        return text
    return "".join(lines[start:end]).strip("\r\n")


def _gutenberg_bounds(lines: Sequence[str]) -> tuple[int, int]:
    """[start, end) of the body of a Gutenberg text; (0, len(lines)) when there are no markers."""
    start = next((i + 1 for i, line in enumerate(lines) if _PG_START.match(line)), None)
    if start is None:  # old etexts: the header ends with the licence ("*END*THE SMALL PRINT! ...")
        start = next((i + 1 for i, line in enumerate(lines) if _PG_SMALL_PRINT_END.match(line)), 0)
    end = next((i for i in range(start, len(lines)) if _PG_END.match(lines[i])), len(lines))
    return start, end


def is_valid_document(text: str, valid_fraction: float) -> bool:
    """Whether a document belongs to the validation split: blake2b of its UTF-8 text, as a fraction of 2**64."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < valid_fraction


def load_corpus(
    uri: str | os.PathLike[str],
    *,
    valid_fraction: float = 0.05,
    max_document_chars: int = 1_000_000,
    max_files: int = 10_000,
    exclude: Sequence[str] = (),
) -> Corpus:
    """Read, validate and clean every data file under `uri`, and split the documents train/validation.

    `exclude` holds glob patterns matched against each file's path relative to `uri` and its name
    (e.g. `"*_test.jsonl"`); matching files are skipped. Raises `CorpusError` (see the module docstring)
    and ValueError for bad arguments.
    """
    if isinstance(valid_fraction, bool) or not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={valid_fraction!r} must lie in [0, 1)")
    if isinstance(max_document_chars, bool) or not isinstance(max_document_chars, int) or max_document_chars < 1:
        raise ValueError(f"max_document_chars={max_document_chars!r} must be an int >= 1")
    if isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 1:
        raise ValueError(f"max_files={max_files!r} must be an int >= 1")
    if isinstance(exclude, str):
        exclude = (exclude,)
    uri = os.fspath(uri)

    fs, files = _list_files(uri, max_files=max_files, exclude=exclude)
    total_bytes = sum(size for _, _, size in files)
    stats = _Stats()
    documents: list[str] = []
    for path, shown, _ in files:
        before = len(documents)
        suffix = _format_of(path)
        if suffix == ".txt":
            documents.extend(_read_txt(fs, path, shown, max_document_chars, stats))
        elif suffix == ".jsonl":
            documents.extend(_read_jsonl(fs, path, shown, max_document_chars, stats))
        else:
            documents.extend(_read_table(fs, path, shown, suffix, max_document_chars, total_bytes, stats))
        if len(documents) == before:
            logger.warning("%s holds no documents", shown)

    if not documents:
        reason = f"no documents: the {len(files)} data file(s) hold only empty or whitespace text"
        if stats.held_out:
            reason += f" (and {stats.held_out} record(s) of held-out splits, which were dropped)"
        raise CorpusError(uri, reason)
    train: list[str] = []
    valid: list[str] = []
    for doc in documents:
        (valid if is_valid_document(doc, valid_fraction) else train).append(doc)
    if not train:
        raise CorpusError(uri, f"all {len(documents)} document(s) fell in the validation split; lower valid_fraction")
    if valid_fraction > 0 and not valid:
        logger.warning("%s: no document fell in the validation split (%d documents)", uri, len(documents))
    if stats.held_out:
        logger.info("%s: dropped %d record(s) of held-out splits %s", uri, stats.held_out, sorted(HELD_OUT_SPLITS))
    if stats.gutenberg:
        logger.info("%s: stripped Project Gutenberg header/footer from %d document(s)", uri, stats.gutenberg)
    corpus = Corpus(
        uri=uri,
        train=tuple(train),
        valid=tuple(valid),
        files=tuple(shown for _, shown, _ in files),
        num_chars=sum(len(doc) for doc in documents),
    )
    logger.info("loaded %r (%.1f MB)", corpus, total_bytes / 1e6)
    return corpus


@dataclass
class _Stats:
    held_out: int = 0
    gutenberg: int = 0


def _format_of(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    return next(s for s in FORMATS if name.endswith(s))


def _is_data_file(path: str) -> bool:
    return path.lower().endswith(ACCEPTED_SUFFIXES)


def _filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3", "s3a") and importlib.util.find_spec("s3fs") is None:
        raise CorpusError(uri, "reading s3:// needs the optional s3fs package: pip install 'loire[s3]'")
    try:
        # Imports the protocol's implementation (s3fs for s3://) only now, never at `import loire`.
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise CorpusError(uri, f"cannot open this URI: {exc}") from None


def _list_files(
    uri: str, *, max_files: int, exclude: Sequence[str]
) -> tuple[fsspec.AbstractFileSystem, list[tuple[str, str, int]]]:
    """(filesystem, [(path, name shown in messages, size)]) of the data files, sorted by relative path."""
    fs, root = _filesystem(uri)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    try:
        if not fs.exists(root):
            raise CorpusError(uri, "does not exist")
        found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    except OSError as exc:
        raise CorpusError(uri, f"cannot list: {exc}") from None

    accepted = ", ".join(ACCEPTED_SUFFIXES)
    if list(found) == [root] and not fs.isdir(root) and not _is_data_file(root):
        raise CorpusError(uri, f"not a data file; accepted extensions: {accepted}")
    files: list[tuple[str, str, str, int]] = []
    skipped: list[str] = []
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        rel = str(PurePosixPath(path).relative_to(root)) if path != root else PurePosixPath(path).name
        if any(part.startswith((".", "_")) for part in PurePosixPath(rel).parts) or not _is_data_file(path):
            continue
        if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(PurePosixPath(rel).name, pat) for pat in exclude):
            skipped.append(rel)
            continue
        shown = path if local else fs.unstrip_protocol(path)
        files.append((rel, path, shown, int(info.get("size") or 0)))
    if skipped:
        logger.info("%s: excluded %d file(s): %s", uri, len(skipped), skipped)
    if not files:
        if skipped:
            raise CorpusError(uri, f"every data file is excluded by exclude={list(exclude)}: {skipped}")
        raise CorpusError(uri, f"no data files (accepted extensions: {accepted})")
    if len(files) > max_files:
        raise CorpusError(uri, f"holds {len(files)} data files, more than max_files={max_files}")
    files.sort()
    return fs, [(path, shown, size) for _, path, shown, size in files]


def _open(fs: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
    """The file's bytes; a `.gz` file is decompressed as a stream under the bomb guard (`_GzipGuard`)."""
    raw = fs.open(path, "rb")
    if not path.lower().endswith(".gz"):
        return raw
    try:
        return _GzipGuard(raw)  # type: ignore[return-value]
    except BaseException:
        raw.close()
        raise


def read_bytes(uri: str) -> bytes:
    """A whole file's bytes, local path or fsspec URL; a `.gz` file decompressed under the bomb guard.

    Raises the filesystem's OSError (FileNotFoundError, IsADirectoryError, ...) as is, and `CorpusError`
    naming the file for corrupt or bomb-like gzip data. For small files read at once (task data); corpora
    stream line by line (`load_corpus`).
    """
    fs, path = _filesystem(uri)
    try:
        with _open(fs, path) as f:
            return f.read()
    except _GzipBomb as exc:
        raise CorpusError(uri, str(exc)) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorpusError(uri, _gzip_reason(exc)) from None


def _gzip_reason(exc: BaseException) -> str:
    """Why gzip data could not be read; an early end of the stream is said to be a truncated file, not a short one."""
    if isinstance(exc, EOFError):
        return f"corrupt gzip data: truncated, the file ends before the gzip stream does ({exc})"
    return f"corrupt gzip data ({exc})"


class _GzipBomb(Exception):
    def __init__(self, produced: int, consumed: int) -> None:
        super().__init__(
            f"gzip data expands more than {MAX_GZIP_RATIO:g}x ({produced} bytes decompressed from the first "
            f"{consumed} compressed bytes): refused as a decompression bomb"
        )


class _GzipGuard:
    """A gzip stream that counts what it produces and raises `_GzipBomb` past the ratio cap.

    Only bounded reads are served (`read(n)` in chunks, `readline(limit)`), so no single call can
    expand the whole file before the check.
    """

    _CHUNK = 1024**2

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")
        self._produced = 0

    def _check(self, data: bytes) -> bytes:
        self._produced += len(data)
        if self._produced > GZIP_RATIO_FLOOR:
            consumed = max(1, self._raw.tell())
            if self._produced > MAX_GZIP_RATIO * consumed:
                raise _GzipBomb(self._produced, consumed)
        return data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read(self._CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        return self._check(self._gz.read(min(size, self._CHUNK)))

    def readline(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = GZIP_RATIO_FLOOR  # callers here always pass a limit; never an unbounded line
        return self._check(self._gz.readline(size))

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            self._gz.close()
        finally:
            self._raw.close()

    def __enter__(self) -> _GzipGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LineTooLong(Exception):
    def __init__(self, lineno: int) -> None:
        self.lineno = lineno


def _raw_lines(fs: fsspec.AbstractFileSystem, path: str, shown: str, limit: int) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a file, gzip-decompressed; errors name the file and the line reached."""
    lineno = 0
    try:
        with _open(fs, path) as f:
            while True:
                line = f.readline(limit + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > limit:
                    raise _LineTooLong(lineno)
                yield lineno, line
    except _GzipBomb as exc:
        raise CorpusError(shown, str(exc), lineno + 1) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorpusError(shown, _gzip_reason(exc), lineno + 1) from None
    except OSError as exc:
        if path.lower().endswith(".gz"):
            raise CorpusError(shown, f"corrupt gzip data ({exc})", lineno + 1) from None
        raise CorpusError(shown, f"cannot read ({exc})", lineno + 1) from None


def _decode(raw: bytes, shown: str, lineno: int) -> str:
    """UTF-8 text of one line; NUL bytes (binary data, UTF-16) and invalid UTF-8 are errors."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CorpusError(shown, f"binary data: NUL byte at column {nul + 1} (is this a text file in UTF-8?)", lineno)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise CorpusError(shown, f"invalid UTF-8 at byte {exc.start + 1} ({bad!r}): {exc.reason}", lineno) from None
    return text.removeprefix("\ufeff") if lineno == 1 else text


def _too_long(shown: str, length: int, max_chars: int, lineno: int | None, unit: str = "line") -> CorpusError:
    return CorpusError(
        shown, f"document of {length} characters is longer than max_document_chars={max_chars}", lineno, unit=unit
    )


def _read_txt(fs: fsspec.AbstractFileSystem, path: str, shown: str, max_chars: int, stats: _Stats) -> list[str]:
    """Documents of a .txt file: paragraphs separated by blank lines, after Gutenberg stripping."""
    lines: list[str] = []
    try:
        for lineno, raw in _raw_lines(fs, path, shown, limit=4 * max_chars + 2):
            lines.append(_decode(raw, shown, lineno).rstrip("\r\n"))
    except _LineTooLong as exc:
        raise _too_long(shown, max_chars + 1, max_chars, exc.lineno) from None
    start, end = _gutenberg_bounds(lines)
    if (start, end) != (0, len(lines)):
        stats.gutenberg += 1
    documents: list[str] = []
    current: list[str] = []
    size = 0
    first = 0
    for i in range(start, end + 1):
        line = lines[i] if i < end else ""
        if line.strip():
            if not current:
                first, size = i + 1, 0
            current.append(line)
            size += len(line) + 1
            if size - 1 > max_chars:
                raise _too_long(shown, size - 1, max_chars, first)
        elif current:
            documents.append("\n".join(current))
            current = []
    return documents


def _check_text(
    record: dict[str, Any], shown: str, where: int, max_chars: int, stats: _Stats, unit: str = "line"
) -> str | None:
    """The cleaned document of one record, or None when it is empty or of a held-out split."""
    split = record.get("split")
    if isinstance(split, str) and split.strip().lower() in HELD_OUT_SPLITS:
        stats.held_out += 1
        return None
    text = record[TEXT_FIELD]
    if text is None and unit == "row":  # an empty CSV cell
        return None
    if not isinstance(text, str):
        raise CorpusError(shown, f"'{TEXT_FIELD}' is {type(text).__name__}, not a string", where, unit=unit)
    if "\x00" in text:
        raise CorpusError(shown, f"'{TEXT_FIELD}' holds a NUL character (binary data)", where, unit=unit)
    if len(text) > max_chars:
        raise _too_long(shown, len(text), max_chars, where, unit)
    stripped = strip_gutenberg(text)
    if stripped is not text:
        stats.gutenberg += 1
    return stripped if stripped.strip() else None


def _read_jsonl(fs: fsspec.AbstractFileSystem, path: str, shown: str, max_chars: int, stats: _Stats) -> list[str]:
    documents: list[str] = []
    # JSON escapes take up to 12 bytes per character (a surrogate pair); other fields get 64 KiB.
    limit = 12 * max_chars + 65536
    try:
        for lineno, raw in _raw_lines(fs, path, shown, limit=limit):
            line = _decode(raw, shown, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(shown, f"broken JSON: {exc.msg} (column {exc.colno})", lineno) from None
            if not isinstance(record, dict):
                raise CorpusError(shown, f"expected a JSON object, got {type(record).__name__}", lineno)
            if TEXT_FIELD not in record:
                raise CorpusError(shown, f"no '{TEXT_FIELD}' field (fields: {sorted(record)})", lineno)
            doc = _check_text(record, shown, lineno, max_chars, stats)
            if doc is not None:
                documents.append(doc)
    except _LineTooLong as exc:
        raise CorpusError(
            shown, f"line longer than {limit} bytes (max_document_chars={max_chars})", exc.lineno
        ) from None
    return documents


def _read_table(
    fs: fsspec.AbstractFileSystem,
    path: str,
    shown: str,
    suffix: str,
    max_chars: int,
    total_bytes: int,
    stats: _Stats,
) -> list[str]:
    """Documents of a .csv or .parquet file, read with `datasets` in a temporary cache folder."""
    import datasets  # heavy (pandas, pyarrow); only table corpora need it

    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    gz = path.lower().endswith(".gz")
    streaming = total_bytes > STREAMING_BYTES
    documents: list[str] = []
    with tempfile.TemporaryDirectory(prefix="loire-datasets-") as tmp:
        source = path
        if suffix == ".csv":
            # pandas reports bad bytes without a line number: check them here first.
            try:
                for lineno, raw in _raw_lines(fs, path, shown, limit=4 * max_chars + 2):
                    _decode(raw, shown, lineno)
            except _LineTooLong as exc:
                raise _too_long(shown, max_chars + 1, max_chars, exc.lineno) from None
        if gz or not local:
            source = f"{tmp}/staged{suffix}"
            try:
                with _open(fs, path) as src, open(source, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except _GzipBomb as exc:
                raise CorpusError(shown, str(exc)) from None
            except (EOFError, zlib.error, OSError) as exc:
                raise CorpusError(shown, _gzip_reason(exc) if gz else f"cannot read ({exc})") from None
        builder = "csv" if suffix == ".csv" else "parquet"
        options: dict[str, Any] = {"encoding": "utf-8-sig"} if builder == "csv" else {}
        try:
            with _quiet_datasets(datasets):
                dataset = datasets.load_dataset(
                    builder,
                    data_files=[source],
                    split="train",
                    cache_dir=f"{tmp}/cache",
                    streaming=streaming,
                    **({} if streaming else {"keep_in_memory": True}),
                    **options,
                )
                columns = dataset.column_names
                if columns is not None and TEXT_FIELD not in columns:
                    raise CorpusError(shown, f"no '{TEXT_FIELD}' column (columns: {columns})")
                for row, record in enumerate(dataset, start=1):
                    if TEXT_FIELD not in record:
                        raise CorpusError(shown, f"no '{TEXT_FIELD}' column (columns: {sorted(record)})")
                    doc = _check_text(record, shown, row, max_chars, stats, unit="row")
                    if doc is not None:
                        documents.append(doc)
        except CorpusError:
            raise
        except Exception as exc:  # pandas / pyarrow / datasets errors: keep the reason, name the file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CorpusError(shown, f"not a readable {builder.upper()} file: {reason}") from None
    return documents


@contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    """No progress bars and no error logs from `datasets` for one load: failures become CorpusError."""
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.utils.enable_progress_bars()


def pack(token_ids: Iterable[Sequence[int]], block_size: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents, each followed by `eos_id`, and cut the stream into (N, block_size) blocks.

    The tail that does not fill a whole block is dropped. Raises ValueError if not even one block fills.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be an int >= 1")
    stream = array("q")
    documents = 0
    for ids in token_ids:
        stream.extend(ids)
        stream.append(eos_id)
        documents += 1
    blocks = len(stream) // block_size
    if blocks == 0:
        raise ValueError(
            f"{len(stream)} tokens ({documents} documents, one eos each) do not fill one block of {block_size}"
        )
    flat = np.frombuffer(stream, dtype=np.int64, count=blocks * block_size)
    return torch.from_numpy(flat.copy()).view(blocks, block_size)


def encode_corpus(
    texts: Sequence[str],
    tokenizer: Any,
    block_size: int,
    max_tokens: int | None = None,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Tokenize `texts` in batches (no special tokens added) and `pack` them with the tokenizer's eos.

    `max_tokens` caps the tokens used (for CPU budgets): documents are taken in order until that many
    tokens are collected (the last one whole), and at most `max_tokens // block_size` blocks are returned.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token; packing needs one between documents")
    if max_tokens is not None and max_tokens < block_size:
        raise ValueError(f"max_tokens={max_tokens} is smaller than one block (block_size={block_size})")
    if not getattr(tokenizer, "is_fast", False):
        logger.warning("%s is not a fast tokenizer; encoding will be slow", type(tokenizer).__name__)
    encoded: list[list[int]] = []
    total = 0
    start = 0
    while start < len(texts) and (max_tokens is None or total < max_tokens):
        stop = min(start + batch_size, len(texts))
        if max_tokens is not None:
            # Under a cap, take only the documents the budget can need (a token is rarely over 8
            # characters), so a small cap does not tokenize a whole batch of long documents.
            wanted, chars, stop = 8 * (max_tokens - total), 0, start
            while stop < min(start + batch_size, len(texts)) and chars < wanted:
                chars += len(texts[stop])
                stop += 1
        batch = list(texts[start:stop])
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        for doc in ids:
            encoded.append(doc)
            total += len(doc) + 1
            if max_tokens is not None and total >= max_tokens:
                break
        start = stop
    blocks = pack(encoded, block_size, eos)
    if max_tokens is not None:
        blocks = blocks[: max_tokens // block_size]
    logger.info("encoded %d documents into %d blocks of %d tokens", len(encoded), len(blocks), block_size)
    return blocks
