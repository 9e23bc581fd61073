"""Stages end to end: real WB → NEWS integration, bad input, NaN, atomic output."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loire.cli import app
from loire.data import encode_corpus, load_corpus
from loire.io import load_model
from loire.lifelong import read_stage, run_stage
from loire.metrics import perplexity
from loire.schedule import Schedule, schedule_preset
from loire.tokenizer import load_tokenizer
from tests.conftest import DATA_ROOT

CORPORA = DATA_ROOT / "corpora"
runner = CliRunner()


def small_schedule(steps: int = 12, lr: float = 2e-3) -> Schedule:
    """The gpt-tiny ladder shrunk to seconds: few steps, small token budget and vocabulary."""
    d = schedule_preset("gpt-tiny").to_dict()
    d["tokenizer_vocab_size"] = 512
    for stage in d["stages"]:
        stage.update(steps=steps, warmup_steps=2, max_train_tokens=16_384, lr=lr)
        stage["distill_steps"] = min(stage["distill_steps"], steps)
    return Schedule.from_dict(d)


def write_corpus(folder: Path, seed: int, docs: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    words = ["river", "model", "grows", "stage", "domain", "token", "learn", "forget", "data", "news"]
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(docs):
        text = " ".join(words[i] for i in torch.randint(0, len(words), (80,), generator=g).tolist())
        lines.append(json.dumps({"text": text}))
    (folder / "part.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_stage_folder_lineage_and_metrics(tmp_path: Path) -> None:
    a, b = write_corpus(tmp_path / "a", 0), write_corpus(tmp_path / "b", 1)
    kd = dict(schedule=small_schedule(), strategy="loire-kd", progress=False)  # the record of the teachers too
    s1 = run_stage("WB", str(a), tmp_path / "s1", **kd)
    s2 = run_stage("NEWS", str(b), tmp_path / "s2", parent=tmp_path / "s1", **kd)
    record = read_stage(tmp_path / "s2")
    assert (s1.stage, s2.stage) == (1, 2)
    assert [e["domain"] for e in record["lineage"]] == ["WB", "NEWS"]
    assert set(s2.ppl) == {"WB", "NEWS"} and s2.ap_plus is not None
    assert record["growth"]["targets"] == {"hidden": 128}
    assert s2.growth_max_abs_logit_diff < 1e-4
    assert record["distill"]["teachers"] == 1
    assert record["flops"]["cumulative"] == pytest.approx(s1.flops + s2.flops)
    model = load_model(tmp_path / "s2")
    assert model.config.hidden_size == 128 and model.config.plugin_layers == []
    assert (tmp_path / "s2" / "tokenizer.json").is_file()
    assert not (tmp_path / ".s2.checkpoints").exists()


def test_a_carried_domain_is_seen_by_the_later_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NEWS, carried into stage 1 (its own stage was not promoted), is replayed and measured in stage 2 like WB."""
    import loire.lifelong as lifelong
    from loire.metrics import learnt_perplexity

    wb, news, bio = (write_corpus(tmp_path / name, seed) for seed, name in enumerate(("wb", "news", "bio")))
    sched = small_schedule(steps=4)
    s1 = run_stage(
        "WB",
        str(wb),
        tmp_path / "s1",
        schedule=sched,
        progress=False,
        max_eval_blocks=4,
        extra_corpora={"NEWS": str(news)},
        extra_sources={"NEWS": "s3://landing/NEWS/b1/"},
    )
    assert s1.record["lineage"][-1]["carried"] == [{"domain": "NEWS", "corpus_uri": "s3://landing/NEWS/b1/"}]
    assert set(s1.ppl) == {"WB", "NEWS"} and s1.record["carried"][0]["ppl"] == s1.ppl["NEWS"]
    replayed: list[list[str]] = []
    earlier_data = lifelong._earlier_data

    def spy(plan, domain, where, tok, blocks):  # what the stage replays and evaluates as earlier domains
        out = earlier_data(plan, domain, where, tok, blocks)
        replayed.append(list(out.corpora))
        return out

    monkeypatch.setattr(lifelong, "_earlier_data", spy)
    s2 = run_stage(
        "BIO",
        str(bio),
        tmp_path / "s2",
        parent=tmp_path / "s1",
        schedule=sched,
        progress=False,
        max_eval_blocks=4,
        earlier_corpora={"NEWS": str(news)},  # the pipeline's local copy of the recorded s3:// URI
    )
    assert replayed == [["NEWS", "WB"]] and set(s2.ppl) == {"WB", "NEWS", "BIO"}
    assert s2.record["train"]["replay_ratio"] > 0  # replay on: its memory is drawn from those corpora
    ap, ap_plus = learnt_perplexity(s2.record["ppl_matrix"], [["NEWS", "WB"], ["BIO"]])
    assert (s2.ap, s2.ap_plus) == (pytest.approx(ap), pytest.approx(ap_plus))  # NEWS's rise counts in AP+
    assert s2.ap_plus == pytest.approx(((s2.ppl["WB"] - s1.ppl["WB"]) + (s2.ppl["NEWS"] - s1.ppl["NEWS"])) / 2)
    assert s2.record["carried"] == [] and "carried" not in s2.record["lineage"][-1]


def test_nan_stage_fails_and_leaves_parent_and_out_untouched(tmp_path: Path) -> None:
    a, b = write_corpus(tmp_path / "a", 0), write_corpus(tmp_path / "b", 1)
    run_stage("WB", str(a), tmp_path / "s1", schedule=small_schedule(), progress=False)
    parent_bytes = (tmp_path / "s1" / "model.safetensors").read_bytes()
    run_stage("NEWS", str(b), tmp_path / "s2", parent=tmp_path / "s1", schedule=small_schedule(), progress=False)
    existing = (tmp_path / "s2" / "model.safetensors").read_bytes()
    result = runner.invoke(
        app,
        ["train-stage", "--domain", "NEWS", "--corpus", str(b), "--out", str(tmp_path / "s2"),
         "--parent", str(tmp_path / "s1"), "--schedule", str(_exploding(tmp_path))],
    )  # fmt: skip
    assert result.exit_code == 2 and "non-finite" in result.output and "Traceback" not in result.output
    assert (tmp_path / "s1" / "model.safetensors").read_bytes() == parent_bytes
    assert (tmp_path / "s2" / "model.safetensors").read_bytes() == existing


def _exploding(tmp_path: Path) -> Path:
    d = small_schedule(steps=30, lr=1e7).to_dict()
    path = tmp_path / "explode.yaml"
    path.write_text(Schedule.from_dict(d).to_yaml())
    return path


def test_bad_corpus_is_one_line_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing model")
    result = runner.invoke(app, ["train-stage", "--domain", "WB", "--corpus", str(bad), "--out", str(out)])
    assert result.exit_code == 2
    assert "x.jsonl" in result.output and "line 2" in result.output and "Traceback" not in result.output
    assert (out / "keep.txt").read_text() == "existing model"


def test_truncated_gzip_corpus_is_one_line_saying_so_and_nothing_is_written(tmp_path: Path) -> None:
    """A `.txt.gz` cut short is a corrupt file, not a short corpus (issue 16, item 6)."""
    import gzip

    bad = tmp_path / "bad"
    bad.mkdir()
    data = gzip.compress(b"a document of the stream\n\n" * 2000)
    (bad / "part-0.txt.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = runner.invoke(app, ["train-stage", "--domain", "WB", "--corpus", str(bad), "--out", str(out)])
    assert result.exit_code == 2, result.output
    (line,) = [text for text in result.output.splitlines() if text.strip()]
    assert "part-0.txt.gz" in line and "corrupt gzip data: truncated" in line and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no stage folder, no checkpoints


@pytest.mark.integration
@pytest.mark.skipif(not (CORPORA / "wb").is_dir(), reason=f"real corpora not found under {CORPORA}")
@pytest.mark.slow  # ~1-2 min: real WB and NEWS text; tests/test_train_real.py covers learning from real text
def test_two_real_stages_wb_then_news(tmp_path: Path) -> None:
    """gpt-tiny on the real WB then NEWS corpora: exact growth, NEWS learned, WB within a bound."""
    schedule = schedule_preset("gpt-tiny")
    s1 = run_stage("WB", str(CORPORA / "wb"), tmp_path / "s1", schedule=schedule, steps=120, progress=False)
    tok = load_tokenizer(tmp_path / "s1")
    news_valid = encode_corpus(list(load_corpus(str(CORPORA / "news")).valid), tok, 64)[:32]
    news_before = perplexity(load_model(tmp_path / "s1"), news_valid)
    s2 = run_stage(
        "NEWS",
        str(CORPORA / "news"),
        tmp_path / "s2",
        parent=tmp_path / "s1",
        schedule=schedule,
        steps=120,
        progress=False,
    )
    assert s2.growth_max_abs_logit_diff is not None and s2.growth_max_abs_logit_diff < 1e-4
    assert s2.ppl["NEWS"] < 0.8 * news_before
    # Stated bound: with replay, WB perplexity after stage 2 stays within 2× its stage-1 value.
    assert s2.ppl["WB"] < 2.0 * s1.ppl["WB"], (s1.ppl, s2.ppl)


def test_lifelong_command_writes_table_json_and_plot(tmp_path: Path) -> None:
    root = tmp_path / "corpora"
    write_corpus(root / "wb", 0)
    write_corpus(root / "news", 1)
    schedule = tmp_path / "s.yaml"
    schedule.write_text(small_schedule(steps=6).to_yaml())
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["lifelong", "--corpora", str(root), "--domains", "WB,NEWS", "--strategy", "replay",
         "--schedule", str(schedule), "--out", str(out)],
        env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "AP+" in result.output and "2 NEWS" in result.output
    summary = json.loads((out / "lifelong.json").read_text())
    assert [s["domain"] for s in summary["stages"]] == ["WB", "NEWS"]
    assert (out / "ppl.png").stat().st_size > 1000
    missing = runner.invoke(app, ["lifelong", "--corpora", str(root), "--domains", "BIO", "--out", str(out / "x")])
    assert missing.exit_code == 2 and "BIO" in missing.output


@pytest.mark.parametrize(
    "strategy", ["loire", "loire-kd", "loire-er", "fixed-small", "fixed-large", "retrain", "token-kd", "replay", "elle"]
)
def test_every_strategy_runs_two_stages(tmp_path: Path, strategy: str) -> None:
    a, b = write_corpus(tmp_path / "a", 0), write_corpus(tmp_path / "b", 1)
    schedule = small_schedule(steps=4)
    s1 = run_stage("WB", str(a), tmp_path / "s1", schedule=schedule, strategy=strategy, progress=False)
    s2 = run_stage(
        "NEWS", str(b), tmp_path / "s2", parent=tmp_path / "s1", schedule=schedule, strategy=strategy, progress=False
    )
    record = read_stage(tmp_path / "s2")
    hidden = record["dims"]["hidden_size"]
    if strategy in ("fixed-small", "token-kd", "replay"):
        assert hidden == 64
    elif strategy in ("loire", "loire-kd", "loire-er", "elle"):
        assert hidden == 128 and read_stage(tmp_path / "s1")["dims"]["hidden_size"] == 64
    elif strategy in ("fixed-large", "retrain"):
        assert hidden == 128 and read_stage(tmp_path / "s1")["dims"]["hidden_size"] == 128
    if strategy in ("loire", "loire-kd", "loire-er"):
        assert s2.growth_max_abs_logit_diff < 1e-4
    expected = {"loire": 0.5, "loire-kd": 0.5, "loire-er": 0.5, "replay": 0.5, "elle": 0.1}.get(strategy, 0.0)
    assert record["train"]["replay_ratio"] == expected
    if strategy == "elle":
        assert s2.growth_max_abs_logit_diff > 1e-3  # bert2BERT-style expansion is not function-preserving
    if strategy == "retrain":
        assert record["train"]["steps"] == 2 * s1.record["train"]["steps"]
    assert (record["distill"] is not None) == (strategy in ("loire-kd", "loire-er", "token-kd"))
    assert s2.ap > 0 and s2.ap_plus is not None


def test_strategy_caps_the_distillation_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from loire.strategies import STRATEGIES

    capped = dataclasses.replace(STRATEGIES["loire-er"], distill_steps=2)
    monkeypatch.setitem(STRATEGIES, "loire-er", capped)
    a, b = write_corpus(tmp_path / "a", 0), write_corpus(tmp_path / "b", 1)
    schedule = small_schedule(steps=6)
    run_stage("WB", str(a), tmp_path / "s1", schedule=schedule, strategy="loire-er", progress=False)
    run_stage("NEWS", str(b), tmp_path / "s2", parent=tmp_path / "s1", schedule=schedule, strategy="loire-er")
    record = read_stage(tmp_path / "s2")
    assert schedule.stages[1].distill_steps == 6 and record["distill"]["distill_steps"] == 2


def test_strategy_sets_where_the_stage_learning_rate_decays_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Strategy.min_lr_ratio` (the LR re-decay lever): 1.0 keeps the stage's rate constant after warmup."""
    import dataclasses

    from loire.strategies import STRATEGIES

    constant = dataclasses.replace(STRATEGIES["replay"], name="replay-constlr", min_lr_ratio=1.0)
    monkeypatch.setitem(STRATEGIES, "replay-constlr", constant)
    a = write_corpus(tmp_path / "a", 0)
    schedule = small_schedule(steps=6, lr=2e-3)
    run_stage("WB", str(a), tmp_path / "c", schedule=schedule, strategy="replay-constlr", progress=False)
    run_stage("WB", str(a), tmp_path / "d", schedule=schedule, strategy="replay", progress=False)
    lrs = {k: [h["train/lr"] for h in read_stage(tmp_path / k)["train"]["history"]] for k in "cd"}
    assert lrs["c"][-1] == pytest.approx(2e-3) and lrs["d"][-1] == pytest.approx(2e-4)
    assert read_stage(tmp_path / "c")["train"]["min_lr_ratio"] == 1.0
    assert "min_lr_ratio" not in read_stage(tmp_path / "d")["train"]  # older records stay the same
    with pytest.raises(ValueError, match="min_lr_ratio"):
        dataclasses.replace(constant, min_lr_ratio=2.0)


def test_resume_reads_back_finished_stages_and_equals_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped after stage 1 (and mid-way through stage 2's training) continues to the same result."""
    import loire.lifelong as lifelong
    import loire.train as train_module

    root = tmp_path / "corpora"
    write_corpus(root / "wb", 0)
    write_corpus(root / "news", 1)
    run = dict(schedule=small_schedule(steps=8), strategy="loire", progress=False, max_eval_blocks=4)
    whole = lifelong.run_lifelong(str(root), ["WB", "NEWS"], tmp_path / "whole", **run)

    out = tmp_path / "cut"
    lifelong.run_lifelong(str(root), ["WB"], out, **run)
    stage_two = lifelong.checkpoint_dir(out / "stage-2-NEWS")
    real_checkpoint = train_module._checkpoint

    def stop_after_first_checkpoint(*args, **kwargs):  # the process dies right after a checkpoint is written
        real_checkpoint(*args, **kwargs)
        if stage_two.exists() and any(stage_two.iterdir()):
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_checkpoint", stop_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        lifelong.run_lifelong(str(root), ["WB", "NEWS"], out, **run)
    monkeypatch.setattr(train_module, "_checkpoint", real_checkpoint)
    ran: list[str] = []
    real_run_stage = lifelong.run_stage

    def counting_run_stage(domain, *args, **kwargs):
        ran.append(domain)
        return real_run_stage(domain, *args, **kwargs)

    monkeypatch.setattr(lifelong, "run_stage", counting_run_stage)
    resumed = lifelong.run_lifelong(str(root), ["WB", "NEWS"], out, resume=True, **run)

    assert ran == ["NEWS"] and resumed["read_back_stages"] == [1]
    assert read_stage(out / "stage-2-NEWS")["train"]["resumed_from"] > 0
    for a, b in zip(whole["stages"], resumed["stages"], strict=True):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6) and a["cumulative_flops"] == b["cumulative_flops"]
    with pytest.raises(ValueError, match=r"written by strategy 'loire' seed \d+, not 'replay'"):
        lifelong.run_lifelong(str(root), ["WB"], out, resume=True, **{**run, "strategy": "replay"})
