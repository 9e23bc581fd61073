"""The Loire model family: one readable file, GPT-2-, BERT- and Llama-like by configuration.

Shapes: B batch, T query length, S key length (past + T), H hidden_size, A heads × head_dim,
N heads, D head_dim, F intermediate_size, V vocab_size.

Growth-time devices (see `loire.grow`), both removable by `consolidate()` once they are no-ops:
- plug-in layers: block output H' = λ·H + (1 − λ)·Block(H), a scalar `plugin_lambda` per gated block;
- a hidden mask `model.hidden_mask` (H,): masked normalisation statistics (Masked Structural
  Growth, Yao et al. 2024) used by post-LN models, and by the MLM head's norm, after hidden growth.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    SequenceClassifierOutput,
)

from loire.config import LoireConfig

logger = logging.getLogger(__name__)


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over targets != -100, equal to F.cross_entropy(ignore_index=-100) in value and gradient.

    Why not F.cross_entropy: it keeps the (N, V) log-softmax for backward, then zero-fills another (N, V)
    tensor and runs the log-softmax backward over both. Here only the logits and the (N,) log-sum-exp are
    kept, and the gradient softmax − onehot is built in place in one (N, V) tensor: less memory traffic
    on the largest tensors of a language-model step (N tokens × V vocabulary).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # (N, V), (N,)
        valid = target != -100  # (N,)
        index = torch.where(valid, target, 0)  # (N,)
        lse = torch.logsumexp(logits, dim=-1)  # (N,)
        nll = (lse - logits.gather(1, index[:, None]).squeeze(1)) * valid  # (N,)
        count = valid.sum()
        ctx.save_for_backward(logits, lse, index, valid, count)
        return nll.sum() / count  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, index, valid, count = ctx.saved_tensors
        grad = logits.sub(lse[:, None]).exp_()  # (N, V): softmax
        rows = torch.arange(len(index), device=grad.device)
        grad[rows, index] -= 1.0
        grad.mul_((valid * (grad_loss / count)).to(grad.dtype)[:, None])  # ignored rows get zero gradient
        return grad, None


def shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32: position i predicts labels[i + 1]; -100 is ignored.

    The labels are shifted (padded with -100), not the logits, so no logits-sized copy is made.
    """
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    logits = logits.float().reshape(-1, logits.shape[-1])  # (B·T, V)
    return _CrossEntropy.apply(logits, shifted.reshape(-1))


class LoireNorm(nn.Module):
    """LayerNorm or RMSNorm, optionally with statistics taken over masked dimensions only.

    With a mask m ∈ [0, 1]^H the mean is Σ m·x / Σ m, the variance (or mean square) is
    Σ m·(x − mean)² / H, and the output is multiplied by m: dims with m = 0 neither influence the
    statistics nor leave a trace in the output, and with m = 1 everywhere this is the plain norm.
    Dividing the variance by H (not Σ m) makes growth h1 → h2 shrink it by exactly h1/h2, which the
    hidden operator compensates the same way for masked and plain norms (γ·√(h1/h2), ε·h1/h2).
    """

    def __init__(self, hidden_size: int, norm_type: str, eps: float) -> None:
        super().__init__()
        self.norm_type = norm_type
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if norm_type == "layernorm" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            return self._masked(x, mask)
        if self.norm_type == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        # RMSNorm as in Llama: statistics in at least float32, scale in the input dtype.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def _masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.dtype)  # (H,)
        h = x.shape[-1]
        if self.norm_type == "layernorm":
            mean = (x * m).sum(-1, keepdim=True) / m.sum()
            centered = x - mean
            var = (m * centered.pow(2)).sum(-1, keepdim=True) / h
            y = centered * torch.rsqrt(var + self.eps) * self.weight + self.bias
        else:
            ms = (m * x.pow(2)).sum(-1, keepdim=True) / h
            y = x * torch.rsqrt(ms + self.eps) * self.weight
        return y * m


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, D) for rotary embeddings, Llama's half-rotation layout."""
    # Frequencies exactly as HF Llama computes them (float32), so imported models match at any position.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    work = torch.promote_types(dtype, torch.float32)
    freqs = position_ids[..., None].to(work) * inv_freq.to(work)  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LoireAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections through F.scaled_dot_product_attention."""

    def __init__(self, config: LoireConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.is_causal = config.is_causal
        self.dropout = config.attention_dropout
        h, a, bias = config.hidden_size, config.attention_size, config.attention_bias
        self.q_proj = nn.Linear(h, a, bias=bias)
        self.k_proj = nn.Linear(h, a, bias=bias)
        self.v_proj = nn.Linear(h, a, bias=bias)
        self.o_proj = nn.Linear(a, h, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, T, D)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, N, S, D)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.is_causal and attn_mask is None and t > 1,
        )  # (B, N, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, H)


class LoireMLP(nn.Module):
    """GELU MLP (down(act(up(x)))) or SwiGLU (down(silu(gate(x)) · up(x)))."""

    def __init__(self, config: LoireConfig) -> None:
        super().__init__()
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.mlp_type == "swiglu"
        self.gate_proj = nn.Linear(h, f, bias=bias) if self.gated else None
        self.up_proj = nn.Linear(h, f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)
        self.act = ACT2FN["silu" if self.gated else config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class LoireBlock(nn.Module):
    """One transformer block; pre-LN (GPT-2, Llama) or post-LN (BERT), optionally a λ-gated plug-in."""

    def __init__(self, config: LoireConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = LoireNorm(config.hidden_size, config.norm_type, config.norm_eps)
        self.attn = LoireAttention(config, layer_idx)
        self.mlp_norm = LoireNorm(config.hidden_size, config.norm_type, config.norm_eps)
        self.mlp = LoireMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        # λ of a plug-in layer: a parameter when learned, a (saved) buffer when scheduled by the trainer.
        self.plugin_lambda: torch.Tensor | None
        gated = layer_idx in config.plugin_layers
        if gated and config.plugin_lambda_mode == "learned":
            self.plugin_lambda = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("plugin_lambda", torch.ones(()) if gated else None)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None,
        hidden_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.pre_norm:
            h = x + self.dropout(self.attn(self.attn_norm(x), attn_mask, rope, cache))
            h = h + self.dropout(self.mlp(self.mlp_norm(h)))
        else:
            h = self.attn_norm(x + self.dropout(self.attn(x, attn_mask, rope, cache)), hidden_mask)
            h = self.mlp_norm(h + self.dropout(self.mlp(h)), hidden_mask)
        if self.plugin_lambda is None:
            return h
        lam = self.plugin_lambda.to(x.dtype)
        return lam * x + (1 - lam) * h  # λ = 1: exactly the input (the block is skipped)


class LoirePreTrainedModel(PreTrainedModel):
    config_class = LoireConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules: ClassVar[list[str]] = ["LoireBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LoireNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LoireBlock) and module.plugin_lambda is not None:
            init.ones_(module.plugin_lambda)
        elif isinstance(module, LoireModel) and module.hidden_mask is not None:
            init.ones_(module.hidden_mask)

    # ----- growth-time devices -----
    @property
    def loire_base(self) -> LoireModel:
        return self if isinstance(self, LoireModel) else getattr(self, self.base_model_prefix)

    def plugin_lambdas(self) -> dict[int, float]:
        """λ of each plug-in layer, by layer index."""
        return {
            i: float(block.plugin_lambda.detach())
            for i, block in enumerate(self.loire_base.layers)
            if block.plugin_lambda is not None
        }

    @torch.no_grad()
    def set_plugin_lambda(self, value: float) -> None:
        """Set λ of every plug-in layer (the scheduled policy ramps it 1 → 0)."""
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"plugin lambda must lie in [0, 1], got {value}")
        for block in self.loire_base.layers:
            if block.plugin_lambda is not None:
                block.plugin_lambda.fill_(value)

    @torch.no_grad()
    def open_hidden_mask(self, value: float) -> None:
        """Open the masked (new) hidden dims to at least `value` ∈ [0, 1]; 1 = plain normalisation."""
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"hidden mask value must lie in [0, 1], got {value}")
        mask = self.loire_base.hidden_mask
        if mask is not None:
            mask.clamp_(min=value)

    def consolidate(self, strict: bool = True) -> LoirePreTrainedModel:
        """Remove growth devices that are no-ops: gates with λ = 0 and a fully open hidden mask.

        In place; returns self. With `strict`, a device that is still active is an error.
        """
        base = self.loire_base
        still_open = [i for i, lam in self.plugin_lambdas().items() if lam != 0.0]
        mask_open = base.hidden_mask is not None and bool((base.hidden_mask != 1).any())
        if strict and (still_open or mask_open):
            raise ValueError(
                f"cannot consolidate: plug-in layers {still_open} have λ != 0"
                + (" and the hidden mask is not fully open" if mask_open else "")
            )
        for i, block in enumerate(base.layers):
            if block.plugin_lambda is not None and i not in still_open:
                block._parameters.pop("plugin_lambda", None)
                block.register_buffer("plugin_lambda", None)
        if base.hidden_mask is not None and not mask_open:
            base.hidden_mask = None  # a None buffer is dropped from the state dict
        self.config.plugin_layers = still_open
        self.config.hidden_mask = mask_open
        return self


class LoireModel(LoirePreTrainedModel):
    """Embeddings → blocks → final norm (pre-LN only). Returns hidden states (B, T, H)."""

    def __init__(self, config: LoireConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, h) if config.position_embedding_type == "learned" else None
        )
        self.embed_token_types = nn.Embedding(config.type_vocab_size, h) if config.type_vocab_size > 0 else None
        self.embed_norm = LoireNorm(h, config.norm_type, config.norm_eps) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(LoireBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = LoireNorm(h, config.norm_type, config.norm_eps) if config.norm_position == "pre" else None
        self.hidden_mask: torch.Tensor | None
        self.register_buffer("hidden_mask", torch.ones(h) if config.hidden_mask else None)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def body_mask(self) -> torch.Tensor | None:
        """The hidden mask as seen by body norms: post-LN models normalise over masked statistics."""
        return self.hidden_mask if self.config.norm_position == "post" else None

    def _attention_mask(
        self, attention_mask: torch.Tensor | None, t: int, past: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """Additive mask (B, 1, T, S), or None when SDPA's own is_causal suffices."""
        causal_with_past = self.config.is_causal and past > 0 and t > 1
        if attention_mask is None and not causal_with_past:
            return None
        s = past + t
        allowed = torch.ones(1, 1, t, s, dtype=torch.bool, device=device)
        if self.config.is_causal:
            q_pos = torch.arange(past, s, device=device)[:, None]
            allowed = allowed & (torch.arange(s, device=device)[None, :] <= q_pos)
        if attention_mask is not None:
            if attention_mask.shape[-1] != s:
                raise ValueError(f"attention_mask has length {attention_mask.shape[-1]}, expected {s} (past + input)")
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        # A row with no allowed key (a padded query) attends uniformly instead of producing NaN.
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: object,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        b, t = x.shape[:2]
        use_cache = self.config.use_cache and self.config.is_causal if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        cache = cache if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if past + t > self.config.max_position_embeddings and self.embed_positions is not None:
            raise ValueError(
                f"sequence length {past + t} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device)[None].expand(b, t)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        if self.embed_token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(b, t, dtype=torch.long, device=x.device)
            x = x + self.embed_token_types(token_type_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x, self.body_mask())
        x = self.dropout(x)
        rope = None
        if self.config.position_embedding_type == "rope":
            rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        attn_mask = self._attention_mask(attention_mask, t, past, x.dtype, x.device)
        for block in self.layers:
            x = block(x, attn_mask, rope, cache, self.body_mask())
        if self.norm is not None:
            x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, cache=cache)


class LoireForCausalLM(LoirePreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LoireConfig) -> None:
        super().__init__(config)
        self.model = LoireModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            # Next-token prediction: position i predicts labels[i + 1]; -100 is ignored.
            loss = shifted_lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


class LoireMLMHead(nn.Module):
    """BERT's prediction head: dense → act → norm → decoder (tied to the token embeddings)."""

    def __init__(self, config: LoireConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = LoireNorm(config.hidden_size, config.norm_type, config.norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, x: torch.Tensor, hidden_mask: torch.Tensor | None) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x)), hidden_mask))


class LoireForMaskedLM(LoirePreTrainedModel):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"mlm_head.decoder.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LoireConfig) -> None:
        super().__init__(config)
        self.model = LoireModel(config)
        self.mlm_head = LoireMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.mlm_head.decoder = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: object,
    ) -> MaskedLMOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        )
        # The head norm always honours the mask: after hidden growth its input has no exact padding.
        logits = self.mlm_head(out.last_hidden_state, self.model.hidden_mask)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


class LoireForSequenceClassification(LoirePreTrainedModel):
    """Classification on a pooled token: the last non-pad token (causal) or the first token (masked)."""

    def __init__(self, config: LoireConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LoireModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _pool(
        self, hidden: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, t = hidden.shape[:2]
        if not self.config.is_causal:
            return hidden[:, 0]
        if attention_mask is not None:
            # Last position whose mask is 1 (works for left and right padding).
            positions = torch.arange(t, device=hidden.device)
            last = (attention_mask.to(torch.long) * positions).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            non_pad = (input_ids != self.config.pad_token_id).to(torch.long)
            last = (non_pad * torch.arange(t, device=hidden.device)).argmax(-1)
        else:
            last = torch.full((b,), t - 1, device=hidden.device)
        return hidden[torch.arange(b, device=hidden.device), last]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: object,
    ) -> SequenceClassifierOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        )
        pooled = self._pool(out.last_hidden_state, input_ids, attention_mask)  # (B, H)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def model_dims(model: nn.Module) -> dict[str, int]:
    """The grown dimensions and parameter count a stage record lists."""
    c = model.config
    return {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "parameters": num_parameters(model),
    }


def num_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "LoireForCausalLM",
    "LoireForMaskedLM",
    "LoireForSequenceClassification",
    "LoireModel",
    "LoirePreTrainedModel",
    "model_dims",
    "num_parameters",
]
