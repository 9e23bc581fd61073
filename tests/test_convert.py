"""Exactness and error tests of loire.convert: HF GPT-2 / BERT / Llama <-> Loire, no downloads."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedModel,
)

import loire
from loire import LoireForCausalLM, LoireForMaskedLM, LoireForSequenceClassification, LoireModel
from loire.convert import from_hf, to_hf
from loire.grow import grow

VOCAB, HIDDEN, LAYERS, HEADS, POSITIONS = 100, 32, 2, 4, 64
STD = 0.2  # weights large enough that attention is far from uniform (small weights hide q/k bugs)


def gpt2_config(**overrides: Any) -> GPT2Config:
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=POSITIONS,
        initializer_range=STD,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    return GPT2Config(**{**fields, **overrides})


def bert_config(**overrides: Any) -> BertConfig:
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
        type_vocab_size=3,
        initializer_range=STD,
    )
    return BertConfig(**{**fields, **overrides})


def llama_config(**overrides: Any) -> LlamaConfig:
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=48,
        max_position_embeddings=POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        initializer_range=STD,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    return LlamaConfig(**{**fields, **overrides})


@torch.no_grad()
def make(cls: type[PreTrainedModel], config: Any, seed: int = 0) -> PreTrainedModel:
    """A random-init HF model in eval mode with norms and biases moved away from identity / zero."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    for name, p in model.named_parameters():
        if p.dim() != 1:
            continue
        is_norm_weight = name.endswith("weight")  # 1-D weights are LayerNorm / RMSNorm scales
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if is_norm_weight else 0.3 * torch.randn_like(p))
    return model


def inputs(seed: int = 0, batch: int = 3, length: int = 12, token_types: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 4 :] = 0  # right padding
    mask[2, length - 1 :] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = torch.randint(0, 3, (batch, length), generator=generator)
    return out


@torch.no_grad()
def output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def assert_same(reference: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.dtype == torch.float32 and reference.shape == actual.shape
    atol = 1e-5 * max(1.0, float(reference.abs().max()))
    torch.testing.assert_close(actual, reference, rtol=1e-5, atol=atol)


def assert_same_state(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa = {k: v for k, v in a.state_dict().items() if not k.startswith(skip)}
    sb = {k: v for k, v in b.state_dict().items() if not k.startswith(skip)}
    assert sorted(sa) == sorted(sb)
    for key, value in sa.items():
        assert sb[key].dtype == value.dtype, key
        assert torch.equal(sb[key], value), key


CASES: list[tuple[str, type[PreTrainedModel], Any, type]] = [
    ("gpt2-lm", GPT2LMHeadModel, gpt2_config(), LoireForCausalLM),
    (
        "gpt2-lm-untied-relu",
        GPT2LMHeadModel,
        gpt2_config(tie_word_embeddings=False, activation_function="relu", n_inner=48),
        LoireForCausalLM,
    ),
    ("gpt2-base", GPT2Model, gpt2_config(), LoireModel),
    ("bert-mlm", BertForMaskedLM, bert_config(), LoireForMaskedLM),
    (
        "bert-mlm-untied",
        BertForMaskedLM,
        bert_config(tie_word_embeddings=False, hidden_act="gelu_new"),
        LoireForMaskedLM,
    ),
    ("bert-base", BertModel, bert_config(), LoireModel),
    ("llama-lm", LlamaForCausalLM, llama_config(), LoireForCausalLM),
    ("llama-lm-gqa", LlamaForCausalLM, llama_config(num_key_value_heads=2), LoireForCausalLM),
    (
        "llama-lm-tied-bias",
        LlamaForCausalLM,
        llama_config(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
        LoireForCausalLM,
    ),
    ("llama-lm-headdim", LlamaForCausalLM, llama_config(head_dim=12, num_key_value_heads=1), LoireForCausalLM),
    ("llama-base-gqa", LlamaModel, llama_config(num_key_value_heads=2), LoireModel),
]


@pytest.mark.parametrize(("name", "hf_cls", "config", "loire_cls"), CASES, ids=[c[0] for c in CASES])
def test_from_hf_and_back_is_exact(name: str, hf_cls: type[PreTrainedModel], config: Any, loire_cls: type) -> None:
    hf = make(hf_cls, config)
    batch = inputs(token_types=name.startswith("bert"))
    reference = output(hf, batch)

    converted = from_hf(hf)
    assert type(converted) is loire_cls
    assert not converted.training
    assert_same(reference, output(converted, batch))
    if config.tie_word_embeddings and loire_cls is not LoireModel:
        assert converted.get_output_embeddings().weight is converted.get_input_embeddings().weight
    # The conversion copies: changing the source leaves the converted model alone.
    embeddings = hf.get_input_embeddings().weight
    saved = embeddings.detach().clone()
    with torch.no_grad():
        embeddings.add_(1.0)
    assert_same(reference, output(converted, batch))
    with torch.no_grad():
        embeddings.copy_(saved)

    back = to_hf(converted)
    assert type(back) is hf_cls
    assert not back.training
    assert_same(reference, output(back, batch))
    grouped = getattr(config, "num_key_value_heads", HEADS) != HEADS
    if not grouped:
        # Not kept: BertModel's pooler, and the untied BERT head's `cls.predictions.bias` (unused by HF's forward).
        unused = ("cls.predictions.bias",) if name == "bert-mlm-untied" else ()
        assert_same_state(hf, back, skip=("pooler.", *unused))
    else:
        assert back.config.num_key_value_heads == HEADS  # expanded to full multi-head attention
        folded = to_hf(converted, num_key_value_heads=config.num_key_value_heads)
        assert_same_state(hf, folded)
        assert_same(reference, output(folded, batch))


def test_gqa_expansion_matches_repeat_kv_layout() -> None:
    hf = make(LlamaForCausalLM, llama_config(num_key_value_heads=2))
    converted = from_hf(hf)
    d = hf.config.head_dim
    k = hf.model.layers[0].self_attn.k_proj.weight  # (2·D, H)
    expanded = converted.model.layers[0].attn.k_proj.weight  # (4·D, H): heads 0,0,1,1
    for head, kv_head in enumerate((0, 0, 1, 1)):
        assert torch.equal(expanded[head * d : (head + 1) * d], k[kv_head * d : (kv_head + 1) * d])
    with torch.no_grad():
        converted.model.layers[0].attn.k_proj.weight[0, 0] += 1.0  # the group is no longer identical
    with pytest.raises(ValueError, match="cannot fold"):
        to_hf(converted, num_key_value_heads=2)


def test_gpt2_greedy_generate_matches_hf() -> None:
    hf = make(GPT2LMHeadModel, gpt2_config())
    converted = from_hf(hf)
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    kwargs: dict[str, Any] = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = hf.generate(prompt, attention_mask=mask, **kwargs)
    actual = converted.generate(prompt, attention_mask=mask, **kwargs)
    assert expected.shape == (2, 11)
    assert torch.equal(actual, expected)


def test_dtype_device_and_train_mode_are_kept() -> None:
    hf = make(GPT2LMHeadModel, gpt2_config()).to(torch.bfloat16).train()
    converted = from_hf(hf)
    assert converted.training
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    back = to_hf(converted)
    assert back.training
    assert_same_state(hf, back)


def test_bert_pooler_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    hf = make(BertModel, bert_config())
    assert hf.pooler is not None
    with caplog.at_level(logging.WARNING, logger="loire.convert"):
        converted = from_hf(hf)
    assert "pooler.dense.weight" in caplog.text
    assert to_hf(converted).pooler is None


def test_llama_with_grown_heads_converts_with_wide_attention() -> None:
    hf = make(LlamaForCausalLM, llama_config())
    batch = inputs()
    reference = output(hf, batch)
    grown = grow(from_hf(hf), heads=8)  # attention width 64 != hidden 32: fine for Llama (explicit head_dim)
    back = to_hf(grown)
    assert back.config.num_attention_heads == 8 and back.config.head_dim == 8
    assert_same(reference, output(back, batch))
    # transformers' LlamaConfig insists on hidden_size % num_attention_heads == 0.
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads=6"):
        to_hf(grow(from_hf(hf), heads=6))


def test_to_hf_refuses_open_plugin_layers() -> None:
    model = from_hf(make(GPT2LMHeadModel, gpt2_config()))
    grown = grow(model, layers=3)
    with pytest.raises(ValueError, match=r"consolidate\(\)"):
        to_hf(grown)
    grown.set_plugin_lambda(0.0)
    grown.consolidate()
    assert type(to_hf(grown)) is GPT2LMHeadModel


def test_to_hf_refuses_open_hidden_mask() -> None:
    model = from_hf(make(BertForMaskedLM, bert_config()))
    grown = grow(model, hidden=40)
    assert grown.config.hidden_mask
    with pytest.raises(ValueError, match=r"consolidate\(\)"):
        to_hf(grown)


@pytest.mark.parametrize(("cls", "config"), [(GPT2LMHeadModel, gpt2_config()), (BertForMaskedLM, bert_config())])
def test_to_hf_refuses_attention_width_other_than_hidden(cls: type[PreTrainedModel], config: Any) -> None:
    grown = grow(from_hf(make(cls, config)), heads=6)
    with pytest.raises(ValueError, match="hidden_size"):
        to_hf(grown)


def test_to_hf_refuses_what_no_family_represents() -> None:
    tiny: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, head_dim=8, intermediate_size=64)
    with pytest.raises(ValueError, match="matches no"):
        to_hf(LoireForCausalLM(loire.preset("gpt-tiny", norm_type="rmsnorm", **tiny)))
    with pytest.raises(ValueError, match="attention_bias"):
        to_hf(LoireForCausalLM(loire.preset("gpt-tiny", attention_bias=False, **tiny)))
    with pytest.raises(ValueError, match="not convertible"):
        to_hf(LoireForSequenceClassification(loire.preset("gpt-tiny", **tiny)))
    with pytest.raises(ValueError, match="no bert counterpart"):
        to_hf(LoireForCausalLM(loire.preset("bert-tiny", **tiny)))
    with pytest.raises(ValueError, match="needs 'rope'"):
        to_hf(LoireForCausalLM(loire.preset("gpt-tiny", **tiny)), family="llama")
    with pytest.raises(ValueError, match="BERT is bidirectional"):
        to_hf(LoireModel(loire.preset("bert-tiny", is_causal=True, **tiny)))
    with pytest.raises(ValueError, match="unknown family"):
        to_hf(LoireModel(loire.preset("bert-tiny", **tiny)), family="t5")


def test_from_hf_refuses_unsupported_classes_and_configs() -> None:
    with pytest.raises(ValueError, match="does not support BertForSequenceClassification"):
        from_hf(BertForSequenceClassification(bert_config()))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        from_hf(GPT2Model(gpt2_config(scale_attn_by_inverse_layer_idx=True)))
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        from_hf(GPT2Model(gpt2_config(reorder_and_upcast_attn=True)))
    with pytest.raises(ValueError, match="activation_function"):
        from_hf(GPT2Model(gpt2_config(activation_function="quick_gelu")))
    bert = BertModel(bert_config(), add_pooling_layer=False)
    bert.config.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="relative_key"):
        from_hf(bert)
    scaled = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type"):
        from_hf(LlamaModel(llama_config(rope_parameters=scaled)))


def test_from_hf_refuses_unknown_parameters() -> None:
    hf = make(GPT2Model, gpt2_config())
    hf.h[1].attn.register_parameter("extra", nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"'h\.1\.attn\.extra'"):
        from_hf(hf)


@torch.no_grad()
def test_bert_without_token_types_gets_one_zero_type() -> None:
    torch.manual_seed(0)
    tiny: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, head_dim=8, intermediate_size=64)
    model = LoireModel(loire.preset("bert-tiny", type_vocab_size=0, **tiny)).eval()
    for p in model.parameters():
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.3 * torch.randn_like(p))
    batch = inputs()
    reference = output(model, batch)
    back = to_hf(model)
    assert type(back) is BertModel and back.config.type_vocab_size == 1
    assert not back.embeddings.token_type_embeddings.weight.any()
    assert_same(reference, output(back, batch))
