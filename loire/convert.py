"""Exact conversion between Hugging Face GPT-2 / BERT / Llama models and Loire models.

`from_hf` turns a native transformers model into the Loire model that computes the same function
(same logits, or the same last hidden state for base models); `to_hf` goes back to the native class.

Weight surgery is key by key through explicit mapping tables (one per family, see `_FAMILIES`):
every Hugging Face state-dict key is parsed by exact structure into a `_Rule` that names the Loire
key(s) it becomes and the operation that transforms it. A key that is in no table is an error, so a
checkpoint with a parameter this module does not understand is refused rather than silently
half-converted. Only known non-parameter buffers (causal-mask buffers, position/token-type id
buffers, rotary frequency tables) are skipped, and BertModel's pooler is dropped with a warning.

Family-specific surgery:
- GPT-2 stores its projections as `Conv1D` (weight (in, out), the transpose of `nn.Linear`), and
  `c_attn` fuses q|k|v along the output dimension: it is split in three and transposed.
- BERT's tied decoder bias appears twice (`cls.predictions.bias` and `cls.predictions.decoder.bias`);
  with untied embeddings `cls.predictions.bias` is not used by the forward pass and is not kept
  (`to_hf` writes the decoder bias to both).
- Llama grouped-query attention (num_key_value_heads < num_attention_heads) is expanded exactly to
  multi-head attention by repeating each k/v head for its group, which is what `repeat_kv` does at
  run time. `to_hf(..., num_key_value_heads=n)` folds such exactly repeated heads back.

Configurations the Loire model cannot represent exactly (e.g. GPT-2 with
`scale_attn_by_inverse_layer_idx`, BERT with relative position embeddings, Llama with scaled RoPE)
are refused with a ValueError rather than converted approximately. Tensors keep their dtype and
device; the converted model is in the same train/eval mode as its source.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights

from loire.config import ACTIVATIONS, LoireConfig
from loire.model import (
    LoireForCausalLM,
    LoireForMaskedLM,
    LoireForSequenceClassification,
    LoireModel,
    LoirePreTrainedModel,
)

logger = logging.getLogger(__name__)

Key = tuple[str, ...]

# ----------------------------------------------------------------------------------------------
# Mapping tables
# ----------------------------------------------------------------------------------------------

# Operations: how one Hugging Face tensor becomes its Loire tensor(s), and back.
#   copy        identical tensor
#   transpose   Conv1D weight (in, out) <-> Linear weight (out, in)
#   qkv_weight  GPT-2 fused c_attn Conv1D weight (H, 3A) <-> q, k, v Linear weights (A, H) each
#   qkv_bias    GPT-2 fused c_attn bias (3A,) <-> q, k, v biases (A,) each
#   kv          Llama k/v projection (n_kv·D, ...) <-> (N·D, ...): each kv head repeated for its group
#   bias_alias  BERT's `cls.predictions.bias`: the same tensor as the decoder bias when tied, unused
#               by the forward pass otherwise
OPS = ("copy", "transpose", "qkv_weight", "qkv_bias", "kv", "bias_alias")


@dataclass(frozen=True)
class _Rule:
    """One Hugging Face tensor: the Loire key(s) it maps to (in the table's scope) and the operation."""

    loire: tuple[Key, ...]
    op: str = "copy"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown conversion op {self.op!r}")


def _r(*loire: str, op: str = "copy") -> _Rule:
    """A rule from dotted Loire keys: _r("attn.q_proj.weight")."""
    return _Rule(tuple(tuple(k.split(".")) for k in loire), op)


def _k(dotted: str) -> Key:
    return tuple(dotted.split("."))


@dataclass(frozen=True)
class _Family:
    """Key tables of one Hugging Face family.

    `base` keys are relative to the base model (HF `base_model_prefix`, Loire `model`), `layer` keys
    relative to one block (HF `layer_prefix`.i, Loire `layers`.i), `heads` keys are full keys of a
    head model, by Loire class. `*_buffers` are non-parameter buffers that are skipped; `dropped`
    are parameters with no Loire counterpart, dropped with a warning.
    """

    name: str
    hf_prefix: str
    layer_prefix: Key
    base: Mapping[Key, _Rule]
    layer: Mapping[Key, _Rule]
    heads: Mapping[type[LoirePreTrainedModel], Mapping[Key, _Rule]]
    base_buffers: frozenset[Key] = field(default_factory=frozenset)
    layer_buffers: frozenset[Key] = field(default_factory=frozenset)
    dropped: frozenset[Key] = field(default_factory=frozenset)


_GPT2_FAMILY = _Family(
    name="gpt2",
    hf_prefix="transformer",
    layer_prefix=("h",),
    base={
        _k("wte.weight"): _r("embed_tokens.weight"),
        _k("wpe.weight"): _r("embed_positions.weight"),
        _k("ln_f.weight"): _r("norm.weight"),
        _k("ln_f.bias"): _r("norm.bias"),
    },
    layer={
        _k("ln_1.weight"): _r("attn_norm.weight"),
        _k("ln_1.bias"): _r("attn_norm.bias"),
        _k("attn.c_attn.weight"): _r("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", op="qkv_weight"),
        _k("attn.c_attn.bias"): _r("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias", op="qkv_bias"),
        _k("attn.c_proj.weight"): _r("attn.o_proj.weight", op="transpose"),
        _k("attn.c_proj.bias"): _r("attn.o_proj.bias"),
        _k("ln_2.weight"): _r("mlp_norm.weight"),
        _k("ln_2.bias"): _r("mlp_norm.bias"),
        _k("mlp.c_fc.weight"): _r("mlp.up_proj.weight", op="transpose"),
        _k("mlp.c_fc.bias"): _r("mlp.up_proj.bias"),
        _k("mlp.c_proj.weight"): _r("mlp.down_proj.weight", op="transpose"),
        _k("mlp.c_proj.bias"): _r("mlp.down_proj.bias"),
    },
    heads={
        LoireModel: {},
        LoireForCausalLM: {_k("lm_head.weight"): _r("lm_head.weight")},
    },
    # Causal-mask buffers of older GPT-2 checkpoints / transformers versions.
    layer_buffers=frozenset({_k("attn.bias"), _k("attn.masked_bias")}),
)

_BERT_FAMILY = _Family(
    name="bert",
    hf_prefix="bert",
    layer_prefix=("encoder", "layer"),
    base={
        _k("embeddings.word_embeddings.weight"): _r("embed_tokens.weight"),
        _k("embeddings.position_embeddings.weight"): _r("embed_positions.weight"),
        _k("embeddings.token_type_embeddings.weight"): _r("embed_token_types.weight"),
        _k("embeddings.LayerNorm.weight"): _r("embed_norm.weight"),
        _k("embeddings.LayerNorm.bias"): _r("embed_norm.bias"),
    },
    layer={
        _k("attention.self.query.weight"): _r("attn.q_proj.weight"),
        _k("attention.self.query.bias"): _r("attn.q_proj.bias"),
        _k("attention.self.key.weight"): _r("attn.k_proj.weight"),
        _k("attention.self.key.bias"): _r("attn.k_proj.bias"),
        _k("attention.self.value.weight"): _r("attn.v_proj.weight"),
        _k("attention.self.value.bias"): _r("attn.v_proj.bias"),
        _k("attention.output.dense.weight"): _r("attn.o_proj.weight"),
        _k("attention.output.dense.bias"): _r("attn.o_proj.bias"),
        _k("attention.output.LayerNorm.weight"): _r("attn_norm.weight"),
        _k("attention.output.LayerNorm.bias"): _r("attn_norm.bias"),
        _k("intermediate.dense.weight"): _r("mlp.up_proj.weight"),
        _k("intermediate.dense.bias"): _r("mlp.up_proj.bias"),
        _k("output.dense.weight"): _r("mlp.down_proj.weight"),
        _k("output.dense.bias"): _r("mlp.down_proj.bias"),
        _k("output.LayerNorm.weight"): _r("mlp_norm.weight"),
        _k("output.LayerNorm.bias"): _r("mlp_norm.bias"),
    },
    heads={
        LoireModel: {},
        LoireForMaskedLM: {
            _k("cls.predictions.transform.dense.weight"): _r("mlm_head.dense.weight"),
            _k("cls.predictions.transform.dense.bias"): _r("mlm_head.dense.bias"),
            _k("cls.predictions.transform.LayerNorm.weight"): _r("mlm_head.norm.weight"),
            _k("cls.predictions.transform.LayerNorm.bias"): _r("mlm_head.norm.bias"),
            _k("cls.predictions.decoder.weight"): _r("mlm_head.decoder.weight"),
            _k("cls.predictions.decoder.bias"): _r("mlm_head.decoder.bias"),
            _k("cls.predictions.bias"): _r("mlm_head.decoder.bias", op="bias_alias"),
        },
    },
    base_buffers=frozenset({_k("embeddings.position_ids"), _k("embeddings.token_type_ids")}),
    dropped=frozenset({_k("pooler.dense.weight"), _k("pooler.dense.bias")}),
)

_LLAMA_FAMILY = _Family(
    name="llama",
    hf_prefix="model",
    layer_prefix=("layers",),
    base={
        _k("embed_tokens.weight"): _r("embed_tokens.weight"),
        _k("norm.weight"): _r("norm.weight"),
    },
    layer={
        _k("input_layernorm.weight"): _r("attn_norm.weight"),
        _k("post_attention_layernorm.weight"): _r("mlp_norm.weight"),
        _k("self_attn.q_proj.weight"): _r("attn.q_proj.weight"),
        _k("self_attn.q_proj.bias"): _r("attn.q_proj.bias"),
        _k("self_attn.k_proj.weight"): _r("attn.k_proj.weight", op="kv"),
        _k("self_attn.k_proj.bias"): _r("attn.k_proj.bias", op="kv"),
        _k("self_attn.v_proj.weight"): _r("attn.v_proj.weight", op="kv"),
        _k("self_attn.v_proj.bias"): _r("attn.v_proj.bias", op="kv"),
        _k("self_attn.o_proj.weight"): _r("attn.o_proj.weight"),
        _k("self_attn.o_proj.bias"): _r("attn.o_proj.bias"),
        _k("mlp.gate_proj.weight"): _r("mlp.gate_proj.weight"),
        _k("mlp.gate_proj.bias"): _r("mlp.gate_proj.bias"),
        _k("mlp.up_proj.weight"): _r("mlp.up_proj.weight"),
        _k("mlp.up_proj.bias"): _r("mlp.up_proj.bias"),
        _k("mlp.down_proj.weight"): _r("mlp.down_proj.weight"),
        _k("mlp.down_proj.bias"): _r("mlp.down_proj.bias"),
    },
    heads={
        LoireModel: {},
        LoireForCausalLM: {_k("lm_head.weight"): _r("lm_head.weight")},
    },
    base_buffers=frozenset({_k("rotary_emb.inv_freq"), _k("rotary_emb.original_inv_freq")}),
)

_FAMILIES: dict[str, _Family] = {f.name: f for f in (_GPT2_FAMILY, _BERT_FAMILY, _LLAMA_FAMILY)}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

# Native class <-> (family, Loire class). Exact types: a subclass may add parameters or behaviour.
_FROM_HF: dict[type[PreTrainedModel], tuple[str, type[LoirePreTrainedModel]]] = {
    GPT2LMHeadModel: ("gpt2", LoireForCausalLM),
    GPT2Model: ("gpt2", LoireModel),
    BertForMaskedLM: ("bert", LoireForMaskedLM),
    BertModel: ("bert", LoireModel),
    LlamaForCausalLM: ("llama", LoireForCausalLM),
    LlamaModel: ("llama", LoireModel),
}
_TO_HF: dict[tuple[str, type[LoirePreTrainedModel]], type[PreTrainedModel]] = {
    (family, loire_cls): hf_cls for hf_cls, (family, loire_cls) in _FROM_HF.items()
}


@dataclass(frozen=True)
class _Dims:
    """Attention shape used by the reshaping ops."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def attention_size(self) -> int:
        return self.num_heads * self.head_dim


# ----------------------------------------------------------------------------------------------
# Key parsing and tensor operations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    """What one Hugging Face key is: `map` (with its rule and full Loire keys), `skip` or `drop`."""

    action: str
    rule: _Rule | None = None
    loire_keys: tuple[str, ...] = ()


def _parse_hf_key(key: str, family: _Family, loire_cls: type[LoirePreTrainedModel]) -> _Parsed:
    """Structured parse of a Hugging Face state-dict key; raises ValueError for anything unknown."""
    parts = tuple(key.split("."))
    is_base = loire_cls is LoireModel
    loire_base: Key = () if is_base else ("model",)
    if not is_base:
        head_rules = family.heads[loire_cls]
        if parts in head_rules:
            rule = head_rules[parts]
            return _Parsed("map", rule, tuple(".".join(k) for k in rule.loire))
        if parts[:1] != (family.hf_prefix,):
            raise ValueError(f"unknown {family.name} parameter {key!r}: it is in no conversion table")
        parts = parts[1:]
    if parts in family.base:
        rule = family.base[parts]
        return _Parsed("map", rule, tuple(".".join((*loire_base, *k)) for k in rule.loire))
    n = len(family.layer_prefix)
    if len(parts) > n + 1 and parts[:n] == family.layer_prefix and parts[n].isdigit():
        local, layer = parts[n + 1 :], parts[n]
        if local in family.layer:
            rule = family.layer[local]
            keys = tuple(".".join((*loire_base, "layers", str(int(layer)), *k)) for k in rule.loire)
            return _Parsed("map", rule, keys)
        if local in family.layer_buffers:
            return _Parsed("skip")
    if parts in family.base_buffers:
        return _Parsed("skip")
    if parts in family.dropped:
        return _Parsed("drop")
    raise ValueError(f"unknown {family.name} parameter {key!r}: it is in no conversion table")


def _check(key: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{what} {key!r} has shape {tuple(tensor.shape)}, expected {expected}")


def _forward_op(key: str, rule: _Rule, tensor: torch.Tensor, dims: _Dims) -> tuple[torch.Tensor, ...]:
    """Hugging Face tensor -> its Loire tensor(s)."""
    a, d = dims.attention_size, dims.head_dim
    if rule.op in ("copy", "bias_alias"):
        return (tensor,)
    if rule.op == "transpose":
        if tensor.dim() != 2:
            raise ValueError(f"Conv1D weight {key!r} has shape {tuple(tensor.shape)}, expected 2 dims")
        return (tensor.t(),)
    if rule.op == "qkv_weight":
        _check(key, tensor, (tensor.shape[0], 3 * a), "fused c_attn weight")
        return tuple(part.t() for part in tensor.split(a, dim=1))
    if rule.op == "qkv_bias":
        _check(key, tensor, (3 * a,), "fused c_attn bias")
        return tuple(tensor.split(a, dim=0))
    # kv: (n_kv·D, ...) -> (n_kv, D, ...) -> each head repeated for its group -> (N·D, ...)
    rest = tuple(tensor.shape[1:])
    _check(key, tensor, (dims.num_kv_heads * d, *rest), "k/v projection")
    group = dims.num_heads // dims.num_kv_heads
    expanded = tensor.reshape(dims.num_kv_heads, d, *rest).repeat_interleave(group, dim=0)
    return (expanded.reshape(dims.num_heads * d, *rest),)


def _inverse_op(key: str, rule: _Rule, tensors: tuple[torch.Tensor, ...], dims: _Dims) -> torch.Tensor:
    """Loire tensor(s) -> the Hugging Face tensor `key`."""
    if rule.op in ("copy", "bias_alias"):
        return tensors[0]
    if rule.op == "transpose":
        return tensors[0].t()
    if rule.op == "qkv_weight":
        return torch.cat([t.t() for t in tensors], dim=1)
    if rule.op == "qkv_bias":
        return torch.cat(tensors, dim=0)
    # kv: fold groups of identical heads back to one head each
    tensor, d = tensors[0], dims.head_dim
    if dims.num_kv_heads == dims.num_heads:
        return tensor
    rest = tuple(tensor.shape[1:])
    group = dims.num_heads // dims.num_kv_heads
    grouped = tensor.reshape(dims.num_kv_heads, group, d, *rest)
    if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        raise ValueError(
            f"cannot fold {key!r} to num_key_value_heads={dims.num_kv_heads}: the heads of a group are not "
            "identical (the model is not an expanded grouped-query checkpoint, or training changed it)"
        )
    return grouped[:, 0].reshape(dims.num_kv_heads * d, *rest)


# ----------------------------------------------------------------------------------------------
# Config translation
# ----------------------------------------------------------------------------------------------


def _special_tokens(config: PretrainedConfig) -> dict[str, Any]:
    return {
        "pad_token_id": getattr(config, "pad_token_id", None),
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_id": getattr(config, "eos_token_id", None),
        "initializer_range": getattr(config, "initializer_range", 0.02),
        "use_cache": bool(getattr(config, "use_cache", True)),
    }


def _refuse(family: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"this {family} config cannot be represented exactly by a Loire model: " + "; ".join(problems))


def _activation(name: Any, field_name: str, problems: list[str]) -> None:
    if name not in ACTIVATIONS:
        problems.append(f"{field_name}={name!r} is not one of {list(ACTIVATIONS)}")


def _gpt2_to_loire(config: GPT2Config) -> dict[str, Any]:
    problems: list[str] = []
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True (per-layer attention scale)")
    if getattr(config, "reorder_and_upcast_attn", False):
        problems.append("reorder_and_upcast_attn=True")
    if not getattr(config, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False (unscaled attention)")
    if getattr(config, "add_cross_attention", False):
        problems.append("add_cross_attention=True (cross-attention layers)")
    _activation(config.activation_function, "activation_function", problems)
    if config.n_embd % config.n_head:
        problems.append(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    _refuse("GPT-2", problems)
    if config.embd_pdrop != config.resid_pdrop:
        logger.info(
            "GPT-2 embd_pdrop=%s differs from resid_pdrop=%s; Loire uses resid_pdrop for both",
            config.embd_pdrop,
            config.resid_pdrop,
        )
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        intermediate_size=config.n_inner if config.n_inner is not None else 4 * config.n_embd,
        max_position_embeddings=config.n_positions,
        norm_type="layernorm",
        norm_position="pre",
        norm_eps=config.layer_norm_epsilon,
        is_causal=True,
        position_embedding_type="learned",
        mlp_type="gelu",
        hidden_act=config.activation_function,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        attention_bias=True,
        mlp_bias=True,
        hidden_dropout=config.resid_pdrop,
        attention_dropout=config.attn_pdrop,
        **_special_tokens(config),
    )


def _bert_to_loire(config: BertConfig) -> dict[str, Any]:
    problems: list[str] = []
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        problems.append(f"position_embedding_type={position_type!r} (only 'absolute' is supported)")
    if getattr(config, "is_decoder", False):
        problems.append("is_decoder=True (causal BERT)")
    if getattr(config, "add_cross_attention", False):
        problems.append("add_cross_attention=True (cross-attention layers)")
    _activation(config.hidden_act, "hidden_act", problems)
    if config.hidden_size % config.num_attention_heads:
        problems.append(
            f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
        )
    _refuse("BERT", problems)
    classifier_dropout = config.classifier_dropout
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        norm_type="layernorm",
        norm_position="post",
        norm_eps=config.layer_norm_eps,
        is_causal=False,
        position_embedding_type="learned",
        mlp_type="gelu",
        hidden_act=config.hidden_act,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        attention_bias=True,
        mlp_bias=True,
        embedding_norm=True,
        type_vocab_size=config.type_vocab_size,
        hidden_dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_probs_dropout_prob,
        classifier_dropout=config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout,
        **_special_tokens(config),
    )


def _llama_to_loire(config: LlamaConfig) -> dict[str, Any]:
    problems: list[str] = []
    rope = getattr(config, "rope_parameters", None)
    theta: float | None = None
    if not isinstance(rope, Mapping) or "rope_theta" not in rope:
        problems.append(f"rope_parameters={rope!r} has no 'rope_theta'")
    else:
        theta = float(rope["rope_theta"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            problems.append(f"rope_type={rope_type!r} (only 'default' RoPE is supported)")
        partial = rope.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            problems.append(f"partial_rotary_factor={partial!r} (only full rotary embeddings are supported)")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (Loire's SwiGLU MLP uses 'silu')")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if getattr(config, "add_cross_attention", False):
        problems.append("add_cross_attention=True (cross-attention layers)")
    _refuse("Llama", problems)
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        norm_type="rmsnorm",
        norm_position="pre",
        norm_eps=config.rms_norm_eps,
        is_causal=True,
        position_embedding_type="rope",
        mlp_type="swiglu",
        hidden_act="silu",
        tie_word_embeddings=bool(config.tie_word_embeddings),
        attention_bias=bool(config.attention_bias),
        mlp_bias=bool(config.mlp_bias),
        rope_theta=theta,
        hidden_dropout=0.0,
        attention_dropout=float(config.attention_dropout),
        **_special_tokens(config),
    )


def _hf_common(config: LoireConfig) -> dict[str, Any]:
    return dict(
        vocab_size=config.vocab_size,
        initializer_range=config.initializer_range,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def _loire_to_hf_config(family: str, config: LoireConfig, num_kv_heads: int) -> PretrainedConfig:
    if family == "gpt2":
        return GPT2Config(
            n_positions=config.max_position_embeddings,
            n_embd=config.hidden_size,
            n_layer=config.num_hidden_layers,
            n_head=config.num_attention_heads,
            n_inner=config.intermediate_size,
            activation_function=config.hidden_act,
            resid_pdrop=config.hidden_dropout,
            embd_pdrop=config.hidden_dropout,
            attn_pdrop=config.attention_dropout,
            layer_norm_epsilon=config.norm_eps,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            **_hf_common(config),
        )
    if family == "bert":
        return BertConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            hidden_dropout_prob=config.hidden_dropout,
            attention_probs_dropout_prob=config.attention_dropout,
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=max(config.type_vocab_size, 1),
            layer_norm_eps=config.norm_eps,
            classifier_dropout=config.classifier_dropout,
            is_decoder=False,
            **_hf_common(config),
        )
    return LlamaConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=config.attention_bias,
        attention_dropout=config.attention_dropout,
        mlp_bias=config.mlp_bias,
        **_hf_common(config),
    )


# The fields that identify each family (see `_infer_family`).
_SIGNATURES: dict[str, tuple[tuple[str, Any], ...]] = {
    "gpt2": (
        ("norm_position", "pre"),
        ("norm_type", "layernorm"),
        ("position_embedding_type", "learned"),
        ("mlp_type", "gelu"),
    ),
    "bert": (("norm_position", "post"), ("norm_type", "layernorm"), ("embedding_norm", True)),
    "llama": (
        ("norm_position", "pre"),
        ("norm_type", "rmsnorm"),
        ("position_embedding_type", "rope"),
        ("mlp_type", "swiglu"),
    ),
}
# Everything else a family fixes, as (field, required value, what it means).
_REQUIREMENTS: dict[str, tuple[tuple[str, Any, str], ...]] = {
    "gpt2": (
        ("is_causal", True, "GPT-2 is causal"),
        ("type_vocab_size", 0, "GPT-2 has no token-type embeddings"),
        ("attention_bias", True, "GPT-2's Conv1D projections all have biases"),
        ("mlp_bias", True, "GPT-2's Conv1D projections all have biases"),
    ),
    "bert": (
        ("is_causal", False, "BERT is bidirectional"),
        ("position_embedding_type", "learned", "BERT has absolute learned positions"),
        ("mlp_type", "gelu", "BERT's MLP is not gated"),
        ("attention_bias", True, "BERT's projections all have biases"),
        ("mlp_bias", True, "BERT's projections all have biases"),
    ),
    "llama": (
        ("is_causal", True, "Llama is causal"),
        ("type_vocab_size", 0, "Llama has no token-type embeddings"),
    ),
}


def _family_problems(family: str, config: LoireConfig) -> list[str]:
    """Why `config` cannot be written as `family` (empty when it can)."""
    problems = [
        f"{name}={getattr(config, name)!r} (needs {value!r})"
        for name, value in _SIGNATURES[family]
        if getattr(config, name) != value
    ]
    problems += [
        f"{name}={getattr(config, name)!r} ({why})"
        for name, value, why in _REQUIREMENTS[family]
        if getattr(config, name) != value
    ]
    if family in ("gpt2", "bert") and config.attention_size != config.hidden_size:
        problems.append(
            f"num_attention_heads*head_dim = {config.num_attention_heads}*{config.head_dim} = "
            f"{config.attention_size} != hidden_size={config.hidden_size} ({family} needs them equal)"
        )
    if family == "llama" and config.hidden_size % config.num_attention_heads:
        problems.append(
            f"hidden_size={config.hidden_size} is not a multiple of num_attention_heads={config.num_attention_heads} "
            "(transformers' LlamaConfig requires it, even with an explicit head_dim)"
        )
    return problems


def _infer_family(config: LoireConfig) -> str:
    for family, signature in _SIGNATURES.items():
        if all(getattr(config, name) == value for name, value in signature):
            return family
    described = ", ".join(
        f"{name}={getattr(config, name)!r}"
        for name in ("norm_position", "norm_type", "position_embedding_type", "mlp_type", "embedding_norm")
    )
    raise ValueError(
        f"this Loire config ({described}) matches no Hugging Face family: gpt2 is "
        "pre+layernorm+learned+gelu, bert is post+layernorm+embedding_norm, llama is pre+rmsnorm+rope+swiglu"
    )


# ----------------------------------------------------------------------------------------------
# Building models from a complete state dict
# ----------------------------------------------------------------------------------------------


def _instantiate(
    cls: type[PreTrainedModel], config: PretrainedConfig, like: torch.Tensor, **init_kwargs: Any
) -> PreTrainedModel:
    """An uninitialised `cls` on `like`'s device, config dtype set to `like`'s.

    Its parameters are replaced by `_load`, so initialisation is skipped; buffers (rotary tables,
    position ids) are still computed by the constructors, on the right device.
    """
    config.dtype = like.dtype
    with no_init_weights(), torch.device(like.device):
        return cls(config, **init_kwargs)


def _load(model: PreTrainedModel, state: dict[str, torch.Tensor], *, training: bool) -> PreTrainedModel:
    """Put exactly `state` into `model` (independent copies; tensor dtypes kept), shapes checked key by key."""
    what = type(model).__name__
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"converted {what} state has missing keys {missing} and unexpected keys {extra}")
    for key, tensor in expected.items():
        _check(key, state[key], tuple(tensor.shape), f"converted {what} tensor")
    owned = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    model.load_state_dict(owned, strict=True, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    for key, tensor in model.state_dict().items():
        if not torch.equal(tensor, state[key]):
            raise RuntimeError(f"converted {what} tensor {key!r} changed while building the model (weight tying?)")
    model.train(training)
    return model


def _copy_generation_config(source: PreTrainedModel, target: PreTrainedModel) -> None:
    if source.can_generate() and target.can_generate() and source.generation_config is not None:
        target.generation_config = copy.deepcopy(source.generation_config)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def from_hf(model: PreTrainedModel) -> LoirePreTrainedModel:
    """The Loire model computing exactly what `model` computes.

    GPT2LMHeadModel / GPT2Model -> LoireForCausalLM / LoireModel, BertForMaskedLM / BertModel ->
    LoireForMaskedLM / LoireModel (BertModel's pooler is dropped with a warning), LlamaForCausalLM /
    LlamaModel -> LoireForCausalLM / LoireModel (grouped-query k/v heads are expanded to full
    multi-head attention). Raises ValueError for other classes, for configs the Loire model cannot
    represent exactly and for any parameter not in the conversion tables.
    """
    if type(model) not in _FROM_HF:
        raise ValueError(
            f"from_hf does not support {type(model).__name__}; supported classes: "
            f"{sorted(cls.__name__ for cls in _FROM_HF)}"
        )
    family_name, loire_cls = _FROM_HF[type(model)]
    family = _FAMILIES[family_name]
    translate = {"gpt2": _gpt2_to_loire, "bert": _bert_to_loire, "llama": _llama_to_loire}[family_name]
    config = LoireConfig(**translate(model.config))
    kv_heads = getattr(model.config, "num_key_value_heads", None) or config.num_attention_heads
    dims = _Dims(config.num_attention_heads, kv_heads, config.head_dim)

    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    dropped: list[str] = []
    for key, tensor in model.state_dict().items():
        parsed = _parse_hf_key(key, family, loire_cls)
        if parsed.action == "skip":
            continue
        if parsed.action == "drop":
            dropped.append(key)
            continue
        assert parsed.rule is not None
        if parsed.rule.op == "bias_alias" and not config.tie_word_embeddings:
            continue  # untied: the decoder has its own bias and this one is unused by the forward pass
        for loire_key, value in zip(parsed.loire_keys, _forward_op(key, parsed.rule, tensor, dims), strict=True):
            if loire_key in state:
                if not torch.equal(state[loire_key], value):
                    raise ValueError(
                        f"{key!r} and {sources[loire_key]!r} both map to {loire_key!r} but hold different values"
                    )
                continue
            state[loire_key] = value
            sources[loire_key] = key
    if dropped:
        logger.warning(
            "%s: %s have no Loire counterpart and are dropped (the pooler is not part of LoireModel)",
            type(model).__name__,
            dropped,
        )
    if config.tie_word_embeddings and loire_cls is not LoireModel:
        embed = state.get("model.embed_tokens.weight")
        head_key = "lm_head.weight" if loire_cls is LoireForCausalLM else "mlm_head.decoder.weight"
        head = state.get(head_key)
        if embed is not None and head is not None and not torch.equal(embed, head):
            raise ValueError(f"tie_word_embeddings=True but {head_key!r} differs from the token embeddings")
    new = _instantiate(loire_cls, config, model.get_input_embeddings().weight)
    _load(new, state, training=model.training)
    _copy_generation_config(model, new)
    assert isinstance(new, LoirePreTrainedModel)
    return new


@torch.no_grad()
def to_hf(
    model: LoirePreTrainedModel,
    family: str | None = None,
    *,
    num_key_value_heads: int | None = None,
) -> PreTrainedModel:
    """The native Hugging Face model computing exactly what `model` computes.

    LoireForCausalLM -> GPT2LMHeadModel / LlamaForCausalLM, LoireForMaskedLM -> BertForMaskedLM,
    LoireModel -> GPT2Model / BertModel (without pooler) / LlamaModel. `family` ("gpt2", "bert",
    "llama") is inferred from the config when None. Llama models are written with full multi-head
    attention unless `num_key_value_heads` asks to fold exactly repeated k/v heads back to
    grouped-query attention. Raises ValueError (saying why) when the model has no exact native form.
    """
    _check_exportable(model)
    config: LoireConfig = model.config
    family, hf_cls = _target_class(model, family)
    kv_heads = _kv_heads(config, family, num_key_value_heads)
    dims = _Dims(config.num_attention_heads, kv_heads, config.head_dim)
    try:
        hf_config = _loire_to_hf_config(family, config, kv_heads)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ValueError(f"transformers refuses the {family} config of this model: {error}") from error

    loire_state = dict(model.state_dict())
    if family == "bert" and config.type_vocab_size == 0:
        # BERT always adds a token-type embedding; one all-zero type adds exactly nothing.
        prefix = "" if type(model) is LoireModel else "model."
        embed = loire_state[prefix + "embed_tokens.weight"]
        loire_state[prefix + "embed_token_types.weight"] = embed.new_zeros(1, embed.shape[1])

    init_kwargs: dict[str, Any] = {"add_pooling_layer": False} if hf_cls is BertModel else {}
    new = _instantiate(hf_cls, hf_config, model.get_input_embeddings().weight, **init_kwargs)
    state = _hf_state(new, loire_state, _FAMILIES[family], type(model), dims)
    _load(new, state, training=model.training)
    _copy_generation_config(model, new)
    return new


def _check_exportable(model: LoirePreTrainedModel) -> None:
    """Refuse a model without an exact native form: a classifier, another class, open growth devices."""
    if isinstance(model, LoireForSequenceClassification):
        raise ValueError(
            "LoireForSequenceClassification is not convertible: its pooling and classifier have no exact "
            "counterpart in the supported Hugging Face classes; convert its `.model` (a LoireModel) instead"
        )
    if type(model) not in (LoireModel, LoireForCausalLM, LoireForMaskedLM):
        raise ValueError(f"to_hf does not support {type(model).__name__}")
    config: LoireConfig = model.config
    gated = [i for i, block in enumerate(model.loire_base.layers) if block.plugin_lambda is not None]
    if config.plugin_layers or gated or config.hidden_mask or model.loire_base.hidden_mask is not None:
        raise ValueError(
            f"the model has open growth devices (plug-in layers {sorted(set(config.plugin_layers) | set(gated))}, "
            f"hidden_mask={config.hidden_mask}), which no Hugging Face class represents: "
            "call model.consolidate() first (after ramping λ to 0 and opening the hidden mask)"
        )


def _target_class(model: LoirePreTrainedModel, family: str | None) -> tuple[str, type[PreTrainedModel]]:
    """The family (inferred when None) and the Hugging Face class `model` becomes."""
    config: LoireConfig = model.config
    if family is None:
        family = _infer_family(config)
    elif family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILIES)}")
    problems = _family_problems(family, config)
    if problems:
        raise ValueError(f"cannot write this Loire model as {family}: " + "; ".join(problems))
    hf_cls = _TO_HF.get((family, type(model)))
    if hf_cls is None:
        supported = sorted(f"{lc.__name__} -> {hc.__name__}" for (f, lc), hc in _TO_HF.items() if f == family)
        raise ValueError(f"{type(model).__name__} has no {family} counterpart; supported: {supported}")
    return family, hf_cls


def _kv_heads(config: LoireConfig, family: str, requested: int | None) -> int:
    """Key/value heads of the written model: all heads, or `requested` (llama only) when it divides them."""
    kv_heads = config.num_attention_heads if requested is None else requested
    if kv_heads != config.num_attention_heads:
        if family != "llama":
            raise ValueError(f"num_key_value_heads is only meaningful for llama, not {family}")
        if (
            isinstance(kv_heads, bool)
            or not isinstance(kv_heads, int)
            or kv_heads < 1
            or (config.num_attention_heads % kv_heads)
        ):
            raise ValueError(
                f"num_key_value_heads={kv_heads!r} must divide num_attention_heads={config.num_attention_heads}"
            )
    return kv_heads


def _hf_state(
    new: PreTrainedModel, loire_state: dict[str, torch.Tensor], fam: _Family, loire_cls: type, dims: _Dims
) -> dict[str, torch.Tensor]:
    """Every persistent tensor of `new` from the Loire tensors; each Loire tensor must find a place."""
    hf_name = type(new).__name__
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key in new.state_dict():
        parsed = _parse_hf_key(key, fam, loire_cls)
        if parsed.action != "map":
            raise ValueError(f"{hf_name} has a persistent entry {key!r} that the conversion cannot fill")
        assert parsed.rule is not None
        missing = [k for k in parsed.loire_keys if k not in loire_state]
        if missing:
            raise ValueError(f"{hf_name} entry {key!r} needs Loire tensor(s) {missing}, absent from the model")
        state[key] = _inverse_op(key, parsed.rule, tuple(loire_state[k] for k in parsed.loire_keys), dims)
        used.update(parsed.loire_keys)
    unused = sorted(set(loire_state) - used)
    if unused:
        raise ValueError(f"Loire tensors {unused} have no place in {hf_name}")
    return state


__all__ = ["FAMILIES", "from_hf", "to_hf"]
