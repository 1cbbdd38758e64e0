"""One entry point that gives the VLM pipelines a model, its tokenizer and its image processor.

Like ``training.lm_rl.models.load_policy_model`` for text: ``"tiny-vlm"`` builds a fresh
TinyVLM (CNN patch encoder + projector + TinyLM) with the character tokenizer plus an
``<image>`` placeholder token and ``TinyVLMImageProcessor``; a directory loads through
``AutoConfig`` / ``AutoModelForImageTextToText`` / ``AutoTokenizer`` / ``AutoImageProcessor``
with no model-specific branch, so a checkpoint written here and a Hugging Face VLM a user has
on disk (model + tokenizer + image processor saved with ``save_pretrained``) take the same
path. What the pipelines need from such a model: a forward that takes ``input_ids`` holding
``num_image_tokens`` placeholder ids (``config.image_token_id``) plus ``pixel_values``, and a
KV cache argument (``cache`` or ``past_key_values``) — the LLaVA convention.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from training.lm_rl.modeling_tiny import TinyLMConfig
from training.lm_rl.models import ModelLoadError
from training.lm_rl.tokenizer import build_tokenizer
from training.lm_rl.vlm.modeling_vlm import MODEL_TYPE, TinyVLMConfig, TinyVLMForConditionalGeneration
from training.lm_rl.vlm.processing import TinyVLMImageProcessor

logger = logging.getLogger(__name__)

TINY_VLM = "tiny-vlm"
IMAGE_TOKEN = "<image>"


@dataclass
class VLMParts:
    """What a VLM policy is made of, besides its weights."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    image_token_id: int
    num_image_tokens: int


def image_token_layout(config: PretrainedConfig) -> tuple[int, int]:
    """(image_token_id, num_image_tokens) of a VLM config: ours, or LLaVA's names for them."""
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    count = getattr(config, "num_image_tokens", None) or getattr(config, "image_seq_length", None)
    if token_id is None or count is None:
        raise ModelLoadError(
            f"config of model_type {config.model_type!r} names no image placeholder: it needs "
            "image_token_id (or image_token_index) and num_image_tokens (or image_seq_length)"
        )
    return int(token_id), int(count)


def build_vlm_tokenizer() -> PreTrainedTokenizerBase:
    """The character tokenizer plus the ``<image>`` placeholder as a special token."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def build_tiny_vlm(seed: int = 0, image_size: int = 64, **vision: Any) -> VLMParts:
    """A freshly initialised TinyVLM with its tokenizer and image processor (seeded in a forked RNG)."""
    tokenizer = build_vlm_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = TinyLMConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = TinyVLMConfig(
        text_config=text_config, image_token_id=image_token_id, image_size=image_size,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **vision,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyVLMForConditionalGeneration(config)
    processor = TinyVLMImageProcessor(size={"height": image_size, "width": image_size})
    return VLMParts(model, tokenizer, processor, image_token_id, config.num_image_tokens)


def is_vlm_checkpoint(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is "tiny-vlm" or a directory whose config names a VLM (ours,
    or any config with a vision sub-config / an image placeholder id)."""
    if name_or_path == TINY_VLM:
        return True
    config_file = Path(name_or_path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    return raw.get("model_type") == MODEL_TYPE or any(
        key in raw for key in ("vision_config", "image_token_id", "image_token_index")
    )


def load_vlm(name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> VLMParts:
    """Model, tokenizer and image processor for "tiny-vlm" (fresh, seeded) or a local VLM directory.

    Raises ModelLoadError naming what is missing: not a directory, no config.json, a config
    without an image placeholder, or no tokenizer / image processor beside the weights.
    Nothing is downloaded: only local directories are accepted.
    """
    if name_or_path == TINY_VLM:
        parts = build_tiny_vlm(seed)
        parts.model = parts.model.to(dtype)
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            raise ModelLoadError(f"{name_or_path!r} is neither {TINY_VLM!r} nor a local VLM directory")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"no config.json in {path}; expected a save_pretrained directory")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read the config in {path}: {error}") from error
        image_token_id, num_image_tokens = image_token_layout(config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {error}") from error
        if not (path / "preprocessor_config.json").is_file():
            raise ModelLoadError(f"no preprocessor_config.json (image processor) in {path}")
        try:
            processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot load an image processor from {path}: {error}") from error
        model = AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dtype)
        parts = VLMParts(model, tokenizer, processor, image_token_id, num_image_tokens)
    tokenizer = parts.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    logger.info(
        "loaded VLM %s: %s, %.2fM parameters, %d image tokens",
        name_or_path, type(parts.model).__name__,
        sum(p.numel() for p in parts.model.parameters()) / 1e6, parts.num_image_tokens,
    )
    return parts


def save_vlm(parts: VLMParts, directory: str | Path) -> Path:
    """save_pretrained model, tokenizer and image processor into one (existing or new) directory."""
    target = Path(directory)
    parts.model.save_pretrained(target)
    parts.tokenizer.save_pretrained(target)
    parts.image_processor.save_pretrained(target)
    return target
