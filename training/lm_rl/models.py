"""One entry point that gives the LM-RL pipelines a policy model and its tokenizer.

Why one function: the testbed (docs/papers/lm-rl.md) requires that a small transformer trained
from scratch here and any Hugging Face causal LM a user has on disk (e.g. SmolLM2-135M saved
with `save_pretrained`) go through the same code path. So `"tiny"` builds a fresh TinyLM with
the character tokenizer, and a checkpoint directory loads through `AutoModelForCausalLM` /
`AutoTokenizer` with no model-specific branches; TinyLM checkpoints load the same way because
`modeling_tiny` registers its classes with the Auto factories.

Either way the tokenizer comes back ready for batched generation: padding on the left and a
pad token set (to eos when the checkpoint has none, the usual choice for Llama-family LMs).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from training.lm_rl.modeling_tiny import TinyLMConfig, TinyLMForCausalLM
from training.lm_rl.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

TINY = "tiny"


class ModelLoadError(ValueError):
    """`load_policy_model` was given something that is not a usable causal-LM checkpoint."""


def _is_causal_lm_config(config: PretrainedConfig) -> bool:
    # The causal-LM Auto mapping also lists encoders that have an LM-head variant (BERT ->
    # BertLMHeadModel), usable only when the config says is_decoder; encoder-decoder models are
    # not decoder-only policies at all.
    return (
        type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
        and not config.is_encoder_decoder
        and getattr(config, "is_decoder", True) is not False
    )


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Generation appends on the right, so batched prompts must be left-padded.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tiny_model(seed: int = 0) -> tuple[TinyLMForCausalLM, PreTrainedTokenizerBase]:
    """A freshly initialised TinyLM (default `TinyLMConfig` sizes) and the character tokenizer.

    Initialisation is seeded inside a forked RNG so the caller's global torch RNG is untouched.
    """
    tokenizer = build_tokenizer()
    config = TinyLMConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyLMForCausalLM(config)
    return model, tokenizer


def load_policy_model(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for `"tiny"` (fresh, seeded by `seed`) or a local causal-LM directory.

    Raises ModelLoadError when `name_or_path` is not "tiny" and not a directory, has no
    config.json, its config is not a decoder-only causal LM, or its tokenizer cannot be loaded.
    Nothing is downloaded: only local directories are accepted.
    """
    if name_or_path == TINY:
        model, tokenizer = build_tiny_model(seed)
        model = model.to(dtype)
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            raise ModelLoadError(
                f"{name_or_path!r} is neither {TINY!r} nor a local checkpoint directory"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"no config.json in {path}; expected a save_pretrained directory")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read the config in {path}: {error}") from error
        if not _is_causal_lm_config(config):
            raise ModelLoadError(
                f"config in {path} (model_type {config.model_type!r}) is not a decoder-only "
                "causal LM architecture"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load a tokenizer from {path}: {error}") from error
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    tokenizer = _prepare_tokenizer(tokenizer)
    logger.info(
        "loaded policy %s: %s, %.2fM parameters",
        name_or_path,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model, tokenizer
