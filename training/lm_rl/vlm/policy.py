"""The trainer's one call for a policy of either kind: a causal LM, or a VLM with its images.

``load_any_policy`` returns (model, tokenizer, vision): ``vision`` is None for a text policy
("tiny" or a causal-LM directory, through ``training.lm_rl.models.load_policy_model``) and a
``VisionPrompts`` (prompt ids with image placeholders, pixel values, the image processor) for
a VLM ("tiny-vlm" or a VLM directory, through ``training.lm_rl.vlm.models.load_vlm``). The
trainer branches on ``vision`` only where images enter: the rollout context, the log-prob
pass, evaluation, the warm start and what a checkpoint holds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.lm_rl.models import load_policy_model
from training.lm_rl.sft import save_atomically
from training.lm_rl.vlm.models import TINY_VLM, is_vlm_checkpoint, load_vlm
from training.lm_rl.vlm.sampling import VisionPrompts, vlm_greedy_accuracy
from training.lm_rl.vlm.sft import save_vlm_atomically, vlm_sft_warm_start
from training.lm_rl.vlm.tasks import is_visual_task

__all__ = [
    "TINY_VLM",
    "VisionPrompts",
    "check_model_for_task",
    "is_visual_task",
    "is_vlm_checkpoint",
    "load_any_policy",
    "save_policy_atomically",
    "vlm_greedy_accuracy",
    "vlm_sft_warm_start",
]


def load_any_policy(name_or_path: str, seed: int = 0) -> tuple[Any, Any, VisionPrompts | None]:
    """(model, tokenizer, vision) for a text policy (vision None) or a VLM (see module docstring)."""
    if is_vlm_checkpoint(name_or_path):
        parts = load_vlm(name_or_path, seed=seed)
        return parts.model, parts.tokenizer, VisionPrompts.from_parts(parts)
    model, tokenizer = load_policy_model(name_or_path, seed=seed)
    return model, tokenizer, None


def save_policy_atomically(
    model: torch.nn.Module, tokenizer: Any, vision: VisionPrompts | None, out_dir: str | os.PathLike
) -> Path:
    """save_pretrained a policy (and, for a VLM, its image processor) atomically."""
    if vision is None:
        return save_atomically(model, tokenizer, out_dir)
    return save_vlm_atomically(model, vision, out_dir)


def check_model_for_task(model: str, task: str) -> None:
    """Refuse a text model on a visual task and a VLM on a text task, naming both."""
    visual = is_visual_task(task)
    vlm = is_vlm_checkpoint(model)
    if visual and not vlm:
        raise ValueError(
            f"TrainConfig.task={task!r} is a visual task and needs a vision-language model; "
            f"got model={model!r} (use {TINY_VLM!r} or a local VLM directory)"
        )
    if vlm and not visual:
        raise ValueError(
            f"TrainConfig.model={model!r} is a vision-language model but task={task!r} has no images; "
            "use a visual task (shape_count, bar_compare, table_read)"
        )
