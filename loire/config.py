"""LoireConfig: one config for the GPT-2-, BERT- and Llama-like members of the Loire family.

Architecture fields are a contract (checks outside this repo construct configs with them):
`vocab_size`, `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `head_dim`,
`intermediate_size`, `max_position_embeddings`, `norm_type`, `norm_position`, `norm_eps`,
`is_causal`, `position_embedding_type`, `mlp_type`, `tie_word_embeddings`.

Growth-time state lives here too, so a model saved mid-growth reloads with its devices:
`plugin_layers` (indices of λ-gated plug-in layers), `plugin_lambda_mode` and `hidden_mask`
(masked normalisation statistics, see `loire.grow.hidden`).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from transformers import PretrainedConfig

NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITION_TYPES = ("learned", "rope")
MLP_TYPES = ("gelu", "swiglu")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")
LAMBDA_MODES = ("scheduled", "learned")

# The fields that define the computation; a serialized config must carry every one of them.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "norm_type",
    "norm_position",
    "norm_eps",
    "is_causal",
    "position_embedding_type",
    "mlp_type",
    "tie_word_embeddings",
)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"LoireConfig.{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"LoireConfig.{name}={value!r} must be an int >= {minimum}")


def _check_unit_float(name: str, value: Any, *, closed_low: bool = True, high: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"LoireConfig.{name}={value!r} must be a number")
    if not (0.0 <= value < high if closed_low else 0.0 < value < high):
        raise ValueError(f"LoireConfig.{name}={value!r} must lie in [0, {high})")


class LoireConfig(PretrainedConfig):
    """Configuration of a Loire model (GPT-2-, BERT- or Llama-like; see `PRESETS`)."""

    model_type: ClassVar[str] = "loire"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 512
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    norm_type: str = "layernorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    is_causal: bool = True
    position_embedding_type: str = "learned"
    mlp_type: str = "gelu"
    tie_word_embeddings: bool = True
    # --- details of the three families ---
    hidden_act: str = "gelu_new"
    attention_bias: bool = True
    mlp_bias: bool = True
    embedding_norm: bool = False  # BERT: LayerNorm on the embedding sum (post-LN only)
    type_vocab_size: int = 0  # BERT token-type embeddings; 0 = none
    rope_theta: float = 10000.0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    classifier_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    use_cache: bool = True
    # --- growth-time state (see loire.grow) ---
    plugin_layers: list[int] | None = None
    plugin_lambda_mode: str = "scheduled"
    hidden_mask: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        self.plugin_layers = sorted(int(i) for i in (self.plugin_layers or []))
        self.validate()
        super().__post_init__(**kwargs)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and what it allows."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("type_vocab_size", self.type_vocab_size, minimum=0)
        _check_choice("norm_type", self.norm_type, NORM_TYPES)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_TYPES)
        _check_choice("mlp_type", self.mlp_type, MLP_TYPES)
        _check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _check_choice("plugin_lambda_mode", self.plugin_lambda_mode, LAMBDA_MODES)
        for name in ("is_causal", "tie_word_embeddings", "attention_bias", "mlp_bias", "embedding_norm", "hidden_mask"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoireConfig.{name}={getattr(self, name)!r} must be a bool")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"LoireConfig.norm_eps={self.norm_eps!r} must be a number > 0")
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            _check_unit_float(name, getattr(self, name))
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"LoireConfig.head_dim={self.head_dim} must be even with position_embedding_type='rope'")
        if self.embedding_norm and self.norm_position != "post":
            raise ValueError("LoireConfig.embedding_norm=True requires norm_position='post' (the BERT layout)")
        bad = [i for i in self.plugin_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"LoireConfig.plugin_layers={self.plugin_layers} holds {bad}, outside [0, {self.num_hidden_layers})"
            )

    # A saved config is complete (not a diff against defaults), so loading can insist on every field.
    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        missing = [name for name in ARCHITECTURE_FIELDS if name not in config_dict and name not in kwargs]
        if missing:
            raise ValueError(
                f"Loire config is missing field(s) {missing}; every one of {list(ARCHITECTURE_FIELDS)} is required"
            )
        return super().from_dict(config_dict, **kwargs)

    def replace(self, **changes: Any) -> LoireConfig:
        """A validated copy with `changes` applied (configs are treated as immutable values)."""
        unknown = [k for k in changes if not hasattr(self, k)]
        if unknown:
            raise ValueError(f"LoireConfig has no field(s) {unknown}")
        new = copy.deepcopy(self)
        for key, value in changes.items():
            setattr(new, key, value)
        new.plugin_layers = sorted(int(i) for i in (new.plugin_layers or []))
        new.validate()
        return new

    @property
    def attention_size(self) -> int:
        """Width of the concatenated heads (heads × head_dim), independent of hidden_size."""
        return self.num_attention_heads * self.head_dim


_GPT2: dict[str, Any] = dict(
    norm_type="layernorm",
    norm_position="pre",
    norm_eps=1e-5,
    is_causal=True,
    position_embedding_type="learned",
    mlp_type="gelu",
    hidden_act="gelu_new",
    tie_word_embeddings=True,
    attention_bias=True,
    mlp_bias=True,
)
_BERT: dict[str, Any] = dict(
    norm_type="layernorm",
    norm_position="post",
    norm_eps=1e-12,
    is_causal=False,
    position_embedding_type="learned",
    mlp_type="gelu",
    hidden_act="gelu",
    tie_word_embeddings=True,
    attention_bias=True,
    mlp_bias=True,
    embedding_norm=True,
    type_vocab_size=2,
)
_LLAMA: dict[str, Any] = dict(
    norm_type="rmsnorm",
    norm_position="pre",
    norm_eps=1e-6,
    is_causal=True,
    position_embedding_type="rope",
    mlp_type="swiglu",
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)


def _dims(vocab: int, hidden: int, layers: int, heads: int, ffn: int, positions: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=ffn,
        max_position_embeddings=positions,
    )


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized members (~1-3M parameters) for tests and the embedded demo.
    "gpt-tiny": {**_GPT2, **_dims(4096, 128, 4, 4, 512, 256)},
    "bert-tiny": {**_BERT, **_dims(4096, 128, 4, 4, 512, 256)},
    "llama-tiny": {**_LLAMA, **_dims(4096, 128, 4, 4, 344, 256)},
    # Reference sizes of the real architectures.
    "gpt2": {**_GPT2, **_dims(50257, 768, 12, 12, 3072, 1024), "bos_token_id": 50256, "eos_token_id": 50256},
    "bert-base": {**_BERT, **_dims(30522, 768, 12, 12, 3072, 512), "pad_token_id": 0},
    "llama-small": {**_LLAMA, **_dims(32000, 768, 12, 12, 2048, 2048), "rope_theta": 10000.0},
}


def preset(name: str, **overrides: Any) -> LoireConfig:
    """A LoireConfig for a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return LoireConfig(**{**PRESETS[name], **overrides})
