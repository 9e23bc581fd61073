"""Growth schedules: YAML round trip, validation errors that name their field, presets and their sizes."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from loire.schedule import DOMAINS, SCHEDULES, Schedule, StageSpec, schedule_preset

YAML = """
preset: gpt-tiny
seed: 3
tokenizer_vocab_size: 512
overrides: {hidden_size: 64, intermediate_size: 256, num_attention_heads: 2, head_dim: 32, num_hidden_layers: 2,
            max_position_embeddings: 128}
defaults: {lr: 1e-3, batch_size: 4, block_size: 32}
stages:
  - {domain: WB, steps: 10, warmup_steps: 2}
  - {domain: NEWS, grow: {hidden: 128}, steps: 10, distill_steps: 5}
  - {domain: REV, grow: {ffn: 512}, steps: 10, distill_steps: 5, beta: [0.25, 0.75], temperature: 2.0}
  - {domain: BIO, grow: {heads: 4}, steps: 10, lr: 5.0e-4}
  - {domain: CS, grow: {layers: 4, hidden: 128}, steps: 10, max_train_tokens: 1000}
"""


def dims(config) -> tuple[int, int, int, int]:
    return (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_hidden_layers)


def test_yaml_loads_with_defaults_and_simulated_sizes() -> None:
    s = Schedule.from_yaml(YAML)
    assert s.domains == ("WB", "NEWS", "REV", "BIO", "CS")
    assert s.seed == 3 and s.lambda_mode == "scheduled"
    assert s.stages[0].lr == 1e-3  # PyYAML reads "1e-3" as a string; accepted as a number
    assert s.stages[3].lr == 5e-4 and s.stages[3].batch_size == 4
    assert s.stages[2].beta == (0.25, 0.75) and s.stages[2].temperature == 2.0
    assert s.stages[0].grow == {} and s.stages[4].grow == {"hidden": 128, "layers": 4}
    assert dims(s.initial_config()) == (64, 256, 2, 2)
    assert [dims(s.config_at(i)) for i in range(5)] == [
        (64, 256, 2, 2),
        (128, 256, 2, 2),
        (128, 512, 2, 2),
        (128, 512, 4, 2),
        (128, 512, 4, 4),
    ]
    final = s.final_config()
    assert final.vocab_size == 512 and final.head_dim == 32 and final.plugin_lambda_mode == "scheduled"
    assert s.stages[1].beta is None  # uniform 1/(t−1), applied by the distillation (loire.lifelong.teacher_betas)
    s.config_at(0).hidden_size = 999  # a copy: the schedule is not changed
    assert s.config_at(0).hidden_size == 64
    with pytest.raises(ValueError, match=r"stage_index=5 must be an int in \[0, 5\)"):
        s.config_at(5)


def test_yaml_round_trip_text_and_file(tmp_path: Path) -> None:
    s = Schedule.from_yaml(YAML)
    again = Schedule.from_yaml(s.to_yaml())
    assert again == s
    assert Schedule.from_dict(s.to_dict()) == s
    path = tmp_path / "schedule.yaml"
    path.write_text(s.to_yaml(), encoding="utf-8")
    assert Schedule.from_yaml(path) == s
    assert Schedule.from_yaml(str(path)) == s
    assert yaml.safe_load(s.to_yaml()) == s.to_dict()  # plain types only
    for name, preset in SCHEDULES.items():
        assert Schedule.from_yaml(preset.to_yaml()) == preset, name


def base() -> dict[str, Any]:
    return yaml.safe_load(YAML)


def _set(d: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


_DELETE = object()

CASES: list[tuple[tuple, Any, str]] = [
    (
        ("stages", 2, "grow", "width"),
        9,
        r"^stages\[2\]\.grow\.width: unknown dimension; allowed: hidden, ffn, heads, layers$",
    ),
    (("stages", 1, "steps"), 0, r"^stages\[1\]\.steps: must be an int >= 1"),
    (("stages", 1, "steps"), "many", r"^stages\[1\]\.steps: must be an int >= 1"),
    (("stages", 1, "steps"), True, r"^stages\[1\]\.steps: must be an int >= 1"),
    (("stages", 1, "stepz"), 3, r"^stages\[1\]: unknown key\(s\) \['stepz'\]"),
    (("stages", 0, "domain"), _DELETE, r"^stages\[0\]\.domain: required"),
    (("defaults", "lr"), _DELETE, r"^stages\[0\]\.lr: required"),
    (("defaults", "lr"), "fast", r"^stages\[0\]\.lr: must be a number"),
    (("defaults", "learning_rate"), 1.0, r"^defaults: unknown key\(s\) \['learning_rate'\]"),
    (("stages", 1, "lr"), -1.0, r"^stages\[1\]\.lr: must be a finite number > 0"),
    (("stages", 1, "warmup_steps"), 11, r"^stages\[1\]\.warmup_steps: must be <= steps \(10\)"),
    (("stages", 1, "warmup_steps"), -1, r"^stages\[1\]\.warmup_steps: must be an int >= 0"),
    (("stages", 1, "distill_steps"), 11, r"^stages\[1\]\.distill_steps: must be <= steps \(10\)"),
    (("stages", 0, "distill_steps"), 1, r"^stages\[0\]\.distill_steps: must be 0 at the first stage"),
    (("stages", 2, "beta"), [1.0], r"^stages\[2\]\.beta: needs 2 weight\(s\), one per earlier stage; got 1"),
    (("stages", 2, "beta"), [1.0, -0.5], r"^stages\[2\]\.beta\[1\]: must be a finite number >= 0"),
    (("stages", 2, "beta"), "uniform", r"^stages\[2\]\.beta: must be null"),
    (("stages", 2, "temperature"), 0, r"^stages\[2\]\.temperature: must be a finite number > 0"),
    (("stages", 2, "batch_size"), 0, r"^stages\[2\]\.batch_size: must be an int >= 1"),
    (("stages", 2, "block_size"), 1, r"^stages\[2\]\.block_size: must be an int >= 2"),
    (("stages", 2, "block_size"), 129, r"^stages\[2\]\.block_size: 129 exceeds max_position_embeddings \(128\)"),
    (("stages", 4, "max_train_tokens"), 0, r"^stages\[4\]\.max_train_tokens: must be an int >= 1"),
    (("stages", 3, "grow", "heads"), 4.5, r"^stages\[3\]\.grow\.heads: must be an int >= 1"),
    (("stages", 3, "grow"), [4], r"^stages\[3\]\.grow: must map a dimension"),
    (("stages", 3, "grow", "hidden"), 96, r"^stages\[3\]\.grow\.hidden: 96 would shrink hidden_size from 128"),
    (("stages", 2, "grow", "ffn"), 128, r"^stages\[2\]\.grow\.ffn: 128 would shrink intermediate_size from 256"),
    (("stages", 3, "domain"), "WB", r"^stages\[3\]\.domain: 'WB' is already trained at stages\[0\]"),
    (("stages", 3, "domain"), "", r"^stages\[3\]\.domain: must be a non-empty str"),
    (("stages", 0), "WB", r"^stages\[0\]: must be a mapping"),
    (("stages",), [], r"^stages: must hold at least one stage"),
    (("stages",), "WB", r"^stages: must be a list"),
    (("preset",), "gpt-huge", r"^preset: unknown preset 'gpt-huge'; allowed: gpt-tiny, bert-tiny"),
    (("preset",), _DELETE, r"^preset: required"),
    (("color",), "red", r"^schedule: unknown key\(s\) \['color'\]; allowed: preset, stages"),
    (("seed",), -1, r"^seed: must be an int >= 0"),
    (("lambda_mode",), "fixed", r"^lambda_mode: unknown mode 'fixed'; allowed: scheduled, learned"),
    (("tokenizer_vocab_size",), 0, r"^tokenizer_vocab_size: must be an int >= 2"),
    (("overrides", "vocab_size"), 100, r"^overrides\.vocab_size: not allowed here; set tokenizer_vocab_size"),
    (("overrides", "plugin_layers"), [0], r"^overrides\.plugin_layers: not allowed here"),
    (("overrides", "widht"), 3, r"^overrides\.widht: unknown LoireConfig field"),
    (("overrides", "hidden_size"), 0, r"^overrides: LoireConfig\.hidden_size=0 must be an int >= 1"),
    (("overrides",), [1], r"^overrides: must map LoireConfig fields"),
]


@pytest.mark.parametrize(
    ("path", "value", "match"),
    CASES,
    ids=[f"{'.'.join(map(str, c[0]))}={'<deleted>' if c[1] is _DELETE else repr(c[1])}" for c in CASES],
)
def test_every_validation_error_names_its_field(path: tuple, value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule.from_dict(_set(base(), path, value))


def test_every_field_error_of_a_yaml_is_reported_in_one_line() -> None:
    data = _set(base(), ("stages", 1, "steps"), True)
    data = _set(data, ("stages", 3, "grow", "width"), 2)
    data["stages"][4].update(stepz=1, lr_decay=0.5)  # a mapping's unknown keys come together
    data["color"] = "red"
    with pytest.raises(ValueError) as err:
        Schedule.from_yaml(yaml.safe_dump(data, sort_keys=False))
    assert str(err.value) == (
        "stages[1].steps: must be an int >= 1, got True; "
        "stages[3].grow.width: unknown dimension; allowed: hidden, ffn, heads, layers; "
        "stages[4]: unknown key(s) ['stepz', 'lr_decay']; allowed: domain, grow, steps, warmup_steps, "
        "distill_steps, beta, temperature, lr, batch_size, block_size, max_train_tokens, plan, flops_budget; "
        "schedule: unknown key(s) ['color']; allowed: preset, stages, seed, lambda_mode, tokenizer_vocab_size, "
        "overrides, defaults"
    )


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("stages", 1, "batch_size"), True, r"^stages\[1\]\.batch_size: must be an int >= 1, got True$"),
        (("stages", 1, "steps"), "10", r"^stages\[1\]\.steps: must be an int >= 1, got '10'$"),  # ints stay strict
        (("stages", 1, "plan"), 1, r"^stages\[1\]\.plan: must be true \(.*\) or false, got 1$"),
        (("stages", 2, "beta"), [True, 0.5], r"^stages\[2\]\.beta\[0\]: must be a finite number >= 0, got True$"),
        (("stages", 2, "temperature"), "nan", r"^stages\[2\]\.temperature: must be a finite number > 0, got nan$"),
    ],
)
def test_bools_are_not_numbers_and_ints_are_not_strings(path: tuple, value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule.from_dict(_set(base(), path, value))


def test_numeric_strings_are_numbers_in_a_mapping_only() -> None:
    data = _set(_set(base(), ("stages", 1, "lr"), "5e-4"), ("stages", 2, "beta"), ["0.25", 0.75])
    s = Schedule.from_dict(data)
    assert s.stages[1].lr == 5e-4 and s.stages[2].beta == (0.25, 0.75)
    stage = {"domain": "WB", "steps": 2, "lr": "1e-3", "batch_size": 2, "block_size": 8}
    assert StageSpec.from_dict(stage).lr == 1e-3
    with pytest.raises(ValueError, match=r"^StageSpec\.lr: must be a finite number > 0, got '1e-3'$"):
        StageSpec(**stage)
    with pytest.raises(ValueError, match=r"^stages\[7\]: unknown key\(s\) \['lr_decay'\]"):
        StageSpec.from_dict({**stage, "lr_decay": 0.5}, path="stages[7]")


def test_growth_to_the_current_size_is_allowed() -> None:
    data = _set(base(), ("stages", 3, "grow", "hidden"), 128)  # no-op target equal to the current size
    assert dims(Schedule.from_dict(data).config_at(3)) == (128, 512, 4, 2)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("preset: [unclosed", "invalid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("no_such_schedule.yaml", "not a file"),
    ],
)
def test_from_yaml_rejects_bad_text(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule.from_yaml(text)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match=r"^StageSpec\.steps: must be an int >= 1"):
        StageSpec(domain="WB", steps=0, lr=1e-3, batch_size=2, block_size=8)
    stage = StageSpec(domain="WB", steps=5, lr=1, batch_size=2, block_size=8, beta=[0.5])
    assert stage.lr == 1.0 and isinstance(stage.lr, float) and stage.beta == (0.5,)
    with pytest.raises(ValueError, match=r"^stages\[0\]\.beta: needs 0 weight"):
        Schedule("gpt-tiny", (stage,))
    with pytest.raises(ValueError, match=r"^stages\[1\]: must be a StageSpec"):
        Schedule("gpt-tiny", (dataclasses.replace(stage, beta=None), {"domain": "NEWS"}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.steps = 6


# --------------------------------------------------------------------------- presets


def test_every_ladder_preset_is_checked_and_the_others_are_its_variants() -> None:
    """The planned / reverse presets are the ladders' FLOP-matched variants (tests/test_planner.py)."""
    variants = {n for n in SCHEDULES if n.endswith(("-planned", "-reverse"))}
    assert set(SCHEDULES) - variants == set(EXPECTED_DIMS)
    assert all(n.rsplit("-", 1)[0] in SCHEDULES for n in variants)


EXPECTED_DIMS = {
    "gpt-tiny": [(64, 256, 2, 2), (128, 256, 2, 2), (128, 512, 2, 2), (128, 512, 4, 2), (128, 512, 4, 4)],
    "gpt-tiny-long": [(64, 256, 2, 2), (128, 256, 2, 2), (128, 512, 2, 2), (128, 512, 4, 2), (128, 512, 4, 4)],
    "bert-tiny": [(64, 256, 2, 2), (128, 256, 2, 2), (128, 512, 2, 2), (128, 512, 4, 2), (128, 512, 4, 4)],
    "gpt-micro": [(32, 128, 2, 1), (48, 128, 2, 1), (48, 192, 2, 1), (48, 192, 3, 1), (48, 192, 3, 2)],
    "gpt2-gpu": [(384, 1536, 6, 6), (768, 1536, 6, 6), (768, 3072, 6, 6), (768, 3072, 12, 6), (768, 3072, 12, 12)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_presets_follow_hidden_ffn_mha_layer_order(name: str) -> None:
    s = schedule_preset(name)
    assert s.domains == DOMAINS
    assert [dims(s.config_at(i)) for i in range(len(s))] == EXPECTED_DIMS[name]
    assert [tuple(stage.grow) for stage in s.stages] == [(), ("hidden",), ("ffn",), ("heads",), ("layers",)]
    assert s.stages[0].distill_steps == 0 and all(stage.distill_steps > 0 for stage in s.stages[1:])
    if name == "gpt2-gpu":
        assert all(stage.beta is None for stage in s.stages)  # uniform default
    else:  # tiny presets: uniform teachers with a total weight of 4
        assert all(sum(stage.beta) == pytest.approx(4.0) for stage in s.stages[1:])
    final = s.final_config()
    assert final.attention_size == final.hidden_size  # heads × head_dim meets the hidden size at the end


def test_preset_final_configs() -> None:
    tiny = schedule_preset("gpt-tiny")
    final = tiny.final_config()
    assert (final.vocab_size, final.head_dim, final.max_position_embeddings, final.is_causal) == (4096, 32, 128, True)
    assert sum(stage.steps for stage in tiny.stages) <= 1000  # a few CPU minutes
    assert all(100 <= stage.steps <= 300 and stage.block_size == 64 for stage in tiny.stages)
    assert schedule_preset("bert-tiny").final_config().is_causal is False
    gpu = schedule_preset("gpt2-gpu")
    final = gpu.final_config()
    assert dims(final) == (768, 3072, 12, 12) and final.head_dim == 64  # GPT-2 small
    assert final.norm_position == "pre" and final.tie_word_embeddings
    assert all(stage.steps >= 10_000 for stage in gpu.stages)
    assert gpu.stages[0].block_size <= final.max_position_embeddings


def test_schedule_preset_renames_domains_and_rejects_bad_input() -> None:
    s = schedule_preset("gpt-tiny", domains=["wb", "news", "rev", "bio", "cs"])
    assert s.domains == ("wb", "news", "rev", "bio", "cs")
    assert dims(s.final_config()) == (128, 512, 4, 4)
    assert SCHEDULES["gpt-tiny"].domains == DOMAINS  # the preset itself is unchanged
    with pytest.raises(ValueError, match="unknown schedule preset 'nope'; allowed: gpt-tiny"):
        schedule_preset("nope")
    with pytest.raises(ValueError, match="list of 5 domain names"):
        schedule_preset("gpt-tiny", domains=["wb"])
    with pytest.raises(ValueError, match=r"stages\[4\]\.domain: 'wb' is already trained"):
        schedule_preset("gpt-tiny", domains=["wb", "news", "rev", "bio", "wb"])
