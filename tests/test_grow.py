"""Contract tests of the growth operators: exact, pure, seeded, no dead units, clear errors."""

import pytest
import torch
from hypothesis import strategies as st

import loire
from loire import LoireForCausalLM, LoireForMaskedLM, LoireForSequenceClassification
from loire.grow import OPERATORS, grow, grow_layers
from loire.grow.layers import spread_evenly
from tests.conftest import FAMILIES, assert_exact, build, every_family_and_head, logits, probe

FIELD = {name: field for name, (_, field) in OPERATORS.items()}
F64 = 1e-9  # float64: max |Δlogits| <= 1e-9 · max(1, max |logits|)
F32 = 1e-4  # float32, relative


def draw_targets(data: st.DataObject, config: loire.LoireConfig, max_add: dict[str, int]) -> dict[str, int]:
    dims = data.draw(st.sets(st.sampled_from(sorted(OPERATORS)), min_size=1), label="dimensions")
    targets = {}
    for name in sorted(dims):
        current = getattr(config, FIELD[name])
        targets[name] = data.draw(st.integers(current + 1, current + max_add[name]), label=name)
    return targets


ADD = {"hidden": 29, "ffn": 40, "heads": 4, "layers": 4}  # hidden 20 → up to 49: mostly non-integer ratios


@every_family_and_head(max_examples=12)
def test_growth_is_exact_alone_chained_and_regrown(family: str, head: type, data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = build(family, head, seed=seed)
    inputs = probe(model, seed=seed)
    reference = logits(model, inputs)

    grown = grow(model, **draw_targets(data, model.config, ADD), seed=seed)
    assert type(grown) is head
    assert_exact(reference, logits(grown, inputs), F64)

    # Devices partially open: the model computes something new; growing it again keeps *that* exact.
    grown.set_plugin_lambda(data.draw(st.floats(0.0, 1.0), label="lambda"))
    grown.open_hidden_mask(data.draw(st.floats(0.0, 1.0), label="mask"))
    current = logits(grown, inputs)
    regrown = grow(grown, **draw_targets(data, grown.config, ADD), seed=seed + 1)
    assert_exact(current, logits(regrown, inputs), F64)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_growth_is_exact_to_rounding(family: str) -> None:
    head = LoireForMaskedLM if family == "bert-tiny" else LoireForCausalLM
    model = build(
        family, head, dtype=torch.float32, hidden_size=128, head_dim=32, num_attention_heads=4, intermediate_size=256
    )
    inputs = probe(model, length=16)
    reference = logits(model, inputs)
    for targets in (
        {"hidden": 200},
        {"ffn": 333},
        {"heads": 7},
        {"layers": 5},
        {"hidden": 170, "ffn": 300, "heads": 5, "layers": 3},
    ):
        assert_exact(reference, logits(grow(model, **targets), inputs), F32)


def test_save_load_with_gates_and_mask_present(tmp_path, family: str) -> None:
    model = build(family, LoireForMaskedLM)
    grown = grow(model, layers=4, hidden=33)
    grown.set_plugin_lambda(0.3)
    grown.open_hidden_mask(0.6)
    grown.save_pretrained(tmp_path)
    again = LoireForMaskedLM.from_pretrained(tmp_path).eval()
    inputs = probe(model)
    assert again.config.plugin_layers == grown.config.plugin_layers
    assert again.plugin_lambdas() == grown.plugin_lambdas()
    # float64; the reloaded tensors are fresh contiguous copies, so kernels may sum in another order (≤ 1e-14)
    torch.testing.assert_close(logits(again, inputs), logits(grown, inputs), rtol=0, atol=1e-12)


def test_input_model_is_never_modified(family: str, head: type) -> None:
    model = build(family, head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    grown = grow(model, hidden=31, ffn=50, heads=5, layers=4)
    with torch.no_grad():
        for p in grown.parameters():
            p.add_(1.0)  # the grown model shares no storage with the input
    assert model.config.to_dict() == config_before
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_growth_is_deterministic_given_the_seed() -> None:
    model = build("gpt-tiny", LoireForCausalLM)
    a, b = grow(model, hidden=30, heads=4, seed=3), grow(model, hidden=30, heads=4, seed=3)
    c = grow(model, hidden=30, heads=4, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_training_mode_and_dtype_are_kept() -> None:
    model = build("llama-tiny", LoireForCausalLM, dtype=torch.float32).train()
    grown = grow(model, ffn=40)
    assert grown.training and next(grown.parameters()).dtype == torch.float32


def _loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(model, LoireForSequenceClassification):
        return model(**inputs, labels=torch.tensor([0, 2])).loss
    return model(**inputs, labels=inputs["input_ids"]).loss


def _new_regions(old: torch.nn.Module, new: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameters whose shape grew, with the old shape (the new entries lie beyond it)."""
    old_params = dict(old.named_parameters())
    return {
        name: tuple(old_params[name].shape)
        for name, p in new.named_parameters()
        if name in old_params and tuple(p.shape) != tuple(old_params[name].shape)
    }


@pytest.mark.parametrize("operator", ["hidden", "ffn", "heads", "layers"])
def test_no_dead_units_after_one_step(family: str, head: type, operator: str) -> None:
    model = build(family, head, plugin_lambda_mode="learned" if family == "llama-tiny" else "scheduled")
    current = getattr(model.config, FIELD[operator])
    grown = grow(model, **{operator: current + 5}, seed=1).train()
    grown.set_plugin_lambda(0.9)  # scheduled devices have started to open
    grown.open_hidden_mask(0.1)
    inputs = probe(model)
    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-2)
    _loss(grown, inputs).backward()
    optimizer.step()
    optimizer.zero_grad()
    _loss(grown, inputs).backward()
    grads = {n: p.grad for n, p in grown.named_parameters()}
    dead = []
    for name, old_shape in _new_regions(model, grown).items():
        if name.endswith("attn.k_proj.bias"):
            continue  # softmax ignores q·b_k (constant over keys): zero gradient in any transformer, old units too
        g = grads[name]
        if g is None:
            dead.append(name)
            continue
        for dim, size in enumerate(old_shape):
            other = tuple(d for d in range(g.dim()) if d != dim)
            per_unit = g.abs().sum(dim=other) if other else g.abs()
            dead += [f"{name}[{dim}:{i}]" for i in range(size, g.shape[dim]) if per_unit[i] == 0]
    if operator == "layers":
        for i in grown.config.plugin_layers:
            block = grown.model.layers[i]
            dead += [
                f"layers.{i}.{n}"
                for n, p in block.named_parameters()
                if n != "attn.k_proj.bias" and (p.grad is None or not p.grad.any())
            ]
    assert not dead, f"new parameters without gradient: {dead[:10]}"
    assert _new_regions(model, grown) or operator == "layers"


def test_layer_sources_and_spread() -> None:
    assert spread_evenly(4, 2) == [1, 3]
    assert spread_evenly(2, 5) == [0, 0, 1, 1, 1]
    model = build("gpt-tiny", LoireForCausalLM)
    grown = grow_layers(model, 4, sources=[0, 0])
    assert grown.config.plugin_layers == [1, 2]
    torch.testing.assert_close(grown.model.layers[1].attn.q_proj.weight, model.model.layers[0].attn.q_proj.weight)
    with pytest.raises(ValueError, match="sources"):
        grow_layers(model, 4, sources=[0, 7])


def test_existing_gates_move_with_their_layers() -> None:
    model = build("bert-tiny", LoireForMaskedLM)
    once = grow(model, layers=3)  # a plug-in after one of the two layers
    gated = once.config.plugin_layers
    twice = grow(once, layers=5)
    assert len(twice.config.plugin_layers) == 3
    assert set(twice.plugin_lambdas().values()) == {1.0}
    assert gated and all(i < 5 for i in twice.config.plugin_layers)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": 10}, "shrink"),
        ({"layers": 1}, "shrink"),
        ({"heads": 2.5}, "must be an int"),
        ({"ffn": "64"}, "must be an int"),
        ({"ffn": True}, "must be an int"),
        ({"width": 64}, "unknown growth dimension"),
    ],
)
def test_bad_targets_are_value_errors_and_mutate_nothing(kwargs: dict, message: str) -> None:
    model = build("gpt-tiny", LoireForCausalLM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        grow(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_not_a_loire_model() -> None:
    with pytest.raises(ValueError, match="Loire model"):
        grow(torch.nn.Linear(2, 2), hidden=4)


def test_invalid_config_is_named() -> None:
    model = build("gpt-tiny", LoireForCausalLM)
    model.config.norm_type = "batchnorm"
    with pytest.raises(ValueError, match="norm_type"):
        grow(model, ffn=64)


def test_unknown_parameter_is_an_error() -> None:
    model = build("gpt-tiny", LoireForCausalLM)
    model.model.layers[0].attn.register_parameter("rel_bias", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.attn\.rel_bias"):
        grow(model, heads=4)


def test_no_op_growth_returns_an_independent_copy() -> None:
    model = build("gpt-tiny", LoireForCausalLM)
    same = grow(model, hidden=model.config.hidden_size)
    assert same is not model
    assert same.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
