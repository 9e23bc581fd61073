"""Hidden-size growth: hidden_size h1 → h2, any ratio, for pre-LN, post-LN, LayerNorm and RMSNorm."""

from __future__ import annotations

import logging
import math

import torch

from loire.grow._surgery import (
    Noise,
    base_key,
    cat,
    check_init,
    copy_units,
    keep,
    new_config,
    parsed_state,
    rebuild,
    split_units,
    tied_keys,
)
from loire.model import LoireForMaskedLM, LoirePreTrainedModel

logger = logging.getLogger(__name__)

# What the residual-stream writers put into the new dims, per layout.
_MEAN, _ZERO, _FREE = "mean", "zero", "free"


def _needs_mask(model: LoirePreTrainedModel) -> bool:
    """Post-LN norms, and a LayerNorm MLM head (its input passes an activation), need masked statistics."""
    config = model.config
    if config.hidden_mask or config.norm_position == "post":
        return True
    return config.norm_type == "layernorm" and isinstance(model, LoireForMaskedLM)


def can_split_hidden(model: LoirePreTrainedModel, hidden_size: int) -> bool:
    """Tiling the stream is exact for a pre-LN model without masks or an MLM head, at an integer ratio."""
    c = model.config
    return (
        hidden_size % c.hidden_size == 0
        and c.norm_position == "pre"
        and not c.embedding_norm
        and not _needs_mask(model)
        and not isinstance(model, LoireForMaskedLM)
    )


def _split_hidden(model: LoirePreTrainedModel, hidden_size: int, seed: int) -> LoirePreTrainedModel:
    """init="split": the stream is tiled k = h2/h1 times (see `grow_hidden`)."""
    config = model.config
    h1, h2 = config.hidden_size, hidden_size
    k = h2 // h1
    members = torch.arange(h2) % h1  # new dim j carries old dim j mod h1
    noise = Noise(seed, config.initializer_range)
    tied = bool(tied_keys(model))  # a head that reads the final norm through the token embeddings
    state: dict[str, torch.Tensor] = {}
    for p, t in parsed_state(model):
        t = t.detach()
        if p.kind == "embed":  # (rows, H): writers tile their columns
            t = copy_units(t, members, 1)
        elif p.kind in ("o_weight", "down_weight", "o_bias", "down_bias"):  # (H, in) / (H,): rows tiled
            t = copy_units(t, members, 0)
        elif p.kind in ("norm_weight", "norm_bias"):
            t = copy_units(t, members, 0)
            if tied and p.layer is None and p.local[0] == "norm":
                t = t / k  # the tied head reads the final norm with undivided (tiled) embedding rows
        elif p.kind in ("qkv_weight", "up_weight", "classifier_weight") or (p.kind == "output_embedding" and not tied):
            t = split_units(t, members, 1, noise)  # (out, H): each group shares w/k + cancelling noise
        elif p.kind in ("qkv_bias", "up_bias", "plugin_lambda", "classifier_bias"):
            t = keep(model, t)
        else:
            raise AssertionError(f"grow_hidden(init='split') has no rule for {p.key} ({p.kind})")
        state[p.key] = t
    return rebuild(model, new_config(model, hidden_size=h2), state)


def grow_hidden(
    model: LoirePreTrainedModel, hidden_size: int, *, seed: int = 0, init: str = "pad"
) -> LoirePreTrainedModel:
    """Widen the residual stream to `hidden_size`; h2 / h1 need not be an integer.

    Notation: r = h1/h2, s = √r. Every norm gets γ_old·s and ε·r (ε is shared in the config).

    Why it preserves the function, per layout:
    - pre-LN LayerNorm (GPT-2): mean padding. Every writer of the residual stream (token, position
      and type embeddings; attention and FFN output projections and their biases) writes into each
      new dim the mean of its old dims. Sums of means are means of sums, so every new dim of the
      stream equals mean(x_old) for every token. Then LayerNorm sees mean* = μ and
      var* = r·var, so with γ·s and ε·r the old outputs are exact; new outputs are
      γ_new·0 + β_new = 0 with β_new = 0. Readers (Q/K/V, FFN up/gate, heads) therefore see zeros
      in the new dims and their new input columns are free (random).
    - pre-LN RMSNorm (Llama): zero padding. Writers write 0 into new dims, so mean(x*²) = r·mean(x²)
      and γ·s, ε·r keep the old outputs; new outputs are γ_new·0 = 0.
    - post-LN (BERT) and a LayerNorm MLM head: no per-element parameter choice is exact for a
      non-integer ratio, so these norms use masked statistics (`LoireNorm._masked`, after Masked
      Structural Growth): the mean over dims with mask 1, the variance over all h2 dims (which is
      r·var, compensated by the same γ·s, ε·r), output multiplied by the mask. New dims get mask 0:
      they neither enter the statistics nor leave the norm, so whatever the writers put there (random
      values) is erased. Post-LN models without an embedding norm feed the raw embedding to the first
      block's readers, so their new embedding dims are 0. The trainer opens the mask towards 1, after
      which `consolidate()` removes it.
    New parameters whose value does not matter are random (seeded by `seed`); β_new = 0 where it
    matters. Tied output embeddings follow the token embeddings; untied ones get random new columns,
    which read the exact zeros the final norm produces in the new dims.

    init="split" (pre-LN causal models at an integer ratio k = h2/h1; otherwise "pad" is used and
    logged): the stream is tiled, x* = [x, …, x]. Every writer tiles its output rows, so the tiling
    holds after every block; mean and variance of the tiled vector equal those of x, so each norm
    (LayerNorm or RMSNorm, same ε) outputs its tiled old output with γ, β tiled. Every reader splits
    its input columns as w/k + z_c with Σ_c z_c = 0 (cancelling noise), so it computes w·y exactly.
    A tied head reads the final norm through the tiled (undivided) embedding, so the final norm's
    γ, β are divided by k instead. Unlike mean padding, the new dims start as copies of learned
    features, and the cancelling noise gives them distinct gradients from the first step.

    Long mostly by this argument; the code below follows it writer by writer, reader by reader.
    """
    check_init(init)
    if init == "split":
        if can_split_hidden(model, hidden_size):
            return _split_hidden(model, hidden_size, seed)
        logger.info("grow_hidden: init='split' needs a pre-LN causal model and an integer ratio; padding")
    config = model.config
    h1, h2 = config.hidden_size, hidden_size
    n, r = h2 - h1, h1 / h2
    s = math.sqrt(r)
    masked = _needs_mask(model)
    writer = _FREE if config.norm_position == "post" else _MEAN if config.norm_type == "layernorm" else _ZERO
    # The MLM head's dense layer writes into its norm: masked → free, RMSNorm → zero (act(0) = 0).
    head_writer = _FREE if masked else _ZERO
    noise = Noise(seed, config.initializer_range)

    def pad(t: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
        """Append n entries along `dim` (the hidden dim) filled per `mode`."""
        shape = list(t.shape)
        shape[dim] = n
        if mode == _MEAN:
            new = t.mean(dim=dim, keepdim=True).expand(*shape)
        elif mode == _ZERO:
            new = torch.zeros(shape, dtype=t.dtype, device=t.device)
        else:
            new = noise(*shape, like=t)
        return cat(t, new, dim)

    def norm_weight(t: torch.Tensor) -> torch.Tensor:
        return cat(t * s, s * (1.0 + noise(n, like=t)), 0)

    embed_mode = writer if (writer != _FREE or config.embedding_norm) else _ZERO
    state: dict[str, torch.Tensor] = {}
    for p, t in parsed_state(model):
        t = t.detach()
        if p.kind == "embed":  # (rows, H)
            t = pad(t, 1, embed_mode)
        elif p.kind in ("o_weight", "down_weight") or p.kind in ("o_bias", "down_bias"):  # (H, in): new rows
            t = pad(t, 0, writer)
        elif p.kind in ("qkv_weight", "up_weight", "output_embedding", "classifier_weight"):  # (out, H)
            t = pad(t, 1, _FREE)
        elif p.kind == "norm_weight" or p.kind == "head_norm_weight":
            t = norm_weight(t)
        elif p.kind == "norm_bias":  # β_new = 0 where the norm is plain (pre-LN LayerNorm)
            t = pad(t, 0, _FREE if config.norm_position == "post" else _ZERO)
        elif p.kind == "head_norm_bias":
            t = pad(t, 0, _FREE if masked else _ZERO)
        elif p.kind == "head_dense_weight":  # (H, H): reads the stream, writes the head norm
            t = pad(pad(t, 1, _FREE), 0, head_writer)
        elif p.kind == "head_dense_bias":
            t = pad(t, 0, head_writer)
        elif p.kind == "hidden_mask":
            t = cat(t, torch.zeros(n, dtype=t.dtype, device=t.device), 0)
        elif p.kind in ("qkv_bias", "up_bias", "decoder_bias", "classifier_bias", "plugin_lambda"):
            t = keep(model, t)
        else:  # every kind parse_key can return is handled above
            raise AssertionError(f"grow_hidden has no rule for {p.key} ({p.kind})")
        state[p.key] = t
    if masked and not config.hidden_mask:
        like = state[next(iter(state))]
        mask = torch.cat([torch.ones(h1), torch.zeros(n)]).to(dtype=like.dtype, device=like.device)
        state[base_key(model, "hidden_mask")] = mask
    changed = new_config(model, hidden_size=h2, norm_eps=config.norm_eps * r, hidden_mask=masked)
    return rebuild(model, changed, state)
