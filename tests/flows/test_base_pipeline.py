"""A pipeline that starts from a base model (issue 11, `LOIRE_BASE_MODEL`): the base is imported exactly and
registered as version 1 (stage 0, the champion), the arrivals grow from it; a wrong-format base is refused in one
line before anything is registered. In-process stage flows (Prefect server, SQLite MLflow, local landing zone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.landing import fetch_model_folder
from flows.stage import lifelong_stage
from flows.tracking import Tracker
from loire.base import weights_sha256
from loire.lifelong import read_stage
from tests.flows.pipeline_harness import arrive, local_world
from tests.hf_bases import BAD_BASES, TEXT_FILE, make_bad_base, make_base

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not TEXT_FILE.is_file():
        pytest.skip(f"real text not found at {TEXT_FILE} (the tiny base's tokenizer is trained on it)")
    return make_base("gpt2", tmp_path_factory.mktemp("base") / "gpt2")


def _world(root: Path, base_model: Path) -> dict[str, Any]:
    # from-base: growth relative to the base; 3 steps per stage, no downstream tasks, no AP+ gate (untrained stages)
    return local_world(
        root,
        documents=60,
        task_examples=8,
        schedule="from-base",
        steps=3,
        downstream_tasks="none",
        max_ap_plus=None,
        base_model=str(base_model),
    )


def test_the_base_is_version_1_and_two_arrivals_grow_from_it(base: Path, tmp_path: Path, prefect_api: str) -> None:
    world = _world(tmp_path, base)
    settings = world["settings"]
    tracker = Tracker(tracking_uri=settings.tracking_uri)
    wb = lifelong_stage(arrive(world, "WB"), settings)
    news = lifelong_stage(arrive(world, "NEWS"), settings)
    assert (wb["version"], wb["stage"], news["version"], news["stage"]) == ("2", 1, "3", 2)
    v1, v2, v3 = sorted(tracker.client.search_model_versions("name='loire-lm'"), key=lambda v: int(v.version))
    assert v1.tags["loire.stage"] == "0" and v1.tags["loire.base"] == str(base)
    assert v1.tags["loire.parent_version"] == "none" and v1.tags["loire.covers"] == ""
    assert [v.tags["loire.parent_version"] for v in (v2, v3)] == ["1", "2"]
    assert v3.tags["loire.covers"] == "WB,NEWS" and str(tracker.champion().version) == "3"
    assert [e["stage"] for e in tracker.lineage("champion")] == [0, 1, 2]
    first = read_stage(tracker.download_stage("2", tmp_path / "v2"))
    assert first["base"]["source"] == str(base) and first["base"]["sha256"] == weights_sha256(base)
    assert first["parent"]["stage"] == 0 and first["dims"]["hidden_size"] == 48  # 32 x1.25 in whole heads


def test_a_wrong_format_base_is_refused_and_nothing_registered(base: Path, tmp_path: Path, prefect_api: str) -> None:
    # One case here: the stage flow passes loire.base's refusal on as it is (all cases: tests/test_base.py).
    world = _world(tmp_path, make_bad_base("pickle", base, tmp_path / "bad"))
    with pytest.raises(ValueError, match=BAD_BASES["pickle"]) as refused:
        lifelong_stage(arrive(world, "WB"), world["settings"])
    assert len(str(refused.value).splitlines()) == 1
    assert Tracker(tracking_uri=world["settings"].tracking_uri).client.search_model_versions("name='loire-lm'") == []


def test_a_base_under_an_s3_prefix_is_fetched_once(base: Path, tmp_path: Path, moto_server: Any) -> None:
    s3 = moto_server.client("s3")
    s3.create_bucket(Bucket="bases")
    for f in base.iterdir():
        s3.put_object(Bucket="bases", Key=f"team/gpt2/{f.name}", Body=f.read_bytes())
    local = fetch_model_folder("s3://bases/team/gpt2/", tmp_path / "cache", s3=s3)
    assert weights_sha256(local) == weights_sha256(base) and (local / "tokenizer.json").is_file()
    assert fetch_model_folder("s3://bases/team/gpt2", tmp_path / "cache", s3=s3) == local  # reused, not fetched again
