import pytest

import loire
from loire import LoireConfig
from loire.config import ARCHITECTURE_FIELDS, PRESETS
from loire.model import num_parameters


@pytest.mark.parametrize("name", ["gpt-tiny", "bert-tiny", "llama-tiny"])
def test_tiny_presets_are_cpu_sized(name: str) -> None:
    config = loire.preset(name)
    model = loire.LoireForCausalLM(config) if config.is_causal else loire.LoireForMaskedLM(config)
    assert 1_000_000 <= num_parameters(model) <= 5_000_000


def test_families() -> None:
    gpt, bert, llama = loire.preset("gpt-tiny"), loire.preset("bert-tiny"), loire.preset("llama-tiny")
    assert (gpt.norm_position, gpt.norm_type, gpt.position_embedding_type, gpt.mlp_type) == (
        "pre",
        "layernorm",
        "learned",
        "gelu",
    )
    assert gpt.is_causal and gpt.tie_word_embeddings
    assert bert.norm_position == "post" and not bert.is_causal and bert.embedding_norm
    assert (llama.norm_type, llama.position_embedding_type, llama.mlp_type) == ("rmsnorm", "rope", "swiglu")
    assert {"gpt2", "bert-base"} <= set(PRESETS)
    assert loire.preset("gpt2").hidden_size == 768


def test_head_dim_is_independent() -> None:
    config = LoireConfig(hidden_size=64, num_attention_heads=3, head_dim=16)
    assert config.attention_size == 48


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("norm_type", "batchnorm", "layernorm"),
        ("norm_position", "middle", "pre"),
        ("position_embedding_type", "alibi", "rope"),
        ("mlp_type", "relu2", "swiglu"),
        ("hidden_size", 0, ">= 1"),
        ("num_attention_heads", 2.5, "int"),
        ("norm_eps", -1.0, "> 0"),
        ("is_causal", "yes", "bool"),
        ("plugin_lambda_mode", "random", "learned"),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        LoireConfig(**{field: value})
    assert allowed in str(info.value)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="gpt-tiny"):
        loire.preset("gpt-huge")


def test_saved_config_is_complete_and_reloads(tmp_path) -> None:
    config = loire.preset("llama-tiny")
    config.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    for field in ARCHITECTURE_FIELDS:
        assert f'"{field}"' in text
    again = LoireConfig.from_pretrained(tmp_path)
    assert all(getattr(again, f) == getattr(config, f) for f in ARCHITECTURE_FIELDS)


def test_config_missing_a_field_is_an_error() -> None:
    data = loire.preset("gpt-tiny").to_dict()
    del data["norm_position"]
    with pytest.raises(ValueError, match="norm_position"):
        LoireConfig.from_dict(data)


def test_replace_validates() -> None:
    config = loire.preset("gpt-tiny")
    with pytest.raises(ValueError, match="hidden_size"):
        config.replace(hidden_size=-3)
    with pytest.raises(ValueError, match="no field"):
        config.replace(hiden_size=3)
    assert config.replace(hidden_size=256).hidden_size == 256
    assert config.hidden_size == 128


def test_plugin_layers_must_exist() -> None:
    with pytest.raises(ValueError, match="plugin_layers"):
        LoireConfig(num_hidden_layers=2, plugin_layers=[5])
