import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

import loire
from loire import LoireForCausalLM, LoireForMaskedLM, LoireForSequenceClassification, LoireModel
from loire.grow import grow
from tests.conftest import build, logits, probe, randomize, tiny_config

AUTO = {
    LoireForCausalLM: AutoModelForCausalLM,
    LoireForMaskedLM: AutoModelForMaskedLM,
    LoireForSequenceClassification: AutoModelForSequenceClassification,
    LoireModel: AutoModel,
}


def test_outputs_have_logits_and_loss(family: str, head: type) -> None:
    model = build(family, head, dtype=torch.float32)
    inputs = probe(model)
    labels = torch.zeros(2, dtype=torch.long) if head is LoireForSequenceClassification else inputs["input_ids"]
    out = model(**inputs, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    expected = (2, 3) if head is LoireForSequenceClassification else (2, 9, model.config.vocab_size)
    assert out.logits.shape == expected


@pytest.mark.parametrize("cls", [LoireForCausalLM, LoireForMaskedLM, LoireForSequenceClassification, LoireModel])
def test_save_pretrained_round_trips_through_auto_classes(tmp_path, family: str, cls: type) -> None:
    model = build(family, cls, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), loire.LoireConfig)
    again = AUTO[cls].from_pretrained(tmp_path).eval()
    assert type(again) is cls
    inputs = probe(model)
    torch.testing.assert_close(logits(again, inputs), logits(model, inputs), rtol=0, atol=0)


def test_padding_does_not_change_real_tokens(family: str) -> None:
    """Right padding: the outputs at real positions do not depend on what the pad positions hold."""
    model = build(family, LoireForMaskedLM if family == "bert-tiny" else LoireForCausalLM)
    inputs = probe(model)
    altered = {k: v.clone() for k, v in inputs.items()}
    altered["input_ids"][-1, -3:] = (altered["input_ids"][-1, -3:] + 7) % model.config.vocab_size
    a, b = logits(model, inputs), logits(model, altered)
    torch.testing.assert_close(a[-1, :-3], b[-1, :-3], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(b).all()


def test_fully_masked_left_padding_gives_no_nan() -> None:
    model = build("gpt-tiny", LoireForCausalLM, dtype=torch.float32)
    ids = torch.randint(0, 61, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


@pytest.mark.parametrize("family", ["gpt-tiny", "llama-tiny"])
def test_generate_with_cache_equals_greedy_without_cache(family: str) -> None:
    model = build(family, LoireForCausalLM, dtype=torch.float32)
    ids = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    current = ids
    for _ in range(6):
        nxt = model(current, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        current = torch.cat([current, nxt], dim=1)
    assert torch.equal(out, current)


def test_generate_works_with_gates_present() -> None:
    model = grow(build("llama-tiny", LoireForCausalLM, dtype=torch.float32), layers=4)
    model.set_plugin_lambda(0.4)
    ids = torch.randint(0, 61, (1, 3))
    assert model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 7)


def test_sequence_classification_pools_last_real_token_for_causal_models() -> None:
    model = build("gpt-tiny", LoireForSequenceClassification)
    ids = torch.randint(0, 61, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    torch.testing.assert_close(model(ids).logits, model(padded, attention_mask=mask).logits)


def test_sequence_classification_pools_first_token_for_masked_models() -> None:
    model = build("bert-tiny", LoireForSequenceClassification)
    hidden = model.model(torch.randint(0, 61, (2, 5))).last_hidden_state
    pooled = model._pool(hidden, None, None)
    torch.testing.assert_close(pooled, hidden[:, 0])


def test_tied_embeddings_share_storage() -> None:
    model = LoireForCausalLM(tiny_config("gpt-tiny"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = LoireForCausalLM(tiny_config("llama-tiny"))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_consolidate_removes_closed_devices(family: str) -> None:
    model = build(family, LoireForMaskedLM)
    grown = grow(model, layers=3, hidden=27)
    with pytest.raises(ValueError, match="λ != 0"):
        grown.consolidate()
    inputs = probe(model)
    grown.set_plugin_lambda(0.0)
    grown.open_hidden_mask(1.0)
    before = logits(grown, inputs)
    grown.consolidate()
    assert grown.config.plugin_layers == [] and not grown.config.hidden_mask
    assert grown.model.hidden_mask is None
    assert all(b.plugin_lambda is None for b in grown.model.layers)
    assert not any(k.endswith(("plugin_lambda", "hidden_mask")) for k in grown.state_dict())
    after = logits(grown, inputs)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    # A consolidated model is a plain model of its config.
    plain = LoireForMaskedLM(grown.config).double().eval()
    plain.load_state_dict(grown.state_dict())
    torch.testing.assert_close(logits(plain, inputs), after, rtol=0, atol=0)


def test_masked_norm_with_open_mask_is_the_plain_norm() -> None:
    from loire.model import LoireNorm

    for norm_type in ("layernorm", "rmsnorm"):
        norm = LoireNorm(10, norm_type, 1e-5).double()
        randomize_norm = torch.Generator().manual_seed(0)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(10, generator=randomize_norm, dtype=torch.float64))
        x = torch.randn(3, 10, dtype=torch.float64)
        torch.testing.assert_close(norm(x, torch.ones(10, dtype=torch.float64)), norm(x))


def test_learned_lambda_is_a_parameter_scheduled_lambda_a_buffer() -> None:
    scheduled = grow(LoireForCausalLM(tiny_config("gpt-tiny")), layers=3)
    learned = grow(LoireForCausalLM(tiny_config("gpt-tiny", plugin_lambda_mode="learned")), layers=3)
    assert not any(n.endswith("plugin_lambda") for n, _ in scheduled.named_parameters())
    assert any(n.endswith("plugin_lambda") for n, _ in scheduled.named_buffers())
    assert [n for n, p in learned.named_parameters() if n.endswith("plugin_lambda") and p.requires_grad]
    with pytest.raises(ValueError):
        scheduled.set_plugin_lambda(1.5)


def test_random_init_is_seeded() -> None:
    torch.manual_seed(0)
    a = LoireForCausalLM(tiny_config("gpt-tiny"))
    torch.manual_seed(0)
    b = LoireForCausalLM(tiny_config("gpt-tiny"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_randomize_helper_moves_norms_away_from_identity() -> None:
    model = randomize(LoireForCausalLM(tiny_config("gpt-tiny")))
    assert float((model.model.norm.weight.detach() - 1).abs().mean()) > 0.1


def test_rope_tables_equal_hf_llama_at_long_positions() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from loire.model import rope_cos_sin

    config = LlamaConfig(
        hidden_size=512, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}
    )
    positions = torch.arange(0, 32768, 7)[None]
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(torch.zeros(1), positions)
    cos, sin = rope_cos_sin(positions, 128, 500000.0, torch.float32)
    torch.testing.assert_close(cos[:, 0], cos_hf, rtol=0, atol=0)
    torch.testing.assert_close(sin[:, 0], sin_hf, rtol=0, atol=0)


def test_lm_loss_equals_torch_cross_entropy_in_value_and_gradient() -> None:
    from loire.model import _CrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(37, 53, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 53, (37,))
    target[::5] = -100  # ignored positions: no loss, zero gradient
    ours = _CrossEntropy.apply(logits, target)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-15)
    assert grad_ours[::5].abs().max() == 0
    small = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: _CrossEntropy.apply(z, torch.tensor([3, -100, 0, 6, 2, 2])), (small,))
    assert _CrossEntropy.apply(small, torch.full((6,), -100)).isnan()  # as F.cross_entropy: 0 / 0
