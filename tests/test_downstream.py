"""Downstream fine-tuning: catalogue, task data (real and malformed), metrics vs scikit-learn, weights, CLI."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import loire
from loire.cli import app
from loire.downstream import (
    DEFAULT_CATALOGUE,
    CatalogueError,
    Example,
    TaskData,
    TaskDataError,
    TaskFailure,
    TaskResult,
    _stage_strategy,
    accuracy,
    apply_budget,
    encode,
    evaluate_downstream,
    finetune_task,
    load_catalogue,
    load_classifier,
    load_task_data,
    macro_f1,
    majority_baseline,
    micro_f1,
)
from loire.io import load_model
from loire.tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import DATA_ROOT, tiny_lm

runner = CliRunner()
REAL_DATA = pytest.mark.skipif(
    not (DATA_ROOT / "acl_arc").is_dir(), reason=f"downstream task data not found under {DATA_ROOT}"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, above all on a machine shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- metrics
METRIC_CASES = [
    ([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], [0, 1, 2]),
    ([0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1]),  # a label never predicted
    ([0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 2, 3]),  # labels absent from both (count as 0 in macro)
    (["a", "b", "c", "a"], ["a", "c", "c", "b"], ["a", "b", "c"]),
    ([1, 2, 3, 1, 2], [1, 1, 1, 1, 1], [2, 3]),  # a subset of labels (micro differs from accuracy)
]


@pytest.mark.parametrize(("y_true", "y_pred", "labels"), METRIC_CASES)
def test_metrics_match_scikit_learn(y_true: list, y_pred: list, labels: list) -> None:
    sklearn = pytest.importorskip("sklearn.metrics")
    assert accuracy(y_true, y_pred) == pytest.approx(sklearn.accuracy_score(y_true, y_pred))
    for average, ours in (("macro", macro_f1), ("micro", micro_f1)):
        expected = sklearn.f1_score(y_true, y_pred, labels=labels, average=average, zero_division=0)
        assert ours(y_true, y_pred, labels=labels) == pytest.approx(expected), average
        default = sklearn.f1_score(y_true, y_pred, average=average, zero_division=0)
        assert ours(y_true, y_pred) == pytest.approx(default), average


def test_metrics_hand_values_and_bad_input() -> None:
    # label 0: tp 2 fp 1 fn 0 → 0.8; label 1: tp 0 fp 0 fn 1 → 0; label 2 absent → 0.
    assert macro_f1([0, 0, 1], [0, 0, 0], labels=[0, 1, 2]) == pytest.approx(0.8 / 3)
    assert micro_f1([0, 0, 1], [0, 0, 0], labels=[0, 1, 2]) == pytest.approx(2 / 3) == accuracy([0, 0, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="2 items but y_pred has 1"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no examples"):
        macro_f1([], [])


# ----------------------------------------------------------------------------------------- catalogue
DSP_METRICS = {
    "mnli": "accuracy",
    "qnli": "accuracy",
    "hyperpartisan": "macro_f1",
    "ag_news": "macro_f1",
    "amazon": "macro_f1",
    "imdb": "macro_f1",
    "chemprot": "micro_f1",
    "rct_substitute_nicta_piboso": "micro_f1",
    "acl_arc": "macro_f1",
    "sciie": "macro_f1",
}


def test_catalogue_has_the_ten_dsp_tasks() -> None:
    catalogue = load_catalogue()
    assert {name: spec.metric for name, spec in catalogue.items()} == DSP_METRICS
    assert [s.domain for s in catalogue.values()] == [
        "WB",
        "WB",
        "NEWS",
        "NEWS",
        "REV",
        "REV",
        "BIO",
        "BIO",
        "CS",
        "CS",
    ]
    assert {n for n, s in catalogue.items() if s.is_stand_in} == {"amazon", "rct_substitute_nicta_piboso"}
    assert "helpfulness" in catalogue["amazon"].substitute
    for name in ("ag_news", "hyperpartisan", "amazon", "imdb", "mnli"):
        assert catalogue[name].split_rule is not None, name
    assert catalogue["chemprot"].num_labels == 13 and catalogue["ag_news"].label_names[3] == "Sci/Tech"


def test_select_tasks_by_name_alias_and_all() -> None:
    from loire.downstream import select_tasks

    catalogue = load_catalogue()
    assert [s.name for s in select_tasks(catalogue, "all")] == list(DSP_METRICS)
    chosen = select_tasks(catalogue, "rct, acl_arc,rct_substitute_nicta_piboso")
    assert [s.name for s in chosen] == ["rct_substitute_nicta_piboso", "acl_arc"]
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        select_tasks(catalogue, "acl_arc,nope")


def _catalogue_dict() -> dict:
    return yaml.safe_load(DEFAULT_CATALOGUE.read_text())


@pytest.mark.parametrize(
    ("task", "change", "message"),
    [
        ("acl_arc", {"domain": "LAW"}, "task 'acl_arc', field 'domain': 'LAW' is not one of"),
        ("acl_arc", {"metric": "f1"}, "task 'acl_arc', field 'metric'"),
        ("sciie", {"labels": ["A", "A"]}, "task 'sciie', field 'labels': repeats ['A']"),
        ("ag_news", {"split_rule": {"from": "all", "into": {"train": 0.7, "dev": 0.1}}}, "fractions must sum to 1"),
        (
            "chemprot",
            {"files": {"train": "chemprot/train.jsonl"}},
            "task 'chemprot', field 'files': no ['dev', 'test']",
        ),
        ("rct_substitute_nicta_piboso", {"epochs": 0}, "task 'rct_substitute_nicta_piboso', field 'epochs'"),
        ("imdb", {"colour": "red"}, "task 'imdb', field 'colour': unknown field"),
    ],
)
def test_catalogue_errors_name_task_and_field(tmp_path: Path, task: str, change: dict, message: str) -> None:
    raw = _catalogue_dict()
    raw["tasks"][task].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CatalogueError, match=r"bad\.yaml") as info:
        load_catalogue(path)
    assert message in str(info.value)


# ------------------------------------------------------------------------------------ real task data
EXPECTED = {  # train, dev, test; labels present in train
    "mnli": ((8126, 873, 1000), 3),
    "qnli": ((8999, 1000, 5463), 2),
    "hyperpartisan": ((514, 59, 72), 2),
    "ag_news": ((5289, 748, 1563), 4),
    "amazon": ((804, 196, 1000), 5),
    "imdb": ((802, 198, 1000), 2),
    "chemprot": ((4169, 2427, 3469), 13),
    "rct_substitute_nicta_piboso": ((6979, 801, 1991), 6),
    "acl_arc": ((1688, 114, 139), 6),
    "sciie": ((3219, 455, 974), 7),
}


@pytest.mark.integration
@REAL_DATA
@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_task_loads_from_shared_data(name: str) -> None:
    spec = load_catalogue()[name]
    data = load_task_data(spec, DATA_ROOT)
    counts, train_labels = EXPECTED[name]
    assert tuple(data.counts().values()) == counts
    assert len({e.label for e in data.train}) == train_labels == spec.num_labels
    assert all(isinstance(e.text, str) and e.text for e in data.train + data.dev + data.test)
    assert all((e.text_pair is not None) == (name in ("mnli", "qnli")) for e in data.test)
    if spec.split_rule is not None:  # hash split: no input text in two splits, same result twice
        texts = [{(e.text, e.text_pair) for e in data.split(s)} for s in ("train", "dev", "test")]
        assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
        assert load_task_data(spec, DATA_ROOT) == data
    capped = apply_budget(data, 300)
    assert capped.counts() == {"train": min(300, counts[0]), "dev": min(200, counts[1]), "test": min(500, counts[2])}
    assert 0.0 < majority_baseline(spec, capped) < 1.0


@pytest.mark.integration
@REAL_DATA
def test_ag_news_escapes_are_undone() -> None:
    data = load_task_data(load_catalogue()["ag_news"], DATA_ROOT)
    texts = [e.text for e in data.train + data.dev + data.test]
    assert not any("#39;" in t or "\\" in t for t in texts)


# --------------------------------------------------------------------------------- toy tasks, model
WORDS = {
    "pos": ["good", "great", "fine", "lovely", "happy", "bright", "superb", "nice"],
    "neg": ["bad", "awful", "poor", "sad", "grim", "dull", "terrible", "nasty"],
}


def _toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = [rng.choice(WORDS[label]) for _ in range(5)] + [rng.choice(WORDS["pos"] + WORDS["neg"])]
        rows.append({"sentence": " ".join(words) + f" item {i}", "sentiment": label})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def _toy_task(name: str, files: dict, **fields: object) -> dict:
    return {
        "domain": "REV",
        "paper_task": f"toy sentiment ({name})",
        "files": files,
        "text": "sentence",
        "label": "sentiment",
        "labels": ["neg", "pos"],
        "metric": "macro_f1",
        "max_length": 32,
        "epochs": 3,
        "lr": 3e-3,
        "patience": 2,
        "seeds": [0],
        **fields,
    }


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with a good toy task and one broken task per malformation, plus their catalogue."""
    root = tmp_path_factory.mktemp("toy-data")
    for split, (n, seed) in {"train": (96, 0), "dev": (32, 1), "test": (40, 2)}.items():
        _write_jsonl(root / "good" / f"{split}.jsonl", _toy_rows(n, seed))
    good = {s: f"good/{s}.jsonl" for s in ("train", "dev", "test")}
    no_label = _toy_rows(8, 3)
    del no_label[1]["sentiment"]
    _write_jsonl(root / "bad" / "no_label.jsonl", no_label)
    odd_test = _toy_rows(8, 4)
    odd_test[4]["sentiment"] = "neutral"
    _write_jsonl(root / "bad" / "odd_test.jsonl", odd_test)
    no_text = _toy_rows(8, 5)
    no_text[2] = {"text": no_text[2]["sentence"], "sentiment": "pos"}
    _write_jsonl(root / "bad" / "no_text.jsonl", no_text)
    (root / "bad" / "empty.jsonl").write_text("\n")
    tasks = {
        "good": _toy_task("good", good),
        "missing_label": _toy_task("missing_label", {**good, "train": "bad/no_label.jsonl"}),
        "odd_test_label": _toy_task("odd_test_label", {**good, "test": "bad/odd_test.jsonl"}),
        "empty_dev": _toy_task("empty_dev", {**good, "dev": "bad/empty.jsonl"}),
        "missing_file": _toy_task("missing_file", {**good, "test": "bad/nowhere.jsonl"}),
        "missing_text": _toy_task("missing_text", {**good, "train": "bad/no_text.jsonl"}),
        "hashed": _toy_task(
            "hashed",
            {"all": "good/train.jsonl"},
            split_rule={"from": "all", "into": {"train": 0.6, "dev": 0.2, "test": 0.2}},
        ),
    }
    (root / "toy.yaml").write_text(yaml.safe_dump({"version": 1, "tasks": tasks}))
    return root


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory: pytest.TempPathFactory, toy_root: Path) -> Path:
    """A small causal Loire model and its byte-level tokenizer, saved like a stage folder."""
    folder = tmp_path_factory.mktemp("toy-model")
    texts = [r["sentence"] for r in _toy_rows(200, 9)]
    tok = train_tokenizer(texts, vocab_size=300)
    dims = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, intermediate_size=64)
    tiny_lm(tok, max_position_embeddings=64, **dims).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _toy_catalogue(root: Path) -> dict:
    return load_catalogue(root / "toy.yaml")


@pytest.mark.parametrize(
    ("task", "fragments"),
    [
        ("missing_label", ["no_label.jsonl, line 2", "train split", "missing label field 'sentiment'"]),
        ("odd_test_label", ["odd_test.jsonl, line 5", "test split", "label 'neutral'", "not in the label set"]),
        ("empty_dev", ["empty.jsonl", "dev split is empty"]),
        ("missing_file", ["bad/nowhere.jsonl: no such file", "test split"]),
        ("missing_text", ["no_text.jsonl, line 3", "missing text field 'sentence'"]),
    ],
)
def test_malformed_task_data_names_file_and_row(toy_root: Path, task: str, fragments: list[str]) -> None:
    spec = _toy_catalogue(toy_root)[task]
    with pytest.raises(TaskDataError) as info:
        load_task_data(spec, toy_root)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_hash_split_rule_divides_a_file(toy_root: Path) -> None:
    data = load_task_data(_toy_catalogue(toy_root)["hashed"], toy_root)
    assert sum(data.counts().values()) == 96 and min(data.counts().values()) > 5
    assert "hash split" in data.sources["dev"]


def test_transformer_weights_are_loaded_and_head_is_fresh(toy_model: Path) -> None:
    lm = load_model(toy_model)
    clf = load_classifier(toy_model, 3, seed=0)
    for name, value in lm.loire_base.state_dict().items():
        assert torch.equal(clf.model.state_dict()[name], value), name
    fresh = loire.LoireForSequenceClassification(lm.config.replace(num_labels=3))
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    same, other = load_classifier(toy_model, 3, seed=0), load_classifier(toy_model, 3, seed=1)
    assert torch.equal(clf.classifier.weight, same.classifier.weight)
    assert not torch.equal(clf.classifier.weight, other.classifier.weight)
    assert clf.classifier.weight.shape == (3, lm.config.hidden_size) and clf.classifier.weight.abs().max() > 0


def test_encode_truncates_pairs_and_ends_with_eos(toy_model: Path) -> None:
    tok = load_tokenizer(toy_model)
    long_a, short_b = "good " * 40, "bad day"
    rows = encode([Example(long_a, short_b, 0), Example("fine", None, 1)], tok, 16, prompt_id=7)
    assert len(rows[0]) == 16 and rows[0][0] == 7 and rows[0][-1] == tok.eos_token_id
    b_ids = tok(short_b, add_special_tokens=False)["input_ids"]
    assert rows[0][-1 - len(b_ids) : -1] == b_ids  # the short text survives, the long one is cut
    assert rows[1][-1] == tok.eos_token_id and len(rows[1]) < 16
    masked = encode([Example("fine", None, 1)], tok, 16, is_causal=False)
    assert masked[0][0] == tok.eos_token_id


def test_finetune_learns_toy_task_and_reports(toy_root: Path, toy_model: Path) -> None:
    spec = _toy_catalogue(toy_root)["good"]
    data = load_task_data(spec, toy_root)
    logs: list[dict[str, float]] = []
    result = finetune_task(toy_model, spec, data, seeds=[0, 1], on_log=lambda m, step: logs.append(m))
    assert isinstance(result, TaskResult) and result.seeds == (0, 1) and len(result.scores) == 2
    assert result.mean > 0.8 > result.majority, result
    assert (result.n_train, result.n_dev, result.n_test) == (96, 32, 40) and result.max_length == 32
    assert any("downstream/good/dev_macro_f1" in m for m in logs)
    json.dumps(result.to_dict())


def test_evaluate_downstream_keeps_going_past_broken_tasks(toy_root: Path, toy_model: Path) -> None:
    catalogue = _toy_catalogue(toy_root)
    names = ["missing_label", "good", "odd_test_label", "empty_dev", "missing_file"]
    small = {n: dataclasses.replace(catalogue[n], epochs=1) for n in names}
    results = evaluate_downstream(toy_model, names, toy_root, budget=40, catalogue=small)
    assert [r.task for r in results] == names
    assert [r.ok for r in results] == [False, True, False, False, False]
    failures = {r.task: r.error for r in results if isinstance(r, TaskFailure)}
    assert "no_label.jsonl, line 2" in failures["missing_label"]
    assert "odd_test.jsonl, line 5" in failures["odd_test_label"] and "'neutral'" in failures["odd_test_label"]
    assert "nowhere.jsonl" in failures["missing_file"]
    assert results[1].n_train == 40 and results[1].budget == 40
    with pytest.raises(ValueError, match="unknown \\['nope'\\]"):
        evaluate_downstream(toy_model, "good,nope", toy_root, catalogue=small)


def test_elle_stage_gets_domain_prompt(tmp_path: Path) -> None:
    (tmp_path / "stage.json").write_text(json.dumps({"strategy": "elle"}))
    assert _stage_strategy(tmp_path) == "elle" and _stage_strategy(tmp_path / "none") is None


def test_cli_eval_downstream_table_json_and_failures(toy_root: Path, toy_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    args = ["eval-downstream", str(toy_model), "--data-root", str(toy_root), "--catalogue", str(toy_root / "toy.yaml")]
    result = runner.invoke(app, [*args, "--tasks", "good", "--budget", "40", "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "good" in result.output and "majority" in result.output and "±" in result.output
    record = json.loads(out.read_text())
    assert record["results"][0]["task"] == "good" and record["failures"] == [] and record["budget"] == 40
    result = runner.invoke(app, [*args, "--tasks", "missing_file", "--budget", "40"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "nowhere.jsonl" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, [*args, "--tasks", "nope"])
    assert result.exit_code == 2 and "unknown ['nope']" in result.output


# ------------------------------------------------------------------------------ real end to end
@pytest.mark.integration
@REAL_DATA
@pytest.mark.skipif(not (DATA_ROOT / "corpora" / "cs").is_dir(), reason=f"CS corpus not found under {DATA_ROOT}")
def test_acl_arc_beats_majority_from_a_real_stage(tmp_path: Path) -> None:
    """A (briefly trained) CS stage model, fine-tuned on ACL-ARC at a tiny budget, beats the majority class."""
    from loire.lifelong import run_stage
    from tests.test_lifelong import small_schedule

    stage = tmp_path / "s1"
    run_stage("CS", str(DATA_ROOT / "corpora" / "cs"), stage, schedule=small_schedule(steps=12), progress=False)
    spec = dataclasses.replace(load_catalogue()["acl_arc"], epochs=10, patience=10, max_length=64)
    data = load_task_data(spec, DATA_ROOT)
    result = finetune_task(stage, spec, data, seeds=[0], budget=300)
    assert result.n_train == 300 and result.metric == "macro_f1"
    assert result.majority == pytest.approx(majority_baseline(spec, apply_budget(data, 300)))
    assert 0.1 < result.majority < 0.12  # "Background" everywhere: F1 0.68 on one label of six
    assert result.mean > result.majority + 0.03, result


def test_task_data_is_comparable() -> None:
    a = TaskData("t", [Example("x", None, 0)], [Example("y", None, 1)], [Example("z", None, 0)])
    assert apply_budget(a, 10) == a
