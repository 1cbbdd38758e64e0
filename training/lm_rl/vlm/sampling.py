"""Sampler glue for vision-language policies: prompts with images, a VLM RolloutContext and
held-out greedy accuracy.

Every method of ``training.lm_rl.methods`` handles a sample through its prompt token ids
(``ctx.encode_prompt(text)``, ``ctx.sample(prompt_ids, ...)``, ``batch.prompt_ids`` in the
trainer's log-prob pass). ``VisionPrompts`` keeps that contract for images:

- ``encode_prompt(text)``: ``[<image>] * num_image_tokens`` followed by the text prompt
  encoded exactly as for a text policy (``training.lm_rl.sft.encode_prompt``). The text holds
  the image reference line of the visual tasks (``training.lm_rl.vlm.tasks``), so the ids
  identify the image.
- ``pixel_values(prompt_ids)``: decodes each prompt's text, finds the reference, renders
  that image (or takes the problem registered for it) and runs the image processor; results
  are cached per reference.

``VLMRolloutContext`` is a ``RolloutContext`` whose ``sample`` passes those pixel values to
``rollout.generate`` and which adds ``teacher_forced_logprobs`` (``sequence_logprobs`` with
the images) for methods that re-score completions under another context.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.lm_rl.methods.base import RolloutContext
from training.lm_rl.rollout import Rollout, SamplingConfig, generate, sequence_logprobs
from training.lm_rl.sft import encode_prompt as encode_text_prompt
from training.lm_rl.tasks import Problem, get_task
from training.lm_rl.vlm.models import VLMParts
from training.lm_rl.vlm.tasks import (
    IMAGE_SIZE,
    ImageRef,
    VISUAL_TASKS,
    find_image_reference,
    image_reference,
    render_reference,
)

logger = logging.getLogger(__name__)

_CACHE_SIZE = 4096  # processed images kept per VisionPrompts (64x64x3 float32: 48 KiB each)


class VisionPrompts:
    """Prompt ids and pixel values for a VLM's tokenizer, image placeholder and image processor."""

    def __init__(self, tokenizer: Any, image_processor: Any, image_token_id: int, num_image_tokens: int) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        size = getattr(image_processor, "size", None) or {}
        height, width = size.get("height"), size.get("width")
        # Render at the processor's input size when it is square (sharper than resizing up).
        self.render_size = int(height) if height is not None and height == width else IMAGE_SIZE
        self._problems: dict[str, Problem] = {}
        self._pixels: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_parts(cls, parts: VLMParts) -> VisionPrompts:
        return cls(parts.tokenizer, parts.image_processor, parts.image_token_id, parts.num_image_tokens)

    # --- prompts ---------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """Image placeholders, then the text prompt as a text policy would see it."""
        if find_image_reference(text) is None:
            raise ValueError(
                "a VLM prompt must name its image with a reference line such as "
                f"{image_reference('shape_count', 1, 0)!r}; got {text[:80]!r}"
            )
        return [self.image_token_id] * self.num_image_tokens + encode_text_prompt(self.tokenizer, text)

    def register(self, problems: Sequence[Problem]) -> None:
        """Remember problems so their images render from ``meta["scene"]`` (hand-made scenes
        whose reference seed would render another scene)."""
        for problem in problems:
            ref = find_image_reference(problem.prompt)
            if ref is not None and "scene" in problem.meta:
                self._problems[image_reference(ref.task, ref.difficulty, ref.seed)] = problem

    # --- images ------------------------------------------------------------------------------
    def reference_of(self, prompt_ids: Sequence[int] | torch.Tensor) -> ImageRef:
        ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        count = sum(1 for token in ids if token == self.image_token_id)
        if count != self.num_image_tokens:
            raise ValueError(
                f"prompt holds {count} image placeholder tokens, expected {self.num_image_tokens}: "
                "encode VLM prompts with VisionPrompts.encode_prompt"
            )
        ref = find_image_reference(self.tokenizer.decode(ids, skip_special_tokens=True))
        if ref is None:
            raise ValueError("prompt has image placeholders but no image reference line in its text")
        return ref

    def image(self, ref: ImageRef) -> np.ndarray:
        """(H, W, 3) uint8 image of a reference at the processor's size."""
        key = image_reference(ref.task, ref.difficulty, ref.seed)
        problem = self._problems.get(key)
        if problem is not None:
            return VISUAL_TASKS[problem.task].render(problem, self.render_size)
        return render_reference(ref, self.render_size)

    def _processed(self, ref: ImageRef) -> torch.Tensor:
        key = image_reference(ref.task, ref.difficulty, ref.seed)
        cached = self._pixels.get(key)
        if cached is None:
            cached = self.image_processor(self.image(ref), return_tensors="pt")["pixel_values"][0]
            self._pixels[key] = cached
            if len(self._pixels) > _CACHE_SIZE:
                self._pixels.popitem(last=False)
        else:
            self._pixels.move_to_end(key)
        return cached

    def pixel_values(self, prompt_ids: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
        """(B, C, H, W) float32: the image each prompt names."""
        if not prompt_ids:
            raise ValueError("pixel_values needs at least one prompt")
        return torch.stack([self._processed(self.reference_of(ids)) for ids in prompt_ids])

    def pixel_values_for_problems(self, problems: Sequence[Problem]) -> torch.Tensor:
        """(B, C, H, W) float32 for problems (registered first, so hand-made scenes render right)."""
        self.register(problems)
        refs = []
        for problem in problems:
            ref = find_image_reference(problem.prompt)
            if ref is None:
                raise ValueError(f"{problem.task} problem has no image reference in its prompt")
            refs.append(ref)
        return torch.stack([self._processed(ref) for ref in refs])

    # --- policy plumbing ---------------------------------------------------------------------
    def context(self, **fields: Any) -> VLMRolloutContext:
        """A VLMRolloutContext over these prompts (fields as RolloutContext's, encode_prompt set)."""
        fields["encode_prompt"] = self.encode_prompt
        return VLMRolloutContext(vision=self, **fields)

    def save_pretrained(self, directory: Any) -> None:
        self.image_processor.save_pretrained(directory)


@dataclass
class VLMRolloutContext(RolloutContext):
    """RolloutContext of a vision-language policy: samples and scores with each prompt's image."""

    vision: VisionPrompts | None = None

    def sample(
        self,
        prompts: list[list[int]],
        num_samples_per_prompt: int,
        prefixes: list[list[int]] | None = None,
        max_new_tokens: int | None = None,
    ) -> Rollout:
        config = self.sampling
        if max_new_tokens is not None and max_new_tokens != config.max_new_tokens:
            config = SamplingConfig(
                max_new_tokens=max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                stop_strings=config.stop_strings, seed=config.seed,
            )
        return generate(
            self.model, self.tokenizer, prompts, config, num_samples_per_prompt=num_samples_per_prompt,
            prefixes=prefixes, generator=self.generator, pixel_values=self.vision.pixel_values(prompts),
        )

    def teacher_forced_logprobs(
        self, prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor, completion_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, T) untempered log-probs of completions after their prompts, images included."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return sequence_logprobs(
            self.model, prompt_ids, completion_ids, completion_mask, pad_id=pad_id,
            pixel_values=self.vision.pixel_values(prompt_ids),
        )


@torch.no_grad()
def vlm_greedy_accuracy(
    model: torch.nn.Module, vision: VisionPrompts, problems: Sequence[Problem], max_new_tokens: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Share of problems whose greedy completion the task verifier accepts: "eval/accuracy"
    and "eval/accuracy/<task>" (the keys of ``training.lm_rl.sft.greedy_accuracy``)."""
    was_training = model.training
    model.eval()
    vision.register(problems)
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(problems), batch_size):
        batch = list(problems[start : start + batch_size])
        prompts = [vision.encode_prompt(p.prompt) for p in batch]
        rollout = generate(model, vision.tokenizer, prompts, config, pixel_values=vision.pixel_values(prompts))
        for problem, text in zip(batch, rollout.texts):
            correct.setdefault(problem.task, []).append(get_task(problem.task).verify(problem, text))
    model.train(was_training)
    metrics = {f"eval/accuracy/{task}": sum(v) / len(v) for task, v in correct.items()}
    flat = [ok for values in correct.values() for ok in values]
    metrics["eval/accuracy"] = sum(flat) / max(len(flat), 1)
    return metrics
