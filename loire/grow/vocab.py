"""Exact vocabulary growth: new token rows that text written in the old vocabulary never reads.

Adding tokens (ELLE's domain prompts `<WB>`, `<NEWS>`, … on top of an imported checkpoint's tokenizer)
appends rows to the token embedding and to the output head. Old text holds only old ids, so it never
reads a new embedding row, and every old token's logit is computed from the same hidden state and the
same head row as before: the logits over the old vocabulary are unchanged bit for bit. New input rows
start at the mean of the old embeddings (a neutral point in the embedding space), new output rows
(when untied) at zero, a new output bias at the old bias's mean.
"""

from __future__ import annotations

import torch

from loire.grow._surgery import keep, new_config, rebuild, tied_keys
from loire.model import LoirePreTrainedModel

# State keys whose first dimension is the vocabulary (input embedding, LM / MLM output heads).
_INPUT_KEYS = ("model.embed_tokens.weight",)
_OUTPUT_SUFFIXES = ("lm_head.weight", "mlm_head.decoder.weight", "mlm_head.decoder.bias", "mlm_head.bias")


@torch.no_grad()
def grow_vocab(model: LoirePreTrainedModel, vocab_size: int) -> LoirePreTrainedModel:
    """The same model over `vocab_size` tokens (ids of the old vocabulary keep their rows and logits)."""
    old = model.config.vocab_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < old:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= the current vocab_size {old}")
    if vocab_size == old:
        return model
    extra = vocab_size - old
    tied = set(tied_keys(model))
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key in tied:
            continue  # rebuilt from the embedding it shares storage with
        if key in _INPUT_KEYS or (key.endswith(_INPUT_KEYS) and tensor.shape[0] == old):
            fill = tensor.mean(dim=0, keepdim=True).expand(extra, *tensor.shape[1:])
        elif key.endswith(_OUTPUT_SUFFIXES) and tensor.shape[0] == old:
            fill = tensor.new_full((extra, *tensor.shape[1:]), float(tensor.mean()) if tensor.dim() == 1 else 0.0)
        else:
            state[key] = keep(model, tensor)
            continue
        state[key] = torch.cat([tensor.detach(), fill.to(tensor.dtype)], dim=0)
    return rebuild(model, new_config(model, vocab_size=vocab_size), state)
