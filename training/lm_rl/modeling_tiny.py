"""TinyLM: a small decoder-only transformer the LM-RL pipelines train from scratch.

What: a GPT-style causal LM (pre-norm blocks, causal self-attention through
`torch.nn.functional.scaled_dot_product_attention`, rotary position embeddings, GELU MLP, tied
input/output embeddings) written as a real Hugging Face model, so that `save_pretrained`,
`AutoModelForCausalLM.from_pretrained(dir)` and `generate(...)` work on it exactly as on a
pretrained LM a user has locally (the testbed of docs/papers/lm-rl.md: one code path for a
model trained here and for any HF causal LM).

Conventions followed (transformers 5.x, as in its Llama implementation):
- the KV cache is a `transformers.Cache` (a `DynamicCache` created on demand) passed as
  `cache`; `past_key_values` is accepted as the deprecated spelling. Each attention layer
  appends its keys/values with `cache.update(k, v, layer_idx)`.
- `generate` supplies `position_ids` computed from the attention mask, so left-padded
  prompts get the same positions as unpadded ones; rotary embeddings make the scores depend
  only on those positions, and the padding mask keeps pad keys out of every softmax.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

logger = logging.getLogger(__name__)

MODEL_TYPE = "helmstack_tiny_lm"


class TinyLMConfig(PretrainedConfig):
    """Hyper-parameters of TinyLM; stored in config.json by `save_pretrained`.

    Fields use the library-standard names (`num_hidden_layers`, `num_attention_heads`) because
    cache construction reads them; `num_layers` / `num_heads` are accepted as aliases.
    """

    model_type = MODEL_TYPE
    attribute_map = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}

    vocab_size: int = 101
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"head size {self.hidden_size // self.num_attention_heads} must be even for "
                "rotary embeddings"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings; position_ids (B, T) -> each (B, 1, T, head_dim).

    Computed on the fly rather than stored as a buffer: it costs nothing at this size and
    leaves no non-persistent state for from_pretrained's meta-device loading to lose.
    """
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )
    angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, H, T, d) by the position angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class TinyLMAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions and an optional KV cache."""

    def __init__(self, config: TinyLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.dropout
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_bias: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        # hidden_states: (B, T, D); attention_bias: (B, 1, T, T_past + T) bool or None
        batch, length, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, d)
        cos, sin = rotary
        query, key = _apply_rotary(query, cos, sin), _apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, H, T_past + T, d)
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_bias,
            dropout_p=self.dropout if self.training else 0.0,
            # Without padding or cache, the plain causal kernel is both simpler and faster.
            is_causal=attention_bias is None,
        )
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))


class TinyLMBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TinyLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = TinyLMAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_bias: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        attended = self.attn(self.attn_norm(hidden_states), rotary, attention_bias, cache)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


def _attention_bias(
    attention_mask: torch.Tensor, query_length: int, past_length: int
) -> torch.Tensor:
    """Boolean mask (B, 1, T, T_past + T): True where a query may attend to a key.

    attention_mask (B, T_past + T) marks real tokens (1) and padding (0). A query attends to
    real keys at or before its own index. It may also always attend to itself: a padding query
    would otherwise have no allowed key, and SDPA returns NaN for an all-masked row, which
    would then leak into the loss through 0 * NaN. Padding outputs are never read.
    """
    total_length = past_length + query_length
    device = attention_mask.device
    query_index = torch.arange(past_length, total_length, device=device)[:, None]  # (T, 1)
    key_index = torch.arange(total_length, device=device)[None, :]  # (1, T_past + T)
    causal = key_index <= query_index  # (T, T_past + T)
    allowed = causal[None] & attention_mask[:, None, :].bool()  # (B, T, T_past + T)
    allowed = allowed | (key_index == query_index)[None]
    return allowed[:, None]


class TinyLMPreTrainedModel(PreTrainedModel):
    """Shared Hugging Face plumbing: config class, weight init, SDPA support."""

    config_class = TinyLMConfig
    config: TinyLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["TinyLMBlock"]
    _supports_sdpa = True


class TinyLMModel(TinyLMPreTrainedModel):
    """Token embeddings + transformer blocks + final norm; returns hidden states (B, T, D)."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(
            TinyLMBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        # input_ids: (B, T) -> last_hidden_state (B, T, D). Keyword arguments and the
        # BaseModelOutputWithPast return follow the Hugging Face backbone convention, so code
        # that runs the backbone alone (TRL's fused LM head) works; extra flags such as
        # use_cache are decided by the caller through `cache` and ignored here.
        past_length = cache.get_seq_length() if cache is not None else 0
        query_length = input_ids.shape[1]
        if position_ids is None:
            if attention_mask is not None:
                # Count real tokens so a left-padded row starts at position 0 like an
                # unpadded one; padding positions are clamped to 0 (their outputs are unused).
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = positions[:, past_length:]
            else:
                position_ids = torch.arange(
                    past_length, past_length + query_length, device=input_ids.device
                ).expand(input_ids.shape[0], -1)
        hidden_states = self.dropout(self.embed_tokens(input_ids))
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        rotary = _rotary_cos_sin(
            position_ids, head_dim, self.config.rope_theta, hidden_states.dtype
        )
        # With a cache but no mask (single unpadded sequence decoded step by step), the query
        # block is not aligned with the key block, so the causal flag of SDPA would be wrong:
        # build the explicit mask from an all-ones padding mask instead.
        if attention_mask is None and past_length > 0:
            attention_mask = torch.ones(
                input_ids.shape[0], past_length + query_length, device=input_ids.device
            )
        attention_bias = (
            _attention_bias(attention_mask, query_length, past_length)
            if attention_mask is not None
            else None
        )
        for block in self.blocks:
            hidden_states = block(hidden_states, rotary, attention_bias, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.final_norm(hidden_states), past_key_values=cache)


class TinyLMForCausalLM(TinyLMPreTrainedModel, GenerationMixin):
    """TinyLM with a tied LM head; `forward` returns logits (B, T, V) and, with labels, loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__(config)
        self.model = TinyLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for every position; cross-entropy of next-token prediction when labels given.

        input_ids, attention_mask, position_ids, labels: (B, T); labels use -100 for positions
        that carry no loss (prompt, padding) and are shifted inside, as in every HF causal LM.
        `kwargs` absorbs the bookkeeping flags `generate` forwards (return_dict, ...), which
        this model does not act on.
        """
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden_states = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache
        ).last_hidden_state
        logits = self.lm_head(hidden_states)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


# exist_ok: re-importing the module (e.g. under a second import path) re-registers the same
# classes, which must not fail.
AutoConfig.register(MODEL_TYPE, TinyLMConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyLMConfig, TinyLMForCausalLM, exist_ok=True)
