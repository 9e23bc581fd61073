"""Hostile input: keys, corpora, model and tokenizer files built to hurt the pipeline.

Each case drives the real code (`flows.landing`, `loire.data`, `loire.io`, `loire.tokenizer`, the stage
flow) and checks the protection: a clear error naming the key / file / line, bounded memory, nothing
written outside the destination, no pickle ever unpickled, and a failed stage that leaves the registry
as it was.
"""

from __future__ import annotations

import ast
import gzip
import json
import shutil
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

import loire.data
from flows.landing import (
    Arrival,
    LandingError,
    arrival_from_event,
    fetch_batch,
    list_arrivals,
    parse_marker_key,
)
from flows.settings import PipelineSettings
from flows.stage import lifelong_stage
from flows.tracking import Tracker
from loire.data import CorpusError, load_corpus
from loire.io import load_model
from loire.lifelong import run_stage
from loire.tokenizer import load_tokenizer
from tests.flows.pipeline_harness import arrive, local_world
from tests.flows.servers_aws import LandingBucket

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

REPO = Path(__file__).resolve().parents[2]
MB = 1024**2


def jsonl(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def tree(root: Path) -> list[str]:
    """Every path under `root` (relative, sorted): what a test wrote."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --- keys ---------------------------------------------------------------------------------------------

HOSTILE_MARKERS = {
    "landing/../NEWS/b1/_SUCCESS": "'.' or '..' segment",
    "landing/NEWS/../../_SUCCESS": "'.' or '..' segment",
    "/landing/NEWS/b1/_SUCCESS": "absolute path",
    "landing/NEWS/b1\x00/_SUCCESS": "non-printable",
    "landing/NEWS/b\x1b[2J1/_SUCCESS": "non-printable",  # a terminal escape sequence
    "landing/NEWS/b1\r/_SUCCESS": "non-printable",
    "landing/NEWS/b\u202e1/_SUCCESS": "non-printable",  # right-to-left override
    "landing/NEWS/b\u200b1/_SUCCESS": "non-printable",  # zero-width space
    "landing/NEWS/\u2025/_SUCCESS": "must match",  # two-dot leader: '..' after NFKC normalisation
    "landing/NEWS/\uff0e\uff0e/_SUCCESS": "must match",  # fullwidth full stops
    "landing/\uff2e\uff25\uff37\uff33/b1/_SUCCESS": "must match",  # fullwidth NEWS
    "landing/N\u0415WS/b1/_SUCCESS": "must match",  # Cyrillic Ie in NEWS (a homoglyph)
    "landing/NEWS/b1\\..\\..\\x/_SUCCESS": "must match",  # Windows separators
    f"landing/NEWS/{'b' * 65}/_SUCCESS": "must match",
    f"landing/NEWS/{'b' * 2000}/_SUCCESS": "longer than 1024 bytes",
}


@pytest.mark.parametrize(("key", "reason"), list(HOSTILE_MARKERS.items()), ids=lambda v: ascii(v)[:40])
def test_parse_marker_key_refuses_hostile_keys(key: str, reason: str) -> None:
    with pytest.raises(LandingError, match=reason) as info:
        parse_marker_key(key, "landing")
    message = str(info.value)
    assert message.startswith("marker key ") and message.isprintable() and len(message) < 400
    # A hostile key crossing a process boundary (the stage deployment's parameter) is refused as well.
    params = dict(landing="s3://bkt/landing", bucket="bkt", key=key, etag="e", domain="NEWS", batch="b1")
    with pytest.raises(LandingError, match=reason):
        Arrival.from_params({**params, "arrived_at": 0.0})


def test_s3_events_with_encoded_traversal_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    def event(key: str) -> dict[str, Any]:
        obj = {"key": key, "eTag": "e"}
        return {
            "eventName": "ObjectCreated:Put",
            "eventTime": "2026-01-05T00:00:00Z",
            "s3": {"bucket": {"name": "bkt"}, "object": obj},
        }

    for key in ("landing/%2e%2e/NEWS/_SUCCESS", "landing/NEWS/%2E%2E/_SUCCESS", "landing/NEWS/b%00/_SUCCESS"):
        assert arrival_from_event(event(key), "s3://bkt/landing") is None
    assert sum("ignoring event for invalid marker" in r.getMessage() for r in caplog.records) == 3
    assert arrival_from_event(event("landing/NEWS/b1/_SUCCESS"), "s3://bkt/landing") is not None


def test_list_arrivals_skips_hostile_markers(landing_bucket: LandingBucket, caplog: pytest.LogCaptureFixture) -> None:
    lb = landing_bucket
    stored = [k for k in HOSTILE_MARKERS if not k.startswith("/") and "\r" not in k]  # moto refuses CR
    for key in [*stored, "landing/NEWS/ok/_SUCCESS"]:
        lb.s3.put_object(Bucket=lb.bucket, Key=key, Body=b"")
    assert [a.key for a in list_arrivals(lb.landing, s3=lb.s3)] == ["landing/NEWS/ok/_SUCCESS"]
    skipped = [r.getMessage() for r in caplog.records if "skipping invalid marker" in r.getMessage()]
    assert len(skipped) == len(stored)
    assert all(m.isprintable() and len(m) < 500 for m in skipped)  # no raw control characters, no 2 kB lines


HOSTILE_OBJECTS = {
    "../../../evil.jsonl": "would escape the destination folder",
    "sub/../../../evil.jsonl": "would escape the destination folder",
    "/etc/evil.jsonl": "would escape the destination folder",  # 'landing/NEWS/b1//etc/evil.jsonl'
    "sub//evil.jsonl": "would escape the destination folder",
    "./evil.jsonl": "would escape the destination folder",
    "ev\x01il.jsonl": "non-printable name",
    "evil\u202elnosj.txt": "non-printable name",
    f"{'y' * 300}.jsonl": "name segment longer than 255 bytes",
    f"sub/{'é' * 200}.jsonl": "name segment longer than 255 bytes",  # 200 characters, 400 bytes
}


@pytest.mark.parametrize(("name", "reason"), list(HOSTILE_OBJECTS.items()), ids=lambda v: ascii(v)[:40])
def test_fetch_batch_refuses_hostile_object_names(
    landing_bucket: LandingBucket, tmp_path: Path, name: str, reason: str
) -> None:
    lb = landing_bucket
    folder = "landing/NEWS/b1/"
    for rel, body in (("ok.jsonl", jsonl("fine")), (name, jsonl("evil")), ("_SUCCESS", b"")):
        lb.s3.put_object(Bucket=lb.bucket, Key=folder + rel, Body=body)
    (arrival,) = list_arrivals(lb.landing, s3=lb.s3)
    cache = tmp_path / "cache"
    with pytest.raises(LandingError, match=reason) as info:
        fetch_batch(arrival, cache / "NEWS-b1", s3=lb.s3)
    assert str(info.value).startswith("landing/NEWS/b1/_SUCCESS: object ")
    assert tree(tmp_path) == []  # nothing downloaded, nothing written anywhere under tmp_path
    assert not list(Path("/tmp").glob("evil*")) and not (tmp_path.parent / "evil.jsonl").exists()


def test_fetch_batch_keeps_odd_but_harmless_names_inside_the_cache(
    landing_bucket: LandingBucket, tmp_path: Path
) -> None:
    lb = landing_bucket
    odd = ["\uff0e\uff0e\uff0fx.jsonl", "x\\..\\..\\y.jsonl", "\u00e9t\u00e9 news.txt", "a..b.jsonl"]
    for rel in [*odd, "_SUCCESS"]:
        lb.s3.put_object(Bucket=lb.bucket, Key="landing/NEWS/b1/" + rel, Body=b"" if rel == "_SUCCESS" else jsonl("t"))
    (arrival,) = list_arrivals(lb.landing, s3=lb.s3)
    dest = fetch_batch(arrival, tmp_path / "cache" / "d", s3=lb.s3)
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == sorted(odd)
    assert all(p.resolve().parent == dest.resolve() for p in dest.iterdir())
    assert tree(tmp_path)[:2] == ["cache", "cache/d"]


# --- corpora --------------------------------------------------------------------------------------------


def gzip_of(chunk: bytes, times: int) -> bytes:
    """`chunk * times`, gzipped: one compressed member repeated (a valid multi-member gzip file)."""
    return gzip.compress(chunk, compresslevel=9) * times


def test_gzip_bomb_of_zeros_is_refused_without_expanding_it(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gzip_of(bytes(MB), 1024))  # 1 GiB of zeros in ~1 MB
    assert bomb.stat().st_size < 2 * MB
    tracemalloc.start()
    try:
        with pytest.raises(CorpusError, match=r"bomb\.jsonl\.gz, line 1: ") as info:
            load_corpus(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "decompression bomb" in str(info.value) or "line longer than" in str(info.value)
    assert peak < 64 * MB, f"peak {peak / MB:.0f} MB while refusing a 1 GiB bomb"


@pytest.mark.parametrize("name", ["bomb.jsonl.gz", "bomb.txt.gz", "bomb.csv.gz"])
def test_gzip_bomb_of_valid_lines_is_refused_by_the_ratio_cap(tmp_path: Path, name: str) -> None:
    """Blank 1 kB lines: each line passes every per-line check, so only the ratio cap stops the bomb."""
    bomb = tmp_path / name
    bomb.write_bytes(gzip_of((b" " * 1023 + b"\n") * 1024, 256))  # 256 MiB of blank lines in ~260 kB
    produced: list[int] = []
    real = loire.data._GzipGuard._check

    def spy(self: Any, data: bytes) -> bytes:
        produced.append(len(data))
        return real(self, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loire.data._GzipGuard, "_check", spy)
        with pytest.raises(
            CorpusError, match=rf"{name.replace('.', '[.]')}(, line \d+)?: gzip data expands more than"
        ) as info:
            load_corpus(tmp_path)
    assert "decompression bomb" in str(info.value)
    assert sum(produced) < loire.data.GZIP_RATIO_FLOOR + 2 * MB  # stopped right after the floor
    assert not list(tmp_path.glob("**/staged*"))  # the CSV staging copy is gone too


def test_ordinary_gzip_corpora_still_load(tmp_path: Path) -> None:
    texts = [f"document {i}: " + " ".join(f"word{j % 97}" for j in range(i, i + 400)) for i in range(3000)]
    (tmp_path / "part.jsonl.gz").write_bytes(gzip.compress(jsonl(*texts)))
    corpus = load_corpus(tmp_path, valid_fraction=0.0)
    assert len(corpus.train) == 3000  # ~8x compression: far under the ratio cap, past the floor


@pytest.mark.parametrize(
    ("name", "match"), [("huge.txt", "longer than max_document_chars"), ("huge.jsonl", "line longer than")]
)
def test_huge_single_line_is_refused_with_bounded_memory(tmp_path: Path, name: str, match: str) -> None:
    with open(tmp_path / name, "wb") as f:
        f.write(b'{"text": "')
        for _ in range(50):
            f.write(b"a" * MB)  # 50 MB, no newline
    tracemalloc.start()
    try:
        with pytest.raises(CorpusError, match=rf"{name.replace('.', '[.]')}, line 1: .*{match}"):
            load_corpus(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * MB, f"peak {peak / MB:.0f} MB for a 50 MB line"


def png_bytes() -> bytes:
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * 4 for _ in range(4))
    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def xlsx_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        z.writestr(
            "xl/worksheets/sheet1.xml", "<worksheet><sheetData><row><c><v>1</v></c></row></sheetData></worksheet>"
        )
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("image.txt", png_bytes(), r"image\.txt, line 1: invalid UTF-8"),
        ("image.jsonl", png_bytes(), r"image\.jsonl, line 1: invalid UTF-8"),
        (
            "array.jsonl",
            json.dumps([{"text": "a"}, {"text": "b"}]).encode(),
            r"array\.jsonl, line 1: expected a JSON object, got list",
        ),
        ("pretty.jsonl", json.dumps([{"text": "a"}], indent=2).encode(), r"pretty\.jsonl, line 1: broken JSON"),
        ("sheet.csv", xlsx_bytes(), r"sheet\.csv, line 1: binary data: NUL byte"),
        ("sheet.xlsx", xlsx_bytes(), r"no data files \(accepted extensions"),
        ("utf16.txt", "hello world\n".encode("utf-16"), r"utf16\.txt, line 1: (invalid UTF-8|binary data)"),
        ("image.parquet", png_bytes(), r"image\.parquet: not a readable PARQUET file"),
        ("image.txt.gz", png_bytes(), r"image\.txt\.gz, line 1: corrupt gzip data"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v and len(v) < 20 else "",
)
def test_unexpected_formats_raise_corpus_error(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError, match=match):
        load_corpus(tmp_path)


# --- pickles ---------------------------------------------------------------------------------------------


class Canary:
    """Unpickling this creates `path`: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def write_pickle_weights(folder: Path, canary: Path) -> None:
    torch.save({"model.embed_tokens.weight": Canary(canary)}, folder / "pytorch_model.bin")


def test_load_model_refuses_pickle_weights(tmp_path: Path) -> None:
    from loire import LoireForCausalLM, preset

    folder = tmp_path / "model"
    model = LoireForCausalLM(preset("gpt-tiny", vocab_size=64, hidden_size=16, intermediate_size=32, head_dim=8))
    model.save_pretrained(folder, safe_serialization=True)
    canary = tmp_path / "unpickled"
    write_pickle_weights(folder, canary)
    # Both files present: the safetensors weights are loaded, the pickle is never opened.
    assert isinstance(load_model(folder), LoireForCausalLM) and not canary.exists()
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model: no \.safetensors weights \(found \['pytorch_model\.bin'\]: pickle"):
        load_model(folder)
    assert not canary.exists()
    # The pickle renamed to model.safetensors: refused on its header, naming the file, never unpickled.
    (folder / "pytorch_model.bin").rename(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model/model\.safetensors: not a valid safetensors file \(.*header"):
        load_model(folder)
    assert not canary.exists()


# Calls that deserialise with pickle (or build arbitrary objects) whatever their arguments.
PICKLE_LOADERS = frozenset(
    {"pickle.load", "pickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
     "joblib.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load"}
)  # fmt: skip


def _unsafe(name: str, kw: dict[str | None, ast.expr]) -> bool:
    def const(arg: str, value: object) -> bool:
        node = kw.get(arg)
        return isinstance(node, ast.Constant) and node.value is value

    if name in ("torch.load", "torch.serialization.load"):
        return not const("weights_only", True)
    if name in ("np.load", "numpy.load"):
        return "allow_pickle" in kw and not const("allow_pickle", False)
    return name in PICKLE_LOADERS or const("trust_remote_code", True) or const("use_safetensors", False)


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls in `source` that can execute code from a file: torch.load without weights_only=True, pickle,
    yaml.load, numpy.load(allow_pickle=True), from_pretrained(trust_remote_code=True / use_safetensors=False)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call) and _unsafe(ast.unparse(node.func), {k.arg: k.value for k in node.keywords}):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_no_unsafe_deserialisation_in_loire_and_flows() -> None:
    files = sorted([*(REPO / "loire").rglob("*.py"), *(REPO / "flows").rglob("*.py")])
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_loads(f.read_text(), str(f.relative_to(REPO)))]
    assert found == []
    # The scanner itself catches what it is meant to catch.
    bad = (
        "import torch, pickle, yaml\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\nyaml.load(s)\n"
        "AutoModel.from_pretrained(d, trust_remote_code=True)\nM.from_pretrained(d, use_safetensors=False)\n"
        "torch.load(p, weights_only=True)\nyaml.safe_load(s)\n"
    )
    assert [hit.split(":")[1] for hit in unsafe_loads(bad, "bad.py")] == ["2", "3", "4", "5", "6", "7"]
    from_import = "from torch import load\nload(p)\n"
    assert not unsafe_loads(from_import, "x.py")  # documented limit: only dotted calls are checked


# --- tokenizer files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{broken", "not a valid JSON file"),
        (b"", "not a valid JSON file"),
        (b"\xff\xfe\x00garbage", "not a valid JSON file"),
        (
            b'{"version": "1.0", "model": {"type": "NoSuchModel"}}',
            "not a tokenizer.json the tokenizers library can read",
        ),
        (b"[1, 2, 3]", "not a tokenizer.json the tokenizers library can read"),
    ],
)
def test_load_tokenizer_names_a_corrupt_file(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"{tmp_path}/tokenizer\.json: {match}"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_names_a_corrupt_tokenizer_config(tmp_path: Path) -> None:
    from loire.tokenizer import train_tokenizer

    train_tokenizer(["some text to train on", "and a little more text"], vocab_size=300).save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).eos_token == "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": ')
    with pytest.raises(ValueError, match=rf"{tmp_path}/tokenizer_config\.json: cannot load the tokenizer folder"):
        load_tokenizer(tmp_path)


# --- a stage flow whose parent (the champion's downloaded folder) is corrupt ----------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> dict[str, Any]:
    """Version 1 registered and promoted by a real stage flow (local landing, SQLite MLflow)."""
    root = tmp_path_factory.mktemp("hostile-flow")
    world = local_world(root, documents=120, task_examples=12, steps=2, downstream_tasks="none", max_ap_plus=None)
    first = lifelong_stage(arrive(world, "WB"), world["settings"])
    assert first["version"] == "1" and first["promoted"]
    return world


def registry_state(tracker: Tracker) -> tuple[list[str], dict[str, str]]:
    versions = sorted(str(v.version) for v in tracker.client.search_model_versions("name='loire-lm'"))
    aliases = tracker.client.get_registered_model("loire-lm").aliases
    return versions, {k: str(v) for k, v in aliases.items()}


def test_stage_with_a_corrupt_champion_tokenizer_fails_and_registers_nothing(world: dict[str, Any]) -> None:
    settings: PipelineSettings = world["settings"]
    tracker = Tracker(tracking_uri=settings.tracking_uri)
    before = registry_state(tracker)
    assert before == (["1"], {"champion": "1", "candidate": "1"})
    # The stage flow downloads the champion to <work>/models/loire-lm/v1 and reuses a complete download.
    parent = tracker.download_stage("champion", Path(settings.work_dir) / "models" / "loire-lm" / "v1")
    (parent / "tokenizer.json").write_text('{"version": "1.0", "truncation": null, "model": {"type": "BPE", "vocab": ')

    with pytest.raises(ValueError, match=rf"{parent}/tokenizer\.json: not a valid JSON file"):
        lifelong_stage(arrive(world, "NEWS"), settings)

    assert registry_state(tracker) == before
    runs = tracker.client.search_runs([tracker.experiment_id()], "tags.`loire.domain` = 'NEWS'")
    assert [r.info.status for r in runs] == ["FAILED"]
    stages = Path(settings.work_dir) / "stages"
    assert not [p.name for p in stages.iterdir() if "NEWS" in p.name]


def test_run_stage_refuses_a_parent_with_pickle_weights(world: dict[str, Any], tmp_path: Path) -> None:
    stages = Path(world["settings"].work_dir) / "stages"
    good = next(p for p in stages.iterdir() if p.name.startswith("WB-") and p.is_dir())
    parent = tmp_path / "parent"
    shutil.copytree(good, parent)
    (parent / "model.safetensors").unlink()
    canary = tmp_path / "unpickled"
    write_pickle_weights(parent, canary)
    out = tmp_path / "out"
    corpus = world["data"] / "corpora" / "rev"
    with pytest.raises(ValueError, match=r"parent: no \.safetensors weights \(found \['pytorch_model\.bin'\]: pickle"):
        run_stage("REV", str(corpus), out, parent=parent, schedule="gpt-micro", steps=1, device="cpu", progress=False)
    assert not canary.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]
