"""Corpus loading, validation, cleaning, the deterministic split, and packing (loire.data)."""

from __future__ import annotations

import gzip
import json
import pickle
import random
import shutil
from pathlib import Path

import fsspec
import pytest
import torch

from loire.data import (
    HELD_OUT_SPLITS,
    Corpus,
    CorpusError,
    encode_corpus,
    is_valid_document,
    load_corpus,
    pack,
    strip_gutenberg,
)
from tests.conftest import DATA_ROOT


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["growth", "model", "domain", "corpus", "token", "layer", "news", "review", "cell", "graph"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(8)) for i in range(n)]


def raises(uri: Path | str, *, name: str, line: int | None = None, match: str = "", **kwargs: object) -> CorpusError:
    with pytest.raises(CorpusError) as info:
        load_corpus(str(uri), **kwargs)
    err = info.value
    message = str(err)
    assert name in message, message
    if line is not None:
        assert err.line == line, message
        assert f" {line}:" in message, message
    if match:
        assert match in message, message
    return err


# ---------------------------------------------------------------- formats


def test_each_format_loads(tmp_path: Path) -> None:
    import pandas as pd

    texts = docs(4)
    (tmp_path / "a.txt").write_text(f"{texts[0]}\nsecond line\n\n\n{texts[1]}\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": texts[2], "id": 1}])
    pd.DataFrame({"text": [texts[3], "csv row two"], "label": [0, 1]}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"text": ["parquet doc"]}).to_parquet(tmp_path / "d.parquet")
    with gzip.open(tmp_path / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gzipped jsonl"}) + "\n")
    with gzip.open(tmp_path / "f.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gzipped txt\n")
    with gzip.open(tmp_path / "g.csv.gz", "wt", encoding="utf-8") as f:
        pd.DataFrame({"text": ["gzipped csv"]}).to_csv(f, index=False)
    parquet_bytes = (tmp_path / "d.parquet").read_bytes()
    (tmp_path / "h.parquet.gz").write_bytes(gzip.compress(parquet_bytes))
    (tmp_path / "notes.md").write_text("not data")  # ignored: not an accepted extension
    (tmp_path / ".hidden.jsonl").write_text("{broken")  # ignored: hidden

    corpus = load_corpus(str(tmp_path), valid_fraction=0.0)
    expected = [
        f"{texts[0]}\nsecond line",
        texts[1],
        texts[2],
        texts[3],
        "csv row two",
        "parquet doc",
        "gzipped jsonl",
        "gzipped txt",
        "gzipped csv",
        "parquet doc",
    ]
    assert list(corpus.train) == expected
    assert corpus.valid == ()
    assert [Path(f).name for f in corpus.files] == [
        "a.txt",
        "b.jsonl",
        "c.csv",
        "d.parquet",
        "e.jsonl.gz",
        "f.txt.gz",
        "g.csv.gz",
        "h.parquet.gz",
    ]
    assert corpus.num_chars == sum(len(d) for d in expected)
    assert "train=10" in repr(corpus) and "growth" not in repr(corpus)


def test_single_file_crlf_bom_and_nested_folders(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "x.txt").write_bytes("\ufeffone\r\ntwo\r\n\r\nthree\r\n".encode())
    corpus = load_corpus(str(tmp_path / "sub" / "deeper" / "x.txt"), valid_fraction=0.0)
    assert corpus.train == ("one\ntwo", "three")
    assert load_corpus(str(tmp_path), valid_fraction=0.0).train == corpus.train


def test_fsspec_url(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/loire-test/corpus/a.jsonl", b'{"text": "remote one"}\n{"text": "remote two"}\n')
    fs.pipe("/loire-test/corpus/b.csv", b"text\nremote csv\n")
    try:
        corpus = load_corpus("memory://loire-test/corpus", valid_fraction=0.0)
    finally:
        fs.rm("/loire-test", recursive=True)
    assert corpus.train == ("remote one", "remote two", "remote csv")
    assert corpus.files[0].startswith("memory://")


def test_s3_without_s3fs_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "s3fs" else real(name, *a))
    raises("s3://bucket/prefix", name="s3://bucket/prefix", match="loire[s3]")


# ---------------------------------------------------------------- errors


def test_nonexistent_path(tmp_path: Path) -> None:
    raises(tmp_path / "nope", name="nope", match="does not exist")


def test_folder_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("hello")
    err = raises(tmp_path, name=str(tmp_path), match="no data files")
    assert ".jsonl" in str(err) and ".parquet" in str(err) and ".gz" in str(err)
    raises(tmp_path / "readme.md", name="readme.md", match="accepted extensions")


def test_every_file_excluded(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a_test.jsonl", [{"text": "x"}])
    raises(tmp_path, name=str(tmp_path), match="excluded", exclude=["*_test.jsonl"])


def test_too_many_files(tmp_path: Path) -> None:
    for i in range(3):
        write_jsonl(tmp_path / f"{i}.jsonl", [{"text": "x"}])
    raises(tmp_path, name=str(tmp_path), match="max_files=2", max_files=2)


@pytest.mark.parametrize(
    "content",
    ["", "\n\n   \n", '{"text": ""}\n{"text": "  \\n "}\n'],
    ids=["empty", "whitespace", "blank-texts"],
)
def test_empty_corpus(tmp_path: Path, content: str) -> None:
    (tmp_path / "a.jsonl").write_text(content)
    (tmp_path / "b.txt").write_text(" \n\n")
    raises(tmp_path, name=str(tmp_path), match="no documents")


def test_broken_json_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "x"}\n')
    raises(tmp_path, name="a.jsonl", line=3, match="broken JSON")


def test_missing_text_field_jsonl(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"text": "ok"}, {"body": "no text here"}])
    raises(tmp_path, name="a.jsonl", line=3, match="no 'text' field (fields: ['body'])")


def test_not_an_object_jsonl(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, ["a", "list"]])
    raises(tmp_path, name="a.jsonl", line=2, match="JSON object")


@pytest.mark.parametrize("value", [42, None, ["a"], {"t": 1}])
def test_non_string_text(tmp_path: Path, value: object) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"text": value}])
    raises(tmp_path, name="a.jsonl", line=2, match="not a string")


def test_missing_text_column_csv(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("body,label\nhello,1\n")
    raises(tmp_path, name="a.csv", match="no 'text' column (columns: ['body', 'label'])")


def test_missing_text_column_parquet(tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"body": ["x"]}).to_parquet(tmp_path / "a.parquet")
    raises(tmp_path, name="a.parquet", match="no 'text' column")


def test_non_string_text_csv(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text\n1\n2\n")
    raises(tmp_path, name="a.csv", line=1, match="row 1: 'text' is int")


def test_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_bytes(b"PAR1 this is not parquet at all")
    raises(tmp_path, name="a.parquet", match="not a readable PARQUET file")


@pytest.mark.parametrize("suffix", ["txt", "jsonl", "csv"])
def test_invalid_utf8(tmp_path: Path, suffix: str) -> None:
    good = {"txt": b"fine\n", "jsonl": b'{"text": "fine"}\n', "csv": b"text\nfine\n"}[suffix]
    bad = {"txt": b"caf\xe9 au lait\n", "jsonl": b'{"text": "caf\xe9"}\n', "csv": b"caf\xe9\n"}[suffix]
    (tmp_path / f"a.{suffix}").write_bytes(good + b"more\n" * (suffix == "txt") + bad)
    line = {"txt": 3, "jsonl": 2, "csv": 3}[suffix]
    raises(tmp_path, name=f"a.{suffix}", line=line, match="invalid UTF-8")


def test_binary_junk(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"text first\n\x00\x01\x02\xff\xfe binary\n")
    raises(tmp_path, name="a.txt", line=2, match="NUL byte")
    (tmp_path / "a.txt").unlink()
    (tmp_path / "utf16.jsonl").write_bytes('{"text": "utf-16"}\n'.encode("utf-16"))
    raises(tmp_path, name="utf16.jsonl", line=1, match="NUL byte")


def test_nul_character_in_json_text(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a\x00b"}])
    raises(tmp_path, name="a.jsonl", line=1, match="NUL")


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.txt.gz", "a.csv.gz", "a.parquet.gz"])
def test_corrupt_gzip(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"this is not gzip data")
    raises(tmp_path, name=name, match="corrupt gzip")


def test_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(b"".join(json.dumps({"text": f"line {i}"}).encode() + b"\n" for i in range(2000)))
    (tmp_path / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
    err = raises(tmp_path, name="a.jsonl.gz", match="corrupt gzip data: truncated")
    assert err.line is not None and err.line > 1


@pytest.mark.parametrize("name", ["a.txt.gz", "a.csv.gz", "a.parquet.gz"])
@pytest.mark.parametrize("keep", [0.5, -8])  # half the stream; everything but the trailer (CRC and size)
def test_truncated_gzip_is_not_a_short_corpus(tmp_path: Path, name: str, keep: float) -> None:
    import io

    import pandas as pd

    if name.endswith(".parquet.gz"):
        buffer = io.BytesIO()
        pd.DataFrame({"text": [f"document {i}" for i in range(500)]}).to_parquet(buffer)
        data = gzip.compress(buffer.getvalue())
    else:
        data = gzip.compress(("text\n" if name.endswith(".csv.gz") else "").encode() + b"document\n\n" * 2000)
    (tmp_path / name).write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[: int(keep)])
    raises(tmp_path, name=name, match="corrupt gzip data: truncated")


def test_document_over_size_cap(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "short"}, {"text": "x" * 101}])
    raises(tmp_path, name="a.jsonl", line=2, match="max_document_chars=100", max_document_chars=100)
    (tmp_path / "a.jsonl").unlink()
    # A .txt document over the cap is named by its first line, even when each line is short.
    (tmp_path / "b.txt").write_text("ok\n\n" + "ten chars\n" * 20)
    raises(tmp_path, name="b.txt", line=3, match="max_document_chars=100", max_document_chars=100)
    (tmp_path / "b.txt").write_text("ok\n\n" + "y" * 1000 + "\n")  # one huge line: not read whole
    raises(tmp_path, name="b.txt", line=3, match="max_document_chars=100", max_document_chars=100)


def test_bad_arguments(tmp_path: Path) -> None:
    for kwargs in ({"valid_fraction": 1.0}, {"valid_fraction": -0.1}, {"max_document_chars": 0}, {"max_files": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            load_corpus(str(tmp_path), **kwargs)


def test_corpus_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(CorpusError("a.jsonl", "broken", 3)))
    assert (err.path, err.line, str(err)) == ("a.jsonl", 3, "a.jsonl, line 3: broken")


def test_failed_table_load_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    import datasets

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    hf_cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(hf_cache.rglob("*")) if hf_cache.exists() else None
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "a.parquet").write_bytes(b"junk")
    with pytest.raises(CorpusError):
        load_corpus(str(corpus_dir))
    (corpus_dir / "a.parquet").unlink()
    (corpus_dir / "b.csv").write_text("text\nfine\n")
    assert load_corpus(str(corpus_dir), valid_fraction=0.0).train == ("fine",)
    assert list(scratch.iterdir()) == []
    after = sorted(hf_cache.rglob("*")) if hf_cache.exists() else None
    assert after == before


# ---------------------------------------------------------------- cleaning


def test_held_out_split_records_are_dropped(tmp_path: Path) -> None:
    assert {"dev", "test", "validation"} <= HELD_OUT_SPLITS
    write_jsonl(
        tmp_path / "scierc.jsonl",
        [
            {"split": "train", "text": "train abstract"},
            {"split": "dev", "text": "dev abstract"},
            {"split": "test", "text": "test abstract"},
            {"split": "TEST ", "text": "odd case test abstract"},
            {"text": "no split field"},
        ],
    )
    (tmp_path / "t.csv").write_text("split,text\ntrain,csv train\nvalidation,csv validation\n")
    corpus = load_corpus(str(tmp_path), valid_fraction=0.0)
    assert corpus.train == ("train abstract", "no split field", "csv train")


def test_exclude_patterns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "keep.jsonl", [{"text": "kept"}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "task_test.jsonl", [{"text": "excluded by name"}])
    write_jsonl(tmp_path / "sub" / "other.jsonl", [{"text": "excluded by relative path"}])
    corpus = load_corpus(str(tmp_path), valid_fraction=0.0, exclude=["*_test.jsonl", "sub/other.*"])
    assert corpus.train == ("kept",)
    assert [Path(f).name for f in corpus.files] == ["keep.jsonl"]


GUTENBERG = """The Project Gutenberg EBook of Tiny Book, by Nobody

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK TINY BOOK ***

Produced by volunteers

Chapter 1. It was a dark night.
The end came soon.

Chapter 2. Morning.

*** END OF THIS PROJECT GUTENBERG EBOOK TINY BOOK ***

***** This file should be named 1.txt *****
Section 1. General Terms of Use and Redistributing Project Gutenberg-tm
"""

OLD_GUTENBERG = """**The Project Gutenberg Etext of Old Book**
**Welcome To The World of Free Plain Vanilla Electronic Texts**

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***
Why is this "Small Print!" statement here?  You know: lawyers.
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

OLD BOOK

It begins.

End of The Project Gutenberg Etext of Old Book
"""


def test_strip_gutenberg() -> None:
    body = strip_gutenberg(GUTENBERG)
    assert body.startswith("Produced by volunteers")
    assert body.endswith("Chapter 2. Morning.")
    assert "START OF" not in body and "END OF" not in body and "Section 1" not in body
    assert strip_gutenberg(OLD_GUTENBERG) == "OLD BOOK\n\nIt begins."
    plain = "A story about Project Gutenberg volunteers.\n\nNo markers here."
    assert strip_gutenberg(plain) is plain


def test_gutenberg_stripped_in_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_text(GUTENBERG.replace("\n", "\r\n"))
    write_jsonl(tmp_path / "books.jsonl", [{"text": OLD_GUTENBERG}])
    corpus = load_corpus(str(tmp_path), valid_fraction=0.0)
    assert corpus.train == (
        "Produced by volunteers",
        "Chapter 1. It was a dark night.\nThe end came soon.",
        "Chapter 2. Morning.",
        "OLD BOOK\n\nIt begins.",
    )


# ---------------------------------------------------------------- split


def test_split_is_deterministic_and_independent_of_file_order(tmp_path: Path) -> None:
    texts = docs(2000)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_jsonl(a / "1.jsonl", [{"text": t} for t in texts[:1000]])
    write_jsonl(a / "2.jsonl", [{"text": t} for t in texts[1000:]])
    shuffled = texts[::-1]
    write_jsonl(b / "0.jsonl", [{"text": t} for t in shuffled[:700]])
    write_jsonl(b / "z.jsonl", [{"text": t} for t in shuffled[700:]])

    first = load_corpus(str(a), valid_fraction=0.1)
    again = load_corpus(str(a), valid_fraction=0.1)
    other = load_corpus(str(b), valid_fraction=0.1)
    assert first == again and first.digest == again.digest
    assert set(first.valid) == set(other.valid) and set(first.train) == set(other.train)
    assert 0.07 < len(first.valid) / len(texts) < 0.13
    assert all(is_valid_document(t, 0.1) for t in first.valid)
    # A fixed document always lands on the same side, on every machine (pinned hash values).
    assert is_valid_document("doc 0", 0.5) is is_valid_document("doc 0", 0.5)
    assert not load_corpus(str(a), valid_fraction=0.0).valid


def test_split_pinned_values() -> None:
    # blake2b(text, digest_size=8) / 2**64, computed once; guards against accidental changes of the rule.
    import hashlib

    value = int.from_bytes(hashlib.blake2b(b"hello", digest_size=8).digest(), "big") / 2**64
    assert is_valid_document("hello", value + 1e-12) and not is_valid_document("hello", value - 1e-12)


def test_digest_tracks_content(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs(20)])
    first = load_corpus(str(tmp_path))
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(tmp_path / "a.jsonl", moved / "renamed.jsonl")
    assert load_corpus(str(moved)).digest == first.digest
    write_jsonl(moved / "renamed.jsonl", [{"text": t} for t in docs(20)[:-1]])
    assert load_corpus(str(moved)).digest != first.digest
    assert len(first.digest) == 64
    built = Corpus(uri="x", train=("a",), valid=(), files=(), num_chars=1)
    assert built.digest == Corpus(uri="y", train=("a",), valid=(), files=("f",), num_chars=1).digest


def test_all_documents_in_valid_is_an_error(tmp_path: Path) -> None:
    text = next(t for t in docs(100) if is_valid_document(t, 0.5))
    write_jsonl(tmp_path / "a.jsonl", [{"text": text}])
    raises(tmp_path, name=str(tmp_path), match="validation split", valid_fraction=0.5)


# ---------------------------------------------------------------- packing


def test_pack_by_hand() -> None:
    blocks = pack([[1, 2, 3], [4], [5, 6]], block_size=3, eos_id=0)
    # stream: 1 2 3 0 4 0 5 6 0 -> three blocks, nothing dropped
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 0], [5, 6, 0]]
    assert blocks.dtype == torch.long
    # stream: 1 2 3 9 4 9 5 6 9 (9 tokens) -> two blocks of 4, the last token dropped
    assert pack([[1, 2, 3], [4], [5, 6]], block_size=4, eos_id=9).tolist() == [[1, 2, 3, 9], [4, 9, 5, 6]]
    assert pack(iter([[], [7]]), block_size=2, eos_id=0).tolist() == [[0, 7]]  # an empty document still adds eos


def test_pack_errors() -> None:
    with pytest.raises(ValueError, match="do not fill one block of 8"):
        pack([[1, 2], [3]], block_size=8, eos_id=0)
    with pytest.raises(ValueError, match="block_size"):
        pack([[1]], block_size=0, eos_id=0)
    with pytest.raises(ValueError, match="do not fill"):
        pack([], block_size=1, eos_id=0)


class CharTokenizer:
    """A stand-in HF tokenizer: one id per character (ord), eos = 0."""

    eos_token_id = 0
    is_fast = True

    def __call__(self, texts: list[str], **kwargs: object) -> dict[str, list[list[int]]]:
        assert kwargs["add_special_tokens"] is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_encode_corpus_with_cap() -> None:
    blocks = encode_corpus(["ab", "cde"], CharTokenizer(), block_size=3)
    assert blocks.tolist() == [[97, 98, 0], [99, 100, 101]]  # trailing eos dropped
    many = ["abcdefg"] * 100
    capped = encode_corpus(many, CharTokenizer(), block_size=4, max_tokens=10, batch_size=3)
    assert capped.shape == (2, 4)
    assert capped.flatten().tolist() == [97, 98, 99, 100, 101, 102, 103, 0]
    with pytest.raises(ValueError, match="max_tokens"):
        encode_corpus(many, CharTokenizer(), block_size=4, max_tokens=3)


def test_encode_corpus_real_tokenizer() -> None:
    from loire.tokenizer import train_tokenizer

    texts = docs(200)
    tokenizer = train_tokenizer(texts, vocab_size=300)
    blocks = encode_corpus(texts, tokenizer, block_size=16)
    stream = [i for t in texts for i in [*tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]]
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert len(stream) - blocks.numel() < 16


# ---------------------------------------------------------------- real corpora


@pytest.mark.integration
def test_real_wb_and_cs_corpora() -> None:
    corpora = DATA_ROOT / "corpora"
    if not (corpora / "wb").is_dir() or not (corpora / "cs").is_dir():
        pytest.skip(f"real corpora not found under {corpora} (set LOIRE_DATA to shared/data)")
    wb = load_corpus(str(corpora / "wb"))
    assert len(wb.files) == 3 and len(wb.train) + len(wb.valid) > 250
    assert 0.02 < len(wb.valid) / (len(wb.train) + len(wb.valid)) < 0.1
    everything = wb.train + wb.valid
    assert not any("PROJECT GUTENBERG EBOOK" in d.upper() or "SMALL PRINT!" in d.upper() for d in everything)
    assert load_corpus(str(corpora / "wb")).digest == wb.digest

    cs = load_corpus(str(corpora / "cs"))
    cs_text = set(cs.train + cs.valid)
    raw = DATA_ROOT / "cs" / "scierc_abstracts_tokenized.jsonl"
    if not raw.is_file():
        pytest.skip(f"{raw} not found: cannot check the SciERC exclusion")
    records = [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines()]
    held_out = {r["text"] for r in records if r["split"] in ("dev", "test")}
    train = {r["text"] for r in records if r["split"] == "train"}
    assert len(held_out) == 150 and len(train) == 350
    # The corpus holds the SciERC train abstracts and none of the dev/test ones ...
    assert train <= cs_text
    assert not held_out & cs_text
    # ... and the raw file, labelled by split, loses its dev/test abstracts on load.
    scierc = load_corpus(str(raw))
    assert set(scierc.train + scierc.valid) == train
    # No test sentence of the SciERC relation task (entity markers removed) occurs in the CS corpus,
    # while every one of them does occur in the held-out abstracts (so the check has teeth).
    task = DATA_ROOT / "sciie" / "test.jsonl"
    if task.is_file():
        markers = str.maketrans("", "", "<>[]")
        sentences = [json.loads(line)["text"] for line in task.read_text(encoding="utf-8").splitlines()]
        plain = {" ".join(s.translate(markers).split()) for s in sentences}
        held_out_text = "\n".join(" ".join(d.split()) for d in held_out)
        corpus_text = "\n".join(" ".join(d.split()) for d in cs_text)
        assert all(s in held_out_text for s in plain)
        assert not [s for s in plain if s in corpus_text]


def test_streaming_path_for_large_table_corpora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    import loire.data

    monkeypatch.setattr(loire.data, "STREAMING_BYTES", 0)  # every table corpus counts as large
    pd.DataFrame({"text": ["streamed csv", None, "x"]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"text": ["streamed parquet"]}).to_parquet(tmp_path / "b.parquet")
    assert load_corpus(str(tmp_path), valid_fraction=0.0).train == ("streamed csv", "x", "streamed parquet")
    (tmp_path / "c.csv").write_text("body\nno text column\n")
    raises(tmp_path, name="c.csv", match="no 'text' column")
