"""Lifelong growth of an existing HF checkpoint (GPT-2, BERT, Llama) built locally: stage 0 import,
relative schedules, exact vocabulary growth for prompt tokens, refusals of bad bases, CLI end to end."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loire.base import import_base, weights_sha256
from loire.cli import app
from loire.config import preset
from loire.grow.vocab import grow_vocab
from loire.io import load_model
from loire.lifelong import read_stage, run_stage
from loire.model import LoireForCausalLM, LoireForMaskedLM
from loire.schedule import Schedule, resolve_growth, schedule_preset
from loire.tokenizer import DOMAIN_TOKENS, load_tokenizer
from tests.conftest import DATA_ROOT
from tests.hf_bases import BAD_BASES, BASE_FAMILIES, TEXT_FILE, make_bad_base, make_base

CORPORA = DATA_ROOT / "corpora"
needs_data = pytest.mark.skipif(not TEXT_FILE.is_file(), reason=f"real text not found at {TEXT_FILE}")
runner = CliRunner()
# The contract tests' bound on max |Δlogits| for exact growth (tests/test_grow.py: float32, relative 1e-4).
GROWTH_BOUND = 1e-4


def small_from_base(steps: int = 5) -> Schedule:
    """The from-base preset at seconds per stage: a small token budget."""
    d = schedule_preset("from-base").to_dict()
    for stage in d["stages"]:
        stage.update(steps=steps, warmup_steps=1, max_train_tokens=8_192, block_size=32, batch_size=4)
        stage["distill_steps"] = min(stage["distill_steps"], steps)
    return Schedule.from_dict(d)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not TEXT_FILE.is_file():
        pytest.skip(f"real text not found at {TEXT_FILE}")
    root = tmp_path_factory.mktemp("bases")
    return {family: make_base(family, root / family) for family in BASE_FAMILIES}


# ------------------------------------------------------------------------------ relative schedules
def test_relative_targets_resolve_against_the_model() -> None:
    config = preset("gpt-tiny", hidden_size=64, head_dim=16, num_attention_heads=4, intermediate_size=256)
    assert resolve_growth({"hidden": "x1.25", "ffn": "x1.25", "heads": "+1", "layers": "+2"}, config) == {
        "hidden": 80,
        "ffn": 320,
        "heads": 5,
        "layers": config.num_hidden_layers + 2,
    }
    assert resolve_growth({"hidden": "x1.1"}, config) == {"hidden": 80}  # rounded up to whole heads
    assert resolve_growth({"hidden": 96}, config) == {"hidden": 96}  # absolute targets pass through


def test_relative_targets_are_validated_naming_the_field() -> None:
    config = preset("gpt-tiny", hidden_size=64, head_dim=16)
    with pytest.raises(ValueError, match=r"stages\[0\]\.grow\.hidden: \+8 is not a multiple of head_dim \(16\)"):
        resolve_growth({"hidden": "+8"}, config, "stages[0].grow")
    d = schedule_preset("from-base").to_dict()
    d["stages"][1]["grow"] = {"ffn": "x0.5"}
    with pytest.raises(ValueError, match=r"stages\[1\]\.grow\.ffn: a ratio must be >= 1"):
        Schedule.from_dict(d)
    d["stages"][1]["grow"] = {"ffn": "double"}
    with pytest.raises(ValueError, match=r"stages\[1\]\.grow\.ffn: must be a new total"):
        Schedule.from_dict(d)


def test_from_base_preset_follows_the_papers_order() -> None:
    grows = [list(s.grow) for s in schedule_preset("from-base").stages]
    assert grows == [["hidden"], ["ffn"], ["heads"], ["layers"], []]
    assert Schedule.from_yaml(schedule_preset("from-base").to_yaml()) == schedule_preset("from-base")


# ------------------------------------------------------------------------------ vocabulary growth
@pytest.mark.parametrize("head", [LoireForCausalLM, LoireForMaskedLM])
@pytest.mark.parametrize("tied", [True, False])
def test_vocab_growth_keeps_every_old_logit(head, tied: bool) -> None:
    family = "gpt-tiny" if head is LoireForCausalLM else "bert-tiny"
    torch.manual_seed(0)
    model = head(preset(family, vocab_size=50, hidden_size=16, head_dim=8, num_attention_heads=2,
                        intermediate_size=32, num_hidden_layers=1, max_position_embeddings=16,
                        tie_word_embeddings=tied)).eval()  # fmt: skip
    grown = grow_vocab(model, 55)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        old, new = model(input_ids=ids).logits, grown(input_ids=ids).logits
    assert new.shape[-1] == 55 and torch.equal(old, new[..., :50])
    with pytest.raises(ValueError, match="vocab_size"):
        grow_vocab(model, 10)


# ------------------------------------------------------------------------------ import and refusals
def test_import_base_writes_stage_zero(bases: dict[str, Path], tmp_path: Path) -> None:
    record = import_base(bases["gpt2"], tmp_path / "s0")
    assert record["stage"] == 0 and record["lineage"] == [] and read_stage(tmp_path / "s0")["stage"] == 0
    assert record["base"]["source"] == str(bases["gpt2"])
    assert record["base"]["sha256"] == weights_sha256(bases["gpt2"]) and len(record["base"]["sha256"]) == 64
    assert record["base"]["import_max_abs_logit_diff"] < 1e-4
    assert load_tokenizer(tmp_path / "s0").get_vocab() == load_tokenizer(bases["gpt2"]).get_vocab()


@pytest.mark.parametrize(
    ("case", "message"),
    BAD_BASES.items(),
)
def test_a_bad_base_is_refused_in_one_line(bases: dict[str, Path], tmp_path: Path, case: str, message: str) -> None:
    bad = make_bad_base(case, bases["gpt2"], tmp_path / "bad")
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["lifelong", "--base", str(bad), "--corpora", str(CORPORA), "--domains", "WB", "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


# ------------------------------------------------------------------------------ two stages per family
def _check_two_stages(family: str, base: Path, out: Path, *, prompts: bool) -> None:
    s0 = read_stage(out / "stage-0-base")
    s1, s2 = read_stage(out / "stage-1-WB"), read_stage(out / "stage-2-NEWS")
    assert s0["stage"] == 0 and (s1["stage"], s2["stage"]) == (1, 2)
    for record in (s1, s2):
        assert record["base"]["source"] == str(base) and record["base"]["sha256"] == weights_sha256(base)
    base_vocab = load_tokenizer(base).get_vocab()
    vocab = load_tokenizer(out / "stage-1-WB").get_vocab()
    added = set(vocab) - set(base_vocab)
    assert {k: vocab[k] for k in base_vocab} == base_vocab
    assert added == (set(DOMAIN_TOKENS) if prompts else set())
    if not prompts:  # exact growth: within the contract tests' bound against the base
        assert s1["growth"]["max_abs_logit_diff"] < GROWTH_BOUND, s1["growth"]
    assert s1["growth"]["targets"] == {"hidden": 48}  # 32 x 1.25 = 40, rounded up to whole heads of 16
    assert s2["growth"]["targets"] == {"ffn": 80}
    assert set(s2["ppl"]) == {"WB", "NEWS"} and set(s2["ppl_init"]) == {"WB", "NEWS"}
    model = load_model(out / "stage-2-NEWS")
    assert isinstance(model, LoireForMaskedLM if family == "bert" else LoireForCausalLM)


@needs_data
@pytest.mark.slow  # 50-80 s each on the shared 2-core machine (real WB corpus encoded, 2 stages)
@pytest.mark.integration
@pytest.mark.parametrize("family", BASE_FAMILIES)
def test_lifelong_from_each_family_through_the_cli(bases: dict[str, Path], tmp_path: Path, family: str) -> None:
    schedule = tmp_path / "s.yaml"
    schedule.write_text(small_from_base().to_yaml())
    out = tmp_path / "run"
    args = ["lifelong", "--base", str(bases[family]), "--corpora", str(DATA_ROOT), "--domains", "WB,NEWS",
            "--out", str(out), "--steps", "5", "--schedule", str(schedule), "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "init" in result.output and "final" in result.output
    _check_two_stages(family, bases[family], out, prompts=False)
    summary = json.loads((out / "lifelong.json").read_text())
    assert summary["base"]["sha256"] == weights_sha256(bases[family])


@needs_data
def test_train_stage_from_a_base_then_from_its_parent(bases: dict[str, Path], tmp_path: Path) -> None:
    schedule = tmp_path / "s.yaml"
    schedule.write_text(small_from_base().to_yaml())
    common = ["--schedule", str(schedule), "--steps", "3", "--device", "cpu"]
    first = runner.invoke(app, ["train-stage", "--domain", "WB", "--corpus", str(CORPORA / "wb"), "--out",
                                str(tmp_path / "stage-1-WB"), "--base", str(bases["llama"]), *common])  # fmt: skip
    assert first.exit_code == 0, first.output
    parent = str(tmp_path / "stage-1-WB")
    second = runner.invoke(app, ["train-stage", "--domain", "NEWS", "--corpus", str(CORPORA / "news"), "--out",
                                 str(tmp_path / "stage-2-NEWS"), "--parent", parent, *common])  # fmt: skip
    assert second.exit_code == 0, second.output
    s2 = read_stage(tmp_path / "stage-2-NEWS")
    assert s2["base"]["source"] == str(bases["llama"]) and s2["lineage"][0]["domain"] == "WB"
    both = runner.invoke(app, ["train-stage", "--domain", "WB", "--corpus", str(CORPORA / "wb"), "--out",
                               str(tmp_path / "x"), "--base", str(bases["llama"]), "--parent", parent])  # fmt: skip
    assert both.exit_code == 2 and "only one" in both.output


@needs_data
def test_elle_on_a_base_adds_prompt_tokens_with_exact_vocab_growth(bases: dict[str, Path], tmp_path: Path) -> None:
    base = bases["bert"]
    import_base(base, tmp_path / "stage-0-base")
    result = run_stage("WB", str(CORPORA / "wb"), tmp_path / "stage-1-WB", parent=tmp_path / "stage-0-base",
                       schedule=small_from_base(), strategy="elle", steps=2, progress=False, device="cpu")  # fmt: skip
    vocab = load_tokenizer(tmp_path / "stage-1-WB").get_vocab()
    base_vocab = load_tokenizer(base).get_vocab()
    assert set(vocab) - set(base_vocab) == set(DOMAIN_TOKENS)
    assert {k: vocab[k] for k in base_vocab} == base_vocab
    assert load_model(tmp_path / "stage-1-WB").config.vocab_size == len(vocab)
    assert result.record["base"]["sha256"] == weights_sha256(base)
