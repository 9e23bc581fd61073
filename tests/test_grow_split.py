"""Contract tests of init="split" (exact duplication with cancelling noise) and of the ablation's naive growth."""

import pytest
import torch
from hypothesis import strategies as st

from loire import LoireForCausalLM, LoireForMaskedLM, LoireForSequenceClassification
from loire.grow import grow
from loire.grow.hidden import can_split_hidden
from loire.strategies import naive_expand
from tests.conftest import FAMILIES, assert_exact, build, every_family_and_head, logits, probe

F64 = 1e-9


@every_family_and_head(max_examples=2)
def test_split_growth_is_exact(family: str, head: type, data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = build(family, head, seed=seed)
    inputs = probe(model, seed=seed)
    c = model.config
    targets = {
        "hidden": c.hidden_size * data.draw(st.integers(1, 3), label="k") + data.draw(st.sampled_from([0, 0, 3])),
        "ffn": c.intermediate_size + data.draw(st.integers(0, 2 * c.intermediate_size), label="ffn"),
        "heads": c.num_attention_heads + data.draw(st.integers(0, 3), label="heads"),
        "layers": c.num_hidden_layers + data.draw(st.integers(0, 2), label="layers"),
    }
    grown = grow(model, **targets, seed=seed, init="split")
    assert_exact(logits(model, inputs), logits(grown, inputs), F64)


def test_split_copies_units_and_breaks_their_symmetry() -> None:
    model = build("gpt-tiny", LoireForCausalLM)
    c = model.config
    grown = grow(model, hidden=2 * c.hidden_size, ffn=2 * c.intermediate_size, seed=3, init="split")
    h, f = c.hidden_size, c.intermediate_size
    up_old, up_new = model.model.layers[0].mlp.up_proj.weight, grown.model.layers[0].mlp.up_proj.weight
    # new FFN units copy a source unit's input weights (over the tiled stream, each half gets w/2 ± z)
    assert up_new.shape == (2 * f, 2 * h)
    down = grown.model.layers[0].mlp.down_proj.weight
    emb = grown.model.embed_tokens.weight
    torch.testing.assert_close(emb[:, h:], emb[:, :h])  # the stream is tiled
    assert not torch.allclose(down[:h, :f], down[:h, f:])  # copies' consumer weights differ ...
    # ... and sum (per group) to the source's: dims of the new units come from sources spread evenly
    assert torch.isfinite(up_old).all()
    q = grown.model.layers[0].attn.q_proj.weight
    assert not torch.allclose(q[:, :h], q[:, h:])  # readers of the two copies of a dim differ


@pytest.mark.parametrize("family", FAMILIES)
def test_split_hidden_falls_back_to_padding_where_it_cannot_tile(family: str) -> None:
    model = build(family, LoireForMaskedLM)
    assert can_split_hidden(model, 2 * model.config.hidden_size) is False
    causal = build(family, LoireForCausalLM)
    assert can_split_hidden(causal, 2 * causal.config.hidden_size) is (causal.config.norm_position == "pre")
    assert can_split_hidden(causal, 2 * causal.config.hidden_size + 1) is False
    grown = grow(model, hidden=2 * model.config.hidden_size, init="split")
    inputs = probe(model)
    assert_exact(logits(model, inputs), logits(grown, inputs), F64)


def test_unknown_init_is_named() -> None:
    with pytest.raises(ValueError, match=r"init=.copy.*pad, split"):
        grow(build("gpt-tiny", LoireForCausalLM), ffn=100, init="copy")


@pytest.mark.parametrize("init", ["zero", "random"])
def test_naive_expand_reaches_the_sizes_but_changes_the_function(init: str) -> None:
    model = build("gpt-tiny", LoireForCausalLM)
    c = model.config
    targets = dict(hidden=2 * c.hidden_size, ffn=c.intermediate_size + 8, heads=c.num_attention_heads + 1, layers=3)
    grown = naive_expand(model, init, **targets, seed=0)
    exact = grow(model, **targets)
    assert grown.config.hidden_size == exact.config.hidden_size
    assert grown.config.num_hidden_layers == exact.config.num_hidden_layers
    assert not grown.config.plugin_layers
    inputs = probe(model)
    diff = float((logits(model, inputs) - logits(grown, inputs)).abs().max())
    assert diff > 1e-3  # not function preserving: the ablation's point
    # old weights sit in the leading corner of their grown tensors
    w_old, w_new = model.model.layers[0].mlp.up_proj.weight, grown.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(w_new[: w_old.shape[0], : w_old.shape[1]], w_old)
    if init == "zero":
        assert not w_new[w_old.shape[0] :].any()


def test_naive_expand_rejects_unknown_init() -> None:
    with pytest.raises(ValueError, match=r"zero.*random"):
        naive_expand(build("gpt-tiny", LoireForSequenceClassification), "ones", ffn=100)
