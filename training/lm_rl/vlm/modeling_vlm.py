"""TinyVLM: a small vision-language model (CNN patch encoder + projector + TinyLM) as a
Hugging Face model.

What: ``TinyVLMForConditionalGeneration`` turns an image (``pixel_values`` (B, 3, H, W), from
``TinyVLMImageProcessor``) into ``num_image_tokens`` embeddings and puts them where the
prompt holds the image placeholder token, LLaVA-style: the prompt is
``[<image>] * num_image_tokens + text``, so the image tokens are prefix embeddings before the
text prompt and everything after them is an ordinary causal LM (``TinyLMForCausalLM`` as the
language model). With a KV cache the image is seen once, at the prefill; decoding steps
carry text tokens only. It is a real ``PreTrainedModel`` with its own ``PretrainedConfig``
(``model_type`` "helmstack_tiny_vlm", registered with AutoConfig / AutoModel /
AutoModelForImageTextToText), so ``save_pretrained`` / ``from_pretrained`` work exactly as
for a VLM a user has on disk.

Why a CNN and not a ViT: at 64x64 pixels and a few minutes of CPU training, three strided
convolutions learn shapes, bar tops and seven-segment digits far faster than attention over
patches; the output is still a grid of patch tokens (``patch_grid`` x ``patch_grid``) with
learned 2-D position embeddings, which is what the projector and the LM see in a ViT VLM.

The image placeholder is input-only: its logit is masked to the dtype's minimum, so the
sampler never draws it and every completion token is text.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from training.lm_rl.modeling_tiny import (
    TinyLMConfig,
    TinyLMForCausalLM,
    _attention_bias,
    _rotary_cos_sin,
)

logger = logging.getLogger(__name__)

MODEL_TYPE = "helmstack_tiny_vlm"


class TinyVLMConfig(PretrainedConfig):
    """Hyper-parameters of TinyVLM; ``text_config`` is the language model's TinyLMConfig.

    image_size: side of the (square) input image in pixels: three stride-2 convolutions
        reduce it by 8, then a learned patchify convolution (kernel = stride =
        image_size / 8 / patch_grid) gives ``patch_grid`` x ``patch_grid`` tokens, so
        image_size must be a multiple of 8 * patch_grid.
    vision_channels: channels of the last convolution (the patch feature width).
    image_token_id: the placeholder id in the prompt (the tokenizer's ``<image>``).
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": TinyLMConfig}

    text_config: dict | PretrainedConfig | None = None
    image_size: int = 64
    num_channels: int = 3
    vision_channels: int = 96
    patch_grid: int = 4
    image_token_id: int = 101
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        for name in ("image_size", "num_channels", "vision_channels", "patch_grid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyVLMConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % (8 * self.patch_grid) != 0:
            raise ValueError(
                f"TinyVLMConfig.image_size={self.image_size} must be a multiple of 8 * patch_grid "
                f"({8 * self.patch_grid})"
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"TinyVLMConfig.image_token_id={self.image_token_id} is outside the text vocabulary "
                f"(vocab_size {self.text_config.vocab_size})"
            )

    @property
    def num_image_tokens(self) -> int:
        return self.patch_grid * self.patch_grid


class TinyVisionEncoder(nn.Module):
    """(B, 3, H, W) pixels -> (B, patch_grid**2, vision_channels) patch features."""

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__()
        width = config.vision_channels
        self.convs = nn.ModuleList([
            nn.Conv2d(config.num_channels, width // 3, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(width // 3, 2 * width // 3, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(2 * width // 3, width, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1),
        ])
        # Learned downsampling to the token grid (a ViT-style patchify of the feature map):
        # averaging would blur the glyph strokes and bar tops the tasks are about.
        ratio = config.image_size // 8 // config.patch_grid
        self.patchify = nn.Conv2d(width, width, kernel_size=ratio, stride=ratio)
        self.position = nn.Parameter(torch.zeros(config.patch_grid * config.patch_grid, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = pixel_values
        for index, conv in enumerate(self.convs):
            out = F.gelu(conv(hidden))
            hidden = hidden + out if index == len(self.convs) - 1 else out  # residual at full width
        hidden = self.patchify(hidden)  # (B, C, g, g)
        tokens = hidden.flatten(2).transpose(1, 2)  # (B, g*g, C), row-major patches
        return self.norm(tokens + self.position)


class TinyVLMPreTrainedModel(PreTrainedModel):
    config_class = TinyVLMConfig
    config: TinyVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TinyLMBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Convolutions trained from scratch need fan-in scaling, not the LM's N(0, 0.02).
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, TinyVisionEncoder):
            init.normal_(module.position, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)


class TinyVLMForConditionalGeneration(TinyVLMPreTrainedModel, GenerationMixin):
    """Vision encoder + 2-layer MLP projector + TinyLM; ``forward`` returns logits (B, T, V)."""

    _tied_weights_keys = {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}

    def __init__(self, config: TinyVLMConfig) -> None:
        super().__init__(config)
        self.vision_tower = TinyVisionEncoder(config)
        hidden = config.text_config.hidden_size
        self.multi_modal_projector = nn.Sequential(
            nn.Linear(config.vision_channels, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.language_model = TinyLMForCausalLM(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.language_model.set_output_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_image_tokens, text hidden size)."""
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be (B, {expected[0]}, {expected[1]}, {expected[2]}), got "
                f"{tuple(pixel_values.shape)}; use the model's image processor"
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values")
        dtype = self.multi_modal_projector[0].weight.dtype
        return self.multi_modal_projector(self.vision_tower(pixel_values.to(dtype)))

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features written over the placeholder positions."""
        embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        is_image = input_ids == self.config.image_token_id  # (B, T)
        if pixel_values is None:
            if bool(is_image.any()):
                raise ValueError(
                    "input_ids hold image placeholder tokens but no pixel_values were given"
                )
            return embeds
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} images for {input_ids.shape[0]} sequences; "
                "pass one image per sequence"
            )
        counts = is_image.sum(dim=1)
        if bool((counts != self.config.num_image_tokens).any()):
            raise ValueError(
                f"every sequence needs exactly {self.config.num_image_tokens} image placeholder tokens "
                f"(id {self.config.image_token_id}) when pixel_values are given, got {counts.tolist()}"
            )
        features = self.get_image_features(pixel_values).to(embeds.dtype)  # (B, N, D)
        return embeds.masked_scatter(is_image[..., None], features)

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for every position (the last ``logits_to_keep`` when > 0); loss with labels.

        input_ids, attention_mask, position_ids, labels: (B, T); pixel_values (B, 3, H, W)
        with exactly ``num_image_tokens`` placeholders per row, or None when the rows hold
        none (decoding steps after a cached prefill). Labels use -100 where no loss is taken
        and are shifted inside, as in every HF causal LM.
        """
        if cache is None:
            cache = past_key_values
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        text = self.language_model.model
        text_config = self.config.text_config
        past_length = cache.get_seq_length() if cache is not None else 0
        query_length = input_ids.shape[1]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]
            else:
                position_ids = torch.arange(
                    past_length, past_length + query_length, device=input_ids.device
                ).expand(input_ids.shape[0], -1)
        hidden = text.dropout(self._embed(input_ids, pixel_values))
        rotary = _rotary_cos_sin(
            position_ids, text_config.hidden_size // text_config.num_attention_heads,
            text_config.rope_theta, hidden.dtype,
        )
        if attention_mask is None and past_length > 0:
            attention_mask = torch.ones(input_ids.shape[0], past_length + query_length, device=input_ids.device)
        bias = _attention_bias(attention_mask, query_length, past_length) if attention_mask is not None else None
        for block in text.blocks:
            hidden = block(hidden, rotary, bias, cache if use_cache else None)
        hidden = text.final_norm(hidden)
        if logits_to_keep and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language_model.lm_head(hidden)  # (B, T', V)
        # The placeholder is input-only: never sampled, never a completion token.
        placeholder = torch.tensor([self.config.image_token_id], device=logits.device)
        logits = logits.index_fill(-1, placeholder, torch.finfo(logits.dtype).min)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position: call with logits_to_keep=0")
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


AutoConfig.register(MODEL_TYPE, TinyVLMConfig, exist_ok=True)
AutoModel.register(TinyVLMConfig, TinyVLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(TinyVLMConfig, TinyVLMForConditionalGeneration, exist_ok=True)
