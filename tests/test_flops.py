import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from loire import LoireForCausalLM, LoireForMaskedLM, LoireForSequenceClassification, LoireModel
from loire.flops import flops_per_step, flops_per_token, forward_flops_per_token
from loire.grow import grow
from tests.conftest import tiny_config

HEAD_NAME = {
    LoireForCausalLM: "causal_lm",
    LoireForMaskedLM: "masked_lm",
    LoireForSequenceClassification: "sequence_classification",
    LoireModel: "base",
}


def counted(model: torch.nn.Module, ids: torch.Tensor, training: bool) -> int:
    # The math SDPA backend is made of matmuls FlopCounterMode sees; the fused CPU kernel is not counted.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids)
        if training:
            value = out.logits if hasattr(out, "logits") else out.last_hidden_state
            value.float().pow(2).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["gpt-tiny", "bert-tiny", "llama-tiny"])
@pytest.mark.parametrize("cls", list(HEAD_NAME), ids=lambda c: c.__name__)
@pytest.mark.parametrize("training", [False, True])
def test_analytic_flops_match_the_flop_counter(family: str, cls: type, training: bool) -> None:
    config = tiny_config(
        family, hidden_size=64, head_dim=16, num_attention_heads=5, intermediate_size=160, vocab_size=300
    )
    model = cls(config)
    model.train(training)
    batch, seq = 2, 24
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    analytic = flops_per_step(config, batch, seq, training=training, head=HEAD_NAME[cls])
    measured = counted(model, ids, training)
    assert analytic == pytest.approx(measured, rel=0.05)


def test_growth_devices_are_counted() -> None:
    config = tiny_config("gpt-tiny", hidden_size=64, head_dim=16, num_attention_heads=4, intermediate_size=128)
    model = LoireForCausalLM(config)
    grown = grow(model, layers=4, hidden=80)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    analytic = flops_per_step(grown.config, 2, 16, training=True)
    assert analytic == pytest.approx(counted(grown, ids, True), rel=0.05)
    parts = forward_flops_per_token(grown.config, 16)
    assert parts.plugin_gates == 2 * 3 * 80  # two plug-in layers, 3·H each
    assert flops_per_token(grown.config, 16) > flops_per_token(model.config, 16)


def test_training_is_three_forwards_and_bad_input() -> None:
    config = tiny_config("llama-tiny")
    assert flops_per_token(config, 32, training=True) == 3 * flops_per_token(config, 32, training=False)
    with pytest.raises(ValueError, match="head"):
        flops_per_token(config, 32, head="seq2seq")
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(config, 0)
