import pytest
import torch
from typer.testing import CliRunner

import loire
from loire.cli import app
from loire.io import load_model, save_model_atomic
from tests.conftest import build

runner = CliRunner()


@pytest.fixture
def saved(tmp_path):
    model = build("gpt-tiny", loire.LoireForCausalLM, dtype=torch.float32)
    path = tmp_path / "m1"
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")
    return path


def test_grow_writes_a_grown_model_and_reports_the_difference(saved, tmp_path) -> None:
    dst = tmp_path / "m2"
    result = runner.invoke(
        app, ["grow", str(saved), str(dst), "--hidden", "33", "--layers", "3", "--heads", "4", "--ffn", "40"]
    )
    assert result.exit_code == 0, result.output
    assert "max |Δlogits|" in result.output
    grown = load_model(dst)
    assert (grown.config.hidden_size, grown.config.num_hidden_layers) == (33, 3)
    assert (dst / "tokenizer.json").is_file()
    diff = float(result.output.split("probe batch:")[1].split()[0])
    assert diff < 1e-4


def test_inspect_shows_config_params_flops_and_devices(saved, tmp_path) -> None:
    runner.invoke(app, ["grow", str(saved), str(tmp_path / "g"), "--layers", "3"])
    result = runner.invoke(app, ["inspect", str(tmp_path / "g")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("hidden_size", "parameters", "FLOPs/token", "plug-in layers", "2: 1"):
        assert text in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["grow", "{src}", "{dst}", "--hidden", "8"], "shrink"),
        (["grow", "{src}", "{src}", "--hidden", "80"], "contains the source"),
        (["inspect", "{missing}"], "no config.json"),
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_is_written(saved, tmp_path, args: list[str], message: str) -> None:
    dst = tmp_path / "never"
    args = [a.format(src=saved, dst=dst, missing=tmp_path / "missing") for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not dst.exists()


def test_pickle_weights_are_refused(tmp_path) -> None:
    model = build("gpt-tiny", loire.LoireForCausalLM, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "pickle" in result.output


def test_atomic_save_replaces_only_when_complete(tmp_path, monkeypatch) -> None:
    model = build("gpt-tiny", loire.LoireForCausalLM, dtype=torch.float32)
    dst = save_model_atomic(model, tmp_path / "m")
    before = (dst / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError):
        save_model_atomic(model, dst)
    assert (dst / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("where", ["equal", "parent", "unrelated"])
def test_grow_never_deletes_the_source_or_a_users_files(saved, tmp_path, where: str) -> None:
    """DST equal to SRC, containing SRC, or holding other files is refused (exit 2, one line); nothing is lost."""
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    dst = {"equal": saved, "parent": tmp_path, "unrelated": other}[where]
    before = sorted(p.name for p in dst.iterdir())
    result = runner.invoke(app, ["grow", str(saved), str(dst), "--ffn", "40"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) <= 2 and "Traceback" not in result.output
    assert sorted(p.name for p in dst.iterdir()) == before
    assert (saved / "config.json").is_file() and (other / "keep.txt").read_text() == "mine"


def test_grow_replaces_an_earlier_model_folder(saved, tmp_path) -> None:
    dst = tmp_path / "m2"
    assert runner.invoke(app, ["grow", str(saved), str(dst), "--ffn", "40"]).exit_code == 0
    result = runner.invoke(app, ["grow", str(saved), str(dst), "--ffn", "48"])
    assert result.exit_code == 0, result.output
    assert load_model(dst).config.intermediate_size == 48


def test_grow_keeps_the_generation_config(saved, tmp_path) -> None:
    model = load_model(saved)
    model.generation_config.eos_token_id = 3
    model.generation_config.max_new_tokens = 7
    grown = loire.grow.grow(model, ffn=48)
    assert (grown.generation_config.eos_token_id, grown.generation_config.max_new_tokens) == (3, 7)


@pytest.mark.parametrize("case", ["missing", "pickle", "inside"])
def test_import_hf_refuses_bad_input_in_one_line(tmp_path, case: str) -> None:
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "hf"
    if case != "missing":
        config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
        transformers.GPT2LMHeadModel(config).save_pretrained(src)
    if case == "pickle":
        torch.save({"x": torch.zeros(2)}, src / "model.safetensors")  # a pickle under the safetensors name
    dst = src if case == "inside" else tmp_path / "out"
    result = runner.invoke(app, ["import-hf", str(src), str(dst)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2
    expected = {"missing": "no such folder", "pickle": "not a valid safetensors", "inside": "contains the source"}
    assert expected[case] in " ".join(result.output.split())
    if case == "inside":
        assert (src / "model.safetensors").is_file()
