"""Key-by-key weight surgery shared by the growth operators.

Every state-dict key of a Loire model is parsed into a `Param` (what it is, which layer) by exact
structure, never by substring; a key that is not part of the architecture is an error, so an
operator can never silently skip a tensor it does not understand.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loire.config import LoireConfig
from loire.model import LoireModel, LoirePreTrainedModel

# Parameter kinds. "writer": writes the residual stream (its output dim is hidden);
# "reader": reads the (normalised) stream (its input dim is hidden).
_BASE_KEYS: dict[tuple[str, ...], str] = {
    ("embed_tokens", "weight"): "embed",
    ("embed_positions", "weight"): "embed",
    ("embed_token_types", "weight"): "embed",
    ("embed_norm", "weight"): "norm_weight",
    ("embed_norm", "bias"): "norm_bias",
    ("norm", "weight"): "norm_weight",
    ("norm", "bias"): "norm_bias",
    ("hidden_mask",): "hidden_mask",
}
_LAYER_KEYS: dict[tuple[str, ...], str] = {
    ("attn_norm", "weight"): "norm_weight",
    ("attn_norm", "bias"): "norm_bias",
    ("mlp_norm", "weight"): "norm_weight",
    ("mlp_norm", "bias"): "norm_bias",
    ("attn", "q_proj", "weight"): "qkv_weight",
    ("attn", "k_proj", "weight"): "qkv_weight",
    ("attn", "v_proj", "weight"): "qkv_weight",
    ("attn", "q_proj", "bias"): "qkv_bias",
    ("attn", "k_proj", "bias"): "qkv_bias",
    ("attn", "v_proj", "bias"): "qkv_bias",
    ("attn", "o_proj", "weight"): "o_weight",
    ("attn", "o_proj", "bias"): "o_bias",
    ("mlp", "up_proj", "weight"): "up_weight",
    ("mlp", "gate_proj", "weight"): "up_weight",
    ("mlp", "up_proj", "bias"): "up_bias",
    ("mlp", "gate_proj", "bias"): "up_bias",
    ("mlp", "down_proj", "weight"): "down_weight",
    ("mlp", "down_proj", "bias"): "down_bias",
    ("plugin_lambda",): "plugin_lambda",
}
_HEAD_KEYS: dict[tuple[str, ...], str] = {
    ("lm_head", "weight"): "output_embedding",
    ("mlm_head", "dense", "weight"): "head_dense_weight",
    ("mlm_head", "dense", "bias"): "head_dense_bias",
    ("mlm_head", "norm", "weight"): "head_norm_weight",
    ("mlm_head", "norm", "bias"): "head_norm_bias",
    ("mlm_head", "decoder", "weight"): "output_embedding",
    ("mlm_head", "decoder", "bias"): "decoder_bias",
    ("classifier", "weight"): "classifier_weight",
    ("classifier", "bias"): "classifier_bias",
}


@dataclass(frozen=True)
class Param:
    key: str
    kind: str
    layer: int | None = None  # block index for per-layer parameters
    local: tuple[str, ...] = ()  # key inside the block / base model


def parse_key(key: str, model: LoirePreTrainedModel) -> Param:
    """Structured parse of a state-dict key; raises ValueError for anything unknown."""
    parts = tuple(key.split("."))
    prefix = () if isinstance(model, LoireModel) else (model.base_model_prefix,)
    if parts in _HEAD_KEYS and prefix:
        return Param(key, _HEAD_KEYS[parts], local=parts)
    if parts[: len(prefix)] == prefix:
        rest = parts[len(prefix) :]
        if rest in _BASE_KEYS:
            return Param(key, _BASE_KEYS[rest], local=rest)
        if len(rest) >= 3 and rest[0] == "layers" and rest[1].isdigit() and rest[2:] in _LAYER_KEYS:
            return Param(key, _LAYER_KEYS[rest[2:]], layer=int(rest[1]), local=rest[2:])
    raise ValueError(f"unknown parameter {key!r} in {type(model).__name__}: the growth operators do not know it")


def parsed_state(model: LoirePreTrainedModel) -> list[tuple[Param, torch.Tensor]]:
    """(Param, tensor) for every state-dict entry, validated; tensors are the model's own (read only).

    A tied output embedding is left out: `rebuild` ties it to the grown input embedding.
    """
    tied = tied_keys(model)
    return [(parse_key(k, model), v) for k, v in model.state_dict().items() if k not in tied]


def base_key(model: LoirePreTrainedModel, *local: str) -> str:
    """The state-dict key of a base-model entry (prefixed inside a head model)."""
    prefix = () if isinstance(model, LoireModel) else (model.base_model_prefix,)
    return ".".join((*prefix, *local))


def layer_key(model: LoirePreTrainedModel, layer: int, local: tuple[str, ...]) -> str:
    return base_key(model, "layers", str(layer), *local)


class Noise:
    """Seeded N(0, std²) values for new parameters whose value does not affect the function."""

    def __init__(self, seed: int, std: float) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.std = std

    def __call__(self, *shape: int, like: torch.Tensor) -> torch.Tensor:
        # Drawn directly in the target dtype (a float64 draw and cast is ~5× slower at 124M scale).
        values = torch.empty(shape, dtype=like.dtype).normal_(0.0, self.std, generator=self.generator)
        return values.to(device=like.device)


# Models created inside one grow() call: their tensors may be moved into the next model instead of
# copied, since nobody else holds them. The caller's model is never in this set.
_OWNED: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar("loire_grow_owned", default=None)


@contextlib.contextmanager
def owned_models() -> Iterator[set[int]]:
    owned: set[int] = set()
    token = _OWNED.set(owned)
    try:
        yield owned
    finally:
        _OWNED.reset(token)


def keep(model: LoirePreTrainedModel, tensor: torch.Tensor) -> torch.Tensor:
    """An unchanged tensor for the new model: reused if `model` is an intermediate of grow(), else copied."""
    owned = _OWNED.get()
    return tensor.detach() if owned is not None and id(model) in owned else tensor.detach().clone()


def tied_keys(model: LoirePreTrainedModel) -> dict[str, str]:
    """Tied output key -> the input-embedding key it shares storage with (empty when untied)."""
    if not model.config.tie_word_embeddings:
        return {}
    return dict(getattr(type(model), "_tied_weights_keys", None) or {})


def cat(old: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat([old.detach(), new.to(old.dtype)], dim=dim)


def check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise RuntimeError(f"surgery produced {key} with shape {tuple(tensor.shape)}, expected {expected}")


def rebuild(model: LoirePreTrainedModel, config: LoireConfig, state: dict[str, torch.Tensor]) -> LoirePreTrainedModel:
    """A new model of the same class from `config` and a complete state dict (shapes checked key by key)."""
    with torch.device("meta"):
        new = type(model)(config)
    expected = new.state_dict()
    for target, source in tied_keys(new).items():
        state[target] = state[source]
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise RuntimeError(f"surgery produced a state with missing keys {missing} and unexpected keys {extra}")
    for key, tensor in expected.items():
        check_shape(key, state[key], tuple(tensor.shape))
    new.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        new.tie_weights()
    new.train(model.training)
    if getattr(model, "generation_config", None) is not None and hasattr(new, "generation_config"):
        new.generation_config = copy.deepcopy(model.generation_config)  # eos, max_new_tokens, … survive growth
    return new


def new_config(model: LoirePreTrainedModel, **changes: object) -> LoireConfig:
    config = copy.deepcopy(model.config)
    return config.replace(**changes)


# How a width operator fills new units: "pad" (new units that contribute exactly 0: zero consumer
# columns, or mean / zero padding of the stream) or "split" (each new unit duplicates a source unit and
# the group shares the source's consumer weights with a noise that cancels within the group).
WIDTH_INITS: tuple[str, ...] = ("pad", "split")


def check_init(init: str) -> None:
    if init not in WIDTH_INITS:
        raise ValueError(f"init={init!r}: allowed values are {', '.join(WIDTH_INITS)}")


def split_members(old: int, new: int) -> torch.Tensor:
    """Source unit of every unit after growth: 0..old-1 themselves, then the new units' sources.

    New units duplicate sources spread evenly over the old units (each old unit at most once while
    new - old <= old), so every group is as small as possible.
    """
    n = new - old
    sources = [int((k + 0.5) * old / n) % old for k in range(n)] if n else []
    return torch.cat([torch.arange(old), torch.tensor(sorted(sources), dtype=torch.long)])


def copy_units(t: torch.Tensor, members: torch.Tensor, dim: int) -> torch.Tensor:
    """Producer side of a split: every unit's weights copied from its source (identical outputs)."""
    return t.detach().index_select(dim, members.to(t.device))


def split_units(t: torch.Tensor, members: torch.Tensor, dim: int, noise: Noise) -> torch.Tensor:
    """Consumer side of a split: each group shares its source's weights, w/m + z with Σ_group z = 0.

    The members of a group carry identical values (copy_units), so the consumer sees
    Σ_k (w/m + z_k)·a = w·a exactly, while the cancelling noise z makes the copies' weights, and so
    their gradients, differ from the first step: the symmetry of plain duplication is broken.
    """
    t = t.detach()
    members = members.to(t.device)
    old = t.shape[dim]
    counts = torch.bincount(members, minlength=old).to(t.dtype)
    shape = [1] * t.dim()
    shape[dim] = -1
    base = t.index_select(dim, members) / counts.index_select(0, members).view(shape)
    z = noise(*base.shape, like=base)
    group_sum = torch.zeros_like(t).index_add_(dim, members, z)
    z = z - (group_sum / counts.view(shape)).index_select(dim, members)
    return base + z


def split_width(
    model: LoirePreTrainedModel, members: torch.Tensor, producers: tuple[str, ...], consumer: str, noise: Noise
) -> dict[str, torch.Tensor]:
    """The state of a width split: producer kinds copy their units (dim 0), the consumer kind shares them (dim 1)."""
    state: dict[str, torch.Tensor] = {}
    for p, t in parsed_state(model):
        if p.kind in producers:
            state[p.key] = copy_units(t, members, 0)
        elif p.kind == consumer:
            state[p.key] = split_units(t, members, 1, noise)
        else:
            state[p.key] = keep(model, t)
    return state
